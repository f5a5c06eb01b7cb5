#!/usr/bin/env bash
# Boot the test VM under TCG (nested KVM hangs on these machines), bounded in time, its serial console
# written to CONSOLE_LOG; the guest's "SHARDVOL-VM" lines are echoed as they arrive.
#
#   scripts/vm/boot.sh INITRD CONSOLE_LOG [KERNEL ARGUMENTS...]
#
# Network: qemu's user-mode network; the guest is 10.0.2.15 and reaches the host's 127.0.0.1:PORT as
# 10.0.2.2:PORT. Environment: VM_TIMEOUT (seconds, default 900), VM_MEM (MiB, default 1024),
# VM_CPUS (default 2). Exit code: qemu's, or 124 if the time ran out.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

INITRD=${1:?usage: boot.sh INITRD CONSOLE_LOG [KERNEL ARGUMENTS...]}
CONSOLE=${2:?usage: boot.sh INITRD CONSOLE_LOG [KERNEL ARGUMENTS...]}
shift 2
VM_CACHE=${SHARDVOL_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/shardvol/vm}
KERNEL="$VM_CACHE/current/vmlinuz"
VM_TIMEOUT=${VM_TIMEOUT:-900}
[[ -f "$KERNEL" ]] || die "no VM kernel at $KERNEL (run scripts/install-deps.sh)"
need_cmd qemu-system-x86_64 timeout

log "booting $(readlink "$VM_CACHE/current") under TCG (${VM_MEM:-1024} MiB, ${VM_CPUS:-2} vCPUs, limit ${VM_TIMEOUT}s)"
: >"$CONSOLE"
timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -m "${VM_MEM:-1024}" -smp "${VM_CPUS:-2}" \
    -nographic -no-reboot \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 panic=1 loglevel=4 $*" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= -device virtio-rng-pci \
    </dev/null >"$CONSOLE" 2>&1 &
vm=$!
tail -n +1 -f --pid="$vm" "$CONSOLE" 2>/dev/null | tr -d '\r' |
    grep --line-buffered -o 'SHARDVOL-VM: .*' | sed -u 's/^SHARDVOL-VM: /    guest: /' >&2 &
echoer=$!
rc=0
wait "$vm" || rc=$?
wait "$echoer" 2>/dev/null || true
((rc != 124)) || log "VM killed after ${VM_TIMEOUT}s"
log "VM exited with code $rc after ${SECONDS}s"
exit "$rc"
