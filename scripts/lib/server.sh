# shellcheck shell=bash
# The server under test, behind one variable so that every script runs against shardvol (the default)
# or a stand-in NBD server with the same calls:
#
#   SERVER=shardvol   target/release/shardvol (or $SHARDVOL_BIN): `create` a pool with shares, `serve` it
#   SERVER=qemu-nbd   qemu-nbd on a raw image file in the pool directory
#   SERVER=qemu-nbd-luks  qemu-nbd on a LUKS image (AES-256-XTS) in the pool directory
#   SERVER=nbdkit     nbdkit's file plugin on a raw image file in the pool directory
# QEMU_NBD_OPTS adds options to qemu-nbd (e.g. "--cache=none --aio=native").
#
# Calls (all in the current shell, never in $(...), so that the server stays our child):
#   server_create POOL_DIR SIZE        make a pool holding one volume named $EXPORT of SIZE bytes
#   server_start unix|tcp              serve the pool; returns once the export answers nbdinfo
#   server_uri                         the NBD URI of the export ($EXPORT) for the current transport
#   server_stop SIGNAL                 send SIGNAL, wait for the exit (bounded); exit code in SERVER_RC
#
# Source lib/common.sh first.

SERVER=${SERVER:-shardvol}
EXPORT=${EXPORT:-vol0}
SHARDVOL_BIN=${SHARDVOL_BIN:-$REPO_ROOT/target/release/shardvol}
SHARDVOL_SHARES=${SHARDVOL_SHARES:-5}
SHARDVOL_THRESHOLD=${SHARDVOL_THRESHOLD:-3}
# Extra arguments for `shardvol create` (geometry, disks), split on spaces.
SHARDVOL_CREATE_ARGS=${SHARDVOL_CREATE_ARGS:-}
# Passphrase of the LUKS stand-in: a test fixture, not a secret.
LUKS_SECRET="secret,id=sec0,data=shardvol-test-passphrase"
SERVER_READY_TIMEOUT=${SERVER_READY_TIMEOUT:-60}
SERVER_STOP_TIMEOUT=${SERVER_STOP_TIMEOUT:-60}

SERVER_PID=""
SERVER_RC=""
SERVER_POOL=""
SERVER_SOCK=""
SERVER_PORT=""
SERVER_TRANSPORT=""
SERVER_LOG=""
SERVER_STARTS=0
# Which shares `server_start` hands to shardvol: the first $SHARDVOL_THRESHOLD files from this index
# (0-based) of the sorted share directory. Tests set it to unlock with another subset.
SERVER_SHARE_FIRST=${SERVER_SHARE_FIRST:-0}

server_check() {
    case "$SERVER" in
        shardvol)
            [[ -x "$SHARDVOL_BIN" ]] ||
                die "shardvol binary not found at $SHARDVOL_BIN (run 'cargo build --release', or set SHARDVOL_BIN)"
            ;;
        qemu-nbd) need_cmd qemu-nbd ;;
        qemu-nbd-luks) need_cmd qemu-nbd qemu-img ;;
        nbdkit) need_cmd nbdkit ;;
        *) die "unknown SERVER=$SERVER (shardvol, qemu-nbd, qemu-nbd-luks or nbdkit)" ;;
    esac
    need_cmd nbdinfo
    on_exit '_server_kill_on_exit'
    if [[ "$SERVER" == shardvol ]]; then
        log "server under test: shardvol ($SHARDVOL_BIN)"
    else
        log "server under test: $SERVER (stand-in)"
    fi
}

_server_kill_on_exit() {
    # After a failure, the server's warnings and errors, then the end of its log.
    if [[ "${EXIT_RC:-0}" != 0 && -n "$SERVER_LOG" && -s "$SERVER_LOG" ]]; then
        log "the server's warnings and errors ($SERVER_LOG):"
        grep -E 'WARN|ERROR' "$SERVER_LOG" | tail -n 30 >&2 || true
        log "the end of the server's log:"
        tail -n 15 "$SERVER_LOG" >&2 || true
    fi
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping server (pid $SERVER_PID)"
        kill -TERM "$SERVER_PID" 2>/dev/null
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    SERVER_PID=""
}

