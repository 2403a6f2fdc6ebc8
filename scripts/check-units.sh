#!/usr/bin/env bash
# Checks each firmware target's systemd unit with systemd's own tools, offline
# (no booted systemd needed): `systemd-analyze verify` (unknown keys, keys in
# the wrong section, bad values, missing dependencies) and
# `systemd-analyze security --offline` (the sandbox's exposure score must stay
# at or below 2.0, "OK" on systemd's scale).
#
# Usage: scripts/check-units.sh
#
# verify also requires ExecStart's binary to exist and be executable, so each
# unit is checked as a copy whose ExecStart names an empty stand-in script.
# This is a static check: it does not start the agent under systemd.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# systemd counts exposure in tenths: 20 is 2.0, the top of its "OK" band.
THRESHOLD=20

# shellcheck source=lib/packages.sh
. "$ROOT/scripts/lib/packages.sh"
ensure_packages "${UNIT_CHECK_PACKAGES[@]}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-units.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
printf '#!/bin/sh\n' >"$WORK/ferry"
chmod 755 "$WORK/ferry"

failed=0
for unit in "$ROOT"/firmware-targets/*/ferry.service; do
    target=$(basename "$(dirname "$unit")")
    grep -q '^ExecStart=/usr/local/bin/ferry ' "$unit" || {
        echo "check-units $target: ExecStart does not run /usr/local/bin/ferry" >&2
        failed=1
        continue
    }
    sed "s#^ExecStart=/usr/local/bin/ferry #ExecStart=$WORK/ferry #" "$unit" >"$WORK/ferry.service"
    # verify prints problems but exits 0 for some of them (e.g. unknown keys).
    if ! systemd-analyze verify "$WORK/ferry.service" >"$WORK/verify.log" 2>&1 || [ -s "$WORK/verify.log" ]; then
        echo "check-units $target: systemd-analyze verify reports:" >&2
        sed "s#$WORK/##" "$WORK/verify.log" >&2
        failed=1
        continue
    fi
    if ! systemd-analyze security --offline=yes --threshold="$THRESHOLD" "$WORK/ferry.service" >"$WORK/security.log" 2>&1; then
        echo "check-units $target: sandbox exposure above 2.0:" >&2
        grep -E '^✗|Overall' "$WORK/security.log" >&2 || cat "$WORK/security.log" >&2
        failed=1
        continue
    fi
    echo "check-units $target: verified; $(grep -o 'Overall exposure level.*' "$WORK/security.log")"
done
exit "$failed"
