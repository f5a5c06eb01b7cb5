#!/usr/bin/env bash
# The project's test command:
#   1. scripts/install-deps.sh          test dependencies and the VM kernel (fast when present)
#   2. cargo test                       the whole crate: unit, property and integration tests
#   3. cargo build --release            target/release/shardvol, used by the end-to-end scripts
#   4. scripts/verify-units.sh          systemd-analyze verify on systemd/
#   5. scripts/e2e-*.sh                 every end-to-end script, each bounded by E2E_TIMEOUT
# It prints a line per step with its time, a summary line per end-to-end script, and last the line
# "N passed, N failed" (counting the end-to-end scripts). The exit code is non-zero if any step failed.
#
# Environment:
#   SERVER              server for the end-to-end scripts (default shardvol; qemu-nbd or nbdkit as stand-ins)
#   TEST_PROFILE        cargo profile for `cargo test`: dev (default; debug assertions and overflow
#                       checks, opt-level 1, dependencies at 3) or release
#   E2E_TIMEOUT         seconds allowed to each end-to-end script (default 1200)
#   E2E_ONLY            space-separated script names to run instead of all (e.g. "e2e-interop")
#   SKIP_DEPS=1, SKIP_CARGO_TEST=1   skip those steps (local iteration)
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER=${SERVER:-shardvol}
TEST_PROFILE=${TEST_PROFILE:-dev}
E2E_TIMEOUT=${E2E_TIMEOUT:-1200}
export SERVER

start_all=$SECONDS
failed_steps=()
summary=()

hr() { printf '%s\n' "------------------------------------------------------------------------"; }
# run_step NAME LIMIT_SECONDS CMD...: run a step bounded in time, record and print its result.
run_step() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    hr
    printf '[test.sh] %s: %s\n' "$name" "$*"
    timeout -k 30 "$limit" "$@" || rc=$?
    local dt=$((SECONDS - t0))
    if ((rc == 0)); then
        printf '[test.sh] %s: ok (%ss)\n' "$name" "$dt"
        [[ "$name" == e2e-* ]] || summary+=("$(printf '%-22s ok      %5ss' "$name" "$dt")")
    else
        ((rc == 124)) && printf '[test.sh] %s: timed out after %ss\n' "$name" "$limit"
        printf '[test.sh] %s: FAILED (exit %s, %ss)\n' "$name" "$rc" "$dt"
        if [[ "$name" != e2e-* ]]; then
            summary+=("$(printf '%-22s FAILED  %5ss  (exit %s)' "$name" "$dt" "$rc")")
            failed_steps+=("$name")
        fi
    fi
    return "$rc"
}

if [[ "${SKIP_DEPS:-0}" != 1 ]]; then
    run_step install-deps 1800 scripts/install-deps.sh || true
fi

if [[ "${SKIP_CARGO_TEST:-0}" != 1 ]]; then
    if [[ "$TEST_PROFILE" == release ]]; then
        run_step "cargo test" 3000 cargo test --release || true
    else
        run_step "cargo test" 3000 cargo test || true
    fi
fi

build_ok=1
run_step "cargo build --release" 3000 cargo build --release || build_ok=0
# Stand-in servers do not need the binary: their end-to-end runs go ahead whatever the build did.
[[ "$SERVER" == shardvol ]] || build_ok=1

run_step verify-units 300 scripts/verify-units.sh || true

passed=0
failed=0
e2e_results=()
scripts=()
if [[ -n "${E2E_ONLY:-}" ]]; then
    for n in $E2E_ONLY; do scripts+=("scripts/${n%.sh}.sh"); done
else
    for s in scripts/e2e-*.sh; do scripts+=("$s"); done
fi
for s in "${scripts[@]}"; do
    name=$(basename "$s" .sh)
    if ((build_ok == 0)); then
        hr
        printf '[test.sh] %s: not run, the release build failed\n' "$name"
        e2e_results+=("$(printf '%-22s FAILED  (not run: release build failed)' "$name")")
        failed=$((failed + 1))
        continue
    fi
    t0=$SECONDS
    if run_step "$name" "$E2E_TIMEOUT" "$s"; then
        passed=$((passed + 1))
        e2e_results+=("$(printf '%-22s passed  %5ss' "$name" $((SECONDS - t0)))")
    else
        failed=$((failed + 1))
        e2e_results+=("$(printf '%-22s FAILED  %5ss' "$name" $((SECONDS - t0)))")
    fi
done

hr
echo "[test.sh] steps (server for end-to-end scripts: $SERVER):"
printf '  %s\n' "${summary[@]}"
echo "[test.sh] end-to-end scripts:"
printf '  %s\n' "${e2e_results[@]}"
echo "[test.sh] total $((SECONDS - start_all))s"
if ((${#failed_steps[@]} > 0)); then
    echo "[test.sh] failed: ${failed_steps[*]}"
fi
echo "$passed passed, $failed failed"
((${#failed_steps[@]} == 0 && failed == 0))
