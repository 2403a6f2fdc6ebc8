# shellcheck shell=bash disable=SC2034 # its lists are read by the scripts that source it
# Installs what the scripts rely on, by Debian package name and rustup
# target/component name. Sourced by every script that installs anything:
#
#     . "$ROOT/scripts/lib/packages.sh"
#     ensure_packages "${RUST_BUILD_PACKAGES[@]}"
#
# Scripts check for packages (dpkg-query), never for commands: a command can
# be on one machine's PATH from elsewhere and missing on a fresh one, which
# is how a missing package stays hidden (issue 15). scripts/fresh-machine.sh
# runs the README's commands in a bare Debian 12 root to catch one.
#
# Every list of packages is declared once, here or (per firmware target) in
# firmware-targets/*/target.env. All output goes to standard error, so a
# script that prints a value on standard output keeps it clean.

# The C compiler and linker cargo needs on the host (linking, and the C
# parts of ring, wasmtime and mimalloc), and the CA certificates it reaches
# crates.io with.
RUST_BUILD_PACKAGES=(gcc libc6-dev ca-certificates)
# Debian's Python with venv (no ensurepip without python3-venv): the Python
# tools are installed into venvs under the tools dir, never system-wide.
PYTHON_PACKAGES=(python3 python3-venv)
# The MQTT broker tests and smoke tests start, each on its own ephemeral
# port (ensure_broker).
BROKER_PACKAGES=(mosquitto)
# The interop matrix's other broker implementations from Debian
# (tests/tests/interop.rs); aedes, amqtt and RMQTT come from npm, PyPI and
# crates.io (scripts/install-test-deps.sh). Node.js runs aedes.
INTEROP_PACKAGES=(nats-server rabbitmq-server nodejs)
# The tests, besides the broker: openssl for the test PKI, systemd-analyze
# for the service units, Python for the consumer example.
TEST_PACKAGES=(openssl systemd "${PYTHON_PACKAGES[@]}")
# scripts/check-units.sh: systemd-analyze.
UNIT_CHECK_PACKAGES=(systemd)
# The C plugin: clang and lld for wasm32, wasi-libc and its compiler runtime.
PLUGIN_C_PACKAGES=(clang lld wasi-libc libclang-rt-dev-wasm32)
# scripts/smoke-target.sh, besides the broker and its target's RUN_PACKAGES:
# the broker's clients, curl for the HTTP API, Python for ports and JSON.
SMOKE_PACKAGES=(mosquitto-clients curl python3)
# scripts/fresh-machine.sh on the host.
FRESH_MACHINE_PACKAGES=(debootstrap)

_pkg_say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# package_installed PKG: true when dpkg has PKG fully installed.
package_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# ensure_packages PKG...: installs those of PKG... that are not installed,
# without recommends, non-interactively, as root or through sudo. apt-get
# update runs only when something is missing, so a machine that has
# everything never touches apt (re-runs are instant and work offline).
ensure_packages() {
    local missing=() pkg
    command -v dpkg-query >/dev/null 2>&1 || {
        _pkg_say "not a Debian system: install $* with your package manager"
        return 1
    }
    for pkg in "$@"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    _pkg_say "installing ${missing[*]}"
    # A subshell, so its EXIT trap removes the guard however the install
    # ends without replacing the caller's own trap.
    (
        sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo)
        # Maintainer scripts must start no services (exit 101 = "not
        # allowed"): tests start their own brokers. An existing policy-rc.d
        # is left as it is.
        policy=/usr/sbin/policy-rc.d
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
            "${sudo[@]}" chmod 755 "$policy"
            trap '"${sudo[@]}" rm -f "$policy"' EXIT
        fi
        apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o Dpkg::Use-Pty=0)
        "${apt[@]}" update -qq >&2
        "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2
    )
}

# ensure_broker: ensures BROKER_PACKAGES. The package enables its system
# service; tests must be the only ones starting brokers, so a service
# installed just now (nothing a user relied on) is disabled.
ensure_broker() {
    local had=1
    package_installed mosquitto || had=0
    ensure_packages "${BROKER_PACKAGES[@]}"
    [ "$had" -eq 1 ] || ensure_services_disabled mosquitto
}

# ensure_services_disabled UNIT...: keeps the system services of packages
# installed for tests from starting at boot; tests start their own instances.
ensure_services_disabled() {
    local sudo=() unit
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    for unit in "$@"; do
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            "${sudo[@]}" systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
        else
            "${sudo[@]}" deb-systemd-helper disable "$unit.service" >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            "${sudo[@]}" update-rc.d "$unit" disable >/dev/null 2>&1 || true
        fi
    done
}

# ensure_npm: npm for the installed nodejs. Debian's nodejs leaves npm to its
# own package; NodeSource's nodejs ships it (and conflicts with Debian's).
ensure_npm() {
    ensure_packages nodejs
    dpkg-query -W -f='${Provides}' nodejs 2>/dev/null | grep -qw npm || ensure_packages npm
}

# ensure_rust_targets TRIPLE...: adds the rustup targets not yet installed.
ensure_rust_targets() {
    local missing=() target installed
    command -v rustup >/dev/null 2>&1 || { _pkg_say "rustup is required (https://rustup.rs)"; return 1; }
    installed=$(rustup target list --installed)
    for target in "$@"; do
        grep -qx "$target" <<<"$installed" || missing+=("$target")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    _pkg_say "rustup target add ${missing[*]}"
    rustup target add "${missing[@]}" >&2
}

# ensure_rust_components NAME...: adds the rustup components (rustfmt,
# clippy, ...) of the active toolchain not yet installed.
ensure_rust_components() {
    local missing=() component installed
    command -v rustup >/dev/null 2>&1 || { _pkg_say "rustup is required (https://rustup.rs)"; return 1; }
    installed=$(rustup component list --installed)
    for component in "$@"; do
        grep -q "^$component\(-preview\)\?-" <<<"$installed" || missing+=("$component")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    _pkg_say "rustup component add ${missing[*]}"
    rustup component add "${missing[@]}" >&2
}
