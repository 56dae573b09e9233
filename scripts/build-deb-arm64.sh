#!/usr/bin/env bash
# Cross-builds the arm64 Debian package (Raspberry Pi 4/5) on an amd64 Debian machine
# and prints its path, target/deb-arm64/debian/exo_<version>-1_arm64.deb.
#
# Uses Debian's own cross toolchain: rustc-web/cargo-web with libstd-rust-web-dev:arm64
# (the arm64 std), gcc/g++-aarch64-linux-gnu as linker and C/C++ compiler for ggml,
# llama.cpp and NNG (cmake cross-configures by itself), qemu-user-static for the smoke
# test. Installs them (and adds the arm64 dpkg architecture) when missing; needs root
# for that.
#
# CPU baseline: ARMv8.0-A with NEON, i.e. the Cortex-A72 of the Pi 4, which also runs on
# the Pi 5 (Cortex-A76). No dotprod (ARMv8.2), which the A72 lacks. RUSTFLAGS overrides
# the `-C target-cpu=native` of .cargo/config.toml WITHOUT a target-cpu:
# llama-cpp-sys-2 would pass `-march=<target-cpu>` to gcc, and `-march=cortex-a72` is
# not a valid gcc value (that is `-mcpu`). Without a target-cpu, llama-cpp-sys-2 builds
# ggml with GGML_NATIVE=OFF and GGML_CPU_ARM_ARCH=armv8-a (`-march=armv8-a`: NEON,
# no dotprod); CFLAGS add `-mtune=cortex-a72`.
#
# A separate target dir (target/deb-arm64) keeps target/release (the native build the
# tests use) untouched. The first build compiles ggml and llama.cpp (~5 minutes on 2
# cores). Then a smoke test runs the binary under qemu-user (`exo --version`,
# `exo inspect` on the test model when present); EXO_ARM64_SKIP_SMOKE=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

