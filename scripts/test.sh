#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need (NVRTC into a
# project-local venv), then format, lint and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup-nvrtc.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
