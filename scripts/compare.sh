#!/usr/bin/env bash
# Runs, in one go, kvx's figures beside the native reference tools installed here
# (memcpy, ucx_perftest, fi_pingpong/fi_rma_bw, fio) with the same parameters, and prints
# ours, theirs and the ratio for each. Tools that are missing are skipped with a note.
#
#   scripts/compare.sh           # full run (a few minutes)
#   scripts/compare.sh --short   # CI mode: small sizes and counts (about a minute)
#   scripts/compare.sh --readme  # full run, then writes its output into README.md's
#                                # "Measured" section (between the compare.sh markers),
#                                # dated, with the commit and the load before and after
set -uo pipefail
cd "$(dirname "$0")/.."
SHORT=0 README=0
case "${1:-}" in
--short) SHORT=1 ;;
--readme) README=1 ;;
"") ;;
*) echo "usage: $0 [--short | --readme]" >&2; exit 2 ;;
esac
if [ $README = 1 ]; then
    # Exactly one begin marker, then exactly one end marker after it.
    marks=$(grep -n '^<!-- compare.sh output \(begin\|end\) -->$' README.md | cut -d: -f2-)
    [ "$marks" = "$(printf '%s\n%s' '<!-- compare.sh output begin -->' '<!-- compare.sh output end -->')" ] ||
        { echo "README.md needs one compare.sh begin marker, then one end marker" >&2; exit 1; }
    out=$(mktemp) block=$(mktemp)
    trap 'rm -f "$out" "$block" README.md.new' EXIT
    trap 'exit 130' INT TERM
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    started=$(date -u '+%F at %H:%M UTC')
    ./scripts/compare.sh | tee "$out"
    rc=${PIPESTATUS[0]}
    load_after=$(cut -d' ' -f1-3 /proc/loadavg)
    # Only a complete run replaces the last one.
    if [ "$rc" != 0 ] || [ "$(grep -c '^== ' "$out")" -lt 6 ]; then
        echo "README.md left as it was: the run failed (exit $rc) or is incomplete" >&2
        exit 1
    fi
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git diff --quiet HEAD -- 2>/dev/null || echo ", with uncommitted changes")
    # The section between the markers: a dated line, then the output verbatim.
    {
        echo "<!-- compare.sh output begin -->"
        echo "\`scripts/compare.sh --readme\` on $started (commit $commit$dirty), $(nproc) cores,"
        echo "load average $load_before before and $load_after after (1, 5, 15 min)."
        echo
        echo '```text'
        grep -v '^building\|^  Executable\|^ *Compiling\|^ *Finished' "$out" | sed '/./,$!d'
        echo '```'
        echo "<!-- compare.sh output end -->"
    } >"$block"
    awk -v blk="$block" '
        /^<!-- compare.sh output begin -->$/ { while ((getline l < blk) > 0) print l; skip = 1; next }
        /^<!-- compare.sh output end -->$/ { skip = 0; next }
        !skip { print }' README.md >README.md.new && mv README.md.new README.md
    echo "README.md: \"Measured\" rewritten from this run" >&2
    exit 0
fi
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
status=0

section() { printf '\n== %s (%s)\n' "$1" "$(date -u '+%F %T UTC')"; }
run() { # name, command...: runs a per-crate comparison, keeps going on failure
    local name=$1; shift
    section "$name"
    "$@"
    local rc=$?
    if [ $rc != 0 ]; then
        echo "($name comparison failed: exit $rc)"
        status=1
    fi
}

cargo build -q --release -p kv-bench || exit 1

section "kv-bench transfer (two processes, tcp backend) vs memcpy"
if [ $SHORT = 1 ]; then tokens=2048; iters=2; else tokens=8192; iters=3; fi
./target/release/kv-bench transfer --model llama3-8b --tokens $tokens --iters $iters --reference memcpy --format table | grep -E 'backend|bandwidth|reference|ratio|check' || status=1
./target/release/kv-bench transfer --model llama3-8b --tokens $tokens --iters $iters --params same_host=false --reference memcpy --format table | grep -E 'bandwidth|ratio|check' | sed 's/^/  tcp-only /' || status=1

# The main job over TCP beside ucx_perftest's tag_bw (1 MiB cached, 32 MiB from DRAM).
if [ $SHORT = 0 ] && command -v ucx_perftest >/dev/null; then
    run "main job over TCP vs ucx_perftest tag_bw" \
        env KV_BENCH=target/release/kv-bench kv-backend-tcp/scripts/mainjob.sh
fi

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
