#!/usr/bin/env bash
# Smoke-tests a firmware target build under qemu-user (natively for x86-64
# musl): precompiles an example plugin for the target, starts the agent with
# the plugin at ingest and a local Mosquitto as destination, ingests over
# HTTP, stops the agent with SIGTERM and checks that exactly the events the
# plugin keeps reached the broker. Also checks that an artifact built for
# another engine configuration is refused with a clear error, and that a
# plugin's trap, timeout and out-of-memory leave the agent running.
#
# Usage: scripts/smoke-target.sh TARGET [--runtime-only]
#   --runtime-only  also build the runtime-only binary and run the agent
#                   test with it (the full build still precompiles)
#
# Prints one result line per binary (size, start-up time, RSS) and appends
# it to $CARGO_TARGET_DIR/ferry-firmware/results.tsv. Under qemu-user every time is
# emulated and RSS includes the emulator's own memory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"

[ $# -ge 1 ] || { echo "usage: $0 TARGET [--runtime-only]" >&2; exit 2; }
TARGET=$1
RUNTIME_ONLY=0
case ${2:-} in "") ;; --runtime-only) RUNTIME_ONLY=1 ;; *) echo "usage: $0 TARGET [--runtime-only]" >&2; exit 2 ;; esac
DIR=$ROOT/firmware-targets/$TARGET
[ -f "$DIR/target.env" ] || { echo "smoke-target: no target '$TARGET' in firmware-targets/" >&2; exit 2; }
# shellcheck source=/dev/null
. "$DIR/target.env"

# shellcheck source=lib/packages.sh
. "$ROOT/scripts/lib/packages.sh"
ensure_broker
# shellcheck disable=SC2086 # RUN_PACKAGES is a space-separated list
ensure_packages "${SMOKE_PACKAGES[@]}" $RUN_PACKAGES
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

PLUGIN=$ROOT/plugins/build/threshold-filter.wasm
[ -f "$PLUGIN" ] || "$ROOT/scripts/build-plugins.sh" rust

# FERRY_SMOKE_PREBUILT=1 tests the binaries of an earlier build-target.sh
# run as they are (e.g. ones built on another machine) instead of building.
build() {
    if [ "${FERRY_SMOKE_PREBUILT:-0}" = 1 ]; then
        local bin=$CARGO_TARGET_DIR/ferry-firmware/$TARGET/ferry${1:+-runtime-only}
        [ -x "$bin" ] || { echo "smoke-target: no prebuilt $bin" >&2; exit 1; }
        echo "$bin"
    else
        "$ROOT/scripts/build-target.sh" "$TARGET" "$@"
    fi
}
FULL=$(build)
RUNTIME=""
[ "$RUNTIME_ONLY" -eq 0 ] || RUNTIME=$(build --runtime-only)

