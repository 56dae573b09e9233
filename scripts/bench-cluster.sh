#!/usr/bin/env bash
# Cluster benchmark on one machine (not a test): Gemma 3 270M,
#  (a) single-stream decode: 2 stages pinned to one core each vs 1 node on both cores
#  (b) 8 concurrent streams: 2 stages pinned one core each vs 1 node pinned to one core
#  (c) bytes per token per hop (from the head's /metrics)
#  (d) (a)/(b) again with 1 ms and 5 ms of added link latency between the two stages,
#      using network namespaces and tc netem (root, iproute2, sch_netem), else a
#      userspace delay proxy (scripts/delay-proxy.py)
# Nodes use the default wire format (activations = "f32", exact); WIRE=f16 for the
# half-size one. EXO=path runs another build of exo (e.g. an older one, for before/after).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p exo
EXO=${EXO:-$PWD/target/release/exo}
wire_line=""
[ -n "${WIRE:-}" ] && wire_line="activations = \"$WIRE\""
MODEL=$PWD/models/gemma-3-270m-Q4_K_M.gguf
TOKENS=${TOKENS:-64}
REPS=${REPS:-3}
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done
    if [ -n "${NETNS:-}" ]; then ip netns del exo-a 2>/dev/null || true; ip netns del exo-b 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

single() { # name cpus threads port
    cat > "$work/$1.toml" <<EOF
[model]
path = "$MODEL"
[api]
listen = "$5:$4"
[engine]
threads = $3
ctx = 1024
max_slots = 8
EOF
    taskset -c "$2" "$EXO" serve --config "$work/$1.toml" 2> "$work/$1.log" &
    pids+=($!)
}

cluster_node() { # name cpu http_ip http_port data_ip data_port peer_a_ip peer_b_ip [netns]
    local cmd=("$EXO" serve --config "$work/$1.toml")
    cat > "$work/$1.toml" <<EOF
[node]
name = "$1"
listen = "tcp://$5:$6"
[model]
path = "$MODEL"
[api]
listen = "$3:$4"
[engine]
threads = 1
ctx = 1024
max_slots = 8
[cluster]
key = "bench-cluster-secret-0123456789"
$wire_line
[[peer]]
name = "a"
address = "tcp://$7:${PA_PORT:-17100}"
[[peer]]
name = "b"
address = "tcp://$8:${PB_PORT:-17110}"
EOF
    if [ -n "${9:-}" ]; then
        ip netns exec "$9" taskset -c "$2" "${cmd[@]}" 2> "$work/$1.log" &
    else
        taskset -c "$2" "${cmd[@]}" 2> "$work/$1.log" &
    fi
    pids+=($!)
}

wait_ready() { # name: a worker has loaded and timed itself (its timing must not
    # overlap the next node's loading)
    for _ in $(seq 1 240); do
        grep -q "worker $1 ready" "$work/$1.log" 2>/dev/null && return 0
        sleep 0.25
    done
    echo "worker $1 did not come up" >&2; cat "$work/$1.log" >&2; return 1
}

