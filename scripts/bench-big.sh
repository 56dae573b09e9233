#!/usr/bin/env bash
# Big-model cluster benchmark on one machine (not a test): a generated model of Llama 3
# 8B's exact shapes and types (`exo gen-model --shape llama3-8b`, random weights; the
# file is kept in models/generated/), SHAPE=llama3-1b for a quicker run.
#  (a) decode: 1 node pinned to one core vs 2 nodes pinned to one core each, at 1 and
#      8 streams (interleaved rounds, medians): the steady decode rate (tokens the head
#      generated while every stream decoded, from its /metrics) and the aggregate rate
#      (all tokens over the whole round, the prompts' prefill included)
#  (b) each node's resident memory (VmRSS, and the peak VmHWM) against its weights + KV
#  (c) start to serving: the head's /health 200 after starting both nodes, when the
#      worker must fetch its slice and when it already has it
#  (d) the slice's transfer rate over loopback against a plain TCP copy of as many
#      bytes of the same file (Python, file -> socket -> file + fsync; its sending
#      thread on the head's core, its receiving thread on the worker's), interleaved
#      (their order alternating) after a warm-up round that is shown, not counted
# The worker has no model file: it receives its slice from the head.
# EXO=path runs another build; REPS (default 3) rounds; TOKENS (default 48) per stream;
# WIDE (default 8) streams for the many-streams measurement (two nodes split them in
# two micro-batches, so WIDE=16 gives each node's steps 8 columns, as one node's at 8);
# One node is also timed at WIDE/2 streams: the pair's micro-batches have WIDE/2 columns,
# so twice that rate bounds what two nodes can decode (printed as the ceiling).
# ONLY=transfer stops after (c) and (d); ONLY=decode skips them.
# LINK=1gbit (any `tc` rate; needs root) shapes loopback to that rate for (c) and (d),
# as a board's Ethernet would, with a token bucket (`tc qdisc ... tbf`) removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p exo
EXO=${EXO:-$PWD/target/release/exo}
SHAPE=${SHAPE:-llama3-8b}
REPS=${REPS:-3}
TOKENS=${TOKENS:-48}
CTX=${CTX:-1024}
WIDE=${WIDE:-8}
SLOTS=$(( WIDE > 8 ? WIDE : 8 ))
HALF=$(( WIDE / 2 ))
MODEL=${MODEL:-$PWD/models/generated/$SHAPE.gguf}
if [ ! -f "$MODEL" ]; then
    mkdir -p models/generated
    t0=$(date +%s.%N)
    "$EXO" gen-model --shape "$SHAPE" --seed 1 "$MODEL.tmp"
    mv "$MODEL.tmp" "$MODEL"
    echo "generated $SHAPE in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s: $(du -h --apparent-size "$MODEL" | cut -f1)" >&2
fi
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
    [ -z "${LINK:-}" ] || tc qdisc del dev lo root 2>/dev/null || true
}
trap cleanup EXIT
KEY="bench-big-secret-0123456789abcdef"

single() { # name cpu port
    cat > "$work/$1.toml" <<EOF
[model]
path = "$MODEL"
cache_dir = "$work/$1-cache"
[api]
listen = "127.0.0.1:$3"
[engine]
threads = 1
ctx = $CTX
max_slots = $SLOTS
EOF
    taskset -c "$2" "$EXO" serve --config "$work/$1.toml" 2> "$work/$1.log" &
    pids+=($!)
    eval "pid_$1=$!"
}

cluster_node() { # name cpu http_port data_port has_model
    local model_line=""
    [ "$5" = 1 ] && model_line="path = \"$MODEL\""
    cat > "$work/$1.toml" <<EOF
[node]
name = "$1"
listen = "tcp://127.0.0.1:$4"
[model]
$model_line
cache_dir = "$work/$1-cache"
[api]
listen = "127.0.0.1:$3"
[engine]
threads = 1
ctx = $CTX
max_slots = $SLOTS
[cluster]
key = "$KEY"
[[peer]]
name = "a"
address = "tcp://127.0.0.1:17600"
[[peer]]
name = "b"
address = "tcp://127.0.0.1:17610"
EOF
    taskset -c "$2" "$EXO" serve --config "$work/$1.toml" 2>> "$work/$1.log" &
    pids+=($!)
    eval "pid_$1=$!"
}

