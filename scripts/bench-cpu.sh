#!/usr/bin/env bash
# moac against llama.cpp on the CPU (issue 23's side-by-side benchmark): the same GGUF,
# prompt tokens and thread count, interleaved runs; prints a table of ratios.
# llama.cpp comes pinned from PyPI (llama-cpp-python, built from source for this CPU,
# CPU only) into target/bench-llamacpp, once. Not a test: it takes minutes.
#
#   scripts/bench-cpu.sh [--contexts 1024,4096,8000] [--threads N] [--rounds 2]
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON=0.3.36
VENV=target/bench-llamacpp
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
scripts/setup-model.sh >/dev/null
if ! [ -f "$VENV/built-$LLAMA_CPP_PYTHON" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy
  # This CPU's vector extensions, spelled out: GGML_NATIVE also compiles in AMX, whose
  # matmul crashes (SIGSEGV in ggml_backend_amx_mul_mat) on these virtual machines.
  flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  if grep -q avx512f /proc/cpuinfo; then
    flags="$flags -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF" \
    "$VENV/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
  touch "$VENV/built-$LLAMA_CPP_PYTHON"
fi
cargo build -q --release -p moac-cli
text=target/bench-cpu-text.txt
cat /usr/share/common-licenses/{GPL-3,GPL-2,LGPL-2.1,Apache-2.0,MPL-2.0} > "$text"
plan=target/bench-cpu-u50.json
target/release/moac plan uniform --config "$MODEL" --alpha 0 --beta 0.5 -o "$plan" >/dev/null
"$VENV/bin/python" scripts/bench_cpu.py --model "$MODEL" --plan "$plan" --text "$text" "$@"
