#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after another (never two at once), each until
# it has made RUNS executions or run SECONDS seconds, whichever comes first, starting
# from its corpus and its committed regression inputs (fuzz/regressions/<target>/).
#
#   scripts/fuzz.sh                                 # every target, 30 s each (CI)
#   scripts/fuzz.sh --seconds 3600 --runs 10000000  # the long campaign (fuzz/README.md)
#   scripts/fuzz.sh --seconds 60 auth_handshake     # some targets
#
# Needs a nightly toolchain and cargo-fuzz. Prints one line per target and a closing
# "fuzz: N passed, N failed"; exits non-zero when a target crashed (its log and the
# crashing input are kept under fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=30
runs=-1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Builds share a lock with the other cargo commands on a shared machine, where there is one.
lock=()
if [ -e /tmp/kvx-cargo.lock ] && command -v flock >/dev/null; then
    lock=(flock /tmp/kvx-cargo.lock)
fi
"${lock[@]}" cargo +nightly fuzz build >/dev/null

bin=fuzz/target/x86_64-unknown-linux-gnu/release
# UCX and libfabric keep process-lifetime allocations they never free; only their
# libraries' leaks are suppressed (scripts/lsan.supp says why).
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
passed=0
failed=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/regressions/$t" ] && seeds=("fuzz/regressions/$t")
    log=fuzz/artifacts/$t/last-run.log
    start=$(date +%s)
    if "$bin/$t" "$corpus" "${seeds[@]}" -max_total_time="$seconds" -runs="$runs" \
        -rss_limit_mb=2048 -timeout=30 -artifact_prefix="fuzz/artifacts/$t/" \
        -print_final_stats=1 >"$log" 2>&1; then
        done_line=$(grep -a '^Done ' "$log" | tail -1)
        echo "fuzz $t: ok, ${done_line:-no summary} ($(( $(date +%s) - start )) s wall)"
        passed=$((passed + 1))
    else
        echo "fuzz $t: FAILED after $(( $(date +%s) - start )) s; log $log:"
        grep -a -A15 'ERROR\|panicked\|SUMMARY' "$log" | head -40 || tail -40 "$log"
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
