#!/usr/bin/env bash
# Fetch the kernel for the test VM: Debian's linux-image-cloud-amd64 (the versioned package it depends
# on), unpacked into a cache directory — never installed into the host's /boot or /lib/modules.
#
# Result, in $SHARDVOL_VM_CACHE (default ~/.cache/shardvol/vm):
#   current -> <kernel version>/
#   <kernel version>/vmlinuz                the kernel
#   <kernel version>/modules/*.ko           the modules the guest needs, uncompressed
#   <kernel version>/modules/load-order     their file names, in insmod (dependency) order
#
# Fast when done: a complete `current` is reused without asking apt. Delete the cache to refresh.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

VM_CACHE=${SHARDVOL_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/shardvol/vm}
META_PKG=linux-image-cloud-amd64
# The guest loads these (and whatever they depend on): virtio-net for the network, virtio-rng so that
# the guest's random pool is ready at once (nbd-client's TLS library waits for it: minutes under TCG
# without it), nbd for /dev/nbd0.
WANTED=(virtio_pci virtio_net virtio-rng nbd)
EXPECTED=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover
    virtio_net virtio-rng nbd)

cache_complete() {
    local m
    [[ -f "$VM_CACHE/current/vmlinuz" && -f "$VM_CACHE/current/modules/load-order" ]] || return 1
    for m in "${EXPECTED[@]}"; do
        grep -qx "$m.ko" "$VM_CACHE/current/modules/load-order" || return 1
    done
}
if cache_complete; then
    log "VM kernel cached: $(readlink "$VM_CACHE/current") in $VM_CACHE"
    exit 0
fi

need_cmd apt-get apt-cache dpkg-deb depmod modprobe
mkdir -p "$VM_CACHE"

step "resolve $META_PKG"
pkg=$(apt-cache depends "$META_PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
if [[ -z "$pkg" ]]; then
    log "no package lists yet: apt-get update"
    apt-get update -qq >/dev/null
    pkg=$(apt-cache depends "$META_PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
fi
[[ -n "$pkg" ]] || die "cannot resolve $META_PKG to a versioned kernel package"
log "kernel package: $pkg"

step "download and unpack $pkg"
tmp=$(mktemp -d "$VM_CACHE/.fetch.XXXXXX")
on_exit 'rm -rf -- "$tmp"'
(cd "$tmp" && apt-get download -o APT::Sandbox::User=root -qq "$pkg") || die "apt-get download $pkg failed"
dpkg-deb -x "$tmp"/*.deb "$tmp/root"
moddir=""
for d in "$tmp/root/lib/modules" "$tmp/root/usr/lib/modules"; do
    [[ -d "$d" ]] && moddir=$d && break
done
[[ -n "$moddir" ]] || die "no lib/modules in $pkg"
kver=$(ls "$moddir")
[[ $(wc -w <<<"$kver") == 1 ]] || die "expected one kernel version in $pkg, found: $kver"
vmlinuz="$tmp/root/boot/vmlinuz-$kver"
[[ -f "$vmlinuz" ]] || die "no /boot/vmlinuz-$kver in $pkg"

step "work out module load order"
# modules.dep is made at install time, not shipped: make it in the unpacked tree, then let modprobe
# print the insmod sequence (ignoring the host's modprobe.d options).
depmod -b "${moddir%/lib/modules}" "$kver"
mapfile -t kos < <(modprobe -C /dev/null -d "${moddir%/lib/modules}" -S "$kver" --show-depends -a "${WANTED[@]}" |
    awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++')
((${#kos[@]} > 0)) || die "modprobe found no modules for ${WANTED[*]}"

out="$VM_CACHE/$kver"
rm -rf "$out" "$out.partial"
mkdir -p "$out.partial/modules"
for ko in "${kos[@]}"; do
    base=$(basename "$ko")
    case "$base" in
        *.ko.xz) xz -dc "$ko" >"$out.partial/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" >"$out.partial/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$ko" >"$out.partial/modules/${base%.gz}"; base=${base%.gz} ;;
        *.ko) cp "$ko" "$out.partial/modules/$base" ;;
        *) die "unexpected module file $ko" ;;
    esac
    echo "$base" >>"$out.partial/modules/load-order"
done
for m in "${EXPECTED[@]}"; do
    grep -qx "$m.ko" "$out.partial/modules/load-order" || die "module $m.ko missing from the load order"
done
cp "$vmlinuz" "$out.partial/vmlinuz"
echo "$pkg" >"$out.partial/package"
mv "$out.partial" "$out"
ln -sfn "$kver" "$VM_CACHE/current"
log "VM kernel $kver ready in $out; modules: $(tr '\n' ' ' <"$out/modules/load-order")"
