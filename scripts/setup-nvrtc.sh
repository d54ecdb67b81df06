#!/usr/bin/env bash
# Installs NVRTC 13.0 (and the CUDA headers it needs) from PyPI into a project-local
# Python venv at .venv, idempotently. moac finds it there by itself; MOAC_NVRTC_DIR
# (a folder holding libnvrtc.so.13 and include/) overrides.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.moac-nvrtc-13.0"
if [ -f "$stamp" ]; then
  exit 0
fi
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
# ptxas, for inspecting CUBINs by hand; moac itself does not need it.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps nvidia-cuda-nvcc==13.0.88
lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1)
if [ -z "$lib" ] || [ ! -e "$lib/libnvrtc.so.13" ]; then
  echo "setup-nvrtc: libnvrtc.so.13 not found after install" >&2
  exit 1
fi
touch "$stamp"
echo "setup-nvrtc: NVRTC 13.0 installed in $venv"
