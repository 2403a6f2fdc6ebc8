#!/usr/bin/env bash
# Installs what Ferry's integration, fault and interop tests need on Debian
# bookworm: the mosquitto broker binary, openssl, and systemd-analyze (which
# checks the firmware targets' service units offline).
#
# Idempotent and non-interactive. When everything is already present it does not
# touch apt at all, so re-runs are instant and work offline. Tests start their
# own broker instances on ephemeral ports, so the system mosquitto service is
# kept from starting during the install and is disabled afterwards.
#
# Usage: scripts/install-test-deps.sh   (as root, or with sudo available)
set -euo pipefail

# command -> Debian package that provides it. Add further brokers here.
declare -A NEEDED=(
    [mosquitto]=mosquitto
    [openssl]=openssl
    [systemd-analyze]=systemd
)

missing=()
for cmd in "${!NEEDED[@]}"; do
    # mosquitto lives in /usr/sbin, which is not on every user's PATH.
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        missing+=("${NEEDED[$cmd]}")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-deps: all present (mosquitto, openssl, systemd-analyze)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Keep maintainer scripts from starting services (exit 101 = "not allowed").
# An existing policy-rc.d is left as it is.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
    fi
}
trap cleanup EXIT

echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# The package enables its service; tests must be the only ones starting brokers.
# We installed it just now, so stopping it stops nothing a user relied on.
if [[ " ${missing[*]} " == *" mosquitto "* ]]; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now mosquitto.service >/dev/null 2>&1 || true
    else
        $SUDO deb-systemd-helper disable mosquitto.service >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        $SUDO update-rc.d mosquitto disable >/dev/null 2>&1 || true
    fi
fi

echo "install-test-deps: done"
