#!/usr/bin/env bash
# End-to-end durability across server restarts: data written and flushed must read back after
#   1. a clean stop (SIGTERM; the server must exit with code 0), and
#   2. a kill (SIGKILL) right after an explicit NBD flush,
# each time served again from the same pool (for shardvol: unlocked again with shares; the second
# restart uses a different subset of the shares).
#
#   scripts/e2e-restart.sh                    # shardvol
#   SERVER=qemu-nbd scripts/e2e-restart.sh    # stand-in server
#
# Environment: E2E_SIZE (volume size, default 1G), DATA_SIZE (random payload, default 64M), KEEP_WORK=1.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/server.sh"

E2E_SIZE=${E2E_SIZE:-1G}
DATA_SIZE=${DATA_SIZE:-64M}
SIZE_BYTES=$(size_bytes "$E2E_SIZE")
DATA_BYTES=$(size_bytes "$DATA_SIZE")
MiB=$((1 << 20))
((SIZE_BYTES >= 512 * MiB)) || die "E2E_SIZE must be at least 512M"

need_cmd nbdcopy qemu-io cmp jq
server_check
make_workdir

# qemu_io_check LOGNAME DESCRIPTION ARGS...: run qemu-io on the export; fail on any error or mismatch.
qemu_io_check() {
    local name=$1 what=$2
    shift 2
    if ! bounded qemu-io -f raw "$(server_uri)" "$@" >"$WORK/$name.log" 2>&1 ||
        grep -qiE 'error|fail' "$WORK/$name.log"; then
        cat "$WORK/$name.log" >&2
        die "$what"
    fi
}

# read_back_random: the first DATA_SIZE bytes of the volume equal random.bin.
read_back_random() {
    rm -f "$WORK/out.bin"
    bounded nbdcopy "$(server_uri)" "$WORK/out.bin" || die "nbdcopy out of the export failed"
    cmp -n "$DATA_BYTES" "$WORK/random.bin" "$WORK/out.bin" ||
        die "random data read back after restart differs from what was written"
    rm -f "$WORK/out.bin"
}

A=$((256 * MiB)) # qemu-io patterns of phase 1 live here
K=$((384 * MiB)) # and those of phase 2 here
PHASE1=(-c "write -P 0xa1 $((A + 100)) 100000" -c "write -P 0xa2 $((A + MiB - 1)) 3" -c "write -P 0xa3 $((A + 2 * MiB + 4096)) $((2 * MiB))")
PHASE1_READ=(-c "read -P 0xa1 $((A + 100)) 100000" -c "read -P 0xa2 $((A + MiB - 1)) 3" -c "read -P 0xa3 $((A + 2 * MiB + 4096)) $((2 * MiB))" -c "read -P 0 $((A + 100000 + 100)) 4096")
PHASE2=(-c "write -P 0xb1 $((K + 7)) 65536" -c "write -P 0xb2 $((K + 3 * MiB)) $((5 * MiB + 12345))" -c "write -P 0xb3 $((A + 150)) 50")
PHASE2_READ=(-c "read -P 0xb1 $((K + 7)) 65536" -c "read -P 0xb2 $((K + 3 * MiB)) $((5 * MiB + 12345))" -c "read -P 0xa1 $((A + 100)) 50" -c "read -P 0xb3 $((A + 150)) 50" -c "read -P 0xa1 $((A + 200)) $((100000 - 100))")

step "create pool and start server"
server_create "$WORK/pool" "$E2E_SIZE"
server_start unix

step "write $DATA_SIZE of random data and patterns, then flush"
head -c "$DATA_BYTES" /dev/urandom >"$WORK/random.bin"
bounded nbdcopy --flush "$WORK/random.bin" "$(server_uri)" || die "nbdcopy into the export failed"
qemu_io_check write1 "qemu-io writes failed" "${PHASE1[@]}" -c flush
qemu_io_check read1 "data did not read back before any restart" "${PHASE1_READ[@]}"
log "written and read back on the first run"

step "stop with SIGTERM"
server_stop TERM
[[ "$SERVER_RC" == 0 ]] || die "server exited with code $SERVER_RC after SIGTERM, expected 0"

step "restart and read back"
server_start unix
read_back_random
qemu_io_check read2 "patterns differ after a restart (SIGTERM)" "${PHASE1_READ[@]}"
log "all data intact after SIGTERM + restart"

step "write more, flush, then SIGKILL"
[[ "$SERVER" != shardvol ]] || whole_before=$(shardvol_counter stripes_written_whole)
qemu_io_check write2 "qemu-io writes failed" "${PHASE2[@]}" -c flush
if [[ "$SERVER" == shardvol ]]; then
    # The 5 MiB write lands on empty stripes: most of it skips the journal, and the flush must
    # have committed those stripes before the kill.
    whole=$(($(shardvol_counter stripes_written_whole) - whole_before))
    ((whole > 0)) || die "the 5 MiB write wrote no whole stripe without the journal"
    log "whole stripes written without the journal before the kill: $whole"
fi
server_stop KILL
[[ "$SERVER_RC" == 137 ]] || die "server exit code after SIGKILL is $SERVER_RC, expected 137"

step "restart after SIGKILL and read back"
if [[ "$SERVER" == shardvol ]]; then
    # Any t of the n shares unlock the pool: use the last t this time.
    SERVER_SHARE_FIRST=$((SHARDVOL_SHARES - SHARDVOL_THRESHOLD))
    log "unlocking with shares $((SERVER_SHARE_FIRST + 1))..$SHARDVOL_SHARES of $SHARDVOL_SHARES"
fi
server_start unix
read_back_random
qemu_io_check read3 "phase-1 patterns differ after SIGKILL + restart" "${PHASE1_READ[@]:2:4}"
qemu_io_check read4 "flushed writes lost or damaged by SIGKILL + restart" "${PHASE2_READ[@]}"
log "all flushed data intact after SIGKILL + restart"

step "final clean stop"
server_stop TERM
[[ "$SERVER_RC" == 0 ]] || die "server exited with code $SERVER_RC after SIGTERM, expected 0"
