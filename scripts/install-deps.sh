#!/usr/bin/env bash
# Install what the tests need on a Debian bookworm machine (run as root). Idempotent and fast when
# everything is there: apt is only called for packages that are missing, and the VM kernel is only
# fetched when its cache is incomplete.
#
#   scripts/install-deps.sh
#
# - Debian packages: NBD clients and peers (qemu-utils, libnbd-bin, python3-libnbd, nbdkit, fio),
#   the VM (qemu-system-x86) and what its initramfs is made of (busybox-static, nbd-client, e2fsprogs,
#   cpio, kmod, xz-utils, zstd), jq for reading JSON output, systemd for `systemd-analyze verify`.
# - The VM kernel: Debian's linux-image-cloud-amd64, unpacked into a cache (scripts/vm/fetch-kernel.sh),
#   never installed into /boot.
# The Rust toolchain is expected to be there already (cargo).
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

PACKAGES=(
    qemu-utils qemu-system-x86
    libnbd-bin python3-libnbd nbdkit fio
    nbd-client busybox-static e2fsprogs cpio kmod xz-utils zstd
    jq python3 procps systemd
)

installed() { [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]; }

step "Debian packages"
missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done

if ((${#missing[@]} > 0)); then
    [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}; run this script as root"
    log "missing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
    run_logged /tmp/shardvol-apt-update.log apt-get -o DPkg::Lock::Timeout=600 update ||
        die "apt-get update failed"
    want=("${missing[@]}")
    # bookworm's qemu-system-x86 (7.2) cannot sit beside a newer qemu-utils (backports' 10.x breaks
    # qemu-system-common < 8): take the qemu-utils of the same version as qemu-system-x86.
    if ! installed qemu-system-x86 && installed qemu-utils; then
        sysver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        utilsver=$(dpkg-query -W -f='${Version}' qemu-utils)
        if [[ -n "$sysver" && "$sysver" != "$utilsver" ]]; then
            log "qemu-utils $utilsver is replaced by $sysver to match qemu-system-x86"
            want+=("qemu-utils=$sysver")
            apt_opts+=(--allow-downgrades)
        fi
    fi
    run_logged /tmp/shardvol-apt-install.log apt-get install "${apt_opts[@]}" "${want[@]}" ||
        die "apt-get install ${want[*]} failed (log: /tmp/shardvol-apt-install.log)"
    for p in "${PACKAGES[@]}"; do installed "$p" || die "package $p is still not installed"; done
    log "installed: ${missing[*]}"
else
    log "all ${#PACKAGES[@]} packages present"
fi

step "check the tools"
need_cmd qemu-io qemu-img qemu-nbd qemu-system-x86_64 nbdinfo nbdcopy nbdsh nbdkit fio nbd-client \
    mke2fs e2fsck debugfs cpio depmod modprobe jq python3 systemd-analyze cargo
fio --enghelp 2>/dev/null | grep -qw nbd || die "fio has no nbd engine"
[[ -x /bin/busybox ]] || die "no /bin/busybox (busybox-static)"

step "VM kernel"
"$SCRIPTS_DIR/vm/fetch-kernel.sh"
