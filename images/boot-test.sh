#!/usr/bin/env bash
# Boot test of the virt images under qemu (TCG; no KVM needed): `make image-test`.
#
#   images/boot-test.sh [amd64] [arm64] [two-node] [pi4]     (default: amd64 arm64 two-node)
#
# Each guest boots target/images/virt-ARCH/ (built by images/build.sh when missing) by
# direct kernel boot (-kernel/-initrd), the root disk with snapshot=on (the image is never
# changed), a second virtio disk labelled EXOMODEL with the Gemma 3 270M model (and, for
# the cluster, seed files) that the image's first-boot step copies into
# /var/lib/exo/models, and a user netdev forwarding 127.0.0.1:PORT to the guest's 8080.
# The kernel command line has exo.boot_report: the guest prints EXO-REPORT lines on its
# serial console once booted (exo.service state, failed units, /health from inside).
#
#   amd64     q35, -cpu max, 2 vCPUs: exo.service active, /health 200 and a greedy
#             completion through the forwarded port, no failed unit.
#   arm64     the same on virt/cortex-a72 with 2 vCPUs (exo uses 2 threads);
#             EXO_ARM64_CPU=max boots a CPU with dotprod (the package runs its dotprod build).
#   two-node  two amd64 guests (1 vCPU each) on a private LAN (qemu -netdev socket,
#             10.77.0.1/.2, static, from seed network files), configured as [[peer]]s with
#             a shared [cluster] key: the head answers a completion over both nodes. The
#             model is on node1's disk only; node2's disk holds just its exo.toml, and it
#             receives its slice from node1.
#   pi4       boots the Pi 4 image's root file system and kernel as a virt guest (qemu
#             cannot emulate a Pi 4 here); the model comes from the FAT partition's exo/.
#
# Timings are printed (boot to /health 200, completion). On failure: the reason, the tail
# of the serial log and its path (target/images/test/*.serial.log). Timeouts everywhere
# (EXO_BOOT_TIMEOUT, default 900 s per guest); qemu is always killed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=images/lib.sh
. images/lib.sh

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(amd64 arm64 two-node)
boot_timeout=${EXO_BOOT_TIMEOUT:-900}
model=models/gemma-3-270m-Q4_K_M.gguf
# The greedy answer of exo (and llama.cpp) on this machine for the prompt below.
expected=${EXO_BOOT_EXPECTED:-" the capital of the country of France."}
work=target/images/test
mkdir -p "$work"
[ -f "$model" ] || ./scripts/setup.sh
[ "$(id -u)" -eq 0 ] || die "run as root (the image builds need it)"

for t in "${tests[@]}"; do
    case $t in
    amd64 | two-node) qemu_ensure x86 ;;
    arm64 | pi4) qemu_ensure arm ;;
    *) die "unknown test '$t' (amd64, arm64, two-node, pi4)" ;;
    esac
done
apt_ensure curl e2fsprogs python3

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

failed=0
fail() { # fail NAME MESSAGE
    echo "boot-test: FAIL [$1]: $2" >&2
    local log=$work/$1.serial.log
    if [ -f "$log" ]; then
        echo "----- last 40 lines of $log -----" >&2
        tail -n 40 "$log" | tr -d '\r' >&2
        echo "----- (full serial log: $log) -----" >&2
    fi
    failed=$((failed + 1))
}

ensure_image() { # ensure_image virt-amd64|virt-arm64|pi4
    local d=target/images/$1
    if [ "$1" = pi4 ]; then
        [ -f "$d/exo-pi4.img" ] && return 0
    else
        [ -f "$d/rootfs.ext4" ] && return 0
    fi
    log "building $1 (not built yet)"
    ./images/build.sh "$1"
}

