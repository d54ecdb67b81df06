#!/usr/bin/env bash
# The measurements behind EVAL.md's "plans against the uniform window" section (issue
# 22; not part of the tests; hours on 2 cores): `moac plan make` for SmolLM2-135M at
# densities 0.5 and 0.25 with the default calibration mix (one work folder: the
# calibration set and the profile are made once), then each made plan against the
# uniform plan of the same density (alpha 0, beta = density) and dense, on data the
# pipeline never saw:
# - pass-key retrieval at 1k/2k/3k, five depths 0.1..0.9, EVAL_SEEDS (4) prompts each
#   (seed 11), and at 2k again with EVAL_SEEDS_2K (8) prompts per depth (seed 23);
# - LongEval lines at 1k/2k, EVAL_LINES (20) prompts each;
# - perplexity of the license texts at 2k/4k/8k, prefill and decode scoring;
# - the retrieval heads (`moac eval heads`) and the spans each plan gives them.
# Results go to target/eval-quality/. EVAL_DENSITIES, EVAL_CONTEXTS, EVAL_MODES,
# EVAL_PASSKEY_LENGTHS, EVAL_LINES_LENGTHS narrow it; MAKE_ARGS adds plan make flags.
set -euo pipefail
EVAL_OUT=eval-quality
# The model's default weights (the file's blocks), as a user runs it.
EVAL_WEIGHTS="${EVAL_WEIGHTS:-auto}"
# shellcheck source=scripts/eval-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/eval-common.sh"
bash scripts/setup-calib-text.sh
work="$out/work"
for d in ${EVAL_DENSITIES:-0.5 0.25}; do
  made="$out/made-$d.json"
  if [ ! -f "$made" ]; then
    # shellcheck disable=SC2086
    { time "$moac" plan make --model "$model" --density "$d" --work-dir "$work" --keep-parts ${MAKE_ARGS:-} -o "$made"; } \
      2>&1 | tee "$out/plan-make-$d.log"
    cp -r "$work/plans" "$out/plans-$d"
  fi
  "$moac" plan uniform --config "$model" --alpha 0 --beta "$d" -o "$out/uniform-$d.moac.json"
done
plans=()
for d in ${EVAL_DENSITIES:-0.5 0.25}; do
  plans+=(--plan "$out/uniform-$d.moac.json" --plan "$out/made-$d.json")
done
# Which heads retrieve (on the calibration's true-answer samples) and the spans each
# plan gives them.
"$moac" eval heads --model "$model" --calib "$work/calib.jsonl" "${plans[@]}" --top 30 \
  -o "$out/heads.json" | tee "$out/heads.txt"
"$moac" eval retrieval --model "$model" --weights "$weights" "${plans[@]}" --task passkey \
  --lengths "${EVAL_PASSKEY_LENGTHS:-1024,2048,3072}" --depths 0.1,0.3,0.5,0.7,0.9 \
  --samples "${EVAL_SEEDS:-4}" --seed 11 --svg "$out/passkey.svg" | tee "$out/passkey.txt"
"$moac" eval retrieval --model "$model" --weights "$weights" "${plans[@]}" --task passkey \
  --lengths 2048 --depths 0.1,0.3,0.5,0.7,0.9 --samples "${EVAL_SEEDS_2K:-8}" --seed 23 \
  | tee "$out/passkey-2k.txt"
"$moac" eval retrieval --model "$model" --weights "$weights" "${plans[@]}" --task lines \
  --lengths "${EVAL_LINES_LENGTHS:-1024,2048}" --samples "${EVAL_LINES:-20}" --seed 12 \
  --svg "$out/lines.svg" | tee "$out/lines.txt"
{
  for ctx in ${EVAL_CONTEXTS:-2048 4096 8192}; do
    for mode in ${EVAL_MODES:-prefill decode}; do
      ppl "$ctx" "$mode" --dense
      for d in ${EVAL_DENSITIES:-0.5 0.25}; do
        ppl "$ctx" "$mode" --plan "$out/uniform-$d.moac.json"
        ppl "$ctx" "$mode" --plan "$out/made-$d.json"
      done
    done
  done
} | tee "$out/perplexity.jsonl"