# How to run a target binary: under qemu-user with the cross sysroot, or
# natively. An array, not a function, so `&` gives the agent's own pid.
RUN=()
[ -z "$QEMU" ] || RUN=("$QEMU" -L "$SYSROOT")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-smoke.XXXXXX")
BROKER_PID=""
AGENT_PID=""
cleanup() {
    [ -z "$AGENT_PID" ] || kill "$AGENT_PID" 2>/dev/null || true
    [ -z "$BROKER_PID" ] || kill "$BROKER_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    echo "smoke-target $TARGET: FAIL: $*" >&2
    for log in "$WORK"/*.log; do
        [ -f "$log" ] && { echo "--- $log" >&2; tail -n 30 "$log" >&2; }
    done
    exit 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }

# write_config FILE DATA_DIR: the agent config every run shares (store sized
# for the smoke test, HTTP ingest, one destination on the local broker),
# followed by the run's [[plugin]] table read from stdin.
write_config() {
    cat >"$1" <<TOML
[agent]
device_id = "smoke"
data_dir = "$2"

[store]
quota = "64 MiB"
cache_size = "4 MiB"
min_free_disk = "0 B"

[ingest.http]
listen = "127.0.0.1:0"

[[destination]]
name = "local"
url = "mqtt://127.0.0.1:$MQTT_PORT"
routes = ["#"]

TOML
    cat >>"$1"
}

# start_agent BIN CONFIG LOG: starts the agent (AGENT_PID) and waits until
# its HTTP API answers (URL); $NAME says which run failed.
start_agent() {
    "${RUN[@]}" "$1" run --log-format json --config "$2" >"$3" 2>&1 &
    AGENT_PID=$!
    URL=""
    for _ in $(seq 1200); do
        kill -0 "$AGENT_PID" 2>/dev/null || fail "$NAME exited during start-up"
        addr=$(grep -o 'HTTP API listening on [0-9.:]*' "$3" | head -1 | awk '{print $NF}') || true
        if [ -n "$addr" ] && curl -fsS "http://$addr/healthz" >/dev/null 2>&1; then
            URL=http://$addr
            return
        fi
        sleep 0.05
    done
    fail "$NAME did not answer /healthz within 60 s"
}

# --- precompile with the target's own full build --------------------------
CWASM=$WORK/threshold-filter.cwasm
"${RUN[@]}" "$FULL" plugin precompile --target "$TRIPLE" "$PLUGIN" -o "$CWASM" >"$WORK/precompile.log" 2>&1 ||
    fail "ferry plugin precompile for $TRIPLE"
cat "$WORK/precompile.log"
# An artifact for fuel-bounded plugins must be refused by a time-bounded one.
"${RUN[@]}" "$FULL" plugin precompile --fuel --target "$TRIPLE" "$PLUGIN" -o "$WORK/fuel.cwasm" >/dev/null 2>&1 ||
    fail "ferry plugin precompile --fuel"
if "${RUN[@]}" "$FULL" plugin check --cases 1 "$WORK/fuel.cwasm" >"$WORK/mismatch.log" 2>&1; then
    fail "an artifact precompiled for fuel loaded into a time-bounded plugin"
fi
grep -q "does not fit this agent" "$WORK/mismatch.log" || fail "the mismatch error does not say what is wrong"
echo "smoke-target $TARGET: fuel/epoch mismatch refused: $(grep -o 'does not fit this agent: [^(]*' "$WORK/mismatch.log" | head -1)"
# An artifact for a 32-bit ARM device (32-bit Pulley bytecode) must be
# refused by every other target; every build can compile for Pulley.
if [ "$TRIPLE" != armv7-unknown-linux-gnueabihf ]; then
    "${RUN[@]}" "$FULL" plugin precompile --target armv7-unknown-linux-gnueabihf "$PLUGIN" -o "$WORK/armv7.cwasm" \
        >/dev/null 2>&1 || fail "ferry plugin precompile for armv7"
    if "${RUN[@]}" "$FULL" plugin check --cases 1 "$WORK/armv7.cwasm" >"$WORK/mismatch.log" 2>&1; then
        fail "an artifact precompiled for armv7 loaded on $TRIPLE"
    fi
    grep -q "compiled for architecture 'pulley32'" "$WORK/mismatch.log" || fail "the target mismatch is not named"
    echo "smoke-target $TARGET: armv7 artifact refused: $(grep -o 'does not fit this agent: [^(]*' "$WORK/mismatch.log" | head -1)"
fi

# A runtime-only build refuses a .wasm, saying how to precompile it.
if [ -n "$RUNTIME" ]; then
    if "${RUN[@]}" "$RUNTIME" plugin check --cases 1 "$PLUGIN" >"$WORK/nocompiler.log" 2>&1; then
        fail "the runtime-only build loaded a .wasm"
    fi
    grep -q "ferry plugin precompile --target $TRIPLE" "$WORK/nocompiler.log" ||
        fail "the runtime-only build's refusal does not say how to precompile"
    echo "smoke-target $TARGET: runtime-only build refuses the .wasm: $(grep -o 'has no plugin compiler[^:]*' "$WORK/nocompiler.log" | head -1)"
fi

# --- broker ----------------------------------------------------------------
for _ in 1 2 3 4 5; do
    MQTT_PORT=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$MQTT_PORT" >"$WORK/mosquitto.conf"
    "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 50); do
        mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t probe -E >/dev/null 2>&1 && break 2
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
done
[ -n "$BROKER_PID" ] || fail "mosquitto did not start"

# The agent runs: the full build compiling the plugin at start-up (the
# cache is empty) and loading the precompiled one, and the runtime-only build.
RUNS=("$FULL|$PLUGIN|.wasm" "$FULL|$CWASM|.cwasm")
[ -z "$RUNTIME" ] || RUNS+=("$RUNTIME|$CWASM|.cwasm")
RESULTS=$CARGO_TARGET_DIR/ferry-firmware/results.tsv
run=0
for entry in "${RUNS[@]}"; do
    IFS='|' read -r BIN PLUGIN_FILE KIND <<<"$entry"
    run=$((run + 1))
    NAME="$(basename "$BIN") with the plugin as $KIND"
    # A persistent session registered before the agent starts, so every
    # QoS 1 publish is queued for it however fast the agent forwards.
    SESSION=ferry-smoke-$run
    mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -i "$SESSION" -c -q 1 -t 'ferry/#' -E || fail "subscribing"

    LOG=$WORK/agent-$run.log
    write_config "$WORK/ferry-$run.toml" "$WORK/data-$run" <<TOML
[[plugin]]
name = "threshold"
path = "$PLUGIN_FILE"
world = "filter"
stage = "ingest"
config = { field = "celsius", min = "20" }
timeout_ms = 5000
TOML
    started=$(now_ms)
    start_agent "$BIN" "$WORK/ferry-$run.toml" "$LOG"
    startup_ms=$(($(now_ms) - started))
    if [ "$KIND" = .cwasm ]; then
        grep -q '"compiled":"Precompiled"' "$LOG" || fail "$NAME: the plugin was not loaded as precompiled"
    fi
    sleep 1
    rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$AGENT_PID/status")

    # Two readings at or above the threshold pass, the cold one is dropped.
    curl -fsS "$URL/v1/events" \
        -d '[{"topic":"telemetry/temp","id":"warm","data":{"celsius":21.5}},{"topic":"telemetry/temp","id":"cold","data":{"celsius":5}},{"topic":"telemetry/temp","id":"hot","data":{"celsius":30}}]' \
        >"$WORK/ingest-$run.json" || fail "ingest"
    delivered=0
    for _ in $(seq 600); do
        delivered=$(curl -fsS "$URL/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["destinations"][0]["delivered"])')
        [ "$delivered" -ge 2 ] && break
        sleep 0.1
    done
    [ "$delivered" -eq 2 ] || fail "$NAME: $delivered events acknowledged by the broker, expected 2"

    # Under load: 20 requests of 200 events each, all passing the filter.
    python3 -c '
import json
print(json.dumps([{"topic": "load/t", "data": {"celsius": 25, "n": i}} for i in range(200)]))' >"$WORK/batch.json"
    load_started=$(now_ms)
    for _ in $(seq 20); do
        curl -fsS "$URL/v1/events" --data-binary @"$WORK/batch.json" >/dev/null || fail "ingest under load"
    done
    load_ms=$(($(now_ms) - load_started))
    rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT_PID/status")

    kill -TERM "$AGENT_PID"
    code=0
    wait "$AGENT_PID" || code=$?
    AGENT_PID=""
    [ "$code" -eq 0 ] || fail "$NAME exited with $code after SIGTERM"
    grep -q "stopped cleanly" "$LOG" || fail "$NAME did not report a clean stop"

    # Exactly the two warm readings, in order, on the device's topic.
    mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -i "$SESSION" -c -q 1 -t 'ferry/#' -C 2 -W 20 -F '%t %p' \
        >"$WORK/received-$run.txt" || fail "$NAME: the broker did not hold the forwarded events"
    expected=$'ferry/smoke/telemetry/temp {"celsius":21.5}\nferry/smoke/telemetry/temp {"celsius":30}'
    [ "$(cat "$WORK/received-$run.txt")" = "$expected" ] ||
        fail "$NAME: received $(cat "$WORK/received-$run.txt"), expected $expected"

    size=$(stat -c %s "$BIN")
    engine=$ENGINE
    echo "smoke-target $TARGET: $NAME ok: $(numfmt --to=iec-i --suffix=B "$size") stripped, engine $engine," \
        "start-up ${startup_ms} ms, RSS idle ${rss_idle} KiB, peak under load ${rss_peak} KiB" \
        "(4000 events in ${load_ms} ms)${QEMU:+ — under $QEMU, emulated}"
    mkdir -p "$(dirname "$RESULTS")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$TARGET" "$(basename "$BIN")" "$KIND" "$size" "$engine" "$startup_ms" \
        "$rss_idle" "$rss_peak" "$load_ms" "${QEMU:-native}" >>"$RESULTS"
done
# --- plugin failures ----------------------------------------------------------
# A trap, a runaway loop and an out-of-memory in a plugin are wasmtime traps
# (signals in native code, interpreter exits on Pulley), not panics: the
# firmware profile's panic = "abort" must leave them to the plugin's
# on_error policy, with the agent running on.
HOSTILE=$ROOT/plugins/build/testdata/hostile-filter.wasm
[ -f "$HOSTILE" ] || "$ROOT/scripts/build-plugins.sh" rust
BIN=${RUNTIME:-$FULL}
NAME="$(basename "$BIN") with a hostile plugin"
"${RUN[@]}" "$FULL" plugin precompile --target "$TRIPLE" "$HOSTILE" -o "$WORK/hostile.cwasm" >/dev/null 2>&1 ||
    fail "ferry plugin precompile of the hostile plugin"
LOG=$WORK/agent-hostile.log
write_config "$WORK/ferry-hostile.toml" "$WORK/data-hostile" <<TOML
[[plugin]]
name = "hostile"
path = "$WORK/hostile.cwasm"
world = "filter"
stage = "ingest"
timeout_ms = 1000
memory = "16 MiB"
on_error = "dead-letter"
TOML
start_agent "$BIN" "$WORK/ferry-hostile.toml" "$LOG"
for subject in hostile/trap hostile/loop hostile/oom ok/1; do
    curl -fsS "$URL/v1/events" -d "{\"topic\":\"$subject\",\"data\":1}" >/dev/null ||
        fail "$NAME: ingest of $subject"
    kill -0 "$AGENT_PID" 2>/dev/null || fail "$NAME died on $subject"
done
counts=""
for _ in $(seq 300); do
    counts=$(curl -fsS "$URL/v1/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
p = s["plugins"][0]
print(p["traps"], p["timeouts"], p["out_of_memory"], s["store"]["dead_letters"], s["destinations"][0]["delivered"])')
    [ "${counts##* }" -ge 1 ] && break
    sleep 0.1
done
read -r traps timeouts ooms dead delivered <<<"$counts"
[ "$traps" -ge 1 ] && [ "$timeouts" -ge 1 ] && [ "$ooms" -ge 1 ] && [ "$dead" -eq 3 ] && [ "$delivered" -eq 1 ] ||
    fail "$NAME: traps $traps, timeouts $timeouts, out-of-memory $ooms, dead letters $dead, delivered $delivered; expected at least one of each failure, 3 dead letters, 1 delivered"
kill -TERM "$AGENT_PID"
code=0
wait "$AGENT_PID" || code=$?
AGENT_PID=""
[ "$code" -eq 0 ] || fail "$NAME exited with $code after SIGTERM"
echo "smoke-target $TARGET: $NAME ok: trap, timeout and out-of-memory dead-lettered, the agent ran on"

echo "smoke-target $TARGET: passed"
