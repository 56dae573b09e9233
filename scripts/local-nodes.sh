# Sourced by scripts that run exo nodes on 127.0.0.1 (demo.sh, soak.sh): free ports
# and the config of a two-node cluster.

# free_ports KIND...: a free port for each "http", and for each "data" a port P
# such that P + 1 (its control plane) is free too; printed on one line.
free_ports() {
    python3 - "$@" <<'PY'
import socket, sys
def free(pair):
    while True:
        s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
        if not pair: return p
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 1)); t.close(); return p
        except OSError:
            t.close()
print(*(free(kind == "data") for kind in sys.argv[1:]))
PY
}

# pair_config FILE NAME HTTP_PORT DATA_PORT DATA_A DATA_B KEY MODEL [EXTRA]: the
# config of node NAME (a or b) of a two-node cluster on 127.0.0.1 whose nodes a and
# b listen on DATA_A and DATA_B; one thread, context 1024; EXTRA lines go to
# [engine] (e.g. "max_slots = 8").
pair_config() {
    cat > "$1" <<TOML
[node]
name = "$2"
listen = "tcp://127.0.0.1:$4"
[model]
path = "$8"
[api]
listen = "127.0.0.1:$3"
[engine]
threads = 1
ctx = 1024
${9:-}
[cluster]
key = "$7"
[[peer]]
name = "a"
address = "tcp://127.0.0.1:$5"
[[peer]]
name = "b"
address = "tcp://127.0.0.1:$6"
TOML
}
