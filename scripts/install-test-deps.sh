#!/usr/bin/env bash
# Installs what Ferry's integration, fault and interop tests need on Debian
# bookworm: the packages scripts/lib/packages.sh declares for them (the
# mosquitto broker, openssl, systemd-analyze, Python, and the interop
# matrix's nats-server, rabbitmq-server and Node.js), and under
# ${FERRY_TOOLS:-~/.cache/ferry-tools}: the consumer example's venv with
# pinned paho-mqtt and cloudevents, and the interop matrix's brokers from the
# other registries, each pinned: aedes (npm), amqtt (PyPI) and RMQTT (a
# trimmed server from crates.io, tests/harness/brokers/rmqtt).
#
# Idempotent and non-interactive. When everything is already present it does
# not touch apt, PyPI, npm or cargo at all, so re-runs are instant and work
# offline. Tests start their own broker instances on ephemeral ports, so the
# brokers' system services are kept from starting during the install and are
# disabled afterwards. Progress goes to standard error.
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

# The interop matrix's brokers, pinned so every machine tests the same ones.
AEDES_VERSION=0.51.3
AMQTT_VERSION=0.12.1

ensure_broker
ensure_packages "${TEST_PACKAGES[@]}"

# Debian's brokers; their services, enabled by the packages, are disabled
# when this script installed them (the tests start their own instances).
had_interop=1
for pkg in "${INTEROP_PACKAGES[@]}"; do package_installed "$pkg" || had_interop=0; done
ensure_packages "${INTEROP_PACKAGES[@]}"
[ "$had_interop" -eq 1 ] || ensure_services_disabled nats-server rabbitmq-server epmd
ensure_npm

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

# tool_current DIR VERSION: true when DIR holds VERSION (its stamp says so).
tool_current() { [ "$(cat "$1/ferry-version" 2>/dev/null)" = "$2" ]; }

# aedes (npm), in its own prefix; tests/harness/brokers/aedes.js runs it.
aedes=$TOOLS/aedes
if ! tool_current "$aedes" "$AEDES_VERSION" || [ ! -f "$aedes/node_modules/aedes/package.json" ]; then
    echo "install-test-deps: npm install aedes@$AEDES_VERSION into $aedes" >&2
    rm -rf "$aedes" && mkdir -p "$aedes"
    npm install --silent --no-audit --no-fund --prefix "$aedes" "aedes@$AEDES_VERSION" >&2
    echo "$AEDES_VERSION" >"$aedes/ferry-version"
fi

# amqtt (PyPI), in its own venv.
amqtt=$TOOLS/amqtt
if ! tool_current "$amqtt" "$AMQTT_VERSION" || ! "$amqtt/bin/python3" -c 'import amqtt.broker' 2>/dev/null; then
    echo "install-test-deps: pip install amqtt==$AMQTT_VERSION into $amqtt" >&2
    /usr/bin/python3 -m venv --clear "$amqtt"
    "$amqtt/bin/pip" install --quiet --disable-pip-version-check "amqtt==$AMQTT_VERSION" >&2
    echo "$AMQTT_VERSION" >"$amqtt/ferry-version"
fi

# RMQTT (crates.io), an MQTT 5 broker in Rust: a trimmed build of its
# server (tests/harness/brokers/rmqtt, with its lockfile), rebuilt when those
# sources change. The stamp is their digest.
rmqtt=$TOOLS/rmqtt
rmqtt_src=$ROOT/tests/harness/brokers/rmqtt
rmqtt_digest=$(cd "$rmqtt_src" && cat Cargo.toml Cargo.lock src/*.rs | sha256sum | cut -d' ' -f1)
if ! tool_current "$rmqtt" "$rmqtt_digest" || [ ! -x "$rmqtt/bin/rmqttd" ]; then
    echo "install-test-deps: cargo install $rmqtt_src into $rmqtt (about 6 min)" >&2
    cargo install --quiet --locked --force --root "$rmqtt" --target-dir "$TOOLS/rmqtt-build" --path "$rmqtt_src" >&2
    rm -rf "$TOOLS/rmqtt-build"
    echo "$rmqtt_digest" >"$rmqtt/ferry-version"
fi

echo "install-test-deps: ready (${BROKER_PACKAGES[*]} ${TEST_PACKAGES[*]} ${INTEROP_PACKAGES[*]}; $venv $aedes $amqtt $rmqtt)" >&2
