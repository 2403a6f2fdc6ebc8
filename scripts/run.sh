#!/usr/bin/env bash
# Runs the agent from this checkout, after installing and building what it
# needs: the host C toolchain cargo links with (Debian packages, by name) and
# the example Rust plugins (scripts/build-plugins.sh rust), so `demo` runs
# with its threshold filter. Then `cargo run --release -- ARGS`, which
# leaves the binary at target/release/ferry.
#
# Usage: scripts/run.sh demo          the demo: two clouds, one goes offline
#        scripts/run.sh run           the agent on its embedded default config
#        scripts/run.sh ARGS...       any ferry command (`scripts/run.sh --help`)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/packages.sh
. "$ROOT/scripts/lib/packages.sh"

ensure_packages "${RUST_BUILD_PACKAGES[@]}"
# Progress only; the agent's own output is what stdout is for.
"$ROOT/scripts/build-plugins.sh" rust >&2

# From the caller's directory, so relative paths in ARGS mean what they say.
exec cargo run --release --locked --manifest-path "$ROOT/Cargo.toml" -p ferry --bin ferry -- "$@"
