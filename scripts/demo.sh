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

# free ports: HTTP for each node, and a data port (control = data + 1) for each
read -r HTTP_A HTTP_B DATA_A DATA_B < <(python3 - <<'PY'
import socket
def free(pair=False):
    while True:
        s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
        if not pair: return p
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 1)); t.close(); return p
        except OSError:
            t.close()
print(free(), free(), free(True), free(True))
PY
)
for n in a b; do
    if [ $n = a ]; then http=$HTTP_A; data=$DATA_A; else http=$HTTP_B; data=$DATA_B; fi
    cat > "$work/$n.toml" <<TOML
[node]
name = "$n"
listen = "tcp://127.0.0.1:$data"
[model]
path = "$MODEL"
[api]
listen = "127.0.0.1:$http"
[engine]
threads = 1
ctx = 1024
[cluster]
key = "demo-cluster-secret-$(date +%s)"
activations = "f32"
[[peer]]
name = "a"
address = "tcp://127.0.0.1:$DATA_A"
[[peer]]
name = "b"
address = "tcp://127.0.0.1:$DATA_B"
TOML
done
# the same key on both nodes
sed -i "s/^key = .*/$(grep '^key' "$work/a.toml")/" "$work/b.toml"
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
