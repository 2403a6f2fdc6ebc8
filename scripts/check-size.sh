#!/usr/bin/env bash
# Builds runtime-only firmware binaries exactly as documented (the
# `firmware-small` profile with fat LTO, scripts/build-target.sh) and fails
# if one is over the 6 MB budget (firmware-targets/README.md).
#
# Usage: scripts/check-size.sh TARGET...
#   TARGET  a folder of firmware-targets/, e.g. x86_64-unknown-linux-musl
#
# CI's smoke builds skip fat LTO for time, so their sizes say nothing about
# the budget; this builds into its own directory under CARGO_TARGET_DIR so the
# two kinds of build do not evict each other's cached dependencies.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Decimal, as the README's size table counts.
BUDGET=6000000

[ $# -ge 1 ] || { echo "usage: $0 TARGET..." >&2; exit 2; }

# The documented size profile, whatever the caller's environment overrides.
unset CARGO_PROFILE_FIRMWARE_LTO CARGO_PROFILE_FIRMWARE_CODEGEN_UNITS \
    CARGO_PROFILE_FIRMWARE_SMALL_LTO CARGO_PROFILE_FIRMWARE_SMALL_CODEGEN_UNITS
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}/size"

failed=0
for target in "$@"; do
    bin=$("$ROOT/scripts/build-target.sh" "$target" --runtime-only)
    size=$(stat -c %s "$bin")
    if [ "$size" -le "$BUDGET" ]; then
        echo "check-size $target runtime-only: $size B, $((BUDGET - size)) B under the $BUDGET B budget"
    else
        echo "check-size $target runtime-only: $size B, $((size - BUDGET)) B over the $BUDGET B budget" >&2
        failed=1
    fi
done
exit "$failed"
