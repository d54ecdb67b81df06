#!/usr/bin/env bash
# Installs cuBLAS 13.0 (the GEMMs of the device engine on cuda) from PyPI into the
# project-local venv at .venv, idempotently, beside NVRTC. moac finds it there by itself;
# a CUDA toolkit's own (CUDA_HOME, /usr/local/cuda) or MOAC_CUBLAS_DIR (a folder holding
# libcublas.so.13 and libcublasLt.so.13) serve too. Only `--engine device --backend cuda`
# and `moac bench decode` need it; the tests do not (emu does its GEMMs on the CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.moac-cublas-13.0"
if [ -f "$stamp" ]; then
  exit 0
fi
bash "$root/scripts/setup-nvrtc.sh"
# The wheel is about 420 MB; --no-deps: its only dependency is the runtime NVRTC's
# setup already installed.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  nvidia-cublas==13.0.0.19
lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1)
if [ -z "$lib" ] || [ ! -e "$lib/libcublas.so.13" ] || [ ! -e "$lib/libcublasLt.so.13" ]; then
  echo "setup-cublas: libcublas.so.13 not found after install" >&2
  exit 1
fi
touch "$stamp"
echo "setup-cublas: cuBLAS 13.0 installed in $venv"
