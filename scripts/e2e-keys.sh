#!/usr/bin/env bash
# End-to-end key lifecycle against the real server (shardvol only; other SERVERs skip it):
#   1. a server started without shares is sealed: no export, until 2 of 3 holders run
#      `shardvol unlock` (a repeated share, a corrupt one and one of another pool are refused,
#      each named);
#   2. random data is written and flushed, `key rotate` starts a new epoch and re-encrypts, more
#      data is written, a new master version is made, and the rotation task (epochs of 2 s, max age
#      2 s, 20 MB/s) re-encrypts everything in the background; destroying version 1 now is refused;
#   3. the server is killed with SIGKILL at random moments while it re-encrypts, restarted with
#      shares each time, and the data must read back identical after every restart;
#   4. `key status` shows version 1 draining to zero; then it is destroyed, its wrapped key is
#      found in no file of the pool (disks included), and the data still reads back;
#   5. the audit log verifies with the shares, and fails naming the record once one is edited.
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
need_cmd nbdcopy nbdinfo cmp jq python3
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
rate = 20
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
# A share with one digit of its secret changed (the file's checksum refuses it) and a share of
# another pool: each refused, naming the file, without counting.
python3 -c '
import sys
t = open(sys.argv[1]).read()
i = t.index("secret: ") + 8
open(sys.argv[2], "w").write(t[:i] + ("1" if t[i] == "0" else "0") + t[i + 1:])' "$S2" "$WORK/corrupt.txt"
if sv unlock --pool "$POOL" --share "$WORK/corrupt.txt" >"$WORK/unlock-bad.log" 2>&1; then die "a corrupt share was accepted"; fi
grep -q "corrupt.txt" "$WORK/unlock-bad.log" || die "corrupt share not named: $(cat "$WORK/unlock-bad.log")"
sv create --pool "$WORK/other" --size 16M --journal-size 8M --disks 3 --data 2 --parity 1 --shares 3 --threshold 2 \
    --share-dir "$WORK/other-shares" >/dev/null 2>&1 || die "create of a second pool failed"
if sv unlock --pool "$POOL" --share "$WORK/other-shares/share-2.txt" >"$WORK/unlock-foreign.log" 2>&1; then
    die "a share of another pool was accepted"
