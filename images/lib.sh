# shellcheck shell=bash
# Shared helpers of images/build.sh and images/boot-test.sh (sourced, not run).

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# apt-get install the packages that are missing (dpkg -s), with one apt-get update first.
apt_ensure() {
    local missing=() p
    for p in "$@"; do
        dpkg -s "${p%%/*}" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades "${missing[@]}" >&2
}

# qemu-system-{x86,arm} from Debian 12 Breaks a newer (backported) qemu-utils: take the
# bookworm qemu-utils in the same apt call (a downgrade when the backport is installed).
qemu_ensure() { # qemu_ensure x86|arm
    local pkg=qemu-system-$1
    dpkg -s "$pkg" >/dev/null 2>&1 && return 0
    local extra=()
    if dpkg -s qemu-utils >/dev/null 2>&1 &&
        dpkg-query -W -f='${Version}' qemu-utils | grep -q bpo; then
        extra=(qemu-utils/bookworm)
    fi
    apt_ensure "$pkg" "${extra[@]}"
}

# Runs arm64 binaries in a chroot through qemu-user (binfmt_misc; by hand when systemd
# is not PID 1, as in a container).
binfmt_arm64_ensure() {
    apt_ensure qemu-user-static binfmt-support arch-test
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        $SUDO update-binfmts --enable qemu-aarch64 || true
    fi
    arch-test arm64 >/dev/null || die "arm64 binaries do not run here (binfmt_misc/qemu-user)"
}

build_deps_ensure() {
    apt_ensure mmdebstrap e2fsprogs zstd fdisk dosfstools mtools
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
