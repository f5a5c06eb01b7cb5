#!/usr/bin/env bash
# End-to-end with the Linux kernel's own NBD client: a small VM (Debian's cloud kernel, busybox
# initramfs, TCG) attaches the server on the host as /dev/nbd0 over TCP with 2 connections, runs fio
# with crc32c verify on the raw device, makes an ext4 filesystem, writes files, checks their sha256 after
# a remount and after a disconnect + reconnect (scripts/vm/init). The host then copies the volume out
# and checks, independently of the guest, that the filesystem is clean (e2fsck) and that every file
# has the checksum the guest printed (debugfs).
#
#   scripts/e2e-kernel.sh                     # shardvol
#   SERVER=nbdkit scripts/e2e-kernel.sh       # stand-in server
#
# Environment: E2E_SIZE (volume size, default 1G), VM_CONNS (nbd-client -C, default 2), VM_FIO_SIZE
# (per fio job in the guest, default 32M), VM_TIMEOUT (default 900 s), KEEP_WORK=1.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/server.sh"

E2E_SIZE=${E2E_SIZE:-1G}
VM_CONNS=${VM_CONNS:-2}
VM_FIO_SIZE=${VM_FIO_SIZE:-32M}
SIZE_BYTES=$(size_bytes "$E2E_SIZE")

need_cmd qemu-system-x86_64 nbdcopy e2fsck debugfs sha256sum
server_check
make_workdir

step "build the VM initramfs"
"$SCRIPTS_DIR/vm/build-initramfs.sh" "$WORK/initrd.cpio" || die "initramfs build failed"

step "create pool and start server on TCP"
server_create "$WORK/pool" "$E2E_SIZE"
server_start tcp

step "boot the VM: kernel nbd client on /dev/nbd0"
CONSOLE="$WORK/console.log"
vm_rc=0
"$SCRIPTS_DIR/vm/boot.sh" "$WORK/initrd.cpio" "$CONSOLE" \
    "shardvol.port=$SERVER_PORT" "shardvol.export=$EXPORT" "shardvol.conns=$VM_CONNS" \
    "shardvol.size=$SIZE_BYTES" "shardvol.fio_size=$VM_FIO_SIZE" || vm_rc=$?
tr -d '\r' <"$CONSOLE" >"$WORK/console.txt"

show_console() {
    log "last lines of the VM console:"
    grep -v '^SHARDVOL-VM-SUM' "$WORK/console.txt" | tail -n 40 >&2
    if [[ "${KEEP_WORK:-0}" != 1 ]]; then
        cp "$WORK/console.txt" "${TMPDIR:-/tmp}/shardvol-e2e-kernel-console.log" &&
            log "full console saved to ${TMPDIR:-/tmp}/shardvol-e2e-kernel-console.log"
    fi
}
if grep -q 'SHARDVOL-VM: FAIL' "$WORK/console.txt"; then
    show_console
    die "guest reported: $(grep -o 'SHARDVOL-VM: FAIL.*' "$WORK/console.txt" | head -n 1)"
fi
if ! grep -q 'SHARDVOL-VM: PASS' "$WORK/console.txt"; then
    show_console
    ((vm_rc == 124)) && die "VM did not finish within ${VM_TIMEOUT:-900}s"
    die "VM stopped (exit $vm_rc) without a PASS marker"
fi
if grep -qE 'I/O error|EXT4-fs error|Call Trace|BUG:|blk_update_request' "$WORK/console.txt"; then
    show_console
    die "the guest kernel logged errors although the checks passed"
fi
((vm_rc == 0)) || die "qemu exited with code $vm_rc after PASS"
log "guest checks passed"

step "host cross-check: e2fsck and file checksums from the served volume"
bounded nbdcopy "$(server_uri)" "$WORK/disk.img" || die "nbdcopy of the volume failed"
e2fsck -fn "$WORK/disk.img" >"$WORK/e2fsck.log" 2>&1 || { cat "$WORK/e2fsck.log" >&2; die "e2fsck finds errors in the filesystem the guest wrote"; }
checked=0
while read -r _ sum path; do
    path=${path#./}
    debugfs -R "dump -p /$path $WORK/file" "$WORK/disk.img" >/dev/null 2>&1 || die "debugfs cannot read /$path"
    got=$(sha256sum "$WORK/file" | cut -d' ' -f1)
    [[ "$got" == "$sum" ]] || die "/$path: sha256 on the host $got, in the guest $sum"
    checked=$((checked + 1))
done < <(grep '^SHARDVOL-VM-SUM ' "$WORK/console.txt")
((checked >= 70)) || die "only $checked file checksums found on the console, expected 70"
rm -f "$WORK/disk.img" "$WORK/file"
log "filesystem clean; $checked files match the guest's checksums"

step "stop server"
server_stop TERM
[[ "$SERVER_RC" == 0 ]] || die "server exited with code $SERVER_RC after SIGTERM"
