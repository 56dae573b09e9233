#!/usr/bin/env bash
# The mmdebstrap hooks below are single-quoted on purpose: "$1" is the chroot, for mmdebstrap.
# shellcheck disable=SC2016
# Builds a bootable exo image (Debian 12 + the exo .deb, exo.service enabled).
#
#   images/build.sh virt-amd64|virt-arm64|pi4 [--deb PATH] [--model FILE]
#   images/build.sh model-disk OUT.img [DIR|FILE...]   (an ext4 disk labelled EXOMODEL)
#
# Outputs under target/images/TARGET/ (never committed):
#   virt-*: rootfs.ext4 (raw ext4, no partition table, root=/dev/vda), vmlinuz,
#           initrd.img, cmdline (the kernel command line for qemu -append)
#   pi4:    exo-pi4.img (MBR: RASPIFIRM FAT32 with firmware/kernel/initrd, RASPIROOT
#           ext4) and exo-pi4.img.bmap; --model puts the model on RASPIFIRM under exo/
#
# Two layers: the Debian base (mmdebstrap, the slow part: kernel + initramfs, ~4 min for
# arm64 under qemu-user, ~20 min for the Pi) is cached as a tarball under
# ${EXO_IMAGE_CACHE:-~/.cache/exo-images}, keyed by a hash of its recipe; each build
# unpacks it, installs the .deb (chroot dpkg -i, arm64 through binfmt/qemu-user), adds
# the image files from images/rootfs/ and writes the file systems with mkfs.ext4 -d and
# mtools: no loop device, no mount of the image.
#
# The .deb defaults to the newest target/deb-{amd64,arm64}/debian/exo_*.deb, built by
# scripts/build-deb.sh / scripts/build-deb-arm64.sh when missing. Host packages
# (mmdebstrap, arch-test, qemu-user-static, binfmt, e2fsprogs, dosfstools, mtools, bmap-
# tools) are installed when missing. Needs root (chroot, file ownership in the image).
# SOURCE_DATE_EPOCH defaults to the last commit's time (mmdebstrap, mkfs.ext4, mkfs.vfat).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
# shellcheck source=images/lib.sh
. images/lib.sh

usage() { sed -n '4,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
target=$1; shift

[ "$(id -u)" -eq 0 ] || die "run as root (chroot, ownership of files in the image)"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
mirror=${EXO_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${EXO_IMAGE_CACHE:-$HOME/.cache/exo-images}

# --- an ext4 disk holding models and optional seed files (see images/rootfs/usr/lib/exo-image/exo-firstboot)
model_disk() { # model_disk OUT.img SRC...   (a SRC directory's contents, or files)
    local out=$1; shift
    local dir; dir=$(mktemp -d)
    local s
    for s in "$@"; do
        if [ -d "$s" ]; then cp -a "$s"/. "$dir"/; else cp -a "$s" "$dir"/; fi
    done
    local mb; mb=$(( $(du -sm "$dir" | cut -f1) * 11 / 10 + 16 ))
    rm -f "$out"
    mkfs.ext4 -q -F -L EXOMODEL -m 0 -E root_owner=0:0 -d "$dir" "$out" "${mb}M"
    rm -rf "$dir"
    log "model disk $out (${mb} MiB, label EXOMODEL)"
}
if [ "$target" = model-disk ]; then
    [ $# -ge 1 ] || usage
    apt_ensure e2fsprogs
    model_disk "$@"
    exit 0
fi

deb="" model=""
while [ $# -gt 0 ]; do
    case $1 in
    --deb) deb=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    *) usage ;;
    esac
done

case $target in
virt-amd64) arch=amd64 kind=virt ;;
virt-arm64) arch=arm64 kind=virt ;;
pi4) arch=arm64 kind=pi ;;
*) usage ;;
esac
[ -z "$model" ] || [ -f "$model" ] || die "no model file at $model"

t0=$(date +%s)
build_deps_ensure
[ "$arch" = arm64 ] && binfmt_arm64_ensure

