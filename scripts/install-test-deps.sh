#!/usr/bin/env bash
# Installs what Ferry's integration, fault and interop tests need on Debian
# bookworm: the packages scripts/lib/packages.sh declares for them (the
# mosquitto broker, openssl, systemd-analyze, Python), and the Python that
# the consumer example's test runs, a venv at
# ${FERRY_TOOLS:-~/.cache/ferry-tools}/consumer with pinned paho-mqtt and
# cloudevents from PyPI.
#
# Idempotent and non-interactive. When everything is already present it does
# not touch apt or PyPI at all, so re-runs are instant and work offline. Tests
# start their own broker instances on ephemeral ports, so the system
# mosquitto service is kept from starting during the install and is disabled
# afterwards. Progress goes to standard error.
#
# Usage: scripts/install-test-deps.sh   (as root, or with sudo available)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/packages.sh
. "$ROOT/scripts/lib/packages.sh"
TOOLS=${FERRY_TOOLS:-$HOME/.cache/ferry-tools}

# What docs/examples/consumer.py imports; pinned so every machine tests the
# same client code.
CONSUMER_REQUIREMENTS=(paho-mqtt==2.1.0 cloudevents==2.2.0)

ensure_broker
ensure_packages "${TEST_PACKAGES[@]}"

# The consumer venv, rebuilt only when its stamp (the requirement list it was
# built from) differs or its imports fail. Debian's python3, which
# ensure_packages just checked, not whichever python3 is first on PATH.
venv=$TOOLS/consumer
stamp=$venv/ferry-requirements.txt
wanted=$(printf '%s\n' "${CONSUMER_REQUIREMENTS[@]}")
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] ||
    ! "$venv/bin/python3" -c 'import paho.mqtt, cloudevents' 2>/dev/null; then
    echo "install-test-deps: pip install ${CONSUMER_REQUIREMENTS[*]} into $venv" >&2
    mkdir -p "$TOOLS"
    /usr/bin/python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${CONSUMER_REQUIREMENTS[@]}" >&2
    printf '%s\n' "$wanted" >"$stamp"
fi

echo "install-test-deps: ready (${BROKER_PACKAGES[*]} ${TEST_PACKAGES[*]}; $venv)" >&2