triple=aarch64-unknown-linux-gnu
pkgs="rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static binfmt-support"
missing=""
for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "build-deb-arm64: installing$missing" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    dpkg --print-foreign-architectures | grep -qx arm64 || $sudo dpkg --add-architecture arm64
    $sudo apt-get update
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $pkgs
fi
if ! command -v cmake >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/clang/*/include/stdbool.h >/dev/null 2>&1; then
    ./scripts/setup.sh
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb-arm64: installing cargo-deb" >&2
    cargo install --locked cargo-deb
fi

# Debian's rustc has the arm64 std (rustup's toolchain does not, unless added).
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CFLAGS_aarch64_unknown_linux_gnu="-mtune=cortex-a72"
export CXXFLAGS_aarch64_unknown_linux_gnu="-mtune=cortex-a72"
# bindgen (llama-cpp-sys-2, nng-sys) parses the arm64 headers of the cross sysroot.
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=/usr/aarch64-linux-gnu -I/usr/aarch64-linux-gnu/include"
# No target-cpu here (see above); NEON is part of the aarch64 baseline.
export RUSTFLAGS="-C target-feature=+neon"
# EXO_DEB_TARGET_DIR: another target dir for the package build (default target/deb-arm64).
export CARGO_TARGET_DIR=${EXO_DEB_TARGET_DIR:-target/deb-arm64}
export CARGO_TERM_COLOR=never

cargo build --release --locked -p exo --target "$triple"
bin=$CARGO_TARGET_DIR/$triple/release/exo
file "$bin" | grep -q 'ARM aarch64' || { echo "build-deb-arm64: $bin is not an arm64 binary" >&2; exit 1; }

# The baseline holds: no dotprod (sdot/udot) and no SVE in the binary.
if command -v aarch64-linux-gnu-objdump >/dev/null 2>&1; then
    v82=$(aarch64-linux-gnu-objdump -d --no-show-raw-insn "$bin" | grep -cE '\s(sdot|udot|usdot|smmla|ummla)\s|\sz[0-9]+\.' || true)
    echo "build-deb-arm64: dotprod/i8mm/SVE instructions in $bin: $v82" >&2
    [ "$v82" -eq 0 ] || { echo "build-deb-arm64: the binary uses instructions beyond ARMv8.0-A" >&2; exit 1; }
fi

if [ "${EXO_ARM64_SKIP_SMOKE:-0}" != 1 ]; then
    # Run under qemu-user WITHOUT -L (mixing the two libc copies hangs); the arm64
    # dynamic loader and libc come from the cross sysroot via QEMU_LD_PREFIX.
    export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
    echo "build-deb-arm64: smoke test: $(qemu-aarch64-static "$bin" --version)" >&2
    model=models/gemma-3-270m-Q4_K_M.gguf
    if [ -f "$model" ]; then
        qemu-aarch64-static "$bin" inspect --model "$model" >/dev/null
        echo "build-deb-arm64: smoke test: exo inspect ok" >&2
    fi
fi

# cargo-deb prints the path of the package it wrote on stdout.
# The second build, for ARMv8.2-A with dotprod (Pi 5): ggml compiled with
# -march=armv8.2-a+dotprod+fp16 through a compiler wrapper (llama-cpp-sys-2 itself
# only offers armv8-a on Linux); installed as /usr/lib/exo/exo-dotprod, which
# /usr/bin/exo runs instead of itself on a CPU with dotprod.
dot_dir=${CARGO_TARGET_DIR}-dotprod
CC_aarch64_unknown_linux_gnu=$PWD/scripts/cross/aarch64-dotprod-gcc \
CXX_aarch64_unknown_linux_gnu=$PWD/scripts/cross/aarch64-dotprod-g++ \
CARGO_TARGET_DIR=$dot_dir \
    cargo build --release --locked -p exo --target "$triple"
dot_bin=$dot_dir/$triple/release/exo
if command -v aarch64-linux-gnu-objdump >/dev/null 2>&1; then
    n_dot=$(aarch64-linux-gnu-objdump -d --no-show-raw-insn "$dot_bin" | grep -cE '\s(sdot|udot)\s' || true)
    echo "build-deb-arm64: dotprod instructions in the dotprod build: $n_dot" >&2
    [ "$n_dot" -gt 0 ] || { echo "build-deb-arm64: the dotprod build has no dotprod instructions" >&2; exit 1; }
fi
cp "$dot_bin" "$CARGO_TARGET_DIR/$triple/release/exo-dotprod"

if [ "${EXO_ARM64_SKIP_SMOKE:-0}" != 1 ]; then
    # the baseline picks the dotprod build on a CPU with dotprod, and not without;
    # both give the same greedy text
    model=models/gemma-3-270m-Q4_K_M.gguf
    if [ -f "$model" ]; then
        for cpu in cortex-a72 max; do
            out=$(EXO_DOTPROD_BUILD="$CARGO_TARGET_DIR/$triple/release/exo-dotprod" \
                qemu-aarch64-static -cpu "$cpu" "$bin" run --model "$model" --prompt "The capital of France is" \
                -n 6 --temp 0 --threads 1 --verbose 2>"$CARGO_TARGET_DIR/smoke-$cpu.err")
            build=$(sed -n 's/^exo: build: //p' "$CARGO_TARGET_DIR/smoke-$cpu.err")
            echo "build-deb-arm64: smoke test on $cpu: $build build: '$out'" >&2
            case "$cpu:$build" in
                cortex-a72:baseline | max:dotprod) ;;
                *) echo "build-deb-arm64: on $cpu the $build build ran" >&2; exit 1 ;;
            esac
            eval "text_${cpu//-/_}=\$out"
        done
        # shellcheck disable=SC2154 # set by the eval above
        [ "$text_cortex_a72" = "$text_max" ] || { echo "build-deb-arm64: the two builds disagree" >&2; exit 1; }
    fi
fi

deb=$(cargo deb -p exo --target "$triple" --variant arm64 --no-build | tail -n 1)
[ -f "$deb" ] || { echo "build-deb-arm64: no package at '$deb'" >&2; exit 1; }
arch=$(dpkg-deb -f "$deb" Architecture)
[ "$arch" = arm64 ] || { echo "build-deb-arm64: $deb has Architecture $arch" >&2; exit 1; }
echo "$deb"
