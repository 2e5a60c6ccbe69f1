#!/usr/bin/env bash
# Run pjdfstest (https://github.com/pjd/pjdfstest, POSIX conformance) on a zkfs mount,
# as its README says: as root, from inside the filesystem under test.
#
#   tests/pjdfstest.sh PJDFSTEST_DIR [PROVE ARGS...]     e.g. tests/pjdfstest.sh ../pjdfstest -j2
#
# PJDFSTEST_DIR is a checkout of pjdfstest outside this repository (it is not
# vendored); it is built there if needed (autoconf, automake, gcc). A server and a
# mount with --allow-other (the tests switch users) are started in a temporary
# folder and stopped at the end, whatever happens. Exit status: prove's, or 1 if the
# mount did not live to the end.
set -euo pipefail
PJD=$(realpath "${1:?usage: $0 PJDFSTEST_DIR [PROVE ARGS...]}")
shift
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ "$(id -u)" -eq 0 ] || { echo "pjdfstest needs root" >&2; exit 2; }

if [ ! -x "$PJD/pjdfstest" ]; then
    (cd "$PJD" && autoreconf -ifs && ./configure && make pjdfstest) >/dev/null
fi

WORK=$(mktemp -d /tmp/zkfs-pjdfstest.XXXXXX)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export ZKFS_HOME="$WORK/home"
SERVER_PID=""
cleanup() {
    cd /
    if grep -q " $WORK/mnt fuse" /proc/mounts; then
        "$PY" "$ROOT/mount.py" --unmount "$WORK/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$WORK/mnt" || true
    fi
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    echo "logs: $WORK/server.log $ZKFS_HOME/logs/" >&2
}
trap cleanup EXIT

mkdir -p "$WORK/data" "$WORK/mnt"
"$PY" -m server --data-dir "$WORK/data" --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
    "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/api/v1/health').status_code != 200)" \
        2>/dev/null && break
    sleep 0.1
done
PASSWORD="pjdfstest $(date +%s%N)"
printf '%s\n' "$PASSWORD" | "$PY" client.py register pjd --server "http://127.0.0.1:$PORT" --password-stdin >/dev/null
printf '%s\n' "$PASSWORD" | "$PY" client.py login pjd --server "http://127.0.0.1:$PORT" --password-stdin >/dev/null
"$PY" mount.py "$WORK/mnt" --allow-other
chmod 0755 "$WORK/mnt"
cd "$WORK/mnt"
status=0
prove -r "$@" "$PJD/tests" || status=$?
# the mount must have lived through it all
if ls "$WORK/mnt" >/dev/null && "$PY" "$ROOT/mount.py" --status "$WORK/mnt" >/dev/null; then
    echo "the mount is alive"
else
    echo "the mount died" >&2
    status=1
fi
exit $status
