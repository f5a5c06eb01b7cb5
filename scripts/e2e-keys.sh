#!/usr/bin/env bash
# End-to-end key lifecycle against the real server (shardvol only; other SERVERs skip it):
#   1. a server started without shares is sealed: no export, until 2 of 3 holders run
#      `shardvol unlock` (a repeated share is refused);
#   2. random data is written and flushed, a new master version is made, and the rotation task
#      (epochs of 2 s, max age 2 s) re-encrypts everything in the background;
#   3. the server is killed with SIGKILL at random moments while it re-encrypts, restarted with
#      shares each time, and the data must read back identical after every restart;
#   4. once no block needs version 1 it is destroyed, and the data still reads back.
#
#   scripts/e2e-keys.sh
#
# Environment: E2E_SIZE (volume, default 256M), DATA_SIZE (payload, default 32M), KILLS (default 5),
# SHARDVOL_BIN, KEEP_WORK=1.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

if [[ "${SERVER:-shardvol}" != shardvol ]]; then
    log "skipped: keys, unlock and re-encryption are shardvol's own (SERVER=$SERVER)"
    exit 0
fi

E2E_SIZE=${E2E_SIZE:-256M}
DATA_SIZE=${DATA_SIZE:-32M}
KILLS=${KILLS:-5}
SHARDVOL_BIN=${SHARDVOL_BIN:-$REPO_ROOT/target/release/shardvol}
DATA_BYTES=$(size_bytes "$DATA_SIZE")

[[ -x "$SHARDVOL_BIN" ]] || die "shardvol binary not found at $SHARDVOL_BIN (cargo build --release, or set SHARDVOL_BIN)"
need_cmd nbdcopy nbdinfo cmp
make_workdir

POOL="$WORK/pool"
SOCK="$WORK/nbd.sock"
URI="nbd+unix:///vol0?socket=$SOCK"
PID=""
kill_server() { [[ -z "$PID" ]] || kill -KILL "$PID" 2>/dev/null || true; }
on_exit kill_server

cat >"$WORK/config.toml" <<'EOF'
[rotation]
period = "2s"
max_age = "2s"
rate = 1000
EOF

sv() { SHARDVOL_LOG=warn bounded "$SHARDVOL_BIN" "$@"; }
answers() { sv status --pool "$POOL" >/dev/null 2>&1; }
exported() { timeout 10 nbdinfo --size "$URI" >/dev/null 2>&1; }

# start [share files...]: serve the pool (sealed without shares); waits for the control socket.
start() {
    rm -f "$SOCK"
    local shares=()
    for f in "$@"; do shares+=(--share "$f"); done
    SHARDVOL_LOG=info "$SHARDVOL_BIN" serve --pool "$POOL" --socket "$SOCK" --listen "127.0.0.1:$(free_port)" \
        --config "$WORK/config.toml" "${shares[@]}" >>"$WORK/server.log" 2>&1 &
    PID=$!
    wait_until 60 "the server to listen" test -S "$SOCK" || die "server did not start (log: $WORK/server.log)"
    wait_until 60 "the control socket" answers || die "server did not answer on its control socket"
}

read_back() {
    rm -f "$WORK/out.bin"
    wait_until 60 "the export" exported || die "export not served after $1"
    bounded nbdcopy "$URI" "$WORK/out.bin" || die "nbdcopy out of the export failed after $1"
    cmp -n "$DATA_BYTES" "$WORK/data.bin" "$WORK/out.bin" || die "data differs after $1"
    rm -f "$WORK/out.bin"
}

step "create a pool, 2 of 3 shares"
sv create --pool "$POOL" --size "$E2E_SIZE" --journal-size 32M --shares 3 --threshold 2 \
    --share-dir "$WORK/shares" >"$WORK/create.log" 2>&1 || die "create failed"
S1="$WORK/shares/share-1.txt" S2="$WORK/shares/share-2.txt" S3="$WORK/shares/share-3.txt"

step "sealed start, unlock share by share"
start
[[ -z "$(timeout 10 nbdinfo --list "nbd+unix:///?socket=$SOCK" 2>/dev/null | grep -i 'export="vol0"' || true)" ]] ||
    die "a sealed server lists an export"
sv unlock --pool "$POOL" --share "$S1" | tee "$WORK/unlock1.log"
grep -q "1 of 2" "$WORK/unlock1.log" || die "first share: no \"1 of 2\""
if sv unlock --pool "$POOL" --share "$S1" >"$WORK/unlock-dup.log" 2>&1; then die "a repeated share was accepted"; fi
grep -q "already given" "$WORK/unlock-dup.log" || die "repeated share: $(cat "$WORK/unlock-dup.log")"
sv unlock --pool "$POOL" --share "$S3" | grep -q "unlocked" || die "2 of 2 did not unlock"

step "write $DATA_SIZE, flush, new master version"
head -c "$DATA_BYTES" /dev/urandom >"$WORK/data.bin"
bounded nbdcopy --flush "$WORK/data.bin" "$URI" || die "nbdcopy into the export failed"
sv key rotate-master --pool "$POOL" | grep -q "version 2 is active" || die "rotate-master failed"

step "SIGKILL while re-encrypting, $KILLS times"
for ((i = 1; i <= KILLS; i++)); do
    sleep "0.$((RANDOM % 9 + 1))"
    kill -KILL "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
    start "$S2" "$S3"
    read_back "kill $i"
    log "kill $i: data intact; $(sv status --pool "$POOL" | grep '^keys:' || true)"
done

step "wait until no block needs version 1, then destroy it"
v1_blocks() {
    sv key status --pool "$POOL" --json | jq '.versions[] | select(.version == 1) | .blocks'
}
wait_until 120 "version 1 to protect no block" test "$(v1_blocks)" = 0 ||
    die "version 1 still protects $(v1_blocks) blocks"
sv key destroy 1 --pool "$POOL" | grep -q destroyed || die "destroy failed"
read_back "destroying version 1"
kill -TERM "$PID"
wait "$PID" || die "server did not stop cleanly"
PID=""
start "$S1" "$S2"
read_back "a restart without version 1"
kill -TERM "$PID"
wait "$PID" || true
PID=""
log "key lifecycle: sealed unlock, $KILLS kills during re-encryption, destroy: all data intact"
