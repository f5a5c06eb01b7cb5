#!/usr/bin/env bash
# Fault injection end to end (shardvol only; other SERVERs skip it):
#   a. disks damaged under a running server: while fio writes with --verify=crc32c through the NBD
#      engine, m disk files are truncated (one to nothing, one to half); the verify phase that
#      follows must find zero errors;
#   b. kill -9 at random moments: E2E_KILL_CYCLES times, a writer writes stamped blocks and flushes
#      (scripts/lib/stamped.py), the server is killed at a random instant, restarted, and every block
#      is checked: each flushed write is there (or a newer one), no block is garbage;
#   c. offline recovery: data written and flushed (some of it only in the journal when the server
#      is killed), pool.redb and m disk files deleted, `shardvol recover` rebuilds the image, which
#      must equal what the server served; the remaining disk files must be unchanged.
# Each scenario prints its counts; the script exits non-zero at the first failure.
#
#   scripts/e2e-faults.sh
#   E2E_SCENARIOS="b" E2E_KILL_CYCLES=10 scripts/e2e-faults.sh
#
# Environment: E2E_SIZE (volume size, default 256M), E2E_FIO_SIZE (bytes fio writes and verifies in
# scenario a, default 64M), E2E_FIO_RATE (its write rate, default 16m), E2E_KILL_CYCLES (default 50), E2E_KILL_SPAN (blocks the kill -9 writer
# uses, default 4096 = 16 MiB), E2E_SCENARIOS (default "c b a": the one that needs degraded
# destaging runs last, so the others report even while it fails), KEEP_WORK=1.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/server.sh"

if [[ "$SERVER" != shardvol ]]; then
    log "skipped: the fault scenarios damage shardvol's disk files (SERVER=$SERVER)"
    exit 0
fi

E2E_SIZE=${E2E_SIZE:-256M}
E2E_FIO_SIZE=${E2E_FIO_SIZE:-64M}
# The write phase is throttled so that it lasts a few seconds and the disks are damaged in its
# middle (the verify phase then runs at full speed).
E2E_FIO_RATE=${E2E_FIO_RATE:-16m}
E2E_KILL_CYCLES=${E2E_KILL_CYCLES:-50}
E2E_KILL_SPAN=${E2E_KILL_SPAN:-4096}
E2E_SCENARIOS=${E2E_SCENARIOS:-c b a}
# 4+2 with small chunks and a 32 MiB journal: every stripe touches every disk of the 6, so each
# fault reaches every stripe, and pools stay small. The journal is smaller than E2E_FIO_SIZE, so
# scenario a cannot pass by keeping everything in the journal: it needs destaging to go on with
# damaged disks.
SHARDVOL_CREATE_ARGS=${SHARDVOL_CREATE_ARGS:---data 4 --parity 2 --chunk-size 16K --journal-size 32M}
M=2
# Debian's python3 has the libnbd bindings (python3-libnbd); a python3 earlier in PATH may not.
PY=${PY:-/usr/bin/python3}
STAMPED="$SCRIPTS_DIR/lib/stamped.py"

need_cmd fio qemu-io nbdcopy cmp sha256sum truncate
"$PY" -c 'import nbd' 2>/dev/null || die "$PY cannot import nbd (python3-libnbd; run scripts/install-deps.sh)"
server_check
make_workdir

# new_pool NAME: a fresh pool in $WORK/NAME (sets SERVER_POOL).
new_pool() {
    server_create "$WORK/$1/pool" "$E2E_SIZE"
}

disk_file() { echo "$SERVER_POOL/disks/disk-$1.img"; }

# fio_json_field FILE EXPR: a value from fio's JSON output (python expression on `j`).
fio_json_field() {
    "$PY" -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"
}

scenario_a() {
    step "a: truncate $M disk files while fio writes and verifies (crc32c)"
    new_pool a
    server_start unix
    local uri json=$WORK/a/fio.json
    uri=$(server_uri)
    # (`|| exit` keeps the ERR trap out of the background job: its status is checked below.)
    {
        bounded fio --name=faults --ioengine=nbd --uri="$uri" --rw=randwrite --bsrange=4k-64k \
            --size="$E2E_FIO_SIZE" --rate="$E2E_FIO_RATE" --iodepth=16 --verify=crc32c \
            --do_verify=1 --verify_fatal=1 --verify_dump=0 --randrepeat=0 \
            --output-format=json --output="$json" || exit $?
    } &
    local fio_pid=$!
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || die "fio finished before the disks were damaged (lower E2E_FIO_RATE)"
    local d1 d2 half
    d1=$(disk_file 1)
    d2=$(disk_file 4)
    half=$(($(stat -c %s "$d2") / 2))
    truncate -s 0 "$d1"
    truncate -s "$half" "$d2"
    log "truncated $d1 to 0 bytes and $d2 to $half bytes while fio runs"
    local rc=0
    wait "$fio_pid" || rc=$?
    local written verified errors
    written=$(fio_json_field "$json" "j['jobs'][0]['write']['io_bytes']" 2>/dev/null || echo "?")
    verified=$(fio_json_field "$json" "j['jobs'][0]['read']['io_bytes']" 2>/dev/null || echo "?")
    errors=$(fio_json_field "$json" "j['jobs'][0]['error']" 2>/dev/null || echo "?")
    log "a: fio wrote $written bytes, verified $verified bytes, error code $errors, exit $rc"
    if ((rc != 0)) || [[ "$errors" != 0 ]]; then
        tail -n 20 "$SERVER_LOG" >&2 || true
        die "fio reported errors with $M disks damaged (exit $rc, error $errors)"
    fi
    [[ "$verified" == "$written" ]] || die "fio verified $verified bytes of the $written written"
    server_stop KILL
}