if [ -z "$deb" ]; then
    # shellcheck disable=SC2012
    deb=$(ls -t target/deb-"$arch"/debian/exo_*_"$arch".deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        log "no $arch .deb yet: building it"
        if [ "$arch" = amd64 ]; then ./scripts/build-deb.sh >/dev/null; else ./scripts/build-deb-arm64.sh >/dev/null; fi
        # shellcheck disable=SC2012
        deb=$(ls -t target/deb-"$arch"/debian/exo_*_"$arch".deb | head -n 1)
    fi
fi
[ -f "$deb" ] || die "no package at $deb"
[ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || die "$deb is not an $arch package"

# --- the base layer ------------------------------------------------------------------
common_pkgs="systemd,systemd-sysv,udev,dbus,kmod,iproute2,netbase,procps,zstd,initramfs-tools,less,avahi-daemon,avahi-utils,libnss-mdns"
if [ $kind = virt ]; then
    suite_components=main
    pkgs="$common_pkgs,linux-image-cloud-$arch"
else
    suite_components="main,non-free-firmware"
    pkgs="$common_pkgs,linux-image-arm64,raspi-firmware,systemd-timesyncd,openssh-server,dosfstools"
fi
# Virt images: an initramfs with just the drivers for the root disk (MODULES=dep does not
# work in a chroot). The Pi keeps Debian's MODULES=most: it must find its SD card or USB
# disk on hardware this machine cannot boot.
hook_virt='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=list > "$1/etc/initramfs-tools/conf.d/exo-image" && mkdir -p "$1/usr/share/initramfs-tools/modules.d" && printf "%s\n" virtio_pci virtio_mmio virtio_blk virtio_scsi ext4 > "$1/usr/share/initramfs-tools/modules.d/exo-image"'
# The Pi: /etc/default/raspi-firmware is a conffile, set in the exo layer (a file made
# before the package is installed would stop dpkg at a conffile prompt).
hook_pi='mkdir -p "$1/etc/default"'
if [ $kind = virt ]; then hook=$hook_virt; else hook=$hook_pi; fi
key=$(printf '%s\n' bookworm "$arch" "$suite_components" "$pkgs" "$hook" "$mirror" v1 | sha256sum | cut -c1-16)
base=$cache/base-$target-$key.tar.zst
mkdir -p "$cache"
if [ -f "$base" ]; then
    log "base layer: cached $base"
else
    log "base layer: mmdebstrap bookworm $arch ($pkgs) -> $base"
    tb=$(date +%s)
    mmdebstrap --variant=minbase --arch="$arch" --components="$suite_components" \
        --include="$pkgs" --essential-hook="$hook" \
        --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id; : > "$1/etc/machine-id"' \
        --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
        bookworm "$base.tmp.tar" "$mirror" >&2 || { rm -f "$base.tmp.tar"; die "mmdebstrap failed (log above)"; }
    zstd -q -T0 --rm -f "$base.tmp.tar" -o "$base.tmp"
    mv "$base.tmp" "$base"
    log "base layer built in $(( $(date +%s) - tb )) s"
fi

# --- the exo layer -------------------------------------------------------------------
out=$here/target/images/$target
root=$out/rootfs
mnt_proc=""
cleanup() {
    if [ -n "$mnt_proc" ]; then umount "$mnt_proc" 2>/dev/null || true; fi
}
trap cleanup EXIT
rm -rf "$out"
mkdir -p "$root"
tar --zstd -xf "$base" -C "$root" --numeric-owner
log "exo layer: $(basename "$deb")"
cp "$deb" "$root/tmp/exo.deb"
mount -t proc proc "$root/proc"; mnt_proc=$root/proc
dpkg_log_lines=0
[ ! -f "$root/var/log/dpkg.log" ] || dpkg_log_lines=$(wc -l <"$root/var/log/dpkg.log")
chroot "$root" env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/exo.deb >&2
rm -f "$root/tmp/exo.deb"
# dpkg logs the wall clock: its lines for exo get SOURCE_DATE_EPOCH's time instead.
sed -i "$(( dpkg_log_lines + 1 )),\$ s/^[0-9-]\{10\} [0-9:]\{8\} /$(date -u -d "@$SOURCE_DATE_EPOCH" '+%F %T') /" \
    "$root/var/log/dpkg.log"
umount "$root/proc"; mnt_proc=""
[ -L "$root/etc/systemd/system/multi-user.target.wants/exo.service" ] || die "exo.service is not enabled in the image"

# Image files: first-boot model/config step, boot report, networking. Owned by root,
# not writable by group/other, dated SOURCE_DATE_EPOCH whatever the checkout's; the
# directories that exist in the base (/etc, /usr/lib, ...) keep their owner and mode.
tar -C images/rootfs -cf - --sort=name --owner=0 --group=0 --numeric-owner --mode=go-w \
    --mtime="@$SOURCE_DATE_EPOCH" . | tar -C "$root" -xf - --no-overwrite-dir --numeric-owner
ln -sf /etc/systemd/system/exo-firstboot.service "$root/etc/systemd/system/multi-user.target.wants/exo-firstboot.service"
ln -sf /etc/systemd/system/exo-boot-report.service "$root/etc/systemd/system/multi-user.target.wants/exo-boot-report.service"
ln -sf /lib/systemd/system/avahi-daemon.service "$root/etc/systemd/system/multi-user.target.wants/avahi-daemon.service"
ln -sf /etc/systemd/system/exo-ssh-host-keys.service "$root/etc/systemd/system/multi-user.target.wants/exo-ssh-host-keys.service"
# openssh-server's postinst made host keys in the cached base: every image would share
# them. exo-ssh-host-keys.service makes new ones on the first boot.
rm -f "$root"/etc/ssh/ssh_host_*_key "$root"/etc/ssh/ssh_host_*_key.pub
ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
mkdir -p "$root/etc/systemd/system/sockets.target.wants" "$root/etc/systemd/system/network-online.target.wants"
ln -sf /lib/systemd/system/systemd-networkd.socket "$root/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$root/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
echo "exo" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\texo\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
if [ $kind = virt ]; then
    echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$root/etc/fstab"
else
    printf '%s\n' "LABEL=RASPIROOT / ext4 rw,errors=remount-ro 0 1" \
        "LABEL=RASPIFIRM /boot/firmware vfat rw,nofail,umask=0022 0 2" >"$root/etc/fstab"
fi
# No password for root: log in on the console (virt), or with a key (pi: exo/authorized_keys
# on the FAT partition, see exo-firstboot).
if [ -n "$model" ] && [ $kind = virt ]; then
    install -o "$(stat -c %u "$root/var/lib/exo/models")" -g "$(stat -c %g "$root/var/lib/exo/models")" \
        -m 0644 "$model" "$root/var/lib/exo/models/"
fi

kernels=("$root"/boot/vmlinuz-*)
initrds=("$root"/boot/initrd.img-*)
{ [ ${#kernels[@]} -eq 1 ] && [ -f "${kernels[0]}" ] && [ ${#initrds[@]} -eq 1 ] && [ -f "${initrds[0]}" ]; } ||
    die "expected one kernel and one initrd in /boot: ${kernels[*]} ${initrds[*]}"
cp "${kernels[0]}" "$out/vmlinuz"
cp "${initrds[0]}" "$out/initrd.img"

uuid() { printf '%s' "$1-$SOURCE_DATE_EPOCH" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/'; }
# Files written by this build (dpkg, the steps above, the Pi's firmware hook) would carry
# today's mtime: clamp every mtime to SOURCE_DATE_EPOCH.
clamp_mtimes() { find "$@" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +; }
# mkfs.ext4 -d (e2fsprogs 1.47.0) takes each inode's atime and ctime from the source tree,
# i.e. from this build's unpacking: set both to SOURCE_DATE_EPOCH (crtime already is).
# Its directory order is alphasort(), hence LC_ALL=C.
mkfs_ext4() { # mkfs_ext4 IMG SIZE_MB DIR MKFS-OPTIONS...
    local img=$1 mb=$2 dir=$3 err; shift 3
    LC_ALL=C mkfs.ext4 -q -F -U "$(uuid root)" -E "hash_seed=$(uuid hash)" "$@" -d "$dir" "$img" "${mb}M"
    [ -z "$(find "$dir" -name '*"*' -print -quit)" ] || die "a file name in $dir holds a double quote (debugfs)"
    err=$( (cd "$dir" && find . -printf '%P\n') |
        awk -v t="@$SOURCE_DATE_EPOCH" '{ printf "sif \"/%s\" atime %s\nsif \"/%s\" ctime %s\n", $0, t, $0, t }' |
        debugfs -w -f - "$img" 2>&1 >/dev/null | grep -v '^debugfs [0-9.]* (' || true)
    [ -z "$err" ] || die "debugfs could not set the times in $img: $(echo "$err" | head -n 3)"
}
if [ $kind = virt ]; then
    size=${EXO_IMAGE_SIZE_MB:-$(( $(du -sm "$root" | cut -f1) + 768 ))}
    clamp_mtimes "$root"
    mkfs_ext4 "$out/rootfs.ext4" "$size" "$root" -L exo-root
    if [ $arch = amd64 ]; then console=ttyS0; else console=ttyAMA0; fi
    echo "root=/dev/vda rw console=$console" >"$out/cmdline"
    rm -rf "$root"
    log "built $out/rootfs.ext4 (${size} MiB), vmlinuz, initrd.img in $(( $(date +%s) - t0 )) s"
    exit 0
fi

# Pi 4: the firmware partition is what raspi-firmware's kernel hook writes to
# /boot/firmware: run it again with the root partition by label and the serial console
# on the GPIO UART (it copies files, no initramfs).
sed -i -e 's|^#\?ROOTPART=.*|ROOTPART=LABEL=RASPIROOT|' -e 's|^#\?CONSOLES=.*|CONSOLES="ttyS1,115200 tty0"|' \
    "$root/etc/default/raspi-firmware"
grep -qx 'ROOTPART=LABEL=RASPIROOT' "$root/etc/default/raspi-firmware" ||
    echo 'ROOTPART=LABEL=RASPIROOT' >>"$root/etc/default/raspi-firmware"
mount -t proc proc "$root/proc"; mnt_proc=$root/proc
chroot "$root" env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware >&2
umount "$root/proc"; mnt_proc=""
fw=$root/boot/firmware
{ [ -f "$fw/config.txt" ] && [ -f "$fw/cmdline.txt" ]; } || die "raspi-firmware left no config.txt/cmdline.txt in /boot/firmware"
grep -q 'root=LABEL=RASPIROOT' "$fw/cmdline.txt" || die "cmdline.txt does not boot LABEL=RASPIROOT: $(cat "$fw/cmdline.txt")"
fwdir=$out/firmware
mv "$fw" "$fwdir"
mkdir -p "$fw" "$fwdir/exo"
cp images/pi-firmware-README.txt "$fwdir/exo/README.txt"
[ -z "$model" ] || cp "$model" "$fwdir/exo/"
fw_mb=$(( $(du -sm "$fwdir" | cut -f1) + 64 ))
[ "$fw_mb" -ge 512 ] || fw_mb=512
root_mb=${EXO_IMAGE_SIZE_MB:-$(( $(du -sm "$root" | cut -f1) + 768 ))}
fwimg=$out/firmware.vfat
rm -f "$fwimg"
# --invariant before -i: it sets a constant volume id of its own.
mkfs.vfat -C -F 32 -n RASPIFIRM --invariant -i "$(printf '%08x' $(( SOURCE_DATE_EPOCH % 4294967296 )))" "$fwimg" $(( fw_mb * 1024 )) >/dev/null
clamp_mtimes "$fwdir" "$root"
# FAT keeps local time: the same in every build with TZ=UTC.
TZ=UTC mcopy -s -m -i "$fwimg" "$fwdir"/* ::/
mkfs_ext4 "$out/root.ext4" "$root_mb" "$root" -L RASPIROOT
img=$out/exo-pi4.img
rm -f "$img"
# 4 MiB alignment for SD cards; sfdisk works on a plain file.
truncate -s $(( 4 + fw_mb + root_mb ))M "$img"
printf 'label: dos\nlabel-id: 0x%08x\nstart=4MiB, size=%dMiB, type=c, bootable\nstart=%dMiB, type=83\n' \
    $(( SOURCE_DATE_EPOCH % 4294967296 )) "$fw_mb" $(( 4 + fw_mb )) | sfdisk -q "$img"
dd if="$fwimg" of="$img" bs=1M seek=4 conv=notrunc,sparse status=none
dd if="$out/root.ext4" of="$img" bs=1M seek=$(( 4 + fw_mb )) conv=notrunc,sparse status=none
rm -f "$fwimg" "$out/root.ext4"
echo "root=LABEL=RASPIROOT rw console=ttyAMA0" >"$out/cmdline"
rm -rf "$root" "$fwdir"
apt_ensure bmap-tools
bmaptool create -o "$img.bmap" "$img"
log "built $img ($(( 4 + fw_mb + root_mb )) MiB) in $(( $(date +%s) - t0 )) s"
