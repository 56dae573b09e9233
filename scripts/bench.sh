#!/usr/bin/env bash
# exo against llama.cpp (same binary, same ggml, same threads), interleaved runs,
# medians and ratios: prefill of 512 tokens and decode of 128, at 1 and 2 threads.
# Then exo's prefetching matrix products against ggml's own kernels on one core
# (a Gemma-head-sized Q8_0 matrix and a Q5_0 one of the same shape, 1 to 8 tokens),
# and the per-column products of batch-invariant decoding against ggml's batched ones.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p exo -p ggml-shim --example qmatmul --example columns
for t in 1 2; do
    ./target/release/exo bench --model models/gemma-3-270m-Q4_K_M.gguf --threads "$t" --reps "${REPS:-5}"
done
for w in q8_0 q5_0; do
    taskset -c 0 ./target/release/examples/qmatmul "$w" 262144 "${REPS:-5}"
done
./target/release/examples/columns 2 "${REPS:-5}"
