#!/usr/bin/env bash
# Build the test VM's initramfs (an uncompressed newc cpio: nothing to decompress under TCG):
#   busybox-static, nbd-client, mke2fs (mkfs.ext4), fio with the shared libraries ldd finds for them,
#   the kernel modules from the cached kernel (scripts/vm/fetch-kernel.sh) and scripts/vm/init as /init.
#
#   scripts/vm/build-initramfs.sh OUT.cpio
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

OUT=${1:?usage: build-initramfs.sh OUT.cpio}
VM_CACHE=${SHARDVOL_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/shardvol/vm}
KDIR="$VM_CACHE/current"
[[ -f "$KDIR/modules/load-order" ]] || die "no VM kernel in $VM_CACHE (run scripts/install-deps.sh)"
need_cmd cpio ldd nbd-client mke2fs fio

BUSYBOX=/bin/busybox
if [[ ! -x "$BUSYBOX" ]] || ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is missing or not static (install busybox-static)"
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/shardvol-initramfs.XXXXXX")
on_exit 'rm -rf -- "$stage"'
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,lib/modules,proc,sys,dev,tmp,mnt,run}

cp "$BUSYBOX" "$stage/bin/busybox"
# The real tools live in usr/; busybox's applets (which include its own nbd-client) go to /bin.
tools=("$(command -v nbd-client):usr/sbin/nbd-client"
    "$(command -v mke2fs):usr/sbin/mke2fs"
    "$(command -v fio):usr/bin/fio")
libs=()
for t in "${tools[@]}"; do
    src=${t%%:*}
    dst=${t#*:}
    cp -L "$src" "$stage/$dst"
    while read -r lib; do libs+=("$lib"); done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done
ln -s mke2fs "$stage/usr/sbin/mkfs.ext4"
mapfile -t libs < <(printf '%s\n' "${libs[@]}" | sort -u)
for lib in "${libs[@]}"; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$stage/etc/"

cp "$KDIR"/modules/*.ko "$KDIR/modules/load-order" "$stage/lib/modules/"
install -m 0755 "$SCRIPTS_DIR/vm/init" "$stage/init"

(cd "$stage" && find . -print0 | sort -z | cpio --null -o -H newc --quiet -R 0:0) >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "initramfs $OUT: $(du -h "$OUT" | cut -f1), ${#libs[@]} libraries, modules: $(tr '\n' ' ' <"$KDIR/modules/load-order")"