# server_create POOL_DIR SIZE
server_create() {
    SERVER_POOL=$1
    local size=$2
    mkdir -p "$(dirname "$SERVER_POOL")"
    case "$SERVER" in
        shardvol)
            mkdir -p "$SERVER_POOL.shares"
            # shellcheck disable=SC2086  # SHARDVOL_CREATE_ARGS is a list of words
            run_logged "$SERVER_POOL.create.log" "$SHARDVOL_BIN" create --pool "$SERVER_POOL" \
                --volume "$EXPORT" --size "$size" \
                --shares "$SHARDVOL_SHARES" --threshold "$SHARDVOL_THRESHOLD" \
                --share-dir "$SERVER_POOL.shares" $SHARDVOL_CREATE_ARGS ||
                die "shardvol create failed (log: $SERVER_POOL.create.log)"
            local n
            n=$(find "$SERVER_POOL.shares" -maxdepth 1 -type f | wc -l)
            ((n >= SHARDVOL_THRESHOLD)) ||
                die "shardvol create wrote $n share files into $SERVER_POOL.shares, expected $SHARDVOL_SHARES"
            ;;
        qemu-nbd | nbdkit)
            mkdir -p "$SERVER_POOL"
            truncate -s "$size" "$SERVER_POOL/$EXPORT.img"
            ;;
        qemu-nbd-luks)
            mkdir -p "$SERVER_POOL"
            # iter-time only sets how long unlocking takes, not the data path. qemu-img times its
            # PBKDF by CPU time and gives up ("Unable to get accurate CPU usage") when a busy VM
            # reports none: that is retried.
            local attempt
            for attempt in 1 2 3 4; do
                rm -f "$SERVER_POOL/$EXPORT.luks"
                run_logged "$SERVER_POOL.create.log" qemu-img create -f luks --object "$LUKS_SECRET" \
                    -o key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 \
                    "$SERVER_POOL/$EXPORT.luks" "$size" && break
                ((attempt < 4)) || die "qemu-img create -f luks failed"
                log "qemu-img create -f luks failed (attempt $attempt); retrying"
            done
            ;;
    esac
    log "created pool $SERVER_POOL with volume $EXPORT of $size"
}

