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
#   d. bit rot and scrub: random data written and destaged, then bits flipped in random blocks and
#      metadata entries of at most m disks per stripe (scripts/lib/bitrot.py); `shardvol scrub
#      --repair` through the running server must list exactly the flipped shards and repair them
#      all, a second scrub must find nothing, and the volume must read back identical. Then one
#      disk too many: the same row of some stripes flipped on m+1 disks; reading every block of
#      the volume must give an error for exactly the data blocks of those rows and the right data
#      for every other block;
#   e. replace a disk while fio runs: the volume filled with random data, then fio writes and
#      verifies (crc32c) while a disk file is truncated; once `shardvol status` shows it failed,
#      `shardvol disk replace` rebuilds it onto a new file while fio still writes; fio must find
#      zero errors and every disk must be ok. Prints the rebuild's MB/s and the volume's
#      sequential read rate.
#   f. add disks: with the volume full of random data, `shardvol disk add` grows the pool from 6 to
#      7 disks while fio writes and verifies (zero errors); then a second add is interrupted by
#      kill -9 half way, the restarted server resumes it by itself, and the volume reads back
#      identical; finally pool.redb and 2 of the 8 disks (the newest among them) are deleted and
#      `shardvol recover` rebuilds the same image from the superblocks. Prints the rebalance MB/s.
# Each scenario prints its counts; the script exits non-zero at the first failure.
#
#   scripts/e2e-faults.sh
#   E2E_SCENARIOS="b" E2E_KILL_CYCLES=10 scripts/e2e-faults.sh
#   E2E_SCENARIOS="d e" scripts/e2e-faults.sh
#
# Environment: E2E_SIZE (volume size, default 256M), E2E_FIO_SIZE (bytes fio writes and verifies in
# scenarios a and e, default 64M), E2E_FIO_RATE (its write rate in a, default 16m),
# E2E_REPLACE_FIO_RATE (its write rate in e, default 8m), E2E_KILL_CYCLES (default 50), E2E_KILL_SPAN (blocks the kill -9 writer
# uses, default 4096 = 16 MiB), E2E_ROT_SHARDS (shards flipped in scenario d, default 300),
# E2E_ROT_ROWS (rows flipped on m+1 disks in scenario d, default 16), E2E_SEED (scenario d's
# random choices; default $RANDOM, printed), E2E_SCENARIOS (default "c b a d e f"), KEEP_WORK=1.
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
E2E_SCENARIOS=${E2E_SCENARIOS:-c b a d e f}
E2E_REPLACE_FIO_RATE=${E2E_REPLACE_FIO_RATE:-8m}
E2E_ROT_SHARDS=${E2E_ROT_SHARDS:-300}
E2E_ROT_ROWS=${E2E_ROT_ROWS:-16}
# 4+2 with small chunks and a 32 MiB journal: every stripe touches every disk of the 6, so each
# fault reaches every stripe, and pools stay small. The journal is smaller than E2E_FIO_SIZE, so
# scenario a cannot pass by keeping everything in the journal: it needs destaging to go on with
# damaged disks.
SHARDVOL_CREATE_ARGS=${SHARDVOL_CREATE_ARGS:---data 4 --parity 2 --chunk-size 16K --journal-size 32M}
M=2
# Debian's python3 has the libnbd bindings (python3-libnbd); a python3 earlier in PATH may not.
PY=${PY:-/usr/bin/python3}
STAMPED="$SCRIPTS_DIR/lib/stamped.py"
BITROT="$SCRIPTS_DIR/lib/bitrot.py"

need_cmd fio qemu-io nbdcopy cmp sha256sum truncate
"$PY" -c 'import nbd' 2>/dev/null || die "$PY cannot import nbd (python3-libnbd; run scripts/install-deps.sh)"
server_check
make_workdir

# new_pool NAME: a fresh pool in $WORK/NAME (sets SERVER_POOL).
new_pool() {
    server_create "$WORK/$1/pool" "$E2E_SIZE"
}

disk_file() { echo "$SERVER_POOL/disks/disk-$1.img"; }

