# shellcheck shell=bash
# Helpers shared by the scripts in scripts/: progress output, failure messages, cleanup on exit,
# bounded waits, free TCP ports on 127.0.0.1.
#
# Source it after `set -euo pipefail`:   . "$(dirname "$0")/lib/common.sh"

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(cd "$SCRIPTS_DIR/.." && pwd)
SCRIPT_NAME=$(basename "$0" .sh)
CURRENT_STEP="start"
_CLEANUPS=()

ts() { date +%H:%M:%S; }

# log MESSAGE...: one progress line on stderr, prefixed with the time and the script's name.
log() { printf '[%s %s] %s\n' "$(ts)" "$SCRIPT_NAME" "$*" >&2; }

# step NAME: announce a step; a failure later names it.
step() {
    CURRENT_STEP="$*"
    printf '[%s %s] == %s\n' "$(ts)" "$SCRIPT_NAME" "$*" >&2
}

# die MESSAGE...: say what failed and exit non-zero (the EXIT trap then cleans up).
die() {
    printf '[%s %s] FAIL: %s\n' "$(ts)" "$SCRIPT_NAME" "$*" >&2
    exit 1
}

# on_exit COMMAND: run COMMAND (a string, eval'd) when the script exits, last registered first.
on_exit() { _CLEANUPS+=("$1"); }

_run_cleanups() {
    local rc=$? i
    # The cleanups see the exit status (e.g. to print a server's log when the script failed).
    EXIT_RC=$rc
    trap - EXIT ERR
    set +e
    for ((i = ${#_CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${_CLEANUPS[i]}"
    done
    if ((rc == 0)); then
        printf '[%s %s] PASS (%ss)\n' "$(ts)" "$SCRIPT_NAME" "$SECONDS" >&2
    else
        printf '[%s %s] FAILED in step "%s" (exit %s, %ss)\n' \
            "$(ts)" "$SCRIPT_NAME" "$CURRENT_STEP" "$rc" "$SECONDS" >&2
    fi
    exit "$rc"
}
trap _run_cleanups EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR
set -E

# need_cmd CMD...: fail early, naming the missing tools and how to get them.
need_cmd() {
    local c missing=()
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
    ((${#missing[@]} == 0)) || die "missing commands: ${missing[*]} (run scripts/install-deps.sh)"
}

# make_workdir: a fresh temporary directory in $WORK, removed on exit unless KEEP_WORK=1.
make_workdir() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/shardvol-$SCRIPT_NAME.XXXXXX")
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then
        on_exit 'log "kept work directory $WORK"'
    else
        on_exit 'rm -rf -- "$WORK"'
    fi
    log "work directory $WORK"
}

# wait_until SECONDS DESCRIPTION CMD...: run CMD (a command or a shell function; bound each try
# yourself, e.g. with `timeout`) every 0.2 s until it succeeds. Gives up (returns 1) once SECONDS have
# passed, or after SECONDS*5 tries, whichever comes first.
wait_until() {
    local limit=$1 what=$2 i deadline
    shift 2
    deadline=$((SECONDS + limit))
    for ((i = 0; i < limit * 5 && SECONDS <= deadline; i++)); do
        if "$@"; then return 0; fi
        sleep 0.2
    done
    log "gave up after ${limit}s waiting for: $what"
    return 1
}

# free_port: print a TCP port on 127.0.0.1 that is free right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# size_bytes SIZE: 1G / 256M / 64K / 4096 -> bytes (binary units).
size_bytes() {
    local s=$1 n unit
    n=${s%[KkMmGgTt]}
    unit=${s:${#n}}
    case "$unit" in
        "") echo "$n" ;;
        K | k) echo $((n << 10)) ;;
        M | m) echo $((n << 20)) ;;
        G | g) echo $((n << 30)) ;;
        T | t) echo $((n << 40)) ;;
    esac
}

# run_logged LOGFILE CMD...: run CMD with its output in LOGFILE; on failure show the log's tail.
run_logged() {
    local logfile=$1
    shift
    if ! "$@" >"$logfile" 2>&1; then
        log "command failed: $*"
        tail -n 40 "$logfile" >&2 || true
        return 1
    fi
}

# bounded CMD...: run a client command (qemu-io, nbdcopy, fio, ...) with a time limit, so that a
# server that stops answering fails the test instead of hanging it. CLIENT_TIMEOUT seconds, default 600.
bounded() { timeout -k 10 "${CLIENT_TIMEOUT:-600}" "$@"; }