# boot NAME ARCH ROOTDISK KERNELDIR MODELDISK SMP PORT [extra qemu args...]; sets $qpid
boot() {
    local name=$1 arch=$2 disk=$3 kdir=$4 mdisk=$5 smp=$6 port=$7
    shift 7
    local log=$work/$name.serial.log
    rm -f "$log"
    local cmdline; cmdline="$(cat "$kdir/cmdline") exo.boot_report"
    local q
    if [ "$arch" = amd64 ]; then
        q=(qemu-system-x86_64 -M q35 -cpu max)
    else
        q=(qemu-system-aarch64 -M virt -cpu "${EXO_ARM64_CPU:-cortex-a72}")
    fi
    local mac_n; mac_n=$(printf '%02x' $((RANDOM % 256)))
    q+=(-accel tcg -smp "$smp" -m 1536 -display none -monitor none -no-reboot
        -serial "file:$log"
        -kernel "$kdir/vmlinuz" -initrd "$kdir/initrd.img" -append "$cmdline"
        -drive "file=$disk,format=raw,if=virtio,snapshot=on"
        -netdev "user,id=wan,hostfwd=tcp:127.0.0.1:$port-:8080"
        -device "virtio-net-pci,netdev=wan,mac=52:54:00:aa:00:$mac_n"
        "$@")
    [ -z "$mdisk" ] || q+=(-drive "file=$mdisk,format=raw,if=virtio,readonly=on")
    log "[$name] ${q[*]}"
    "${q[@]}" >"$work/$name.qemu.log" 2>&1 &
    qpid=$!
    pids+=("$qpid")
}

# wait_ready NAME PID PORT START: /health 200 through the forwarded port and the guest's
# boot report; prints the seconds from START to /health 200 into $ready_s.
wait_ready() {
    local name=$1 pid=$2 port=$3 start=$4
    local log=$work/$name.serial.log code="" deadline=$(( start + boot_timeout ))
    ready_s=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            fail "$name" "qemu exited ($(tail -n 3 "$work/$name.qemu.log" | tr '\n' ' '))"
            return 1
        fi
        if [ -z "$ready_s" ]; then
            code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
            [ "$code" = 200 ] && ready_s=$(( $(date +%s) - start )) && log "[$name] /health 200 after ${ready_s} s"
        fi
        if [ -n "$ready_s" ] && grep -q 'EXO-REPORT done' "$log" 2>/dev/null; then
            return 0
        fi
        sleep 2
    done
    if [ -z "$ready_s" ]; then
        fail "$name" "/health not 200 within ${boot_timeout} s (last: ${code:-none})"
    else
        fail "$name" "no boot report (EXO-REPORT done) within ${boot_timeout} s"
    fi
    return 1
}

# wait_report NAME PID START: the guest's boot report only (no forwarded /health check).
wait_report() {
    local name=$1 pid=$2 start=$3
    while [ "$(date +%s)" -lt $(( start + boot_timeout )) ]; do
        kill -0 "$pid" 2>/dev/null || { fail "$name" "qemu exited"; return 1; }
        grep -q 'EXO-REPORT done' "$work/$name.serial.log" 2>/dev/null && return 0
        sleep 2
    done
    fail "$name" "no boot report (EXO-REPORT done) within ${boot_timeout} s"
    return 1
}

# check_report NAME: exo.service active, no failed unit, /health 200 from inside.
check_report() {
    local name=$1 log=$work/$1.serial.log
    local rep; rep=$(tr -d '\r' <"$log" | grep -a -o 'EXO-REPORT .*' | sed 's/^EXO-REPORT //')
    while IFS= read -r line; do echo "  [$name] $line" >&2; done <<<"$rep"
    echo "$rep" | grep -qx 'exo.service=active' || { fail "$name" "exo.service is not active"; return 1; }
    echo "$rep" | grep -qx 'failed-units=\[\]' || { fail "$name" "systemctl --failed is not empty: $(echo "$rep" | grep failed-units)"; return 1; }
    echo "$rep" | grep -q '^health=HTTP/1.[01] 200' || { fail "$name" "/health inside the guest: $(echo "$rep" | grep '^health=')"; return 1; }
    # the node announces its web page over mDNS under its hostname (a seed hostname file,
    # else exo-XXXX)
    local host; host=$(echo "$rep" | sed -n 's/^hostname=\([^ ]*\) avahi=active$/\1/p')
    [ -n "$host" ] || { fail "$name" "avahi-daemon is not active: $(echo "$rep" | grep '^hostname=')"; return 1; }
    case $name in node*) [ "$host" = "$name" ] ;; *) [[ $host =~ ^exo-[0-9a-f]{4}$ ]] ;; esac ||
        { fail "$name" "hostname $host: expected the seed's, or exo-XXXX"; return 1; }
    echo "$rep" | grep -q "^mdns=.*$host.local=" || { fail "$name" "$host.local is not announced: $(echo "$rep" | grep '^mdns=')"; return 1; }
}

