#!/usr/bin/env bash
# Whole-system benchmark: fio's nbd engine over a unix socket against shardvol and its peers, in one
# run, same data size, same workloads, same machine:
#   shardvol        a fresh pool with the default geometry (4+2)
#   qemu-nbd        raw file, cache=none, aio=native
#   qemu-nbd-luks   LUKS (AES-256-XTS) file, cache=none, aio=native
#   nbdkit          file plugin (page cache)
# Each volume is first filled with random data (nbdcopy), so reads move real data rather than holes.
# Workloads, each --time_based for the runtime: sequential read 1M qd8, random read 4k qd32,
# sequential write 1M qd8, random write 4k qd32 (reads first, on the random fill).
# Prints one table: MB/s and IOPS per server and workload, the first server's ratio to each other
# server (shardvol's to each peer by default), each server's peak RSS (VmHWM, read at the end) and
# its RSS at rest (VmRSS after 6 s without requests: shardvol gives free heap back after 5 s).
#
#   scripts/bench.sh [--size 1G] [--runtime 10] [--out FILE] [--servers "shardvol qemu-nbd ..."] [--rounds 3]
#
# --rounds N measures every server N times, the servers' order reversed every other round (so
# that no server always runs first or last), and each cell of the table is the median over the
# rounds (RSS: the largest); a second table gives each round's ratios. The default is 3:
# one round on a shared 2-core machine is noisy, peers' own figures were seen to move 3x
# between consecutive runs. --rounds 1 for a quick look.
#
# Environment: BENCH_SIZE, BENCH_RUNTIME, BENCH_OUT, BENCH_SERVERS, BENCH_ROUNDS (same as the options).
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/server.sh"

BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_RUNTIME=${BENCH_RUNTIME:-10}
BENCH_OUT=${BENCH_OUT:-${TMPDIR:-/tmp}/shardvol-bench-results.md}
BENCH_SERVERS=${BENCH_SERVERS:-shardvol qemu-nbd qemu-nbd-luks nbdkit}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
while (($# > 0)); do
    case "$1" in
        --size) BENCH_SIZE=$2; shift 2 ;;
        --runtime) BENCH_RUNTIME=$2; shift 2 ;;
        --out) BENCH_OUT=$2; shift 2 ;;
        --servers) BENCH_SERVERS=$2; shift 2 ;;
        --rounds) BENCH_ROUNDS=$2; shift 2 ;;
        -h | --help) trap - EXIT; sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
read -r -a servers <<<"$BENCH_SERVERS"
((${#servers[@]} > 0)) || die "no servers to measure"
SIZE_BYTES=$(size_bytes "$BENCH_SIZE")
((BENCH_RUNTIME > 0)) || die "runtime must be a positive number of seconds"
[[ "$BENCH_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "rounds must be a positive whole number"

# name  rw  bs  iodepth  metric(for the ratio)  label
WORKLOADS=(
    "seqread read 1M 8 bw seq-read-1M-qd8"
    "randread randread 4k 32 iops rand-read-4k-qd32"
    "seqwrite write 1M 8 bw seq-write-1M-qd8"
    "randwrite randwrite 4k 32 iops rand-write-4k-qd32"
)
TABLE_ORDER=(seqwrite seqread randwrite randread)

need_cmd fio nbdcopy jq nbdinfo
make_workdir
declare -A MBPS IOPS RSS REST LABEL FILL
# Seconds without requests before the RSS at rest is read.
BENCH_REST_S=6
# Per round: MBPS_R[srv/workload/round] ... ; the tables above get the medians at the end.
declare -A MBPS_R IOPS_R FILL_R

# median V...: the median of the numbers given.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ratio A B: A / B to two decimals ("n/a" when B is 0).
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

# workload_fields NAME: "metric label" of the workload NAME.
workload_fields() {
    local w n metric label
    for w in "${WORKLOADS[@]}"; do
        read -r n _ _ _ metric label <<<"$w"
        if [[ "$n" == "$1" ]]; then
            echo "$metric $label"
            return
        fi
    done
}

# table_header COLUMN...: a Markdown table's header row ("workload" first) and separator.
table_header() {
    local hdr="| workload |" sep="|---|" c
    for c in "$@"; do
        hdr+=" $c |"
        sep+="---|"
    done
    echo "$hdr"
    echo "$sep"
}

# memory_row LABEL ARRAY: a table row with each server's figure from the associative array
# ARRAY (KiB) in MiB, and empty ratio cells.
memory_row() {
    local -n kib=$2
    local row="| $1 |" s
    for s in "${servers[@]}"; do row+=" $(awk -v k="${kib[$s]}" 'BEGIN {printf "%.1f MiB", k / 1024}') |"; done
    for s in "${servers[@]:1}"; do row+=" |"; done
    echo "$row"
}

server_label() {
    case "$1" in
        shardvol) echo "shardvol" ;;
        qemu-nbd) echo "qemu-nbd raw" ;;
        qemu-nbd-luks) echo "qemu-nbd LUKS" ;;
        nbdkit) echo "nbdkit file" ;;
        *) echo "$1" ;;
    esac
}

