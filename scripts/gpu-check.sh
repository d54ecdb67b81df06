#!/usr/bin/env bash
# The one script to run on a GPU machine (sized for an H200 with 16 cores, ~8 minutes):
# NVRTC setup, a release build, `moac compile` of every example plan for sm_90,
# `moac verify --backend cuda` (two layers of every plan, f16 and bf16, plus one larger
# prompt), the decode benchmark (moac vs dense), then a short `moac tune --backend cuda`
# (best configuration against the heuristic) and a compile with its database, then
# SmolLM2-135M with attention on cuda against cpu (generate, both perplexity modes,
# retrieval). Stops at the first failure with
# the step's name; prints a summary and the benchmark table last.
# Logs and artifacts go to target/gpu-check/ (and are copied to $OUT when it is set).
# On a machine without network or Rust (the lent GPU machines): build the release
# binaries elsewhere and bring target/release/moac and target/release/moac-gpu-bench;
# NVRTC then comes from the CUDA toolkit there.
#
# The device engine (issue 14) comes first: the whole model on the GPU (cuBLAS from the
# CUDA toolkit there, or scripts/setup-cublas.sh's wheel) against the host runner on the
# same random weights (`generate --engine device --check`, a tiny config and the
# Llama-3.2-1B shape), then `moac bench decode` for the Llama-3.2-1B and Llama-3-8B
# shapes with their MoA plans beside dense. `--engine-only` stops after that.
set -euo pipefail
engine_only=0
if [ "${1:-}" = "--engine-only" ]; then
  engine_only=1
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi finds none); run this on a GPU machine"
  exit 1
fi
work="$root/target/gpu-check"
rm -rf "$work"
mkdir -p "$work/artifacts" "$work/logs"
# The compile cache is shared by `moac compile`, verify and the benchmark.
export MOAC_CACHE_DIR="${MOAC_CACHE_DIR:-$root/target/moac-cache}"
export MOAC_EMU_CACHE="${MOAC_EMU_CACHE:-$MOAC_CACHE_DIR/emu}"
arch=sm_90
seed=1
summary=()
start_all=$SECONDS

finish() {
  local rc=$?
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp -r "$work/logs" "$OUT/gpu-check-logs" 2>/dev/null || true
  fi
  exit "$rc"
}
trap finish EXIT

