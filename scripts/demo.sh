#!/usr/bin/env bash
# Set-up, build, then a local two-node exo cluster (two `exo serve` processes on
# 127.0.0.1, Gemma 3 270M split between them) answering one completion:
#   ./scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p exo
EXO=$PWD/target/release/exo
MODEL=$PWD/models/gemma-3-270m-Q4_K_M.gguf
prompt=${1:-"The three primary colours are"}
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

. scripts/local-nodes.sh
# free ports: HTTP for each node, and a data port (control = data + 1) for each
read -r HTTP_A HTTP_B DATA_A DATA_B < <(free_ports http http data data)
key="demo-cluster-secret-$(date +%s)"
pair_config "$work/a.toml" a "$HTTP_A" "$DATA_A" "$DATA_A" "$DATA_B" "$key" "$MODEL"
pair_config "$work/b.toml" b "$HTTP_B" "$DATA_B" "$DATA_A" "$DATA_B" "$key" "$MODEL"
"$EXO" serve --config "$work/b.toml" 2> "$work/b.log" & pids+=($!)
"$EXO" serve --config "$work/a.toml" 2> "$work/a.log" & pids+=($!)
for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$HTTP_A/health" >/dev/null && break
    sleep 0.25
done
"$EXO" status --config "$work/a.toml"
echo
body=$(python3 -c 'import json,sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": 48, "temperature": 0}))' "$prompt")
curl -s "http://127.0.0.1:$HTTP_A/v1/completions" -H 'Content-Type: application/json' -d "$body" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(sys.argv[1] + r["choices"][0]["text"])' "$prompt"
