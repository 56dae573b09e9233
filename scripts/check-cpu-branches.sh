#!/usr/bin/env bash
# Lints (and unit-tests the kernels of) the x86-64 code branches that depend on the
# CPU a build targets (`cfg(target_feature = ...)` in ggml-shim), whatever CPU this
# machine has: AVX2 without AVX-512 (x86-64-v3, the .deb's baseline), AVX-512 with
# VNNI, and no AVX2 at all (x86-64-v2). The main build covers the branch of this CPU
# (target-cpu=native).
#
# Each branch builds in its own target dir, so the main build stays warm. ggml's C++
# is built unoptimized there (LLAMA_LIB_PROFILE=Debug): faster to compile, and the
# kernel tests only compare bits. The VNNI branch is linted only: its tests need a
# CPU that has VNNI (the main build runs them there). The target CPU applies to the
# target only (`--target` with CARGO_TARGET_<triple>_RUSTFLAGS): build scripts run on
# this machine and are built for it (an AVX-512 build script dies with SIGILL on a CPU
# without AVX-512, such as a Zen 3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "check-cpu-branches: not x86-64, nothing to do"; exit 0; }
export CARGO_TERM_COLOR=never LLAMA_LIB_PROFILE=Debug
triple=x86_64-unknown-linux-gnu
branch() { # target-dir rustflags cargo-args...
    local dir=$1 flags=$2
    shift 2
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$flags" CARGO_TARGET_DIR="$dir" \
        cargo "$@"
}

echo "check-cpu-branches: AVX2 only (x86-64-v3)"
branch target/branch-x86-64-v3 "-C target-cpu=x86-64-v3" \
    clippy --release --target "$triple" --workspace --all-targets -- -D warnings
# the kernels against ggml's, on this branch's code (the CPU runs AVX2 code anyway)
branch target/branch-x86-64-v3 "-C target-cpu=x86-64-v3" \
    test --release --target "$triple" -p ggml-shim --lib -- qmatmul columns

echo "check-cpu-branches: AVX-512 with VNNI (x86-64-v4 + avx512vnni)"
branch target/branch-x86-64-v4-vnni "-C target-cpu=x86-64-v4 -C target-feature=+avx512vnni" \
    clippy --release --target "$triple" --workspace --all-targets -- -D warnings

# The code paths of a CPU without AVX2 (what the Pi's arm64 build compiles too): the
# kernels' stubs and fallbacks must lint clean as well.
echo "check-cpu-branches: no AVX2 (x86-64-v2)"
branch target/branch-x86-64-v2 "-C target-cpu=x86-64-v2" \
    clippy --release --target "$triple" --workspace --all-targets -- -D warnings
