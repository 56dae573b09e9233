#!/usr/bin/env bash
# Soak benchmark (not a test): a single node, then a two-node cluster, each under
# CLIENTS concurrent clients for REQUESTS requests (`exo bench-soak`): plain and
# streamed completions and chats of 4-16 tokens, a tenth of the streams closed after
# their first event, a tenth of the requests malformed HTTP, and (cluster) random
# bytes and forged frames on both nodes' peer ports meanwhile. Per configuration it
# prints outcomes by kind, p50/p99 latency, each process's resident memory at start
# (after a warm-up), middle and end, and whether /metrics agrees with what was sent.
#   REQUESTS=10000 CLIENTS=8 ONLY=single|cluster ./scripts/soak.sh
# THREADS (default 1) is the single node's [engine] threads; cluster nodes take 1 each.
# On a shared, oversubscribed 2-core machine 2 threads ran 3-6x slower than 1 (the
# ggml threads wait on each other for cores taken by others).
# EXO=path soaks another build; KEEP=1 keeps the nodes' logs (else kept on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$PWD/models/gemma-3-270m-Q4_K_M.gguf
[ -f "$MODEL" ] || { echo "soak: no $MODEL (run ./scripts/setup.sh)" >&2; exit 1; }
[ -n "${EXO:-}" ] || cargo build --release -p exo
EXO=${EXO:-$PWD/target/release/exo}
REQUESTS=${REQUESTS:-10000}
CLIENTS=${CLIENTS:-8}
ONLY=${ONLY:-}
THREADS=${THREADS:-1}
work=$(mktemp -d)
pids=()
failed=0
cleanup() {
    for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
    if [ "$failed" -ne 0 ] || [ -n "${KEEP:-}" ]; then
        echo "soak: logs and configs kept in $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

. scripts/local-nodes.sh

wait_health() { # port name
    for _ in $(seq 1 480); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "soak: node $2 did not come up" >&2; tail -n 20 "$work/$2.log" >&2; failed=1; return 1
}

wait_ready() { # name: a worker has loaded and timed itself
    for _ in $(seq 1 480); do
        grep -q "worker $1 ready" "$work/$1.log" 2>/dev/null && return 0
        sleep 0.25
    done
    echo "soak: worker $1 did not come up" >&2; tail -n 20 "$work/$1.log" >&2; failed=1; return 1
}

# whether every pid given is still running; names the ones that are not
alive() {
    local ok=0
    for p in "$@"; do
        if ! kill -0 "$p" 2>/dev/null; then echo "soak: process $p is gone (crashed)" >&2; ok=1; fi
    done
    return $ok
}

soak() { # label, then --node arguments
    local label=$1; shift
    local t0 t1
    echo
    echo "== $label: $REQUESTS requests, $CLIENTS clients; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores =="
    t0=$(date +%s)
    if ! "$EXO" bench-soak --requests "$REQUESTS" --clients "$CLIENTS" "$@"; then failed=1; fi
    t1=$(date +%s)
    echo "wall time $((t1 - t0)) s (with the warm-up); load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# Ports are picked right before each configuration starts: the soak's own
# connections take ephemeral ports, and one picked earlier may be in use by then.
if [ "$ONLY" != cluster ]; then
    read -r HTTP_1 < <(free_ports http)
    cat > "$work/one.toml" <<EOF
[model]
path = "$MODEL"
[api]
listen = "127.0.0.1:$HTTP_1"
[engine]
threads = $THREADS
ctx = 1024
max_slots = 8
EOF
    "$EXO" serve --config "$work/one.toml" 2> "$work/one.log" & pids+=($!)
    one=$!
    wait_health "$HTTP_1" one
    soak "single node ($THREADS threads)" --node "one,$one,127.0.0.1:$HTTP_1"
    alive "$one" || failed=1
    kill "$one"; wait "$one" 2>/dev/null || true
    echo "node log: $(grep -c ' WARN ' "$work/one.log" || true) warnings, $(grep -c ' ERROR ' "$work/one.log" || true) errors"
fi

if [ "$ONLY" != single ]; then
    read -r HTTP_A HTTP_B DATA_A DATA_B < <(free_ports http http data data)
    key="soak-cluster-secret-$(date +%s%N)"
    pair_config "$work/a.toml" a "$HTTP_A" "$DATA_A" "$DATA_A" "$DATA_B" "$key" "$MODEL" "max_slots = 8"
    pair_config "$work/b.toml" b "$HTTP_B" "$DATA_B" "$DATA_A" "$DATA_B" "$key" "$MODEL" "max_slots = 8"
    "$EXO" serve --config "$work/b.toml" 2> "$work/b.log" & pids+=($!)
    b=$!
    wait_ready b
    "$EXO" serve --config "$work/a.toml" 2> "$work/a.log" & pids+=($!)
    a=$!
    wait_health "$HTTP_A" a
    grep -hE "cluster formed" "$work/a.log" | sed -E "s/^.*(cluster formed)/\1/" || true
    soak "two-node cluster (head a, worker b; garbage on both nodes' peer ports)" \
        --node "a,$a,127.0.0.1:$HTTP_A,127.0.0.1:$DATA_A" \
        --node "b,$b,127.0.0.1:$HTTP_B,127.0.0.1:$DATA_B"
    alive "$a" "$b" || failed=1
    for n in a b; do
        echo "node $n log: $(grep -c ' WARN ' "$work/$n.log" || true) warnings, $(grep -c ' ERROR ' "$work/$n.log" || true) errors"
    done
fi
exit $failed