scenario_a() {
    step "a: truncate $M disk files while fio writes and verifies (crc32c)"
    new_pool a
    server_start unix
    local uri json=$WORK/a/fio.json
    uri=$(server_uri)
    fio_verify_start "$uri" "$json" "$E2E_FIO_RATE"
    local fio_pid=$FIO_PID
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || die "fio finished before the disks were damaged (lower E2E_FIO_RATE)"
    local d1 d2 half
    d1=$(disk_file 1)
    d2=$(disk_file 4)
    half=$(($(stat -c %s "$d2") / 2))
    truncate -s 0 "$d1"
    truncate -s "$half" "$d2"
    log "truncated $d1 to 0 bytes and $d2 to $half bytes while fio runs"
    fio_verify_check "$fio_pid" "$json" a "$M damaged disks"
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

# json_field FILE EXPR: a value from a JSON file (python expression on `j`).
json_field() {
    "$PY" -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"
}

# status_json FILE: `shardvol status --json` of the running server into FILE.
status_json() {
    timeout 30 "$SHARDVOL_BIN" status --pool "$SERVER_POOL" --json >"$1" 2>/dev/null
}

_journal_empty() {
    status_json "$WORK/status.json" &&
        [[ $(json_field "$WORK/status.json" "j['volumes'][0]['journal_used_bytes']") == 0 ]]
}

# _disk_failed ID: whether the running server reports disk ID as failed.
_disk_failed() {
    status_json "$WORK/status.json" &&
        [[ $(json_field "$WORK/status.json" "[d['state'] for d in j['disks'] if d['id'] == $1][0]") == failed ]]
}

# rot_geometry: "slots_start,slot_size,chunk_size,k" of the volume (docs/write-path.md, region
# layout), from `shardvol inspect` of the stopped pool. The pool's one volume ends where the disk files end, so the chunk slots start at the
# file size minus stripes * slot_size; that must be region_offset (1 MiB aligned) + journal_size.
rot_geometry() {
    "$SHARDVOL_BIN" inspect --pool "$SERVER_POOL" --json >"$WORK/inspect.json" 2>/dev/null ||
        die "shardvol inspect failed"
    "$PY" - "$WORK/inspect.json" <<'PYEOF'
import json, sys
j = json.load(open(sys.argv[1]))
v = j["volumes"][0]
chunk = v["chunk_size"]
slot = chunk + (chunk // 4096 * 64 + 4095) // 4096 * 4096
size = j["disks"][0]["size"]
start = size - v["stripes"] * slot
region = start - v["journal_size"]
if region <= 0 or region % (1 << 20):
    sys.exit(f"chunk slots at {start}: region offset {region} is not 1 MiB aligned")
print(f"{start},{slot},{chunk},{v['data_chunks']}")
PYEOF
}

# rot_disks ID...: "id=path,..." for bitrot.py.
rot_disks() {
    local out="" id
    for id in "$@"; do out+="$id=$(disk_file "$id"),"; done
    echo "${out%,}"
}

scenario_d() {
    step "d: bit rot in up to $M disks per stripe, scrub --repair; then $((M + 1)) disks: EIO, never wrong data"
    new_pool d
    local uri dir=$WORK/d seed=${E2E_SEED:-$RANDOM} written=$((24 << 20))
    # (inspect reads the store, which a running server holds)
    local geo stripes k chunk
    geo=$(rot_geometry) || die "cannot locate the chunk slots"
    server_start unix
    uri=$(server_uri)
    head -c "$written" /dev/urandom >"$dir/random.bin"
    bounded nbdcopy --flush "$dir/random.bin" "$uri" || die "nbdcopy into the export failed"
    wait_until 60 "the journal to be destaged (status: journal empty)" _journal_empty ||
        die "the journal was not destaged within 60 s"
    chunk=$(cut -d, -f3 <<<"$geo")
    k=$(cut -d, -f4 <<<"$geo")
    stripes=$((written / (k * chunk)))
    log "d: $written bytes written and destaged ($stripes stripes); chunk slots at $geo (start,slot,chunk,k); seed $seed"

    local out
    out=$("$PY" "$BITROT" rot "$geo" "$(rot_disks 0 1 2 3 4 5)" "$stripes" "$E2E_ROT_SHARDS" "$M" \
        "$seed" "$dir/rot.json") || die "bitrot.py rot failed: $out"
    log "d: $out"
    json_run "$dir/scrub1.json" "shardvol scrub --repair" "$SHARDVOL_BIN" scrub \
        --pool "$SERVER_POOL" --volume "$EXPORT" --repair --json
    local q="'checked {} blocks and {} parity rows: bad {}, repaired {}, unrecoverable {}, in {:.2f} s'.format(j['blocks_checked'], j['parity_checked'], j['bad_found'], j['repaired'], j['unrecoverable'], j['seconds'])"
    log "d: scrub --repair: $(json_field "$dir/scrub1.json" "$q")"
    out=$("$PY" "$BITROT" match-scrub "$dir/rot.json" "$dir/scrub1.json" 2>"$dir/match.err") || {
        echo "$out" >&2
        cat "$dir/match.err" >&2
        die "the scrub did not find and repair exactly the flipped shards"
    }
    log "d: $out"
    [[ $(json_field "$dir/scrub1.json" "j['unrecoverable']") == 0 ]] || die "the scrub reports unrecoverable blocks"
    bounded "$SHARDVOL_BIN" scrub --pool "$SERVER_POOL" --volume "$EXPORT" --json \
        >"$dir/scrub2.json" 2>"$dir/scrub2.err" || die "the second scrub failed: $(cat "$dir/scrub2.err")"
    log "d: second scrub: $(json_field "$dir/scrub2.json" "$q")"
    [[ $(json_field "$dir/scrub2.json" "j['bad_found'] + j['unrecoverable']") == 0 ]] ||
        die "the second scrub still finds bad shards"
    bounded nbdcopy "$uri" "$dir/served.img" || die "nbdcopy out of the export failed"
    cmp -n "$written" "$dir/random.bin" "$dir/served.img" || die "the volume differs from what was written"
    cmp -n $(($(stat -c %s "$dir/served.img") - written)) -i "$written:0" "$dir/served.img" /dev/zero ||
        die "the volume is not zero after the written data"
    log "d: the volume reads back identical after the repair"

    # One disk too many: the same rows on m+1 disks, chosen at random.
    local three
    read -r -a three < <("$PY" -c 'import random, sys
print(*sorted(random.Random(int(sys.argv[1])).sample(range(6), int(sys.argv[2]))))' "$seed" $((M + 1)))
    out=$("$PY" "$BITROT" rot-rows "$geo" "$(rot_disks "${three[@]}")" "$stripes" "$E2E_ROT_ROWS" \
        "$seed" "$dir/rows.json") || die "bitrot.py rot-rows failed: $out"
    log "d: disks ${three[*]}: $out"
    out=$(bounded "$PY" "$BITROT" read "$uri" "$dir/random.bin" "$dir/rows.json" 2>"$dir/read.err") || {
        echo "$out" >&2
        cat "$dir/read.err" >&2
        die "reads with $((M + 1)) disks rotten: wrong data, or errors where there should be none"
    }
    log "d: $out"
    # A scrub that finds unrecoverable blocks prints its report and exits non-zero.
    local src=0
    bounded "$SHARDVOL_BIN" scrub --pool "$SERVER_POOL" --volume "$EXPORT" --json \
        >"$dir/scrub3.json" 2>"$dir/scrub3.err" || src=$?
    ((src == 1)) || die "the scrub with unrecoverable blocks exited with $src, not 1: $(cat "$dir/scrub3.err")"
    local lost
    lost=$(json_field "$dir/rows.json" "len(j['lost'])")
    log "d: scrub with $((M + 1)) disks rotten: $(json_field "$dir/scrub3.json" "$q")"
    [[ $(json_field "$dir/scrub3.json" "j['unrecoverable']") == "$lost" ]] ||
        die "the scrub counts $(json_field "$dir/scrub3.json" "j['unrecoverable']") unrecoverable blocks, $lost were lost"
    server_stop TERM
}

# fill_random URI DIR: writes the whole volume with random data (nbdcopy --flush), so that
# rebuilds, rebalances and reads move real data, not holes.
fill_random() {
    head -c "$(size_bytes "$E2E_SIZE")" /dev/urandom >"$2/fill.bin"
    bounded nbdcopy --flush "$2/fill.bin" "$1" || die "nbdcopy into the export failed"
    rm -f "$2/fill.bin"
}

# json_run OUT WHAT CMD...: runs CMD (bounded) with its standard output in OUT; if it fails,
# prints its standard error and dies naming WHAT.
json_run() {
    local out=$1 what=$2
    shift 2
    bounded "$@" >"$out" 2>"$out.err" || {
        cat "$out.err" >&2
        die "$what failed"
    }
}

# fio_verify_start URI JSON [RATE]: fio writes random blocks (4k-64k, E2E_FIO_SIZE at RATE,
# default E2E_REPLACE_FIO_RATE, iodepth 16) with crc32c verification, in the background (sets
# FIO_PID). (`|| exit` keeps the ERR trap out of the background job: fio_verify_check checks
# its status.)
fio_verify_start() {
    {
        bounded fio --name=verify --ioengine=nbd --uri="$1" --rw=randwrite --bsrange=4k-64k \
            --size="$E2E_FIO_SIZE" --rate="${3:-$E2E_REPLACE_FIO_RATE}" --iodepth=16 --verify=crc32c \
            --do_verify=1 --verify_fatal=1 --verify_dump=0 --randrepeat=0 \
            --output-format=json --output="$2" || exit $?
    } &
    FIO_PID=$!
}

# fio_verify_check PID JSON SCENARIO WHAT: waits for fio and requires zero errors, with every
# byte written verified.
fio_verify_check() {
    local rc=0 written verified errors
    wait "$1" || rc=$?
    written=$(json_field "$2" "j['jobs'][0]['write']['io_bytes']" 2>/dev/null || echo "?")
    verified=$(json_field "$2" "j['jobs'][0]['read']['io_bytes']" 2>/dev/null || echo "?")
    errors=$(json_field "$2" "j['jobs'][0]['error']" 2>/dev/null || echo "?")
    log "$3: fio wrote $written bytes, verified $verified bytes, error code $errors, exit $rc"
    if ((rc != 0)) || [[ "$errors" != 0 ]]; then
        tail -n 20 "$SERVER_LOG" >&2 || true
        die "fio reported errors across $4 (exit $rc, error $errors)"
    fi
    [[ "$verified" == "$written" ]] || die "fio verified $verified bytes of the $written written"
}

scenario_e() {
    step "e: a disk truncated and replaced while fio writes and verifies (crc32c)"
    new_pool e
    server_start unix
    local uri json=$WORK/e/fio.json dir=$WORK/e
    uri=$(server_uri)
    # The whole volume holds random data first, so that the rebuild and the sequential read
    # below move real data, not holes.
    fill_random "$uri" "$dir"
    fio_verify_start "$uri" "$json"
    local fio_pid=$FIO_PID t0=$SECONDS
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || die "fio finished before the disk was damaged (lower E2E_REPLACE_FIO_RATE)"
    local victim=3
    truncate -s 0 "$(disk_file $victim)"
    log "e: truncated $(disk_file $victim) to 0 bytes while fio runs"
    wait_until 30 "the server to mark disk $victim failed" _disk_failed "$victim" ||
        die "disk $victim was not marked failed within 30 s of its truncation"
    log "e: status shows disk $victim failed $((SECONDS - t0 - 1))s after the truncation"
    kill -0 "$fio_pid" 2>/dev/null || die "fio finished before the replacement started (lower E2E_REPLACE_FIO_RATE)"
    json_run "$dir/rebuild.json" "shardvol disk replace" "$SHARDVOL_BIN" disk replace \
        --pool "$SERVER_POOL" --disk "$victim" --with "$dir/new-disk.img" --json
    local running=no
    kill -0 "$fio_pid" 2>/dev/null && running=yes
    local q="'{} chunks rebuilt, {:.1f} MiB read, {:.1f} MiB written in {:.2f} s: {:.0f} MB/s read, {:.0f} MB/s written; completed {}, unrecoverable {}'.format(j['chunks'], j['bytes_read'] / 2**20, j['bytes_written'] / 2**20, j['seconds'], j['bytes_read'] / j['seconds'] / 1e6, j['bytes_written'] / j['seconds'] / 1e6, j['completed'], j['unrecoverable'])"
    log "e: disk replace: $(json_field "$dir/rebuild.json" "$q"); fio still running afterwards: $running"
    [[ $(json_field "$dir/rebuild.json" "j['completed'] and j['unrecoverable'] == 0") == True ]] ||
        die "the rebuild did not complete, or left unrecoverable blocks"
    fio_verify_check "$fio_pid" "$json" e "the replacement"
    status_json "$dir/status.json" || die "shardvol status failed"
    local states
    states=$(json_field "$dir/status.json" "' '.join(f\"{d['id']}:{d['state']}\" for d in j['disks'])")
    log "e: status after the rebuild: disks $states"
    [[ $(json_field "$dir/status.json" "all(d['state'] == 'ok' for d in j['disks'])") == True ]] ||
        die "not every disk is ok after the rebuild: $states"
    # The sequential read rate of the same volume, for comparison with the rebuild's.
    local t1 t2
    t1=$(date +%s.%N)
    bounded nbdcopy --requests=8 --request-size=$((1 << 20)) "$uri" "$dir/read.img" || die "nbdcopy out of the export failed"
    t2=$(date +%s.%N)
    log "e: sequential read of the volume ($(stat -c %s "$dir/read.img") bytes, nbdcopy 8 x 1 MiB): $("$PY" -c "import sys; print(f'{int(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])) / 1e6:.0f}')" "$(stat -c %s "$dir/read.img")" "$t1" "$t2") MB/s"
    rm -f "$dir/read.img"
    server_stop TERM
}

# _rebalance_done: whether the running server reports no rebalance in progress.
_rebalance_done() {
    status_json "$WORK/f/st.json" 2>/dev/null &&
        [[ $(json_field "$WORK/f/st.json" "j.get('rebalance') is None") == True ]]
}

# recover_shares: --share arguments for the threshold of the pool's shares.
recover_shares() {
    local f n=0
    while IFS= read -r f; do
        ((n < SHARDVOL_THRESHOLD)) || break
        printf -- '--share\n%s\n' "$f"
        n=$((n + 1))
    done < <(find "$SERVER_POOL.shares" -maxdepth 1 -type f | sort -r)
}

scenario_f() {
    step "f: disks added while fio writes and verifies; an add killed half way and resumed; recover"
    new_pool f
    server_start unix
    local uri json=$WORK/f/fio.json dir=$WORK/f
    uri=$(server_uri)
    fill_random "$uri" "$dir"
    fio_verify_start "$uri" "$json"
    local fio_pid=$FIO_PID
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || die "fio finished before the disk add (lower E2E_REPLACE_FIO_RATE)"
    json_run "$dir/add.json" "shardvol disk add" "$SHARDVOL_BIN" disk add \
        --pool "$SERVER_POOL" "$dir/disk-6.img:shelf-2" --json
    local running=no
    kill -0 "$fio_pid" 2>/dev/null && running=yes
    local q="'{} stripes rewritten, {} chunks moved, {:.1f} MiB in {:.2f} s: {:.0f} MB/s; completed {}'.format(j['moved'], j['chunks_moved'], j['bytes'] / 2**20, j['seconds'], j['bytes'] / j['seconds'] / 1e6, j['completed'])"
    log "f: disk add (6 -> 7 disks): $(json_field "$dir/add.json" "$q"); fio still running afterwards: $running"
    [[ $(json_field "$dir/add.json" "j['completed'] and j['moved'] > 0") == True ]] ||
        die "the rebalance did not complete or moved nothing"
    fio_verify_check "$fio_pid" "$json" f "the rebalance"
    status_json "$dir/status.json" || die "shardvol status failed"
    [[ $(json_field "$dir/status.json" "len(j['disks']) == 7 and all(d['state'] == 'ok' for d in j['disks']) and j.get('rebalance') is None") == True ]] ||
        die "after the add: not 7 disks all ok, or a rebalance still shown: $(json_field "$dir/status.json" "[(d['id'], d['state']) for d in j['disks']], j.get('rebalance')")"
    local t1 t2
    t1=$(date +%s.%N)
    bounded nbdcopy --requests=8 --request-size=$((1 << 20)) "$uri" "$dir/served.img" || die "nbdcopy out of the export failed"
    t2=$(date +%s.%N)
    log "f: sequential read of the volume on 7 disks (nbdcopy 8 x 1 MiB): $("$PY" -c "import sys; print(f'{int(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])) / 1e6:.0f}')" "$(stat -c %s "$dir/served.img")" "$t1" "$t2") MB/s"

    # A second add, killed half way: the restarted server resumes it by itself.
    { bounded "$SHARDVOL_BIN" disk add --pool "$SERVER_POOL" "$dir/disk-7.img" --rate 24M \
        >"$dir/add2.out" 2>&1 || true; } &
    local add_pid=$!
    wait_until 30 "the second rebalance to start" _rebalance_started ||
        die "the second disk add did not start"
    sleep 2
    server_stop KILL
    wait "$add_pid" || true
    local pct
    pct=$("$SHARDVOL_BIN" status --pool "$SERVER_POOL" --json | "$PY" -c "import json,sys; r=json.load(sys.stdin).get('rebalance'); print(r and round(r['percent'], 1))")
    [[ "$pct" != None ]] || die "kill -9 came after the second rebalance finished (nothing to resume)"
    log "f: server killed with the second rebalance at $pct%"
    server_start unix
    wait_until 300 "the restarted server to finish the rebalance" _rebalance_done ||
        die "the interrupted rebalance did not finish after the restart"
    bounded nbdcopy "$uri" "$dir/after.img" || die "nbdcopy out of the export failed"
    cmp "$dir/served.img" "$dir/after.img" || die "the volume changed across the interrupted rebalance"
    log "f: the restarted server finished the rebalance onto disk 7; the volume reads back identical"
    server_stop TERM

    # Offline recovery from the superblocks of the grown pool.
    rm "$SERVER_POOL/pool.redb" "$dir/disk-7.img" "$(disk_file 2)"
    local disks=() f shares=()
    for f in "$SERVER_POOL"/disks/disk-*.img "$dir/disk-6.img"; do disks+=(--disk "$f"); done
    mapfile -t shares < <(recover_shares)
    bounded "$SHARDVOL_BIN" recover "${disks[@]}" "${shares[@]}" --volume "$EXPORT" \
        --output "$dir/recovered.img" >"$dir/recover.out" 2>"$dir/recover.err" || {
        cat "$dir/recover.out" "$dir/recover.err" >&2
        die "shardvol recover failed"
    }
    cmp "$dir/served.img" "$dir/recovered.img" || die "the recovered image differs from what the server served"
    rm -f "$dir"/*.img
    log "f: recovered without pool.redb and with disks 2 and 7 of 8 deleted: identical"
}

# _rebalance_started: whether the running server reports a rebalance in progress.
_rebalance_started() {
    status_json "$WORK/f/st.json" 2>/dev/null &&
        [[ $(json_field "$WORK/f/st.json" "j.get('rebalance') is not None") == True ]]
}

for s in $E2E_SCENARIOS; do
    case "$s" in
        a) scenario_a ;;
        b) scenario_b ;;
        c) scenario_c ;;
        d) scenario_d ;;
        e) scenario_e ;;
        f) scenario_f ;;
        *) die "unknown scenario $s (a, b, c, d, e or f)" ;;
    esac
done
