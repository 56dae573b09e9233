#!/usr/bin/env bash
# exo against llama.cpp (same binary, same ggml, same threads), interleaved runs,
# medians and ratios: prefill of 512 tokens and decode of 128, at 1 and 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p exo
for t in 1 2; do
    ./target/release/exo bench --model models/gemma-3-270m-Q4_K_M.gguf --threads "$t" --reps "${REPS:-5}"
done
