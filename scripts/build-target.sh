#!/usr/bin/env bash
# Cross-builds the agent for one firmware target with the size-optimised
# `firmware` profile.
#
# Usage: scripts/build-target.sh TARGET [--runtime-only]
#   TARGET          a folder of firmware-targets/, e.g. aarch64-unknown-linux-gnu
#   --runtime-only  leave Cranelift out: the agent then loads only plugins
#                   precompiled for TARGET (`ferry plugin precompile`)
#
# Installs what it needs and skips what is present: the rustup target, the
# host's build packages and the target's BUILD_PACKAGES (target.env: Debian's
# cross gcc, the linker and the C compiler for ring and wasmtime's helpers,
# and the target's C headers). Prints only the path of the built binary on
# standard output (callers capture it); all progress, cargo's included, goes
# to standard error. The binary is copied to
# $CARGO_TARGET_DIR/ferry-firmware/TARGET/ferry (or ferry-runtime-only), beside
# cargo's own `firmware` profile directory rather than in it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"

usage() { echo "usage: $0 TARGET [--runtime-only]  (targets: $(cd "$ROOT/firmware-targets" && ls -d */ | tr -d / | tr '\n' ' '))" >&2; exit 2; }
[ $# -ge 1 ] || usage
TARGET=$1
RUNTIME_ONLY=0
case ${2:-} in
    "") ;;
    --runtime-only) RUNTIME_ONLY=1 ;;
    *) usage ;;
esac
DIR=$ROOT/firmware-targets/$TARGET
[ -f "$DIR/target.env" ] || { echo "build-target: no target '$TARGET' in firmware-targets/" >&2; usage; }
# shellcheck source=/dev/null
. "$DIR/target.env"

# shellcheck source=lib/packages.sh
. "$ROOT/scripts/lib/packages.sh"
# shellcheck disable=SC2086 # BUILD_PACKAGES is a space-separated list
ensure_packages "${RUST_BUILD_PACKAGES[@]}" $BUILD_PACKAGES
ensure_rust_targets "$TRIPLE"

# Cargo and the cc crate read these per target, so host builds are untouched.
var=${TRIPLE//-/_}
export "CC_$var=$CROSS_CC"
# The firmware profile aborts on panic, so unwind tables serve only
# backtraces: ask for none. rustc still attaches its personality routine to
# most functions, and LLVM emits unwind tables for every function that has
# one, so most stay all the same; targets with DROP_UNWIND_TABLES=1 leave
# them out at link time (below). A RUSTFLAGS of the caller's own takes
# precedence over this.
export "CARGO_TARGET_${var^^}_RUSTFLAGS=-C force-unwind-tables=no"
# Link flags of the target (target.env), and codegen flags of its
# runtime-only build (below): passed to the final crate only (`cargo rustc …
# -- ARGS`), where everything is linked and, with fat LTO, all code
# generated, so changing them rebuilds no dependency.
FINAL_ARGS=()
# shellcheck disable=SC2086 # LINK_ARGS is a space-separated list
for arg in ${LINK_ARGS:-}; do
    FINAL_ARGS+=(-C "link-arg=$arg")
done
if [ "${DROP_UNWIND_TABLES:-0}" = 1 ]; then
    # shellcheck disable=SC2054 # the commas are inside linker arguments
    FINAL_ARGS+=(-C link-arg=-Wl,--no-eh-frame-hdr -C "link-arg=-Wl,-T,$ROOT/firmware-targets/no-unwind-tables.ld")
fi
if [ -n "$SYSROOT" ]; then
    export "CARGO_TARGET_${var^^}_LINKER=$CROSS_CC"
    export "AR_$var=${CROSS_CC%-gcc}-ar"
fi

# Runtime-only builds are for the smallest devices: the `firmware-small`
# profile, optimised for size ("z") rather than "s".
if [ "$RUNTIME_ONLY" -eq 1 ]; then
    FEATURES=$RUNTIME_ONLY_FEATURES
    # shellcheck disable=SC2086 # a space-separated list of rustc arguments
    for arg in ${RUNTIME_ONLY_CODEGEN_ARGS:-}; do
        FINAL_ARGS+=("$arg")
    done
    NAME=ferry-runtime-only
    PROFILE=firmware-small
else
    NAME=ferry
    PROFILE=firmware
fi

cd "$ROOT"
cargo rustc --locked -p ferry --bin ferry --profile "$PROFILE" --target "$TRIPLE" \
    --no-default-features ${FEATURES:+--features "$FEATURES"} -- "${FINAL_ARGS[@]}" >&2

OUT=$CARGO_TARGET_DIR/ferry-firmware/$TARGET
mkdir -p "$OUT"
cp "$CARGO_TARGET_DIR/$TRIPLE/$PROFILE/ferry" "$OUT/$NAME"
echo "$OUT/$NAME"
