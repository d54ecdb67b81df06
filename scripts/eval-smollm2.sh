#!/usr/bin/env bash
# The measurements behind EVAL.md (not part of the tests; about an hour on 2 cores):
# SmolLM2-135M dense against uniform plans of 25%, 50% and 75% density, perplexity in
# both modes and pass-key retrieval, on the cpu backend. The perplexity text is the
# license texts Debian ships in /usr/share/common-licenses (plain English prose, ~30k
# tokens); pass EVAL_TEXT=FILE for another. Results go to target/eval/.
set -euo pipefail
EVAL_OUT=eval
# shellcheck source=scripts/eval-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/eval-common.sh"
plans=()
for pct in 25 50 75; do
  beta=$(printf '0.%s' "$pct")
  "$moac" plan uniform --config "$model" --alpha 0 --beta "$beta" -o "$out/uniform$pct.moac.json"
  plans+=("$out/uniform$pct.moac.json")
done
ppl() { # ppl CONTEXT MODE ATTENTION...
  local ctx=$1 mode=$2
  shift 2
  "$moac" eval perplexity --model "$model" --weights "$weights" --text-file "$text" \
    --context-len "$ctx" --mode "$mode" --max-windows "${EVAL_WINDOWS:-1}" --json "$@"
}
{
  for ctx in ${EVAL_CONTEXTS:-1024 2048 4096 8192}; do
    for mode in prefill decode; do
      ppl "$ctx" "$mode" --dense
      for p in "${plans[@]}"; do ppl "$ctx" "$mode" --plan "$p"; done
    done
  done
} | tee "$out/perplexity.jsonl"
plan_args=()
for p in "${plans[@]}"; do plan_args+=(--plan "$p"); done
"$moac" eval retrieval --model "$model" --weights "$weights" "${plan_args[@]}" --task passkey \
  --lengths "${EVAL_LENGTHS:-1024,2048,4096}" --samples "${EVAL_SAMPLES:-4}" --seed 1 \
  --svg "$out/retrieval-passkey.svg" | tee "$out/retrieval-passkey.txt"
