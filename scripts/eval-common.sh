# Sourced by the eval scripts: builds moac, installs the model, and sets $moac, $model,
# $out (created; the caller sets EVAL_OUT), $weights and $text (the held-out prose: the
# license texts Debian ships, unless EVAL_TEXT names a file).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup-model.sh
cargo build --release -q -p moac-cli
moac="$root/target/release/moac"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$root/target/$EVAL_OUT"
mkdir -p "$out"
weights="${EVAL_WEIGHTS:-q8}"
text="${EVAL_TEXT:-$out/licenses.txt}"
if [ -z "${EVAL_TEXT:-}" ]; then
  cat /usr/share/common-licenses/{GPL-3,GPL-2,LGPL-2.1,MPL-2.0,Apache-2.0,GFDL-1.3} > "$text"
fi
# Perplexity of $text in one window: ppl CONTEXT MODE ATTENTION... (JSON line).
ppl() { # ppl CONTEXT MODE ATTENTION...
  local ctx=$1 mode=$2
  shift 2
  "$moac" eval perplexity --model "$model" --weights "$weights" --text-file "$text" \
    --context-len "$ctx" --mode "$mode" --max-windows 1 --json "$@"
}
