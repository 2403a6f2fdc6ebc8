#!/usr/bin/env bash
# The fresh-machine rehearsal: runs the README's two set-up commands in a
# bare Debian 12 root, from a clean clone, as a new user would, and prints
# each command's wall time and result (CONTRIBUTING.md).
#
# Usage: scripts/fresh-machine.sh [--only demo|test] [--keep] [--commit REV]
#                                 [--mirror URL] [--log FILE]
#        scripts/fresh-machine.sh --clean ROOT
#   --only demo|test  run one of the two commands (default: both, in order)
#   --keep            keep the root (unmounted) after the run
#   --commit REV      the commit to clone (default: HEAD of this checkout;
#                     uncommitted changes are not in the rehearsal)
#   --mirror URL      the Debian mirror (default: the one apt uses here)
#   --log FILE        where the log goes (default: a dated file in
#                     ${TMPDIR:-/var/tmp}, named at the start and the end)
#   --clean ROOT      unmount and remove a root left by --keep or a kill -9
#
# Runs as root (debootstrap, mount, chroot) on a Debian host. The root is
# debootstrap's minbase variant of bookworm, from the mirror apt uses here:
# nothing is added to it but what the project's own scripts install, so a
# package they rely on without naming it fails here. What it shares:
#   - the host's rustup toolchain, read-only (rustup is the README's
#     prerequisite): ${RUSTUP_HOME:-~/.rustup} as the lower layer of an
#     overlay whose writes (`rustup target add`) stay in the root, and
#     ${CARGO_HOME:-~/.cargo}/bin bound read-only. Not the cargo registry:
#     the root downloads every crate like a new user.
#   - what the host needs to reach the package registries, copied in: its
#     Debian source entries and apt Acquire settings, its CA certificates
#     (an intercepting proxy's CA included), pip, npm and cargo config
#     files, /etc/resolv.conf and /etc/hosts, and the proxy and CA
#     environment variables.
# Everything it mounts is under the root, which is made a private mount of
# its own first, and is unmounted recursively on exit (a trap), however the
# run ends; the root is removed unless --keep.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/packages.sh
. "$ROOT_DIR/scripts/lib/packages.sh"

SUITE=bookworm
# The README's two set-up commands, as a new user types them in the clone.
declare -A COMMANDS=([demo]="scripts/run.sh demo" [test]="scripts/test.sh")
ORDER=(demo test)
# Marks a directory as a root this script made, so --clean removes nothing
# else.
MARK=.ferry-fresh-machine

say() { printf 'fresh-machine: %s\n' "$*"; }
die() { printf 'fresh-machine: error: %s\n' "$*" >&2 && exit 1; }
usage() { sed -n '/^# Usage:/,/^#   --clean/s/^# \{0,1\}//p' "$0" >&2 && exit 2; }
duration() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }

# Mount points at or under $1, deepest first.
mounts_under() {
    awk -v r="$1" '{ mp = $5; gsub(/\\040/, " ", mp); if (mp == r || index(mp, r "/") == 1) print mp }' \
        /proc/self/mountinfo | awk '{ print gsub("/", "/"), $0 }' | sort -rn | cut -d' ' -f2-
}

