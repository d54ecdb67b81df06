#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need (NVRTC into a
# project-local venv, the SmolLM2-135M GGUF into models/, the calibration text into
# models/text/), then format, lint and the whole Rust test suite (which compiles
# every kernel with NVRTC, runs them on emu, and runs the emulation header's own tests).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup-nvrtc.sh
bash scripts/setup-model.sh
bash scripts/setup-calib-text.sh
# Tests that need NVRTC or the model must not skip silently here.
export MOAC_REQUIRE_NVRTC=1
export MOAC_REQUIRE_MODEL=1
# Keep compile and emu caches inside the checkout (fresh in CI, reused locally).
export MOAC_CACHE_DIR="${MOAC_CACHE_DIR:-$root/target/moac-cache}"
cargo fmt --all -- --check
# Default members: the decode benchmark (runtime/model/bench, candle-transformers) is
# built only to benchmark.
cargo clippy --all-targets -- -D warnings
cargo test
# The example model runs end to end on the cpu and emu backends (a short run).
cargo run -q -p moac-runtime --example tiny_llama -- --backend cpu --prompt-len 512 --steps 40
cargo run -q -p moac-runtime --example tiny_llama -- --backend emu --prompt-len 512 --steps 40