fi
grep -q "other-shares/share-2.txt" "$WORK/unlock-foreign.log" || die "foreign share not named: $(cat "$WORK/unlock-foreign.log")"
[[ -z "$(timeout 10 nbdinfo --list "nbd+unix:///?socket=$SOCK" 2>/dev/null | grep -i 'export="vol0"' || true)" ]] ||
    die "exported with 1 valid share of 2"
log "refused, each by name: a repeated share, a corrupt share, a share of another pool; still sealed"
sv unlock --pool "$POOL" --share "$S3" | grep -q "unlocked" || die "2 of 2 did not unlock"

step "write, key rotate, write again, new master version"
head -c "$DATA_BYTES" /dev/urandom >"$WORK/data.bin"
half=$((DATA_BYTES / 2))
head -c "$half" "$WORK/data.bin" >"$WORK/half.bin"
bounded nbdcopy --flush "$WORK/half.bin" "$URI" || die "nbdcopy into the export failed"
sv key rotate --pool "$POOL" >"$WORK/rotate.log" 2>&1 || die "key rotate failed: $(cat "$WORK/rotate.log")"
bounded nbdcopy --flush "$WORK/data.bin" "$URI" || die "nbdcopy into the export failed"
read_back "key rotate and a second write"
v1_blocks() {
    sv key status --pool "$POOL" --json | jq '[.versions[] | select(.version == 1) | .blocks] | add // 0'
}
sv key rotate-master --pool "$POOL" | grep -q "version 2 is active" || die "rotate-master failed"
# Slot A of version 1 in the key-slot file: bytes 32..92 are its wrapped key (docs/key-lifecycle.md).
WRAPPED_V1=$(python3 -c 'import sys; print(open(sys.argv[1],"rb").read()[32:92].hex())' "$POOL/keyslots.bin")
[[ "$WRAPPED_V1" =~ [1-9a-f] ]] || die "no wrapped key for version 1 in keyslots.bin"
left=$(v1_blocks)
if ((left > 0)); then
    if sv key destroy 1 --pool "$POOL" >"$WORK/destroy-early.log" 2>&1; then
        die "destroy of version 1 accepted while $left blocks need it"
    fi
    log "destroy of version 1 refused while $left blocks need it: $(grep -m1 -i 'error' "$WORK/destroy-early.log")"
else
    log "re-encryption finished before the early destroy could be tried"
fi

step "SIGKILL while re-encrypting, $KILLS times"
for ((i = 1; i <= KILLS; i++)); do
    sleep "0.$((RANDOM % 9 + 1))"
    kill -KILL "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
    start "$S2" "$S3"
    read_back "kill $i"
    log "kill $i: data intact; version 1 still protects $(v1_blocks) blocks; $(sv status --pool "$POOL" | grep '^keys:' || true)"
done

step "wait until no block needs version 1, then destroy it"
t0=$SECONDS
drain=()
while :; do
    n=$(v1_blocks)
    drain+=("$n")
    [[ "$n" == 0 ]] && break
    ((SECONDS - t0 < 120)) || die "version 1 still protects $n blocks after 120 s"
    sleep 1
done
log "version 1 blocks, once a second until none: ${drain[*]}"
sv key destroy 1 --pool "$POOL" | grep -q destroyed || die "destroy failed"
read_back "destroying version 1"
# Crypto-shredding: the wrapped key of version 1 is in no file of the pool, disks included.
python3 - "$POOL" "$WRAPPED_V1" <<'PY' || die "the wrapped key of version 1 is still in the pool"
import os, sys
root, needle = sys.argv[1], bytes.fromhex(sys.argv[2])
forms = [needle, needle.hex().encode(), needle.hex().upper().encode()]
found, files = [], 0
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        if not os.path.isfile(p):
            continue
        files += 1
        tail = b""
        with open(p, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                buf = tail + chunk
                if any(x in buf for x in forms):
                    found.append(p)
                    break
                tail = buf[-(2 * len(needle)):]
print(f"searched {files} files of the pool for the wrapped key of version 1: "
      + ("found in " + ", ".join(found) if found else "absent"))
sys.exit(1 if found else 0)
PY
kill -TERM "$PID"
wait "$PID" || die "server did not stop cleanly"
PID=""
start "$S1" "$S2"
read_back "a restart without version 1"
kill -TERM "$PID"
wait "$PID" || true
PID=""

step "audit log: verifies, then fails at an edited record"
sv audit verify --pool "$POOL" --share "$S1" --share "$S2" >"$WORK/audit-ok.log" 2>&1 ||
    die "the audit log does not verify: $(cat "$WORK/audit-ok.log")"
log "audit: $(grep -iE 'record|ok|intact' "$WORK/audit-ok.log" | head -2 | tr '\n' ' ')"
python3 - "$POOL/audit.log" <<'PY'
import sys
p = sys.argv[1]
lines = open(p).read().split("\n")
# Record 3: change one digit of its time.
i = 2
lines[i] = lines[i].replace('"time_unix":', '"time_unix":1', 1)
open(p, "w").write("\n".join(lines))
PY
if sv audit verify --pool "$POOL" >"$WORK/audit-bad.log" 2>&1; then die "an edited audit log verifies"; fi
grep -q "record 3" "$WORK/audit-bad.log" || die "edited record not named: $(cat "$WORK/audit-bad.log")"
log "audit: edited log refused: $(grep -m1 'record 3' "$WORK/audit-bad.log")"
log "key lifecycle: sealed unlock, refusals by name, rotate, rotate-master, $KILLS kills during re-encryption, destroy with no trace of the key, audit: all as expected"