# Ends every process whose root directory is inside $1 (what the run
# started in the chroot, and nothing else), so its mounts can go.
kill_in_root() {
    local root=$1 pids=() link pid
    for _ in 1 2 3; do
        pids=()
        for link in /proc/[0-9]*/root; do
            pid=${link#/proc/} && pid=${pid%/root}
            [ "$pid" != $$ ] || continue
            case $(readlink "$link" 2>/dev/null) in "$root" | "$root"/*) pids+=("$pid") ;; esac
        done
        [ ${#pids[@]} -gt 0 ] || return 0
        say "stopping ${#pids[@]} process(es) still running in the root"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        sleep 5
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 1
    done
}

# Unmounts everything at or under $1, only there: `umount -R` on the root's
# own paths, lazily for what is still busy.
unmount_root() {
    local root=$1 mp
    kill_in_root "$root"
    [ -z "$(mounts_under "$root")" ] && return 0
    umount -R "$root" 2>/dev/null || true
    while read -r mp; do
        [ -n "$mp" ] || continue
        umount -R "$mp" 2>/dev/null || umount -R -l "$mp" 2>/dev/null || true
    done < <(mounts_under "$root")
    [ -z "$(mounts_under "$root")" ] || die "still mounted under $root:
$(mounts_under "$root")
not removing it; unmount these and run $0 --clean $root"
}

remove_root() {
    local root=$1
    [ -f "$root/$MARK" ] || die "$root has no $MARK: not a root this script made; not removing it"
    unmount_root "$root"
    # No mount is left (checked above), so nothing outside the root can be
    # reached through it; --one-file-system all the same.
    say "removing $root"
    rm -rf --one-file-system "$root"
}

# --- arguments ----------------------------------------------------------------

ONLY=""
KEEP=0
COMMIT=""
MIRROR=""
LOG=""
while [ $# -gt 0 ]; do
    case $1 in
        --only) ONLY=${2:-} && shift 2 && [[ " ${ORDER[*]} " == *" $ONLY "* ]] || usage ;;
        --keep) KEEP=1 && shift ;;
        --commit) COMMIT=${2:?} && shift 2 ;;
        --mirror) MIRROR=${2:?} && shift 2 ;;
        --log) LOG=${2:?} && shift 2 ;;
        --clean)
            [ -n "${2:-}" ] && [ $# -eq 2 ] || usage
            [ "$(id -u)" -eq 0 ] || die "run as root"
            remove_root "$(realpath -e "$2")"
            say "removed $2"
            exit 0
            ;;
        -h | --help) usage ;;
        *) usage ;;
    esac
done
[ -z "$ONLY" ] || ORDER=("$ONLY")
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, mount and chroot need it): sudo $0"

STAMP=$(date -u +%Y%m%d-%H%M%S)
LOG=${LOG:-${TMPDIR:-/var/tmp}/ferry-fresh-machine-$STAMP.log}
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1
say "log: $LOG"

# --- the host's side ------------------------------------------------------------

ensure_packages "${FRESH_MACHINE_PACKAGES[@]}"

COMMIT=$(git -C "$ROOT_DIR" rev-parse --verify "${COMMIT:-HEAD}^{commit}")
[ -z "$(git -C "$ROOT_DIR" status --porcelain --untracked-files=no)" ] ||
    say "note: this checkout has uncommitted changes; the rehearsal clones $COMMIT without them"

# The Debian source apt uses here for $SUITE: the first enabled `deb` entry,
# in deb822 .sources files or one-line .list files. Sets MIRROR (unless
# given) and SOURCE_FILE, the file that holds it (copied into the root, so
# apt there reads the same suites and security updates).
find_mirror() {
    local file uri
    SOURCE_FILE=""
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        uri=$(awk -v suite="$SUITE" '
            function flush() { if (deb && on && has && uri != "") { print uri; found = 1; exit } deb = 0; on = 1; has = 0; uri = "" }
            BEGIN { on = 1 }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "enabled:" { if (tolower($2) == "no") on = 0 }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
            END { if (!found) flush() }' "$file")
        if [ -n "$uri" ]; then SOURCE_FILE=$file && break; fi
    done
    if [ -z "$SOURCE_FILE" ]; then
        for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$file" ] || continue
            # deb [options] URI SUITE COMPONENT...
            uri=$(sed -n 's/^[ \t]*deb[ \t]\+\(\[[^]]*\][ \t]\+\)\?\([^ \t]\+\)[ \t]\+'"$SUITE"'[ \t].*/\2/p' "$file" | head -1)
            if [ -n "$uri" ]; then SOURCE_FILE=$file && break; fi
        done
    fi
    if [ -z "$MIRROR" ]; then
        [ -n "$SOURCE_FILE" ] || die "no enabled Debian $SUITE source in /etc/apt; pass --mirror URL"
        MIRROR=$uri
    fi
}
find_mirror
say "Debian $SUITE from $MIRROR (${SOURCE_FILE:-given with --mirror})"

RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
[ -d "$RUSTUP_DIR/toolchains" ] && [ -x "$CARGO_BIN/rustup" ] ||
    die "no rustup toolchain at $RUSTUP_DIR and $CARGO_BIN (set RUSTUP_HOME and CARGO_HOME)"
say "rustup toolchain: $RUSTUP_DIR and $CARGO_BIN, read-only ($("$CARGO_BIN/rustc" --version))"

# --- the root -------------------------------------------------------------------

# Canonical, as /proc/self/mountinfo names it.
ROOT=$(realpath "$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-fresh-machine-$STAMP.XXXXXX")")
# mktemp makes it 0700: as a machine's / it must let every user in (apt's
# _apt, mosquitto's own user).
chmod 755 "$ROOT"
touch "$ROOT/$MARK"
declare -A RESULT=() TOOK=() BEGAN=()
STARTED=$(date +%s)

summary() {
    local name
    say "summary ($(date -u '+%Y-%m-%d %H:%M UTC'), commit ${COMMIT:0:12}, log $LOG):"
    [ -z "${TOOK[debootstrap]:-}" ] || say "  debootstrap --variant=minbase $SUITE: $(duration "${TOOK[debootstrap]}")"
    for name in "${ORDER[@]}"; do
        if [ -n "${RESULT[$name]:-}" ]; then
            say "  $name: ${COMMANDS[$name]}: ${RESULT[$name]} in $(duration "${TOOK[$name]}")"
        elif [ -n "${BEGAN[$name]:-}" ]; then
            say "  $name: ${COMMANDS[$name]}: interrupted after $(duration $(($(date +%s) - BEGAN[$name])))"
        else
            say "  $name: ${COMMANDS[$name]}: not run"
        fi
    done
    say "  total: $(duration $(($(date +%s) - STARTED)))"
}

cleanup() {
    local code=$?
    trap - EXIT INT TERM HUP
    summary
    if [ "$KEEP" -eq 1 ]; then
        unmount_root "$ROOT"
        say "kept the root at $ROOT (unmounted); remove it with: $0 --clean $ROOT"
    else
        remove_root "$ROOT"
        say "removed the root"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# A private mount of its own first: whatever is mounted under the root
# (here, by debootstrap or by the tests) stays invisible to the host, and
# unmounting it never reaches a host mount.
mount --bind "$ROOT" "$ROOT"
mount --make-private "$ROOT"

# minbase: essential packages and apt only, the smallest Debian 12; a real
# machine has more, never less.
say "debootstrap --variant=minbase $SUITE $ROOT"
t0=$(date +%s)
debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR"
TOOK[debootstrap]=$(($(date +%s) - t0))
say "debootstrap done in $(duration "${TOOK[debootstrap]}"): $(chroot "$ROOT" dpkg-query -W -f='.\n' | wc -l) packages"

# --- reaching the registries ------------------------------------------------------

# copy_in FILE [DEST]: copies a host file into the root (at DEST, default
# the same path), if it exists.
declare -A COPIED=()
copy_in() {
    local src=$1 dest=$ROOT${2:-$1}
    [ -f "$src" ] && [ -z "${COPIED[$dest]:-}" ] || return 0
    COPIED[$dest]=1
    mkdir -p "$(dirname "$dest")"
    cp -L "$src" "$dest"
    say "  copied ${2:-$1}"
}
say "registry access, copied from the host:"
if [ -n "$SOURCE_FILE" ]; then
    : >"$ROOT/etc/apt/sources.list"
    if [[ $SOURCE_FILE == *.sources ]]; then
        copy_in "$SOURCE_FILE"
    else
        copy_in "$SOURCE_FILE" /etc/apt/sources.list
    fi
fi
# Acquire settings of the network (proxies, a snapshot mirror's validity
# dates) are how the host reaches its mirror; nothing else of its apt config.
for file in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    [ -f "$file" ] || continue
    if grep -qiE '^[^/#]*Acquire::(https?|ftp|Check-Valid-Until|Check-Date|Max-ValidTime|Retries|[^ ]*Proxy)' "$file"; then
        copy_in "$file"
    fi
done
# The CA bundle, and the local CAs it was built with, so that installing
# ca-certificates in the root (update-ca-certificates) keeps them.
copy_in /etc/ssl/certs/ca-certificates.crt
for file in /usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt; do
    copy_in "$file"
done
copy_in /etc/pip.conf
copy_in /etc/npmrc
copy_in "$HOME/.config/pip/pip.conf" /root/.config/pip/pip.conf
copy_in "$HOME/.pip/pip.conf" /root/.pip/pip.conf
copy_in "$HOME/.npmrc" /root/.npmrc
copy_in "$HOME/.cargo/config.toml" /root/.cargo/config.toml
copy_in "$HOME/.cargo/config" /root/.cargo/config
copy_in /etc/resolv.conf
copy_in /etc/hosts

# The environment of the commands: a new root login, plus the host's proxy
# and CA variables (a CA file they name is copied in). Not PIP_FIND_LINKS
# or other caches: the root gets its packages from the registries.
ENV=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8 TERM=dumb
    "PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    "RUSTUP_HOME=$RUSTUP_DIR")
passed=()
for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY ALL_PROXY all_proxy \
    PIP_INDEX_URL PIP_CERT PIP_DEFAULT_TIMEOUT SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE \
    NODE_EXTRA_CA_CERTS CARGO_HTTP_CAINFO CARGO_HTTP_PROXY; do
    [ -n "${!var:-}" ] || continue
    [[ $var != *_CERT* && $var != *CA_BUNDLE && $var != *CAINFO && $var != *CA_CERTS ]] || copy_in "${!var}"
    ENV+=("$var=${!var}")
    passed+=("$var")
done
say "  environment passed in: ${passed[*]:-none}"

# --- mounts ---------------------------------------------------------------------------

mount -t proc proc "$ROOT/proc"
for dir in sys dev; do
    mount --rbind "/$dir" "$ROOT/$dir"
    mount --make-rslave "$ROOT/$dir"
done
# The toolchain: the host's files are the overlay's lower layer, never
# written; `rustup target add` in the root writes to the upper layer there.
mkdir -p "$ROOT$RUSTUP_DIR" "$ROOT/.rustup-overlay/upper" "$ROOT/.rustup-overlay/work" "$ROOT/root/.cargo/bin"
if ! mount -t overlay ferry-rustup -o "lowerdir=$RUSTUP_DIR,upperdir=$ROOT/.rustup-overlay/upper,workdir=$ROOT/.rustup-overlay/work" \
    "$ROOT$RUSTUP_DIR"; then
    say "no overlayfs: the toolchain is bound read-only, so rustup cannot add targets in the root"
    mount --bind "$RUSTUP_DIR" "$ROOT$RUSTUP_DIR"
    mount -o remount,bind,ro "$ROOT$RUSTUP_DIR"
fi
mount --bind "$CARGO_BIN" "$ROOT/root/.cargo/bin"
mount -o remount,bind,ro "$ROOT/root/.cargo/bin"

# --- the clone ------------------------------------------------------------------------

git clone --quiet --no-hardlinks "$ROOT_DIR" "$ROOT/root/ferry"
# A commit on no branch is not in the clone yet.
git -C "$ROOT/root/ferry" cat-file -e "$COMMIT^{commit}" 2>/dev/null ||
    git -C "$ROOT/root/ferry" fetch --quiet "$ROOT_DIR" "$COMMIT"
git -C "$ROOT/root/ferry" checkout --quiet --detach "$COMMIT"
say "cloned $COMMIT ($(git -C "$ROOT_DIR" log -1 --format=%s "$COMMIT")) into /root/ferry"

# --- the README's commands ----------------------------------------------------------

failed=0
for name in "${ORDER[@]}"; do
    cmd=${COMMANDS[$name]}
    say "$name: $cmd (in the root, as root, from /root/ferry) started $(date -u '+%H:%M:%S UTC')"
    t0=$(date +%s)
    BEGAN[$name]=$t0
    code=0
    # In the background and waited for, so a signal reaches the trap at once.
    chroot "$ROOT" /usr/bin/env -i "${ENV[@]}" /bin/bash -c "cd /root/ferry && $cmd" </dev/null &
    wait $! || code=$?
    TOOK[$name]=$(($(date +%s) - t0))
    if [ "$code" -eq 0 ]; then
        RESULT[$name]="passed"
    else
        RESULT[$name]="FAILED (exit $code)"
        failed=1
    fi
    say "$name: $cmd: ${RESULT[$name]} in $(duration "${TOOK[$name]}")"
done
exit "$failed"
