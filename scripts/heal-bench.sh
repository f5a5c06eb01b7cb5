#!/usr/bin/env bash
# What self-healing costs, measured on one volume of a running server: sequential read of the
# volume by an NBD client, scrub of the volume, sequential read with one disk failed (every
# block of that disk rebuilt from parity), the rebuild of that disk onto a new file, and the
# rebalance onto a seventh disk (`disk add`); each time the data is read back and compared. Prints one table of MB/s.
#
#   scripts/heal-bench.sh                 # 4+2 over six files, a 1 GiB volume full of random data
#
# Environment: HEAL_SIZE (volume, default 1G), HEAL_DATA (random data written, default: all of it),
# SHARDVOL_BIN, KEEP_WORK=1. Needs a release build (cargo build --release).
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/server.sh"

HEAL_SIZE=${HEAL_SIZE:-1G}
HEAL_DATA=${HEAL_DATA:-$HEAL_SIZE}
DATA_BYTES=$(size_bytes "$HEAL_DATA")
MiB=$((1 << 20))
SERVER=shardvol

need_cmd nbdcopy cmp python3
server_check
make_workdir

# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }
# mbps BYTES START END
mbps() { python3 -c "import sys; b,s,e=map(float,sys.argv[1:]); print(f'{b/(e-s)/1e6:.0f}')" "$@"; }
# field JSON_FILE NAME
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# seq_read LABEL: read the data back with nbdcopy (8 requests of 1 MiB in flight); sets MBPS.
seq_read() {
    local t0 t1
    t0=$(now)
    bounded nbdcopy --requests=8 --request-size=$MiB "$(server_uri)" "$WORK/read-$1.bin" ||
        die "sequential read ($1) failed"
    t1=$(now)
    cmp -n "$DATA_BYTES" "$WORK/data.bin" "$WORK/read-$1.bin" >/dev/null || die "read back ($1): the data differs"
    rm -f "$WORK/read-$1.bin"
    MBPS=$(mbps "$(size_bytes "$HEAL_SIZE")" "$t0" "$t1")
}

step "create and fill"
server_create "$WORK/pool" "$HEAL_SIZE"
POOL="$WORK/pool"
head -c "$DATA_BYTES" /dev/urandom >"$WORK/data.bin"
truncate -s "$HEAL_SIZE" "$WORK/data.bin"
server_start unix
bounded nbdcopy --requests=8 --request-size=$MiB "$WORK/data.bin" "$(server_uri)" ||
    die "filling the volume failed"

step "sequential read, healthy"
seq_read healthy
READ_OK=$MBPS

step "scrub (running server, through the control socket)"
"$SHARDVOL_BIN" scrub --pool "$POOL" --volume "$EXPORT" --json >"$WORK/scrub.json" 2>"$WORK/scrub.log" ||
    { cat "$WORK/scrub.log" >&2; die "scrub failed"; }
SCRUB_BYTES=$(field "$WORK/scrub.json" bytes_read)
SCRUB_S=$(field "$WORK/scrub.json" seconds)
SCRUB_BAD=$(field "$WORK/scrub.json" bad_found)
SCRUB=$(mbps "$SCRUB_BYTES" 0 "$SCRUB_S")
[[ "$SCRUB_BAD" == 0 ]] || die "scrub of a healthy volume found $SCRUB_BAD bad shards"

step "lose a disk: stop, delete disk-2, start"
server_stop TERM
rm -f "$POOL/disks/disk-2.img"
server_start unix
seq_read degraded
READ_DEGRADED=$MBPS

step "replace disk 2 (running server, through the control socket)"
"$SHARDVOL_BIN" disk replace --pool "$POOL" --disk 2 --with "$WORK/new-disk-2.img" --json \
    >"$WORK/rebuild.json" 2>"$WORK/rebuild.log" || { cat "$WORK/rebuild.log" >&2; die "rebuild failed"; }
RB_READ=$(field "$WORK/rebuild.json" bytes_read)
RB_WRITTEN=$(field "$WORK/rebuild.json" bytes_written)
RB_S=$(field "$WORK/rebuild.json" seconds)
REBUILD_READ=$(mbps "$RB_READ" 0 "$RB_S")
REBUILD_WRITE=$(mbps "$RB_WRITTEN" 0 "$RB_S")
"$SHARDVOL_BIN" status --pool "$POOL" >"$WORK/status.txt"
grep -q "rebuilding\|failed" "$WORK/status.txt" && { cat "$WORK/status.txt" >&2; die "a disk is not ok after the rebuild"; }

step "sequential read after the rebuild"
seq_read rebuilt
READ_REBUILT=$MBPS

step "add a seventh disk and rebalance (running server)"
"$SHARDVOL_BIN" disk add --pool "$POOL" "$WORK/disk-6.img" --json \
    >"$WORK/add.json" 2>"$WORK/add.log" || { cat "$WORK/add.log" >&2; die "disk add failed"; }
ADD=$(mbps "$(field "$WORK/add.json" bytes)" 0 "$(field "$WORK/add.json" seconds)")
seq_read grown
READ_GROWN=$MBPS
server_stop TERM

printf '\nvolume %s (%s of random data), 4+2 over six files, one run\n\n' "$HEAL_SIZE" "$HEAL_DATA"
printf '| operation | MB/s | what moves |\n|---|---|---|\n'
printf '| sequential read, healthy | %s | the volume, by an NBD client (nbdcopy, 8 x 1 MiB) |\n' "$READ_OK"
printf '| scrub | %s | every chunk slot of every stripe with data (data and parity) read |\n' "$SCRUB"
printf '| sequential read, one disk failed | %s | the volume; its blocks on the failed disk rebuilt from parity |\n' "$READ_DEGRADED"
printf '| rebuild of one disk: read | %s | the other chunks of every stripe placed on it |\n' "$REBUILD_READ"
printf '| rebuild of one disk: written | %s | the new disk |\n' "$REBUILD_WRITE"
printf '| sequential read, rebuilt | %s | the volume |\n' "$READ_REBUILT"
printf '| rebalance onto a 7th disk (disk add) | %s | the data of every stripe whose placement changed (journal, then full stripes) |\n' "$ADD"
printf '| sequential read, 7 disks | %s | the volume |\n' "$READ_GROWN"
log "all data read back identical (healthy, degraded, rebuilt, grown)"
