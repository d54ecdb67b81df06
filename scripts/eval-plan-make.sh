#!/usr/bin/env bash
# The measurements behind EVAL.md's "plans made by moac" section (not part of the tests;
# about an hour on 2 cores): `moac plan make` for SmolLM2-135M at density 0.5 (timed per
# stage), then the made plan against the uniform plan of the same density (alpha 0,
# beta 0.5) and dense: perplexity of held-out text (the license texts of
# scripts/eval-smollm2.sh, not in the calibration set) at 2k/4k/8k in both scoring modes,
# and pass-key retrieval at 1k-4k. Results go to target/eval-made/.
set -euo pipefail
EVAL_OUT=eval-made
# shellcheck source=scripts/eval-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/eval-common.sh"
made="${MADE_PLAN:-$out/made50.json}"
if [ ! -f "$made" ]; then
  { time "$moac" plan make --model "$model" --density 0.5 -o "$made"; } 2>&1 | tee "$out/plan-make.log"
fi
"$moac" plan uniform --config "$model" --alpha 0 --beta 0.5 -o "$out/uniform50.moac.json"
{
  for ctx in ${EVAL_CONTEXTS:-2048 4096 8192}; do
    for mode in ${EVAL_MODES:-prefill decode}; do
      ppl "$ctx" "$mode" --dense
      ppl "$ctx" "$mode" --plan "$out/uniform50.moac.json"
      ppl "$ctx" "$mode" --plan "$made"
    done
  done
} | tee -a "$out/perplexity.jsonl"
"$moac" eval retrieval --model "$model" --weights "$weights" --plan "$out/uniform50.moac.json" \
  --plan "$made" --task passkey --lengths "${EVAL_LENGTHS:-1024,2048,4096}" \
  --samples "${EVAL_SAMPLES:-4}" --seed 1 --svg "$out/retrieval-passkey.svg" \
  | tee "$out/retrieval-passkey.txt"
