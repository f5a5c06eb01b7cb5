#!/usr/bin/env bash
# End-to-end interoperability: real NBD clients (libnbd's nbdinfo and nbdcopy, qemu-io, qemu-img, fio's
# nbd engine) against a freshly created pool served on a unix socket.
#
#   scripts/e2e-interop.sh                    # shardvol (target/release/shardvol)
#   SERVER=nbdkit scripts/e2e-interop.sh      # same checks against a stand-in server
#
# Environment: E2E_SIZE (volume size, default 1G), COPY_SIZE (nbdcopy payload, default 256M),
# KEEP_WORK=1 keeps the temporary directory.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/server.sh"

E2E_SIZE=${E2E_SIZE:-1G}
COPY_SIZE=${COPY_SIZE:-256M}
SIZE_BYTES=$(size_bytes "$E2E_SIZE")
COPY_BYTES=$(size_bytes "$COPY_SIZE")
MiB=$((1 << 20))
((SIZE_BYTES >= 1024 * MiB)) || die "E2E_SIZE must be at least 1G (the checks use offsets up to 1 GiB)"

need_cmd nbdinfo nbdcopy qemu-io qemu-img fio jq cmp
server_check
make_workdir

step "create pool and start server"
server_create "$WORK/pool" "$E2E_SIZE"
server_start unix
URI=$(server_uri)

# ---------------------------------------------------------------------------------------------------
step "nbdinfo: export list, size and flags"
bounded nbdinfo --list --json "nbd+unix:///?socket=$SERVER_SOCK" >"$WORK/list.json" ||
    die "nbdinfo --list failed"
jq -e --arg n "$EXPORT" '[.exports[]."export-name"] | index($n) != null' "$WORK/list.json" >/dev/null ||
    die "export $EXPORT not in the list: $(jq -c '[.exports[]."export-name"]' "$WORK/list.json")"
log "exports listed: $(jq -c '[.exports[]."export-name"]' "$WORK/list.json")"

bounded nbdinfo --json "$URI" >"$WORK/info.json" || die "nbdinfo $URI failed"
got_size=$(jq -r '.exports[0]."export-size"' "$WORK/info.json")
[[ "$got_size" == "$SIZE_BYTES" ]] || die "export size is $got_size, expected $SIZE_BYTES"
for flag in can_multi_conn can_flush can_trim can_fua; do
    [[ "$(jq -r ".exports[0].$flag" "$WORK/info.json")" == true ]] || die "export does not advertise $flag"
done
[[ "$(jq -r '.exports[0].is_read_only' "$WORK/info.json")" == false ]] || die "export is read-only"
log "size $got_size bytes; flags: $(jq -c '.exports[0] | with_entries(select(.key|startswith("can_") or startswith("is_"))) ' "$WORK/info.json")"

# ---------------------------------------------------------------------------------------------------
step "nbdcopy: $COPY_SIZE of random data in and out"
head -c "$COPY_BYTES" /dev/urandom >"$WORK/random.bin"
t0=$SECONDS
bounded nbdcopy --flush "$WORK/random.bin" "$URI" || die "nbdcopy into the export failed"
log "copied in ($((SECONDS - t0))s)"
t0=$SECONDS
bounded nbdcopy "$URI" "$WORK/out.bin" || die "nbdcopy out of the export failed"
log "copied out ($((SECONDS - t0))s)"
out_size=$(stat -c %s "$WORK/out.bin")
[[ "$out_size" == "$SIZE_BYTES" ]] || die "nbdcopy read $out_size bytes, expected $SIZE_BYTES"
cmp -n "$COPY_BYTES" "$WORK/random.bin" "$WORK/out.bin" || die "data read back differs from data written"
cmp -n $((SIZE_BYTES - COPY_BYTES)) -i "$COPY_BYTES" "$WORK/out.bin" /dev/zero ||
    die "the never-written part of the volume does not read as zeros"
rm -f "$WORK/out.bin"
log "read back identical; the rest reads as zeros"
if [[ "$SERVER" == shardvol ]]; then
    # Into a new volume, nbdcopy's large writes cover whole empty stripes: they skip the journal.
    whole=$(shardvol_counter stripes_written_whole)
    ((whole > 0)) || die "nbdcopy into a new volume wrote no whole stripe without the journal"
    log "whole stripes written without the journal: $whole"
fi

step "qemu-img compare: file vs export"
# A shorter image compares as if padded with zeros, which the rest of the volume must be.
bounded qemu-img compare -f raw -F raw "$WORK/random.bin" "$URI" >"$WORK/compare.log" 2>&1 ||
    { cat "$WORK/compare.log" >&2; die "qemu-img compare reports a difference"; }
log "qemu-img compare: $(grep -v Warning "$WORK/compare.log" | tr '\n' ' ')"
rm -f "$WORK/random.bin"

# ---------------------------------------------------------------------------------------------------
step "qemu-io: patterns at unaligned offsets"
B=$((512 * MiB)) # region of the volume used here
# pattern offset length: unaligned, sub-block, block-straddling, chunk- and stripe-straddling, large
PATTERNS=(
    "0xab $((B + 1000)) 70000"
    "0xcd $((B + 4095)) 1"
    "0x3c $((B + 131072 - 700)) 1400"
    "0x5a $((B + 262144 - 3000)) 10000"
    "0x11 $((B + MiB + 123)) $((3 * MiB + 4567))"
    "0x77 $((SIZE_BYTES - 1000)) 1000"
    "0xe1 $((B + 8 * MiB)) 512"
)
wargs=()
for p in "${PATTERNS[@]}"; do
    read -r pat off len <<<"$p"
    wargs+=(-c "write -P $pat $off $len")
