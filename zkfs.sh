#!/usr/bin/env bash
# zkfs.sh — set up and run zkfs on a fresh Debian machine.
#
#   ./zkfs.sh [up] [MOUNTPOINT]   install what is missing, start the server on 127.0.0.1:8000
#                                 (sqlite + ./storage), log in (or register) and mount the
#                                 encrypted folder (default ~/zkfs)
#   ./zkfs.sh down [MOUNTPOINT]   unmount and stop the server started by `up`
#   ./zkfs.sh test [PYTEST ARGS]  install what is missing and run the test suite (the quick
#                                 tier, then the slow one; with arguments: pytest with them)
#   ./zkfs.sh bench [ARGS]        run the benchmark (bench/run.py) against rclone and gocryptfs
#   ./zkfs.sh setup               only install
#
# Unattended `up`: set ZKFS_USER and ZKFS_PASSWORD.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
SERVER_URL=${ZKFS_SERVER:-http://127.0.0.1:8000}
SERVER_PID="$ROOT/server/server.pid"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_install() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "need Debian packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup() {
    # libfuse3 for the mount (mfusepy) and fusermount3; the rest are what the tests drive
    # (PostgreSQL and HAProxy: the scale-out deployment the tests start themselves).
    apt_install libfuse3-3 fuse3 python3-venv rsync git sqlite3 libglib2.0-bin attr postgresql haproxy
    [ -e /dev/fuse ] || die "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
    local stamp="$VENV/.installed" want
    want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -x "$PY" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "creating $VENV and installing zkfs with its dependencies"
        [ -x "$PY" ] || python3 -m venv "$VENV"
        "$PY" -m pip install -q --upgrade pip >/dev/null
        "$PY" -m pip install -q -e ".[scale,test,bench]"
        echo "$want" > "$stamp"
    fi
    web_setup
}

# The link page's npm dependencies (hash-wasm's Argon2id, for links with a password),
# from the npm registry into server/web/node_modules, where the server serves them from.
web_setup() {
    local web="$ROOT/server/web" want
    want=$(sha256sum "$web/package-lock.json" | cut -d' ' -f1)
    [ "$(cat "$web/node_modules/.zkfs-installed" 2>/dev/null)" = "$want" ] && return 0
    command -v npm >/dev/null || apt_install npm
    say "installing the link page's npm packages"
    (cd "$web" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$want" > "$web/node_modules/.zkfs-installed"
}

# What only the tests need: Debian's Chromium, driven by Playwright (never its own browser).
test_setup() {
    apt_install chromium
}

healthy() {
    "$PY" -c "import sys, urllib.request as u; sys.exit(u.urlopen('$SERVER_URL/api/v1/health', timeout=1).status != 200)" 2>/dev/null
}

server_up() {
    if healthy; then
        say "server already running at $SERVER_URL"
        return
    fi
    say "starting the server at $SERVER_URL (data: server/app.db, storage/)"
    local port=${SERVER_URL##*:}
    nohup "$PY" -m server --host 127.0.0.1 --port "${port%%/*}" >> server/server.log 2>&1 &
    echo $! > "$SERVER_PID"
    for _ in $(seq 100); do
        healthy && return
        sleep 0.1
    done
    die "the server did not start; see server/server.log"
}

account() {
    if [ -s "${ZKFS_HOME:-$HOME/.zkfs}/keys.json" ]; then
        say "using the saved login in ${ZKFS_HOME:-$HOME/.zkfs}"
        return
    fi
    local user=${ZKFS_USER:-} pass=${ZKFS_PASSWORD:-}
    [ -n "$user" ] || read -rp "zkfs username: " user
    if [ -z "$pass" ]; then read -rsp "password (8+ chars): " pass; echo; fi
    if ! printf '%s\n' "$pass" | "$PY" client.py login "$user" --server "$SERVER_URL" --password-stdin 2>/dev/null; then
        say "no such account yet: registering $user"
        printf '%s\n' "$pass" | "$PY" client.py register "$user" --server "$SERVER_URL" --password-stdin
    fi
}

up() {
    local mnt=${1:-$HOME/zkfs}
    setup
    server_up
    account
    mkdir -p "$mnt"
    if grep -q " $(realpath "$mnt") fuse" /proc/mounts; then
        say "$mnt is already mounted"
    else
        "$PY" mount.py "$mnt"
    fi
    say "ready: copy files into $mnt; only ciphertext reaches the server. Stop: ./zkfs.sh down $mnt"
}

down() {
    local mnt=${1:-$HOME/zkfs}
    if grep -q " $(realpath "$mnt") fuse" /proc/mounts; then "$PY" mount.py --unmount "$mnt"; fi
    if [ -f "$SERVER_PID" ]; then
        local pid; pid=$(cat "$SERVER_PID")
        if kill -0 "$pid" 2>/dev/null; then say "stopping the server ($pid)"; kill "$pid"; fi
        rm -f "$SERVER_PID"
    fi
}

run_tests() {
    # With arguments: pytest with them. Without: the quick tier first (it stops
    # there if it fails), then the stress, fault and load tests marked slow.
    if [ $# -gt 0 ]; then exec "$PY" -m pytest "$@"; fi
    say "quick tier (-m 'not slow')"
    "$PY" -m pytest -m "not slow" --durations=10
    say "slow tier (-m slow): stress, faults, load"
    exec "$PY" -m pytest -m slow --durations=10
}

cmd=${1:-up}
[ $# -gt 0 ] && shift
case "$cmd" in
    up) up "$@" ;;
    down) down "$@" ;;
    setup) setup ;;
    test) setup; test_setup; run_tests "$@" ;;
    bench) setup; apt_install rclone gocryptfs; exec "$PY" bench/run.py "$@" ;;
    -h|--help|help) sed -n '2,13p' "$0" ;;
    *) up "$cmd" "$@" ;;
esac