# The share files for this start: $SHARDVOL_THRESHOLD of them, starting at $SERVER_SHARE_FIRST.
_server_share_args() {
    local f all=()
    while IFS= read -r f; do all+=("$f"); done < <(find "$SERVER_POOL.shares" -maxdepth 1 -type f | sort)
    local i
    for ((i = SERVER_SHARE_FIRST; i < SERVER_SHARE_FIRST + SHARDVOL_THRESHOLD && i < ${#all[@]}; i++)); do
        printf -- '--share\n%s\n' "${all[i]}"
    done
}

# server_uri: the export's URI for the transport of the running server.
server_uri() {
    if [[ "$SERVER_TRANSPORT" == tcp ]]; then
        echo "nbd://127.0.0.1:$SERVER_PORT/$EXPORT"
    else
        echo "nbd+unix:///$EXPORT?socket=$SERVER_SOCK"
    fi
}

# server_start unix|tcp: start serving $SERVER_POOL and wait until the export answers.
server_start() {
    SERVER_TRANSPORT=${1:-unix}
    [[ -z "$SERVER_PID" ]] || die "server_start: a server is already running (pid $SERVER_PID)"
    SERVER_STARTS=$((SERVER_STARTS + 1))
    SERVER_SOCK="$(dirname "$SERVER_POOL")/nbd.sock"
    rm -f "$SERVER_SOCK"
    SERVER_PORT=$(free_port)
    SERVER_LOG="$(dirname "$SERVER_POOL")/server-$SERVER_STARTS.log"
    local cmd=()
    case "$SERVER" in
        shardvol)
            local shares=()
            mapfile -t shares < <(_server_share_args)
            # Both a unix socket and a TCP port of our own, so that two runs never collide on 10809.
            cmd=("$SHARDVOL_BIN" serve --pool "$SERVER_POOL" "${shares[@]}"
                --socket "$SERVER_SOCK" --listen "127.0.0.1:$SERVER_PORT")
            ;;
        qemu-nbd | qemu-nbd-luks)
            # shellcheck disable=SC2206  # QEMU_NBD_OPTS is a list of words
            cmd=(qemu-nbd -x "$EXPORT" -t -e 16 ${QEMU_NBD_OPTS:-})
            if [[ "$SERVER_TRANSPORT" == tcp ]]; then
                cmd+=(-b 127.0.0.1 -p "$SERVER_PORT")
            else
                cmd+=(-k "$SERVER_SOCK")
            fi
            if [[ "$SERVER" == qemu-nbd ]]; then
                cmd+=(-f raw "$SERVER_POOL/$EXPORT.img")
            else
                cmd+=(--object "$LUKS_SECRET" --image-opts
                    "driver=luks,key-secret=sec0,file.driver=file,file.filename=$SERVER_POOL/$EXPORT.luks")
            fi
            ;;
        nbdkit)
            # The exportname filter makes nbdkit list and accept exactly one export, named $EXPORT.
            cmd=(nbdkit -f --exit-with-parent --filter=exportname)
            if [[ "$SERVER_TRANSPORT" == tcp ]]; then
                cmd+=(-i 127.0.0.1 -p "$SERVER_PORT")
            else
                cmd+=(-U "$SERVER_SOCK")
            fi
            cmd+=(file "file=$SERVER_POOL/$EXPORT.img" "default-export=$EXPORT" "exportname=$EXPORT"
                exportname-list=explicit exportname-strict=true)
            ;;
    esac
    log "starting $SERVER ($SERVER_TRANSPORT), log $SERVER_LOG"
    "${cmd[@]}" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    local uri
    uri=$(server_uri)
    if ! wait_until "$SERVER_READY_TIMEOUT" "$SERVER to answer on $uri" _server_answers "$uri"; then
        tail -n 40 "$SERVER_LOG" >&2 || true
        die "$SERVER did not answer on $uri within ${SERVER_READY_TIMEOUT}s"
    fi
    log "$SERVER ready (pid $SERVER_PID) at $uri"
}

# _server_answers URI: true once the export answers; fails the script if the server has exited.
_server_answers() {
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        local rc=0
        wait "$SERVER_PID" || rc=$?
        SERVER_PID=""
        tail -n 40 "$SERVER_LOG" >&2 || true
        die "$SERVER exited (code $rc) before it was ready"
    fi
    timeout 10 nbdinfo --size "$1" >/dev/null 2>&1
}

# server_stop SIGNAL: signal the server and wait (bounded) for it to exit; sets SERVER_RC to its exit
# code (128+N when killed by signal N). Fails if it does not exit in time.
server_stop() {
    local sig=${1:-TERM} i
    [[ -n "$SERVER_PID" ]] || die "server_stop: no server running"
    log "sending SIG$sig to $SERVER (pid $SERVER_PID)"
    kill "-$sig" "$SERVER_PID"
    for ((i = 0; i < SERVER_STOP_TIMEOUT * 10; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        tail -n 40 "$SERVER_LOG" >&2 || true
        die "$SERVER did not exit within ${SERVER_STOP_TIMEOUT}s of SIG$sig"
    fi
    SERVER_RC=0
    { wait "$SERVER_PID"; } 2>/dev/null || SERVER_RC=$?
    SERVER_PID=""
    log "$SERVER exited with code $SERVER_RC"
}

# server_memory_kib FIELD: a memory figure of the running server in KiB, from
# /proc/PID/status: VmHWM (peak resident set) or VmRSS (resident set now).
server_memory_kib() {
    awk -v f="$1:" '$1 == f {print $2}' "/proc/$SERVER_PID/status"
}

# shardvol_counter NAME: a volume counter of the running shardvol server (`status --json`),
# summed over its volumes: e.g. stripes_written_whole, blocks_written.
shardvol_counter() {
    "$SHARDVOL_BIN" status --pool "$SERVER_POOL" --json | jq --arg c "$1" '[.volumes[].counters[$c] // 0] | add'
}