step "random data: $BENCH_SIZE"
head -c "$SIZE_BYTES" /dev/urandom >"$WORK/random.bin"

# measure SERVER ROUND: create, fill and run every workload against one server.
measure() {
    local srv=$1 round=$2 uri t0 t1 w name rw bs qd label json dir rss
    # shellcheck disable=SC2034  # read by lib/server.sh
    SERVER=$srv
    LABEL[$srv]=$(server_label "$srv")
    # shellcheck disable=SC2034  # read by lib/server.sh
    case "$srv" in
        qemu-nbd | qemu-nbd-luks) QEMU_NBD_OPTS="--cache=none --aio=native" ;;
        *) QEMU_NBD_OPTS="" ;;
    esac
    step "$srv (round $round of $BENCH_ROUNDS): create, start, fill with random data"
    server_check
    server_create "$WORK/$srv/pool" "$BENCH_SIZE"
    server_start unix
    uri=$(server_uri)
    t0=$(date +%s.%N)
    bounded nbdcopy --flush "$WORK/random.bin" "$uri" || die "$srv: filling the volume failed"
    t1=$(date +%s.%N)
    FILL_R[$srv/$round]=$(awk -v b="$SIZE_BYTES" -v a="$t0" -v c="$t1" 'BEGIN {printf "%.0f", b / (c - a) / 1e6}')
    log "$srv: filled at ${FILL_R[$srv/$round]} MB/s"

    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd _ label <<<"$w"
        json="$WORK/$srv-$name.json"
        timeout -k 10 $((BENCH_RUNTIME + 120)) fio --name="$name" --ioengine=nbd --uri="$uri" \
            --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE_BYTES" \
            --time_based --runtime="$BENCH_RUNTIME" --output-format=json --output="$json" \
            >"$WORK/$srv-$name.log" 2>&1 || { cat "$WORK/$srv-$name.log" >&2; die "$srv: fio $name failed"; }
        dir="read"
        [[ "$rw" == *write ]] && dir="write"
        [[ "$(jq '.jobs[0].error' "$json")" == 0 ]] || die "$srv: fio $name reported an error"
        MBPS_R[$srv/$name/$round]=$(jq ".jobs[0].$dir.bw_bytes / 1e6" "$json")
        IOPS_R[$srv/$name/$round]=$(jq ".jobs[0].$dir.iops" "$json")
        log "$srv $label: $(printf '%.0f' "${MBPS_R[$srv/$name/$round]}") MB/s, $(printf '%.0f' "${IOPS_R[$srv/$name/$round]}") IOPS"
    done
    rss=$(server_memory_kib VmHWM)
    if ((rss > ${RSS[$srv]:-0})); then RSS[$srv]=$rss; fi
    log "$srv: peak RSS $((rss / 1024)) MiB"
    sleep "$BENCH_REST_S"
    rss=$(server_memory_kib VmRSS)
    if ((rss > ${REST[$srv]:-0})); then REST[$srv]=$rss; fi
    log "$srv: RSS at rest $((rss / 1024)) MiB"
    server_stop TERM
    rm -rf "${WORK:?}/$srv"
}

for ((round = 1; round <= BENCH_ROUNDS; round++)); do
    order=("${servers[@]}")
    if ((round % 2 == 0)); then
        order=()
        for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[$i]}"); done
    fi
    for srv in "${order[@]}"; do
        measure "$srv" "$round"
    done
done

# The medians over the rounds.
rounds=$(seq 1 "$BENCH_ROUNDS")
for srv in "${servers[@]}"; do
    # shellcheck disable=SC2046  # one word per round
    FILL[$srv]=$(printf '%.0f' "$(median $(for r in $rounds; do echo "${FILL_R[$srv/$r]}"; done))")
    for w in "${WORKLOADS[@]}"; do
        read -r name _ <<<"$w"
        # shellcheck disable=SC2046
        MBPS[$srv/$name]=$(median $(for r in $rounds; do echo "${MBPS_R[$srv/$name/$r]}"; done))
        # shellcheck disable=SC2046
        IOPS[$srv/$name]=$(median $(for r in $rounds; do echo "${IOPS_R[$srv/$name/$r]}"; done))
    done
