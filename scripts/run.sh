#!/usr/bin/env bash
# Set-up, build, and a completion from the real model (Gemma 3 270M Q4_K_M):
#   ./scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p exo
prompt=${1:-"The three primary colours are"}
exec ./target/release/exo run --model models/gemma-3-270m-Q4_K_M.gguf --temp 0 -n 48 --verbose --prompt "$prompt"