# complete NAME PORT: a greedy completion of 8 tokens; sets $completion_s and $completion_text.
complete() {
    local name=$1 port=$2 t0 body
    t0=$(date +%s.%N)
    body=$(curl -s -m 900 "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt":"The capital of France is","max_tokens":8,"temperature":0}') ||
        { fail "$name" "completion request failed (curl $?)"; return 1; }
    completion_s=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
    completion_text=$(printf '%s' "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])' 2>/dev/null) ||
        { fail "$name" "not a completion: $body"; return 1; }
    [ -n "$completion_text" ] || { fail "$name" "empty completion: $body"; return 1; }
    log "[$name] completion in ${completion_s} s: $(printf '%q' "$completion_text")"
    [ "$completion_text" = "$expected" ] ||
        { fail "$name" "the completion is not exo's greedy answer on the host ($(printf '%q' "$expected")): $body"; return 1; }
}

# chat NAME PORT: a 4-token chat completion answers 200 with text: the chat template
# renders in exo's sandbox process (a child of the daemon) under the hardened unit.
chat() {
    local name=$1 port=$2 body
    body=$(curl -s -m 900 "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Say hi."}],"max_tokens":4,"temperature":0}') ||
        { fail "$name" "chat request failed (curl $?)"; return 1; }
    printf '%s' "$body" | python3 -c 'import json,sys; assert json.load(sys.stdin)["choices"][0]["message"]["content"]' 2>/dev/null ||
        { fail "$name" "not a chat completion: $body"; return 1; }
    log "[$name] chat completion: $body"
}