wait_health() { # ip port [netns]
    for _ in $(seq 1 240); do
        if [ -n "${3:-}" ]; then
            ip netns exec "$3" curl -sf "http://$1:$2/health" >/dev/null 2>&1 && return 0
        else
            curl -sf "http://$1:$2/health" >/dev/null 2>&1 && return 0
        fi
        sleep 0.25
    done
    echo "server at $1:$2 did not come up" >&2; cat "$work"/*.log >&2; return 1
}

measure() { # label ip port concurrency [netns]
    local out
    if [ -n "${5:-}" ]; then
        out=$(ip netns exec "$5" "$EXO" bench-client --addr "$2:$3" --concurrency "$4" --tokens "$TOKENS" --reps "$REPS")
    else
        out=$("$EXO" bench-client --addr "$2:$3" --concurrency "$4" --tokens "$TOKENS" --reps "$REPS")
    fi
    local tps
    tps=$(echo "$out" | awk '{print $3}')
    printf "%-44s %8.1f tok/s\n" "$1" "$tps" >&2
    echo "$tps"
}

stop_all() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; pids=(); sleep 0.5; }

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "== one machine, $(nproc) cores, $TOKENS tokens per stream, $REPS interleaved rounds, medians ==" >&2
# Every server stays up (an idle one only answers heartbeats); the rounds alternate
# between them so that a slow spell of the shared machine hits every side alike.
# One at a time: loading (and the cluster planner's timing of each node) must not
# compete with another server's loading for the cores.
single one2 0,1 2 18200 127.0.0.1; wait_health 127.0.0.1 18200
single one1 0 1 18201 127.0.0.1; wait_health 127.0.0.1 18201
cluster_node b 1 127.0.0.1 18211 127.0.0.1 17110 127.0.0.1 127.0.0.1; wait_ready b
cluster_node a 0 127.0.0.1 18210 127.0.0.1 17100 127.0.0.1 127.0.0.1
wait_health 127.0.0.1 18210
grep -hE "ms/layer|cluster formed" "$work/a.log" | sed -E "s/^.*(this node|peer |cluster formed)/\1/" >&2 || true
declare -A runs
for r in $(seq 1 "$REPS"); do
    echo "-- round $r" >&2
    runs[one_both_1]+="$(REPS=1 measure "1 node, both cores, 1 stream" 127.0.0.1 18200 1) "
    runs[two_1]+="$(REPS=1 measure "2 stages, one core each, 1 stream" 127.0.0.1 18210 1) "
    runs[one_core_8]+="$(REPS=1 measure "1 node, one core, 8 streams" 127.0.0.1 18201 8) "
    runs[two_8]+="$(REPS=1 measure "2 stages, one core each, 8 streams" 127.0.0.1 18210 8) "
done
med() { echo "${runs[$1]}" | tr ' ' '\n' | grep . | median; }
one_both_1=$(med one_both_1); two_1=$(med two_1); one_core_8=$(med one_core_8); two_8=$(med two_8)
metrics=$(curl -s http://127.0.0.1:18210/metrics)
hop() { # peer -> bytes per token
    local b t
    b=$(echo "$metrics" | awk -v s="exo_hop_bytes_total{peer=\"$1\"}" '$1 == s {print $2}')
    t=$(echo "$metrics" | awk -v s="exo_hop_tokens_total{peer=\"$1\"}" '$1 == s {print $2}')
    echo "$b / $t" | bc -l | cut -c1-7
}
"$EXO" status --config "$work/a.toml" >&2 || true
stop_all

n_embd=640
echo >&2
echo "medians: 1 node both cores 1 stream $one_both_1; 2 stages 1 stream $two_1; 1 node one core 8 streams $one_core_8; 2 stages 8 streams $two_8 (tok/s)" >&2
echo "(a) single stream: 2 stages / 1 node on both cores = $(echo "$two_1 / $one_both_1" | bc -l | cut -c1-5)x" >&2
echo "(b) 8 streams: 2 stages (1 core each) / 1 node (1 core) = $(echo "$two_8 / $one_core_8" | bc -l | cut -c1-5)x (aim >= 1.7x)" >&2
echo "(c) bytes per token per hop: a -> b $(hop a), b -> a $(hop b) (f32: 4*n_embd+64 = $((4*n_embd+64)), f16: 2*n_embd+64 = $((2*n_embd+64)))" >&2

# (d) added link latency. With netem (root, iproute2, a kernel with sch_netem): two
# network namespaces joined by a veth pair, the delay on both ends. Otherwise the
# same one-way delay from scripts/delay-proxy.py, a userspace TCP forwarder between
# the two nodes (data and control planes both go through it).
latency_with_proxy() {
    for delay in 1 5; do
        python3 scripts/delay-proxy.py "$delay" 17300:17200 17301:17201 17310:17210 17311:17211 &
        pids+=($!)
        sleep 0.5
        PA_PORT=17300 PB_PORT=17310 cluster_node b 1 127.0.0.1 18231 127.0.0.1 17210 127.0.0.1 127.0.0.1
        wait_ready b
        PA_PORT=17300 PB_PORT=17310 cluster_node a 0 127.0.0.1 18230 127.0.0.1 17200 127.0.0.1 127.0.0.1
        wait_health 127.0.0.1 18230
        d1=$(measure "2 stages, +${delay} ms each way, 1 stream" 127.0.0.1 18230 1)
        d8=$(measure "2 stages, +${delay} ms each way, 8 streams" 127.0.0.1 18230 8)
        echo "(d) +${delay} ms each way (userspace delay proxy): 1 stream $d1 tok/s = $(echo "$d1 / $two_1" | bc -l | cut -c1-5)x of no delay; 8 streams $d8 tok/s = $(echo "$d8 / $two_8" | bc -l | cut -c1-5)x of no delay" >&2
        stop_all
    done
}

if [ "$(id -u)" -ne 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "(d) netem needs root, ip and tc: using the userspace delay proxy" >&2
    latency_with_proxy
    exit 0
fi
NETNS=1
ip netns add exo-a; ip netns add exo-b
ip link add exo-va type veth peer name exo-vb
ip link set exo-va netns exo-a; ip link set exo-vb netns exo-b
ip -n exo-a addr add 10.77.0.1/24 dev exo-va; ip -n exo-b addr add 10.77.0.2/24 dev exo-vb
ip -n exo-a link set exo-va up; ip -n exo-b link set exo-vb up
ip -n exo-a link set lo up; ip -n exo-b link set lo up
for delay in 1ms 5ms; do
    if ! ip netns exec exo-a tc qdisc replace dev exo-va root netem delay "$delay" 2>/dev/null ||
        ! ip netns exec exo-b tc qdisc replace dev exo-vb root netem delay "$delay" 2>/dev/null; then
        echo "(d) this kernel has no netem qdisc (sch_netem): using the userspace delay proxy" >&2
        ip netns del exo-a 2>/dev/null || true; ip netns del exo-b 2>/dev/null || true; NETNS=
        latency_with_proxy
        break
    fi
    cluster_node b 1 127.0.0.1 18221 10.77.0.2 17110 10.77.0.1 10.77.0.2 exo-b
    wait_ready b
    cluster_node a 0 127.0.0.1 18220 10.77.0.1 17100 10.77.0.1 10.77.0.2 exo-a
    wait_health 127.0.0.1 18220 exo-a
    d1=$(measure "2 stages, +$delay each way, 1 stream" 127.0.0.1 18220 1 exo-a)
    d8=$(measure "2 stages, +$delay each way, 8 streams" 127.0.0.1 18220 8 exo-a)
    echo "(d) +$delay: 1 stream $(echo "$d1 / $two_1" | bc -l | cut -c1-5)x of no delay; 8 streams $(echo "$d8 / $two_8" | bc -l | cut -c1-5)x of no delay" >&2
    stop_all
done