done

step "results"
ref=${servers[0]}
{
    echo "# NBD server benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r)."
    echo "fio $(fio --version | sed 's/^fio-//') nbd engine over a unix socket, one job, $BENCH_SIZE volume filled with random data, ${BENCH_RUNTIME} s per workload."
    if ((BENCH_ROUNDS > 1)); then
        echo "$BENCH_ROUNDS rounds (servers in reverse order every other round): each figure is the median over the rounds, RSS the largest."
    fi
    if [[ " ${servers[*]} " == *" shardvol "* ]]; then
        ver=$("$SHARDVOL_BIN" --version 2>/dev/null | head -n 1 || true)
        echo "shardvol: ${ver:-$SHARDVOL_BIN}, pool created with ${SHARDVOL_CREATE_ARGS:-the default geometry (4+2)};" \
            "qemu-nbd $(qemu-nbd --version | awk 'NR==1 {print $2}'); nbdkit $(nbdkit --version | awk '{print $2}')."
    else
        echo "qemu-nbd $(qemu-nbd --version | awk 'NR==1 {print $2}'); nbdkit $(nbdkit --version | awk '{print $2}')."
    fi
    echo "Ratio columns: ${LABEL[$ref]} divided by the other server (above 1: ${LABEL[$ref]} is faster)."
    echo
    names=()
    for s in "${servers[@]}"; do names+=("${LABEL[$s]}"); done
    ratios=()
    for s in "${servers[@]:1}"; do ratios+=("${LABEL[$ref]} / ${LABEL[$s]}"); done
    table_header "${names[@]}" "${ratios[@]}"
    for name in "${TABLE_ORDER[@]}"; do
        read -r metric label <<<"$(workload_fields "$name")"
        row="| $label |"
        for s in "${servers[@]}"; do
            row+=" $(printf '%.0f MB/s, %.0f IOPS' "${MBPS[$s/$name]}" "${IOPS[$s/$name]}") |"
        done
        for s in "${servers[@]:1}"; do
            if [[ "$metric" == bw ]]; then a=${MBPS[$ref/$name]} b=${MBPS[$s/$name]}; else a=${IOPS[$ref/$name]} b=${IOPS[$s/$name]}; fi
            row+=" $(ratio "$a" "$b") |"
        done
        echo "$row"
    done
    row="| fill (nbdcopy write) |"
    for s in "${servers[@]}"; do row+=" ${FILL[$s]} MB/s |"; done
    for s in "${servers[@]:1}"; do row+=" $(ratio "${FILL[$ref]}" "${FILL[$s]}") |"; done
    echo "$row"
    memory_row "peak RSS (VmHWM)" RSS
    memory_row "RSS at rest (${BENCH_REST_S} s idle)" REST
    # The ratio of every round, so that the spread behind each median shows.
    if ((BENCH_ROUNDS > 1 && ${#servers[@]} > 1)); then
        echo
        echo "Ratios of each round, in round order:"
        echo
        table_header "${ratios[@]}"
        for name in "${TABLE_ORDER[@]}" fill; do
            if [[ "$name" == fill ]]; then
                label="fill (nbdcopy write)"
            else
                read -r metric label <<<"$(workload_fields "$name")"
            fi
            row="| $label |"
            for s in "${servers[@]:1}"; do
                per=()
                for r in $rounds; do
                    if [[ "$name" == fill ]]; then
                        a=${FILL_R[$ref/$r]} b=${FILL_R[$s/$r]}
                    elif [[ "$metric" == bw ]]; then
                        a=${MBPS_R[$ref/$name/$r]} b=${MBPS_R[$s/$name/$r]}
                    else
                        a=${IOPS_R[$ref/$name/$r]} b=${IOPS_R[$s/$name/$r]}
                    fi
                    per+=("$(ratio "$a" "$b")")
                done
                row+=" $(printf '%s, ' "${per[@]}" | sed 's/, $//') |"
            done
            echo "$row"
        done
    fi
} >"$WORK/results.md"
mkdir -p "$(dirname "$BENCH_OUT")"
cp "$WORK/results.md" "$BENCH_OUT"
echo
cat "$BENCH_OUT"
echo
log "table written to $BENCH_OUT"
