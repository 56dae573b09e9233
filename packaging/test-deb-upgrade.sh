#!/usr/bin/env bash
# Upgrade test of the Debian package (run as root; it installs, upgrades twice and purges
# exo). Usage:
#   packaging/test-deb-upgrade.sh [path/to/exo_*.deb] [model.gguf]
# Defaults as packaging/test-deb.sh. From the given package it makes two "newer" ones
# with dpkg-deb (same files, versions +upgrade1 and +upgrade2; the second also ships a
# changed /etc/exo/exo.toml), then:
#   1. installs the package and edits /etc/exo/exo.toml as a user would (API port,
#      context, slots);
#   2. upgrades with a plain `apt-get install ./exo_…+upgrade1.deb`: the edited config
#      is kept (the packaged one did not change);
#   3. upgrades to +upgrade2, whose packaged config changed too, with
#      --force-confdef --force-confold (unattended: keep the user's file): the edited
#      config is kept and the new default lands beside it as exo.toml.dpkg-dist;
# after each step: the version, the unit still enabled, the exo user and the model kept,
# and `exo serve` as the exo user with /etc/exo/exo.toml answers a completion on the
# user's port. Then purges.
set -euo pipefail
cd "$(dirname "$0")/.."

name=test-deb-upgrade
# shellcheck source=packaging/test-lib.sh
. packaging/test-lib.sh
test_setup "$@"

# --- the newer packages ---------------------------------------------------------------
v0=$(dpkg-deb -f "$deb" Version)
repack() { # repack SUFFIX CHANGE_CONFIG(0|1) -> prints the path
    local d=$tmp/pkg-$1
    dpkg-deb -R "$deb" "$d"
    sed -i "s/^Version: .*/Version: $v0+$1/" "$d/DEBIAN/control"
    if [ "$2" = 1 ]; then
        printf '\n# (%s: a changed default shipped by a newer package)\n' "$1" >>"$d/etc/exo/exo.toml"
        (cd "$d" && md5sum etc/exo/exo.toml) >"$tmp/md5"
        # DEBIAN/md5sums lists the files by path without a leading slash.
        sed -i "\\| etc/exo/exo.toml\$|d" "$d/DEBIAN/md5sums" 2>/dev/null || true
        cat "$tmp/md5" >>"$d/DEBIAN/md5sums"
    fi
    dpkg-deb --root-owner-group -Zxz -b "$d" "$tmp/exo_$v0+$1.deb" >/dev/null
    rm -rf "$d"
    echo "$tmp/exo_$v0+$1.deb"
}
deb1=$(repack upgrade1 0)
deb2=$(repack upgrade2 1)
{ dpkg --compare-versions "$v0+upgrade2" gt "$v0+upgrade1" && dpkg --compare-versions "$v0+upgrade1" gt "$v0"; } ||
    fail "version order"

apt_install() { # apt_install DEB [apt options...]
    local d=$1; shift
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" "$d" </dev/null >"$tmp/apt.log" 2>&1 ||
        { cat "$tmp/apt.log"; fail "apt-get install $(basename "$d")"; }
}

port=$(free_port)
check() { # check VERSION: the installed package works with the user's config
    local want=$1
    [ "$(dpkg-query -W -f='${Version}' exo)" = "$want" ] || fail "installed version is not $want"
    cmp -s /etc/exo/exo.toml "$tmp/user.toml" || { diff "$tmp/user.toml" /etc/exo/exo.toml || true; fail "the user's /etc/exo/exo.toml was not kept"; }
    [ -L /etc/systemd/system/multi-user.target.wants/exo.service ] || fail "exo.service is no longer enabled"
    getent passwd exo >/dev/null || fail "the exo user is gone"
    cmp -s "$model" "/var/lib/exo/models/$(basename "$model")" || fail "the model in /var/lib/exo/models is gone"
    /usr/bin/exo check-config --config /etc/exo/exo.toml >/dev/null || fail "check-config on the kept config"
    serve_complete /etc/exo/exo.toml "$port"
    echo "  $want: config kept, unit enabled, user and model kept, $(/usr/bin/exo --version), serves on the user's port $port"
}

step "installing $(basename "$deb")"
apt_install "$deb"
install -o exo -g exo -m 0644 "$model" /var/lib/exo/models/
step "editing /etc/exo/exo.toml as a user (api.listen 127.0.0.1:$port, ctx 512, max_slots 1)"
sed -i -e "s|^listen = \"0.0.0.0:8080\"|listen = \"127.0.0.1:$port\"|" \
    -e 's|^# ctx = 4096|ctx = 512|' -e 's|^# max_slots = 4|max_slots = 1|' /etc/exo/exo.toml
{ grep -q "127.0.0.1:$port" /etc/exo/exo.toml && grep -qx 'ctx = 512' /etc/exo/exo.toml; } || fail "editing the config"
cp /etc/exo/exo.toml "$tmp/user.toml"
check "$v0"

step "upgrade to $v0+upgrade1 (same packaged config): apt-get install ./$(basename "$deb1")"
apt_install "$deb1"
check "$v0+upgrade1"

step "upgrade to $v0+upgrade2 (packaged config changed too), keeping the user's: --force-confdef --force-confold"
apt_install "$deb2" -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
check "$v0+upgrade2"
[ -f /etc/exo/exo.toml.dpkg-dist ] || fail "no /etc/exo/exo.toml.dpkg-dist with the new default"
grep -q 'upgrade2: a changed default' /etc/exo/exo.toml.dpkg-dist || fail "exo.toml.dpkg-dist is not the new default"
echo "  the new default is /etc/exo/exo.toml.dpkg-dist"

step "apt-get purge exo"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q exo >"$tmp/apt.log" 2>&1 ||
    { cat "$tmp/apt.log"; fail "apt-get purge"; }
{ [ ! -e /usr/bin/exo ] && [ ! -e /var/lib/exo ]; } || fail "purge left files"
rm -f /etc/exo/exo.toml.dpkg-dist
rmdir /etc/exo 2>/dev/null || true
step "PASS"
