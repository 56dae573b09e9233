#!/usr/bin/env bash
# Post-install test of the Debian package (run as root, on a machine the package may
# change: it installs, runs and purges exo). Usage:
#   packaging/test-deb.sh [path/to/exo_*.deb] [model.gguf]
# Defaults: the newest target/deb-amd64/debian/exo_*.deb (scripts/build-deb.sh) and
# models/gemma-3-270m-Q4_K_M.gguf. Checks the installed files, the conffile, the exo
# user and /var/lib/exo/models, `exo check-config` on the shipped config, then runs
# `exo serve` as the exo user (by hand: systemd need not be PID 1 here), answers one
# completion, and checks that `apt-get purge` removes the binary, the user,
# /var/lib/exo and /etc/exo.
set -euo pipefail
cd "$(dirname "$0")/.."

name=test-deb
# shellcheck source=packaging/test-lib.sh
. packaging/test-lib.sh
test_setup "$@"

step "installing $(basename "$deb")"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$deb" >"$tmp/apt.log" 2>&1 ||
    { cat "$tmp/apt.log"; fail "apt-get install"; }

step "files"
for f in /usr/bin/exo /usr/lib/sysusers.d/exo.conf /etc/exo/exo.toml \
    /usr/share/doc/exo/README.md; do
    [ -f "$f" ] || fail "missing $f"
done
unit=$(dpkg -L exo | grep '/systemd/system/exo.service$') || fail "no exo.service in the package"
[ -f "$unit" ] || fail "missing $unit"
[ "$(stat -c %a /usr/bin/exo)" = 755 ] || fail "/usr/bin/exo is not mode 755"
grep -qx /etc/exo/exo.toml /var/lib/dpkg/info/exo.conffiles || fail "/etc/exo/exo.toml is not a conffile"
# enable = true: deb-systemd-helper links the unit even when systemd is not running.
[ -L /etc/systemd/system/multi-user.target.wants/exo.service ] || fail "exo.service is not enabled"
echo "  $unit, enabled; /etc/exo/exo.toml is a conffile; $(/usr/bin/exo --version)"

step "exo check-config without the model: refused, naming the file"
if /usr/bin/exo check-config --config /etc/exo/exo.toml >"$tmp/check.out" 2>&1; then
    fail "check-config accepted a config whose model file is missing"
fi
grep -q "gemma-3-270m-Q4_K_M.gguf" "$tmp/check.out" || { cat "$tmp/check.out"; fail "check-config did not name the missing model"; }
sed 's/^/  /' "$tmp/check.out" | head -n 3

step "user and state directory"
getent passwd exo >/dev/null || fail "no exo user"
getent group exo >/dev/null || fail "no exo group"
[ -d /var/lib/exo/models ] || fail "no /var/lib/exo/models"
[ "$(stat -c %U:%G /var/lib/exo/models)" = exo:exo ] || fail "/var/lib/exo/models is not owned by exo"
echo "  $(getent passwd exo)"

step "exo check-config --config /etc/exo/exo.toml (model in place)"
install -o exo -g exo -m 0644 "$model" /var/lib/exo/models/
/usr/bin/exo check-config --config /etc/exo/exo.toml >"$tmp/check.out" || fail "check-config"
sed 's/^/  /' "$tmp/check.out" | head -n 5

step "exo serve as the exo user"
port=$(free_port)
cat >"$tmp/exo.toml" <<TOML
[model]
path = "/var/lib/exo/models/$(basename "$model")"
[api]
listen = "127.0.0.1:$port"
[engine]
ctx = 512
max_slots = 1
TOML
chmod 644 "$tmp/exo.toml"
serve_complete "$tmp/exo.toml" "$port"

step "apt-get purge exo"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q exo >"$tmp/apt.log" 2>&1 ||
    { cat "$tmp/apt.log"; fail "apt-get purge"; }
[ ! -e /usr/bin/exo ] || fail "/usr/bin/exo is still there"
[ ! -e "$unit" ] || fail "$unit is still there"
[ ! -e /etc/systemd/system/multi-user.target.wants/exo.service ] || fail "exo.service is still enabled"
! getent passwd exo >/dev/null || fail "the exo user is still there"
! getent group exo >/dev/null || fail "the exo group is still there"
[ ! -e /var/lib/exo ] || fail "/var/lib/exo is still there"
[ ! -e /etc/exo ] || fail "/etc/exo is still there"
step "PASS"