stop() { # stop PID
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

single() { # single amd64|arm64
    local arch=$1 name=$1 port start
    ensure_image "virt-$arch" >&2
    ./images/build.sh model-disk "$work/model.img" "$model" 2>/dev/null
    port=$(free_port)
    start=$(date +%s)
    boot "$name" "$arch" "target/images/virt-$arch/rootfs.ext4" "target/images/virt-$arch" "$work/model.img" 2 "$port"
    local pid=$qpid
    wait_ready "$name" "$pid" "$port" "$start" || { stop "$pid"; return 0; }
    check_report "$name" || { stop "$pid"; return 0; }
    complete "$name" "$port" || { stop "$pid"; return 0; }
    chat "$name" "$port" || { stop "$pid"; return 0; }
    local threads
    threads=$(tr -d '\r' <"$work/$name.serial.log" | grep -a -o 'threads[=: ]*[0-9]\+' | head -n 1 || true)
    echo "RESULT $name: boot to /health 200 ${ready_s} s, completion (8 tokens) ${completion_s} s, exo ${threads:-threads ?}" | tee -a "$work/results.txt"
    stop "$pid"
}

two_node() {
    ensure_image virt-amd64 >&2
    local key; key=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
    local i
    for i in 1 2; do
        local seed=$work/node$i-seed
        rm -rf "$seed"
        mkdir -p "$seed/network"
        echo "node$i" >"$seed/hostname"
        cat >"$seed/network/10-exo-lan.network" <<EOF
[Match]
MACAddress=52:54:00:77:00:0$i

[Network]
Address=10.77.0.$i/24
EOF
        # the model on the head only: node2 gets just exo.toml and receives its slice
        local model_line=""
        [ "$i" = 1 ] && model_line="path = \"/var/lib/exo/models/$(basename "$model")\""
        cat >"$seed/exo.toml" <<EOF
[node]
name = "node$i"
listen = "tcp://0.0.0.0:5555"

[model]
$model_line

[api]
listen = "0.0.0.0:8080"

[engine]
ctx = 1024
max_slots = 2

[cluster]
key = "$key"

[[peer]]
name = "node1"
address = "tcp://10.77.0.1:5555"

[[peer]]
name = "node2"
address = "tcp://10.77.0.2:5555"
EOF
        if [ "$i" = 1 ]; then
            ./images/build.sh model-disk "$work/node$i-model.img" "$model" "$seed" 2>/dev/null
        else
            ./images/build.sh model-disk "$work/node$i-model.img" "$seed" 2>/dev/null
        fi
    done
    local lanport p1 p2 start
    lanport=$(free_port)
    p1=$(free_port)
    p2=$(free_port)
    start=$(date +%s)
    boot node1 amd64 target/images/virt-amd64/rootfs.ext4 target/images/virt-amd64 "$work/node1-model.img" 1 "$p1" \
        -netdev "socket,id=lan,listen=127.0.0.1:$lanport" -device "virtio-net-pci,netdev=lan,mac=52:54:00:77:00:01"
    local pid1=$qpid
    sleep 1
    boot node2 amd64 target/images/virt-amd64/rootfs.ext4 target/images/virt-amd64 "$work/node2-model.img" 1 "$p2" \
        -netdev "socket,id=lan,connect=127.0.0.1:$lanport" -device "virtio-net-pci,netdev=lan,mac=52:54:00:77:00:02"
    local pid2=$qpid
    wait_ready node1 "$pid1" "$p1" "$start" || { stop "$pid1"; stop "$pid2"; return 0; }
    local head_ready=$ready_s
    check_report node1 || { stop "$pid1"; stop "$pid2"; return 0; }
    # The worker booted cleanly too (its report), and its /health points to the head.
    wait_report node2 "$pid2" "$start" || { stop "$pid1"; stop "$pid2"; return 0; }
    check_report node2 || { stop "$pid1"; stop "$pid2"; return 0; }
    # Both announce themselves over mDNS, and one saw the other's web page on the LAN:
    # each looks once, when it has booted, so the one that reports later (the head,
    # which copies the model first) sees the other.
    local mdns1 mdns2
    mdns1=$(tr -d '\r' <"$work/node1.serial.log" | grep -a -o 'EXO-REPORT mdns=.*' | tail -n 1)
    mdns2=$(tr -d '\r' <"$work/node2.serial.log" | grep -a -o 'EXO-REPORT mdns=.*' | tail -n 1)
    log "[node1] $mdns1"
    log "[node2] $mdns2"
    printf '%s' "$mdns2" | grep -q 'node1.local=10.77.0.1:8080' ||
        printf '%s' "$mdns1" | grep -q 'node2.local=10.77.0.2:8080' ||
        { fail node2 "neither node saw the other over mDNS: $mdns1 / $mdns2"; stop "$pid1"; stop "$pid2"; return 0; }
    local wh; wh=$(curl -s -m 10 "http://127.0.0.1:$p2/health" || true)
    log "[node2] /health: $wh"
    printf '%s' "$wh" | grep -q '"role":"worker"' || { fail node2 "/health is not a worker's: $wh"; stop "$pid1"; stop "$pid2"; return 0; }
    local cl; cl=$(curl -s -m 10 "http://127.0.0.1:$p1/v1/cluster" || true)
    log "[node1] /v1/cluster: $cl"
    printf '%s' "$cl" | grep -q node2 || { fail node1 "/v1/cluster does not list node2: $cl"; stop "$pid1"; stop "$pid2"; return 0; }
    # node2 had no model: it received its slice from node1
    if grep -aq "slice of layers" "$work/node2.serial.log" 2>/dev/null; then
        log "[node2] received its slice: $(grep -a "slice of layers" "$work/node2.serial.log" | tail -n 1)"
    else
        log "[node2] (the serial log does not show the slice line; the guest's journal has it)"
    fi
    complete node1 "$p1" || { stop "$pid1"; stop "$pid2"; return 0; }
    echo "RESULT two-node: boot of both to the head's /health 200 ${head_ready} s, completion over 2 nodes ${completion_s} s" | tee -a "$work/results.txt"
    stop "$pid1"
    stop "$pid2"
}

pi4() {
    ensure_image pi4 >&2
    local d=target/images/pi4 port start
    # The model goes on the FAT partition's exo/ folder, as a user would copy it.
    local img=$work/pi4.img
    cp --sparse=always "$d/exo-pi4.img" "$img"
    local off; off=$(sfdisk -J "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][0]["start"] * 512)')
    apt_ensure mtools
    MTOOLS_SKIP_CHECK=1 mcopy -i "$img@@$off" "$model" ::/exo/
    port=$(free_port)
    start=$(date +%s)
    boot pi4 arm64 "$img" "$d" "" 2 "$port"
    local pid=$qpid
    wait_ready pi4 "$pid" "$port" "$start" || { stop "$pid"; return 0; }
    check_report pi4 || { stop "$pid"; return 0; }
    complete pi4 "$port" || { stop "$pid"; return 0; }
    echo "RESULT pi4 (as a virt guest): boot to /health 200 ${ready_s} s, completion ${completion_s} s" | tee -a "$work/results.txt"
    stop "$pid"
}

for t in "${tests[@]}"; do
    log "=== $t"
    case $t in
    amd64 | arm64) single "$t" ;;
    two-node) two_node ;;
    pi4) pi4 ;;
    esac
done
if [ $failed -gt 0 ]; then
    echo "boot-test: $failed FAILED (serial logs under $work/)" >&2
    exit 1
fi
echo "boot-test: PASS (${tests[*]})"
