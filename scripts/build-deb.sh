#!/usr/bin/env bash
# Builds the amd64 Debian package (on an amd64 machine) and prints its path,
# target/deb-amd64/debian/exo_<version>-1_amd64.deb.
#
# The binary (and ggml) are built for the x86-64-v3 baseline (Haswell and later: AVX2,
# FMA, F16C, BMI2), not for this machine's CPU: RUSTFLAGS overrides the
# `-C target-cpu=native` of .cargo/config.toml, and llama-cpp-sys-2 then builds ggml
# with GGML_NATIVE off and exactly those features. On a CPU without AVX2 the binary
# exits with a clear error instead of SIGILL (ggml_shim::cpu_guard, a constructor that
# runs before llama.cpp's static initializers; see packaging/README.md). A separate
# target dir keeps target/release (the native build the tests use) untouched; the
# first run builds ggml again (~4 minutes on 2 cores). Installs cargo-deb
# (~3 minutes) when missing.
# Then: packaging/test-deb.sh installs, tests and purges the package.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cmake >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/clang/*/include/stdbool.h >/dev/null 2>&1; then
    ./scripts/setup.sh
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb"
    cargo install --locked cargo-deb
fi

# EXO_DEB_TARGET_DIR: another target dir for the package build (default target/deb-amd64).
export CARGO_TARGET_DIR=${EXO_DEB_TARGET_DIR:-target/deb-amd64}
export RUSTFLAGS="-C target-cpu=x86-64-v3"
export CARGO_TERM_COLOR=never
# cargo-deb prints the path of the package it wrote on stdout.
deb=$(cargo deb -p exo | tail -n 1)
[ -f "$deb" ] || { echo "build-deb: no package at '$deb'" >&2; exit 1; }

# The baseline holds: no AVX-512 (zmm, mask or upper-16 vector registers) in the
# packaged binary, except blake3's own AVX-512 functions, which blake3 only calls
# after detecting AVX-512 at run time.
bin=$CARGO_TARGET_DIR/release/exo
if command -v objdump >/dev/null 2>&1; then
    avx512=$(objdump -d --no-show-raw-insn "$bin" | awk '
        /^[0-9a-f]+ <.*>:$/ { skip = ($2 ~ /blake3_.*avx512/) }
        !skip && /zmm|%k[0-7]|mm(1[6-9]|2[0-9]|3[01])/ { n++ }
        END { print n + 0 }')
    echo "build-deb: AVX-512 instructions in $bin (outside blake3's run-time dispatch): $avx512" >&2
    [ "$avx512" -eq 0 ] || { echo "build-deb: the binary uses AVX-512 beyond x86-64-v3" >&2; exit 1; }
    # The CPU check (a constructor that runs before the C++ static initializers, and
    # again at the start of main) must run on any x86-64 CPU: no VEX-encoded (AVX)
    # instruction in it, in main, the error path, or what they call directly.
    syms=$(nm "$bin" | awk '$3 ~ /^(_ZN3exo(4main|9cpu_error)|_ZN9ggml_shim9cpu_guard(15missing_feature|5guard))17h/ { print $3 }')
    [ "$(echo "$syms" | wc -w)" -eq 4 ] || { echo "build-deb: CPU check symbols not found" >&2; exit 1; }
    callees=$(for s in $syms; do objdump -d --no-show-raw-insn --disassemble="$s" "$bin"; done |
        sed -n 's/.*call  *[0-9a-f]* <\([^@>]*\)>$/\1/p' | sort -u)
    vex=$(for s in $syms $callees; do objdump -d --no-show-raw-insn --disassemble="$s" "$bin"; done |
        grep -cE '\sv[a-z0-9]+ |%ymm' || true)
    echo "build-deb: AVX instructions in the CPU check ($(echo $syms $callees | wc -w) functions): $vex" >&2
    [ "$vex" -eq 0 ] || { echo "build-deb: the CPU check itself uses AVX" >&2; exit 1; }
    # and it works: on emulated CPUs without AVX, or with AVX but not AVX2, the
    # binary says so and exits 1 (no SIGILL)
    if command -v qemu-x86_64-static >/dev/null 2>&1; then
        for cpu in Nehalem SandyBridge; do
            rc=0
            msg=$(qemu-x86_64-static -cpu "$cpu" "$bin" --version 2>&1 >/dev/null | grep -v '^qemu') || rc=$?
            case "$msg" in
                "exo: error: this CPU lacks "*) echo "build-deb: on $cpu: ${msg%%,*}" >&2 ;;
                *) echo "build-deb: on an emulated $cpu the binary did not refuse cleanly (rc $rc): $msg" >&2; exit 1 ;;
            esac
        done
    fi
fi
echo "$deb"