done
wargs+=(-c "write -z $((B + 9 * MiB + 100)) 20000" -c "flush")
bounded qemu-io -f raw "$URI" "${wargs[@]}" >"$WORK/qemu-io-write.log" 2>&1 ||
    { cat "$WORK/qemu-io-write.log" >&2; die "qemu-io writes failed"; }
grep -qiE 'error|fail' "$WORK/qemu-io-write.log" &&
    { cat "$WORK/qemu-io-write.log" >&2; die "qemu-io reported an error while writing"; }

# Read back on a new connection. The 0xcd byte sits inside the 0xab run: check the bytes around it.
rargs=(
    -c "read -P 0xab $((B + 1000)) 3095"
    -c "read -P 0xcd $((B + 4095)) 1"
    -c "read -P 0xab $((B + 4096)) $((70000 - 3096))"
    -c "read -P 0x3c $((B + 131072 - 700)) 1400"
    -c "read -P 0x5a $((B + 262144 - 3000)) 10000"
    -c "read -P 0x11 $((B + MiB + 123)) $((3 * MiB + 4567))"
    -c "read -P 0x77 $((SIZE_BYTES - 1000)) 1000"
    -c "read -P 0xe1 $((B + 8 * MiB)) 512"
    -c "read -P 0 $((B + 8 * MiB + 512)) 4096"
    -c "read -P 0 $((B + 9 * MiB + 100)) 20000"
    -c "read -P 0 $((B + 71000)) 100"
    -c "read -P 0 $((B + 900 * 1000)) 4096"
)
bounded qemu-io -f raw "$URI" "${rargs[@]}" >"$WORK/qemu-io-read.log" 2>&1 ||
    { cat "$WORK/qemu-io-read.log" >&2; die "qemu-io read-back failed"; }
grep -qiE 'error|fail' "$WORK/qemu-io-read.log" &&
    { cat "$WORK/qemu-io-read.log" >&2; die "qemu-io read-back reported a mismatch"; }
log "${#PATTERNS[@]} patterns and 4 zero ranges read back on a new connection"

step "qemu-io: a wrong pattern must be detected"
bounded qemu-io -f raw "$URI" -c "read -P 0xee $((B + 1000)) 70000" >"$WORK/qemu-io-neg.log" 2>&1 || true
if ! grep -q 'Pattern verification failed' "$WORK/qemu-io-neg.log"; then
    cat "$WORK/qemu-io-neg.log" >&2
    die "reading with a wrong pattern was not reported: the pattern check cannot fail"
fi
log "wrong pattern rejected as expected"

step "qemu-io: trim keeps the neighbours"
bounded qemu-io -f raw "$URI" -c "discard $((B + MiB + 123 + 65536)) 65536" -c flush >"$WORK/qemu-io-trim.log" 2>&1 ||
    { cat "$WORK/qemu-io-trim.log" >&2; die "qemu-io discard failed"; }
bounded qemu-io -f raw "$URI" -c "read -P 0x11 $((B + MiB + 123)) 65536" \
    -c "read -P 0x11 $((B + MiB + 123 + 131072)) 65536" >"$WORK/qemu-io-trim2.log" 2>&1 ||
    { cat "$WORK/qemu-io-trim2.log" >&2; die "data next to a trimmed range changed"; }
grep -qiE 'error|fail' "$WORK/qemu-io-trim2.log" && die "data next to a trimmed range changed"
log "trim accepted; data on both sides intact"

# ---------------------------------------------------------------------------------------------------
step "fio: 4 jobs x iodepth 32, random writes 4k-128k, crc32c verify"
# Each job owns a 64 MiB region from 256 MiB on (offset_increment), one NBD connection each.
if ! bounded fio --name=verify --ioengine=nbd --uri="$URI" --rw=randwrite --bsrange=4k-128k \
    --offset=256M --offset_increment=64M --size=64M --numjobs=4 --iodepth=32 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --verify_state_save=0 \
    --group_reporting --output-format=json --output="$WORK/fio.json" >"$WORK/fio.log" 2>&1; then
    cat "$WORK/fio.log" >&2
    [[ -s "$WORK/fio.json" ]] && jq -c '.jobs[] | {error, write: .write.io_bytes, read: .read.io_bytes}' "$WORK/fio.json" >&2
    die "fio verify run failed"
fi
errs=$(jq '[.jobs[].error] | add' "$WORK/fio.json")
wbytes=$(jq '[.jobs[].write.io_bytes] | add' "$WORK/fio.json")
rbytes=$(jq '[.jobs[].read.io_bytes] | add' "$WORK/fio.json")
[[ "$errs" == 0 ]] || die "fio reported $errs errors"
((wbytes >= 256 * MiB)) || die "fio wrote only $wbytes bytes, expected 256 MiB"
((rbytes >= 256 * MiB)) || die "fio verified only $rbytes bytes, expected 256 MiB"
log "fio wrote $((wbytes / MiB)) MiB, verified $((rbytes / MiB)) MiB, 0 errors"

step "stop server"
server_stop TERM
[[ "$SERVER_RC" == 0 ]] || die "server exited with code $SERVER_RC after SIGTERM"