wait_health() { # port
    for _ in $(seq 1 2400); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server on $1 did not come up" >&2; tail -n 30 "$work"/*.log >&2; return 1
}

stop_pid() { kill -9 "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
now() { date +%s.%N; }

# One cluster start: both nodes, the worker (b) first; `started` is then the seconds to
# the head's /health 200. FRESH=1 empties b's slice cache first.
start_pair() {
    [ "${FRESH:-0}" = 1 ] && rm -rf "$work/b-cache"
    : > "$work/a.log"; : > "$work/b.log"
    local t0; t0=$(now)
    cluster_node b 1 18611 17610 0
    cluster_node a 0 18610 17600 1
    wait_health 18610
    started=$(echo "$(now) - $t0" | bc)
}

echo "== $SHAPE ($(du -h --apparent-size "$MODEL" | cut -f1)), one machine, $(nproc) cores, $REPS rounds, medians ==" >&2
if [ -n "${LINK:-}" ] && [ "${ONLY:-}" != decode ]; then
    tc qdisc replace dev lo root tbf rate "$LINK" burst 256kb latency 20ms
    echo "loopback shaped to $LINK for (c) and (d): $(tc qdisc show dev lo)" >&2
fi
# (c) and (d): interleaved, a fresh worker, a worker with its slice, a plain TCP copy.
# The first round is a warm-up, shown but not counted: on a fresh VM whichever writes
# 2 GB first pays for the guest's new memory pages. Later rounds alternate which of
# the slice and the plain copy goes first.
declare -A runs
plain_copy() { # bytes -> MB/s
    SEND_CPU=0 RECV_CPU=1 python3 scripts/tcp-copy.py "$MODEL" "$1" "$work/copy.bin" | awk '{print $(NF-1)}'
    rm -f "$work/copy.bin"
}
need_bytes=0
for r in $(seq 0 "$REPS"); do
    [ "${ONLY:-}" = decode ] && break
    plain=""
    if [ $((r % 2)) = 0 ] && [ "$need_bytes" -gt 0 ]; then plain=$(plain_copy "$need_bytes"); fi
    FRESH=1 start_pair; t_fetch=$started
    rate=$(grep -o "sent layers .*, [0-9.]* MB/s" "$work/a.log" | tail -n 1 | sed -E 's/.* ([0-9.]+) MB\/s$/\1/')
    need=$(grep -o "holds [0-9.]* of [0-9.]* MB" "$work/b.log" | tail -n 1 | awk '{print $4}')
    need_bytes=$(echo "$need * 1000000 / 1" | bc)
    stop_pid "$pid_a"; stop_pid "$pid_b"
    start_pair; t_have=$started
    stop_pid "$pid_a"; stop_pid "$pid_b"
    [ -n "$plain" ] || plain=$(plain_copy "$need_bytes")
    ratio=$(echo "$rate / $plain" | bc -l | cut -c1-5)
    if [ "$r" = 0 ]; then
        printf "warm-up (not counted): slice %s MB/s, plain TCP copy %s MB/s\n" "$rate" "$plain" >&2
        continue
    fi
    printf "round %s: start to serving %.1f s fetching (%s MB at %s MB/s), %.1f s with the slice; plain TCP copy %s MB/s (%s first): %sx\n" \
        "$r" "$t_fetch" "$need" "$rate" "$t_have" "$plain" "$([ $((r % 2)) = 0 ] && echo copy || echo slice)" "$ratio" >&2
    runs[fetch]+="$t_fetch "; runs[have]+="$t_have "; runs[rate]+="$rate "; runs[plain]+="$plain "; runs[ratio]+="$ratio "
done
med() { echo "${runs[$1]}" | tr ' ' '\n' | grep . | median; }
[ "${ONLY:-}" = decode ] || echo "(c) start to serving: $(med fetch) s when the worker fetches its slice, $(med have) s when it has it" >&2
[ "${ONLY:-}" = decode ] || echo "(d) slice transfer $(med rate) MB/s vs plain TCP copy $(med plain) MB/s = $(echo "$(med rate) / $(med plain)" | bc -l | cut -c1-5)x; median of the rounds' ratios $(med ratio)x (aim >= 0.8)" >&2

[ "${ONLY:-}" = transfer ] && exit 0
[ -z "${LINK:-}" ] || { tc qdisc del dev lo root; echo "loopback unshaped for (a) and (b)" >&2; }
# (a) and (b): the single node and the pair stay up; rounds alternate between them
single one 0 18600
wait_health 18600
start_pair
grep -hE "cluster formed|stage .* loaded" "$work/a.log" "$work/b.log" >&2 || true
measure() { # port concurrency -> "aggregate steady" tok/s
    "$EXO" bench-client --addr "127.0.0.1:$1" --concurrency "$2" --tokens "$TOKENS" --reps 1 |
        awk '{print $3, $(NF-1)}'
}
for r in $(seq 1 "$REPS"); do
    read -r o1 so1 <<<"$(measure 18600 1)"; read -r t1 st1 <<<"$(measure 18610 1)"
    read -r ow sow <<<"$(measure 18600 "$WIDE")"; read -r tw stw <<<"$(measure 18610 "$WIDE")"
    read -r _ soh <<<"$(measure 18600 "$HALF")"
    rw=$(echo "$stw / $sow" | bc -l | cut -c1-5); cw=$(echo "2 * $soh / $sow" | bc -l | cut -c1-5)
    runs[sone_h]+="$soh "; runs[ratio_w]+="$rw "; runs[ceiling_w]+="$cw "
    runs[one_1]+="$o1 "; runs[two_1]+="$t1 "; runs[one_w]+="$ow "; runs[two_w]+="$tw "
    runs[sone_1]+="$so1 "; runs[stwo_1]+="$st1 "; runs[sone_w]+="$sow "; runs[stwo_w]+="$stw "
    echo "round $r: steady decode 1 stream $so1 / $st1, $WIDE streams $sow / $stw tok/s (1 node / 2 nodes); aggregate 1 stream $o1 / $t1, $WIDE streams $ow / $tw; 1 node at $HALF streams $soh; $WIDE streams steady ${rw}x against a ceiling of ${cw}x" >&2
done
mem() { # pid -> "rss peak" in MB
    awk '/^VmRSS/ {r=$2} /^VmHWM/ {h=$2} END {printf "%.0f %.0f", r/1000, h/1000}' "/proc/$1/status"
}
share() { # log -> weights + KV in MB of the serving stage (the last "stage … loaded")
    grep -o "stage [0-9.]* loaded: [0-9.]* MB of weights, [0-9.]* MB of KV" "$1" | tail -n 1 |
        awk '{print $4 + $8}'
}
ratio() { echo "$(med "$1") / $(med "$2")" | bc -l | cut -c1-5; }
echo "(a) steady decode, 2 nodes / 1 node (one core each): 1 stream $(ratio stwo_1 sone_1)x (aim >= 0.95), $WIDE streams $(ratio stwo_w sone_w)x (aim at 8 >= 1.8); medians $(med sone_1) / $(med stwo_1) and $(med sone_w) / $(med stwo_w) tok/s" >&2
echo "(a) the pair's ceiling at $WIDE streams: two micro-batches of $HALF, each node computing half the layers, decode at most twice what one node does at $HALF streams: 2 x $(med sone_h) / $(med sone_w) = $(echo "2 * $(med sone_h) / $(med sone_w)" | bc -l | cut -c1-5)x; medians of the rounds' ratios $(med ratio_w)x and ceilings $(med ceiling_w)x" >&2
echo "(a) aggregate with the prefill of the prompts: 1 stream $(ratio two_1 one_1)x, $WIDE streams $(ratio two_w one_w)x; medians $(med one_1) / $(med two_1) and $(med one_w) / $(med two_w) tok/s" >&2
for n in a b; do
    pid=pid_$n
    read -r rss peak <<<"$(mem "${!pid}")"
    s=$(share "$work/$n.log")
    echo "(b) node $n: RSS $rss MB (peak $peak MB) for weights + KV of $s MB: + $(echo "$rss - $s" | bc) MB (aim <= 64 MiB)" >&2
done
read -r rss peak <<<"$(mem "$pid_one")"
echo "(b) single node: RSS $rss MB (peak $peak MB) for weights + KV of $(share "$work/one.log") MB" >&2
