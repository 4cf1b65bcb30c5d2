#!/usr/bin/env bash
# Runs, in one go, kvx's figures beside the native reference tools installed here
# (memcpy, ucx_perftest, fi_pingpong/fi_rma_bw, fio) with the same parameters, and prints
# ours, theirs and the ratio for each. Tools that are missing are skipped with a note.
#
#   scripts/compare.sh           # full run (a few minutes)
#   scripts/compare.sh --short   # CI mode: small sizes and counts (about a minute)
set -uo pipefail
cd "$(dirname "$0")/.."
SHORT=0
[ "${1:-}" = "--short" ] && SHORT=1
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
status=0

section() { printf '\n== %s (%s)\n' "$1" "$(date -u '+%F %T UTC')"; }
run() { # name, command...: runs a per-crate comparison, keeps going on failure
    local name=$1; shift
    section "$name"
    if ! "$@"; then
        echo "($name comparison failed: exit $?)"
        status=1
    fi
}

cargo build -q --release -p kv-bench || exit 1

section "kv-bench transfer (two processes, tcp backend) vs memcpy"
if [ $SHORT = 1 ]; then tokens=2048; iters=2; else tokens=8192; iters=3; fi
./target/release/kv-bench transfer --model llama3-8b --tokens $tokens --iters $iters --reference memcpy --format table | grep -E 'backend|bandwidth|reference|ratio|check' || status=1
./target/release/kv-bench transfer --model llama3-8b --tokens $tokens --iters $iters --params same_host=false --reference memcpy --format table | grep -E 'bandwidth|ratio|check' | sed 's/^/  tcp-only /' || status=1

for s in kv-backend-tcp kv-backend-ucx kv-backend-libfabric kv-backend-gds kv-tier; do
    script=$s/scripts/compare.sh
    [ -x "$script" ] || continue
    if [ $SHORT = 1 ]; then
        run "$s" env KV_COMPARE_SHORT=1 "$script"
    else
        run "$s" "$script"
    fi
done
exit $status
