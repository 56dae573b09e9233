# shellcheck shell=bash
# Shared by packaging/test-deb.sh and packaging/test-deb-upgrade.sh (sourced after
# `cd` to the repository and with $name set): arguments, messages, clean-up, and one
# `exo serve` run as the exo user that must answer a completion.

name=${name:-test}
step() { echo "$name: $*"; }
fail() { echo "$name: FAIL: $*" >&2; exit 1; }

# test_setup [DEB] [MODEL]: sets $deb (absolute) and $model, checks root and that exo is
# not installed, makes $tmp (removed on exit, with a running $server stopped).
test_setup() {
    # shellcheck disable=SC2012
    deb=${1:-$(ls -t target/deb-amd64/debian/exo_*.deb 2>/dev/null | head -n 1)}
    model=${2:-models/gemma-3-270m-Q4_K_M.gguf}
    { [ -n "$deb" ] && [ -f "$deb" ]; } || { echo "$name: no package (run scripts/build-deb.sh)" >&2; exit 1; }
    [ -f "$model" ] || { echo "$name: no model at $model" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "$name: run as root" >&2; exit 1; }
    deb=$(realpath "$deb")
    server=""
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    trap test_cleanup EXIT
    if dpkg-query -W -f='${Status}' exo 2>/dev/null | grep -q "ok installed"; then
        fail "exo is already installed; purge it first (apt-get purge exo)"
    fi
}
test_cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$tmp"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# serve_complete CONFIG PORT: `exo serve --config CONFIG` as the exo user until /health
# answers 200 on 127.0.0.1:PORT, then one greedy completion (printed), then stops it.
serve_complete() {
    local config=$1 port=$2 code="" body text
    runuser -u exo -- /usr/bin/exo serve --config "$config" >"$tmp/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 1 120); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
        [ "$code" = 200 ] && break
        kill -0 "$server" 2>/dev/null || { cat "$tmp/serve.log"; fail "exo serve exited"; }
        sleep 0.5
    done
    [ "$code" = 200 ] || { cat "$tmp/serve.log"; fail "/health on 127.0.0.1:$port never answered 200 (last: $code)"; }
    echo "  /health 200 on 127.0.0.1:$port (process owner: $(ps -o user= -p "$(pgrep -P "$server" -x exo || echo "$server")"))"
    body=$(curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}') ||
        { cat "$tmp/serve.log"; fail "completion request"; }
    echo "  completion: $body"
    text=$(printf '%s' "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])')
    [ -n "$text" ] || fail "empty completion"
    kill "$server"
    wait "$server" || true
    server=""
}