# step NAME CMD...: runs CMD with its output shown and logged; stops everything on failure.
soft=0
soft_failed=0
step() {
  local name="$1"
  shift
  local log="$work/logs/$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
  local t0=$SECONDS
  echo "=== $name"
  set +e
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  local dt=$((SECONDS - t0))
  if [ "$rc" -ne 0 ] && [ "$soft" = 1 ]; then
    # A soft step (the engine's, before the rest) records its failure and goes on.
    echo "gpu-check: step \"$name\" FAILED (exit $rc, ${dt}s); log: $log; continuing"
    summary+=("FAIL  ${dt}s  $name")
    soft_failed=1
    return 0
  fi
  if [ "$rc" -ne 0 ]; then
    echo
    echo "gpu-check: FAILED at step \"$name\" (exit $rc, ${dt}s); log: $log"
    for line in "${summary[@]}"; do echo "  $line"; done
    echo "  FAIL  ${dt}s  $name"
    exit 1
  fi
  summary+=("ok    ${dt}s  $name")
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader

# NVRTC: the project's venv where pip can reach PyPI; a CUDA toolkit's own NVRTC
# (CUDA_HOME or /usr/local/cuda, which moac also searches) on a machine without network.
cuda_root="${CUDA_HOME:-/usr/local/cuda}"
if [ -e "$root/.venv/.moac-nvrtc-13.0" ] || [ ! -e "$cuda_root/lib64/libnvrtc.so.13" ]; then
  step "setup-nvrtc" bash scripts/setup-nvrtc.sh
else
  echo "=== NVRTC from $cuda_root (no venv setup)"
fi
moac="$root/target/release/moac"
bench="$root/target/release/moac-gpu-bench"
# Build where cargo exists; a GPU machine without Rust runs release binaries built
# elsewhere (x86-64 Linux) and carried into target/release/.
if command -v cargo >/dev/null 2>&1; then
  step "cargo build --release" cargo build --release
elif [ -x "$moac" ] && [ -x "$bench" ]; then
  echo "=== no cargo here: using the prebuilt $moac and $bench"
else
  echo "gpu-check: no cargo on this machine and no prebuilt target/release/moac and moac-gpu-bench;"
  echo "  build them with 'cargo build --release' on a machine with Rust and carry both files"
  exit 1
fi

# ---- the device engine ---------------------------------------------------------------
# In a full run its failures (say, no cuBLAS on the machine) do not stop the older checks.
if [ "$engine_only" = 0 ]; then
  soft=1
fi
ids() { # ids N OFFSET: N comma-separated token ids below 500
  local n=$1 off=$2 out="" i
  for ((i = 0; i < n; i++)); do out+="${out:+,}$(((i * 37 + off) % 500))"; done
  echo "$out"
}
tiny="tests/fixtures/tiny-llama/config.json"
step "plan uniform (tiny)" "$moac" plan uniform --config "$tiny" --alpha 64 --beta 0.2 \
  -o "$work/tiny-plan.json"
for dt in f16 bf16; do
  step "engine check cuda tiny $dt" "$moac" generate --shape "$tiny" --seed "$seed" \
    --plan "$work/tiny-plan.json" --prompt-tokens "$(ids 300 3)" --prompt-tokens "$(ids 40 11)" \
    --prompt-tokens 5,6,7 --max-new-tokens 100 --engine device --backend cuda --dtype "$dt" --check
done
small="examples/plans/meta-llama--Llama-3.2-1B-Instruct"
large="examples/plans/gradientai--Llama-3-8B-Instruct-262k"
step "bench decode Llama-3.2-1B" "$moac" bench decode --shape "$small/config.json" \
  --plan "$small/moa_alpha_beta.json" --batch 1,8,32,64 --context 4096,16384,65536
step "bench decode Llama-3-8B" "$moac" bench decode --shape "$large/config.json" \
  --plan "$large/moa_alpha_beta.json" --batch 1,8,32,64 --context 4096,16384,65536
step "engine check cuda Llama-3.2-1B shape f16 (MoA plan)" "$moac" generate \
  --shape "$small/config.json" --seed "$seed" --plan "$small/moa_alpha_beta.json" \
  --prompt-tokens "$(ids 400 5)" --prompt-tokens "$(ids 70 9)" --max-new-tokens 8 \
  --engine device --backend cuda --dtype f16 --check
soft=0
if [ "$engine_only" = 1 ]; then
  echo
  echo "gpu-check (engine only): all steps passed in $((SECONDS - start_all))s"
  for line in "${summary[@]}"; do echo "  $line"; done
  for f in "$work"/logs/bench_decode_*.log; do if [ -f "$f" ]; then echo; cat "$f"; fi; done
  exit 0
fi

plans=()
for d in examples/plans/*/; do
  d="${d%/}"
  if [ -f "$d/moa_alpha_beta.json" ] && [ -f "$d/config.json" ]; then
    plans+=("$d")
  fi
done
if [ "${#plans[@]}" -eq 0 ]; then
  echo "gpu-check: no example plans under examples/plans"
  exit 1
fi

for d in "${plans[@]}"; do
  name="$(basename "$d")"
  step "compile $name ($arch)" "$moac" compile "$d/moa_alpha_beta.json" --config "$d/config.json" \
    --arch "$arch" -o "$work/artifacts/$name"
done

# Two layers (the first and the last, the default) of every plan, both dtypes: f16 from
# the compiled artifacts (their CUBINs), bf16 from the plans (NVRTC at run time).
for d in "${plans[@]}"; do
  name="$(basename "$d")"
  step "verify cuda $name f16 (artifact CUBIN)" "$moac" verify "$work/artifacts/$name" \
    --backend cuda --seed "$seed"
  step "verify cuda $name bf16" "$moac" verify "$d/moa_alpha_beta.json" --config "$d/config.json" \
    --backend cuda --dtype bf16 --seed "$seed"
done

# A larger, ragged prompt with enough steps to wrap the rings, on the smallest model.
big="examples/plans/meta-llama--Llama-3.2-1B-Instruct"
if [ -d "$big" ]; then
  step "verify cuda $(basename "$big") f16 P=2000,1500,64" "$moac" verify "$big/moa_alpha_beta.json" \
    --config "$big/config.json" --backend cuda --dtype f16 --seed "$seed" \
    --prompt-lens 2000,1500,64 --max-new-tokens 300 --steps 200
fi

step "moac-gpu-bench" "$bench" --artifacts "$work/artifacts"

# A short tuning run: layer 0 of the smallest model, decode and fill, on the GPU; it
# prints the best configuration's time and GB/s next to the default heuristic's.
if [ -d "$big" ]; then
  step "moac tune cuda $(basename "$big") layer 0" "$moac" tune "$big/moa_alpha_beta.json" \
    --config "$big/config.json" --backend cuda --arch "$arch" --layers 0 --kinds decode,fill \
    --prompt-len 4096 --batch 1 --repeats 20 --db "$work/tuning.json"
  step "compile with the tuning database" "$moac" compile "$big/moa_alpha_beta.json" \
    --config "$big/config.json" --arch "$arch" --layers 0 --tuning "$work/tuning.json" \
    -o "$work/artifacts-tuned"
fi

# The real model (SmolLM2-135M) with attention on cuda against cpu: generate (greedy,
# top log-probabilities compared numerically), perplexity in both modes, retrieval.
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$model" ] || bash scripts/setup-model.sh; then
  step "plan uniform 50%" "$moac" plan uniform --config "$model" --alpha 0 --beta 0.5 \
    -o "$work/uniform50.moac.json"
  for be in cpu cuda; do
    step "generate $be" "$moac" generate --model "$model" --plan "$work/uniform50.moac.json" \
      --backend "$be" --chat --prompt "What is the capital of France?" --json --top-logprobs 5
    cp "$work/logs/generate_$be.log" "$work/generate-$be.json"
    step "perplexity prefill $be" "$moac" eval perplexity --model "$model" \
      --plan "$work/uniform50.moac.json" --backend "$be" --text-file tests/fixtures/text/lighthouses.txt \
      --context-len 512 --mode prefill --json
    step "perplexity decode $be" "$moac" eval perplexity --model "$model" \
      --plan "$work/uniform50.moac.json" --backend "$be" --text-file tests/fixtures/text/lighthouses.txt \
      --context-len 512 --mode decode --json
  done
  step "retrieval passkey cuda" "$moac" eval retrieval --model "$model" \
    --plan "$work/uniform50.moac.json" --backend cuda --task passkey --lengths 1024,2048 \
    --samples 4 --seed 1 --svg "$work/retrieval.svg"
  # cuda and cpu must pick the same tokens and agree on their log-probabilities.
  step "generate cuda vs cpu" python3 - "$work/generate-cpu.json" "$work/generate-cuda.json" <<'PY'
import json, sys
a, b = (json.loads([l for l in open(p) if l.startswith("{")][-1]) for p in sys.argv[1:3])
assert a["tokens"] == b["tokens"], (a["tokens"], b["tokens"])
d = max(abs(x[1] - y[1]) for sa, sb in zip(a["top_logprobs"], b["top_logprobs"]) for x, y in zip(sa, sb))
print(f"same {len(a['tokens'])} tokens; max |logprob diff| {d:.4f}")
assert d < 0.05, d
PY
fi

echo
if [ "$soft_failed" = 1 ]; then
  echo "gpu-check: the device engine's steps FAILED (see FAIL below); the rest passed in $((SECONDS - start_all))s"
else
  echo "gpu-check: all steps passed in $((SECONDS - start_all))s"
fi
for line in "${summary[@]}"; do echo "  $line"; done
echo
for f in "$work"/logs/bench_decode_*.log; do if [ -f "$f" ]; then echo; cat "$f"; fi; done
echo
echo "decode benchmark (moac vs dense, per step of all layers):"
# The benchmark's table: everything after its last blank line.
awk 'BEGIN{RS=""} {last=$0} END{print last}' "$work/logs/moac-gpu-bench.log"
tune_log="$(ls "$work"/logs/moac_tune_cuda_*.log 2>/dev/null | head -n 1)"
if [ -n "$tune_log" ]; then
  echo
  echo "tuning (best vs heuristic):"
  grep -E "best .* heuristic" "$tune_log" || true
fi
if [ "$soft_failed" = 1 ]; then
  exit 1
fi
