#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with only rustup.
# Installs what the tests need (idempotently), then checks formatting and
# lints and runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/packages.sh
. scripts/lib/packages.sh

# A target dir outside the clone is reused across clean clones when present.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

step "test dependencies"
ensure_packages "${RUST_BUILD_PACKAGES[@]}"
scripts/install-test-deps.sh

step "format and lints"
ensure_rust_components rustfmt clippy
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
scripts/build-plugins.sh # tests/plugins.rs runs the components it builds into plugins/build
cargo test --workspace --locked

step "runtime-only build (no Cranelift): lints and the plugin engine's tests"
cargo clippy -p ferry --locked --no-default-features --all-targets -- -D warnings
cargo test -p ferry --locked --no-default-features --lib -- plugin::engine cli::tests

step "firmware targets' systemd units (systemd-analyze, offline)"
scripts/check-units.sh

# Cross builds, smoke-tested under qemu-user (firmware-targets/README.md):
# aarch64 (Cranelift) and armv7 (Pulley, also without the compiler: the build
# small ARMv7 devices want). The smoke test checks behaviour, not size, so CI
# builds the `firmware` profile without fat LTO and with parallel codegen:
# that is what keeps four cold release builds of wasmtime inside CI's time.
# The README's size figures come from the full profile (build-target.sh as
# documented). x86-64 musl (static) runs natively, so it costs only its
# build (14 min cold on the shared 2-core machine, beside another build).
# riscv64 builds the same way but is left out of CI for time, as is
# aarch64's runtime-only build.
step "firmware targets under qemu-user"
export CARGO_PROFILE_FIRMWARE_LTO="${CARGO_PROFILE_FIRMWARE_LTO:-off}"
export CARGO_PROFILE_FIRMWARE_CODEGEN_UNITS="${CARGO_PROFILE_FIRMWARE_CODEGEN_UNITS:-16}"
# The runtime-only builds' profile (inherits `firmware`), set as explicitly.
export CARGO_PROFILE_FIRMWARE_SMALL_LTO="$CARGO_PROFILE_FIRMWARE_LTO"
export CARGO_PROFILE_FIRMWARE_SMALL_CODEGEN_UNITS="$CARGO_PROFILE_FIRMWARE_CODEGEN_UNITS"
scripts/smoke-target.sh aarch64-unknown-linux-gnu
scripts/smoke-target.sh armv7-unknown-linux-gnueabihf --runtime-only
scripts/smoke-target.sh x86_64-unknown-linux-musl

# The size budget, checked on the documented fat-LTO builds (about 3 min each
# from cold): aarch64 runtime-only, the closest to 6 MB, and x86-64 musl's,
# whose toolchains CI installs anyway; riscv64 and armv7 are measured by hand.
step "firmware size budget (runtime-only, fat LTO)"
scripts/check-size.sh aarch64-unknown-linux-gnu x86_64-unknown-linux-musl