scenario_b() {
    step "b: kill -9 at random moments, $E2E_KILL_CYCLES cycles"
    new_pool b
    local state=$WORK/b/stamped.json i delay out
    local total_flushed=0
    for ((i = 1; i <= E2E_KILL_CYCLES; i++)); do
        server_start unix
        # The first check of a cycle proves the previous kill lost nothing flushed.
        out=$(bounded "$PY" "$STAMPED" check "$(server_uri)" "$state" "$E2E_KILL_SPAN" 2>"$WORK/b/check.err") || {
            echo "$out" >&2
            cat "$WORK/b/check.err" >&2
            die "cycle $i: blocks damaged or lost after kill -9 and restart"
        }
        [[ $i == 1 ]] || log "b: cycle $i after restart: $out"
        {
            bounded "$PY" "$STAMPED" write "$(server_uri)" "$state" "$E2E_KILL_SPAN" "$i" 5 \
                >"$WORK/b/writer.out" 2>&1 || exit $?
        } &
        local wpid=$!
        # Kill somewhere in the first 0.1-1.5 s of writing.
        delay=$(printf '0.%03d' $((100 + RANDOM % 900)))
        ((RANDOM % 3 == 0)) && delay=1.$((RANDOM % 5))
        sleep "$delay"
        server_stop KILL >/dev/null 2>&1
        wait "$wpid" || die "cycle $i: the writer failed: $(cat "$WORK/b/writer.out")"
        log "b: cycle $i: killed after ${delay}s; $(cat "$WORK/b/writer.out")"
    done
    server_start unix
    out=$(bounded "$PY" "$STAMPED" check "$(server_uri)" "$state" "$E2E_KILL_SPAN") ||
        die "final check after $E2E_KILL_CYCLES kills: blocks damaged or lost"
    total_flushed=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['flushed']))" "$state")
    log "b: $E2E_KILL_CYCLES kill -9 cycles; final $out; $total_flushed distinct blocks flushed at least once"
    server_stop TERM
}

scenario_c() {
    step "c: stop, delete pool.redb and $M disks, recover"
    new_pool c
    server_start unix
    local uri dir=$WORK/c
    uri=$(server_uri)
    head -c $((24 << 20)) /dev/urandom >"$dir/random.bin"
    bounded nbdcopy --flush "$dir/random.bin" "$uri" || die "nbdcopy into the export failed"
    bounded qemu-io -f raw "$uri" -c "write -P 0x5a $((100 << 20)) $((3 << 20))" -c "discard $((4 << 20)) $((1 << 20))" \
        -c flush >/dev/null || die "qemu-io writes failed"
    # What the server serves now, then writes that are (almost surely) still only in the journal
    # when the server is killed right after their flush.
    bounded nbdcopy "$uri" "$dir/served.img" || die "nbdcopy out of the export failed"
    local late=(-c "write -P 0xc3 $((7 << 20)) 300000" -c "write -P 0x3c $((200 << 20)) 65536" -c flush)
    bounded qemu-io -f raw "$uri" "${late[@]}" >/dev/null || die "qemu-io late writes failed"
    server_stop KILL
    qemu-io -f raw "$dir/served.img" "${late[@]}" >/dev/null || die "cannot apply the late writes to the reference"
    rm "$SERVER_POOL/pool.redb"
    rm "$(disk_file 0)" "$(disk_file 3)"
    local disks=() f
    for f in "$SERVER_POOL"/disks/disk-*.img; do disks+=(--disk "$f"); done
    (cd "$SERVER_POOL/disks" && sha256sum disk-*.img) >"$dir/before.sum"
    local shares=() n=0
    while IFS= read -r f; do
        ((n < SHARDVOL_THRESHOLD)) || break
        shares+=(--share "$f")
        n=$((n + 1))
    done < <(find "$SERVER_POOL.shares" -maxdepth 1 -type f | sort -r)
    local t0=$SECONDS
    bounded "$SHARDVOL_BIN" recover "${disks[@]}" "${shares[@]}" --volume "$EXPORT" \
        --output "$dir/recovered.img" >"$dir/recover.out" 2>"$dir/recover.err" || {
        cat "$dir/recover.out" "$dir/recover.err" >&2
        die "shardvol recover failed"
    }
    sed 's/^/    /' "$dir/recover.out" >&2
    (cd "$SERVER_POOL/disks" && sha256sum --quiet -c "$dir/before.sum") ||
        die "recover modified a disk file"
    cmp "$dir/served.img" "$dir/recovered.img" || die "the recovered image differs from what the server served"
    log "c: recovered $(stat -c %s "$dir/recovered.img") bytes ($(du -k "$dir/recovered.img" | cut -f1) KiB on disk) in $((SECONDS - t0))s without pool.redb and with 2 of 6 disks deleted: identical; the 4 disk files left are unchanged"
}

for s in $E2E_SCENARIOS; do
    case "$s" in
        a) scenario_a ;;
        b) scenario_b ;;
        c) scenario_c ;;
        *) die "unknown scenario $s (a, b or c)" ;;
    esac
done
