#!/usr/bin/env bash
# Checks systemd/exo.service offline (systemd need not be PID 1):
#  - `systemd-analyze verify` in a scratch root holding the unit, the stock units it
#    depends on and stand-ins for /usr/bin/exo and /bin/kill; any warning fails;
#  - `systemd-analyze security --offline=true`: fails above an exposure of 2.0.
# Installs the `systemd` package if systemd-analyze is missing (Debian/Ubuntu).
set -euo pipefail
cd "$(dirname "$0")/.."
unit=systemd/exo.service
max_exposure=${EXO_MAX_EXPOSURE:-2.0}

if ! command -v systemd-analyze >/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get install -y --no-install-recommends systemd >/dev/null
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
printf '#!/bin/sh\n' >"$root/usr/bin/exo"
printf '#!/bin/sh\n' >"$root/bin/kill"
chmod +x "$root/usr/bin/exo" "$root/bin/kill"
for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -d "$d" ]; then cp -a "$d" "$root/usr/lib/systemd/"; break; fi
done
cp "$unit" "$root/etc/systemd/system/exo.service"
out=$(systemd-analyze verify --man=no --root="$root" exo.service 2>&1) || {
    echo "$out"; echo "check-unit: systemd-analyze verify failed" >&2; exit 1; }
if [ -n "$out" ]; then
    echo "$out"; echo "check-unit: systemd-analyze verify warned" >&2; exit 1
fi
echo "check-unit: verify OK"

report=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1) || true
score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
    echo "$report"; echo "check-unit: no exposure score" >&2; exit 1
fi
if awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s > m) }'; then
    printf '%s\n' "$report" | grep '✗' || true
    echo "check-unit: exposure $score is above $max_exposure" >&2
    exit 1
fi
echo "check-unit: exposure $score (at most $max_exposure) OK"
