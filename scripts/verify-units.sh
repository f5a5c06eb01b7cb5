#!/usr/bin/env bash
# Check the systemd units in systemd/ with `systemd-analyze verify`, as instance "pool1". Any message
# (unknown key, bad value, missing executable, ordering cycle) fails the check.
# ExecStart's /usr/local/bin/shardvol is pointed at target/release/shardvol when it is built (else at
# /bin/true), since the check also wants every executable to exist.
#
#   scripts/verify-units.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

need_cmd systemd-analyze
make_workdir
bin=/bin/true
[[ -x "$REPO_ROOT/target/release/shardvol" ]] && bin="$REPO_ROOT/target/release/shardvol"
for f in "$REPO_ROOT"/systemd/*.service "$REPO_ROOT"/systemd/*.socket; do
    sed "s|/usr/local/bin/shardvol|$bin|g" "$f" >"$WORK/$(basename "$f")"
done
units=(shardvol@pool1.service shardvol@pool1.socket nbd-attach@pool1.service)
step "systemd-analyze verify ${units[*]} (shardvol binary: $bin)"
rc=0
# Units given by name are looked up in the current directory first.
(cd "$WORK" && systemd-analyze verify --man=no "${units[@]}") >"$WORK/verify.log" 2>&1 || rc=$?
if ((rc != 0)) || [[ -s "$WORK/verify.log" ]]; then
    cat "$WORK/verify.log" >&2
    die "systemd-analyze verify reported problems (exit $rc)"
fi
log "$(systemd-analyze --version | head -n 1): no problems in ${units[*]}"
