#!/usr/bin/env bash
# Compares our 1 MiB WRITE/READ (benches/rma.rs) with libfabric's own fi_pingpong at the
# same size on the same providers, in one run, and prints ours, theirs and the ratio.
#
# fi_rma_bw (fabtests) is used when installed; Debian's libfabric-bin ships only
# fi_pingpong, whose "MB/sec" is bytes per one-way transfer / time per transfer.
# Usage: kv-backend-libfabric/scripts/compare.sh [iterations]   (default 200)
set -euo pipefail
# KV_COMPARE_SHORT=1 (scripts/compare.sh --short, CI) runs fewer iterations.
ITERS=${1:-$([ "${KV_COMPARE_SHORT:-0}" = 1 ] && echo 50 || echo 200)}
SIZE=1048576
cd "$(dirname "$0")/../.."

cargo build -q -j2 --release -p kv-backend-libfabric --bench rma
BENCH=$(ls -t target/release/deps/rma-* | grep -v '\.d$' | head -1)

port=47700
theirs() { # provider -> MB/s of fi_rma_bw or fi_pingpong client
    local prov=$1; port=$((port + 1))
    if command -v fi_rma_bw >/dev/null; then
        timeout 60 fi_rma_bw -p "$prov" -e rdm -S $SIZE -I "$ITERS" -B $port >/dev/null 2>&1 &
        local srv=$!; sleep 0.5
        timeout 60 fi_rma_bw -p "$prov" -e rdm -S $SIZE -I "$ITERS" -P $port 127.0.0.1 | awk '$1=="1m"{print $6}'
    else
        timeout 60 fi_pingpong -p "$prov" -e rdm -S $SIZE -I "$ITERS" -B $port >/dev/null 2>&1 &
        local srv=$!; sleep 0.5
        timeout 60 fi_pingpong -p "$prov" -e rdm -S $SIZE -I "$ITERS" -P $port 127.0.0.1 | awk '$1=="1m"{print $6}'
    fi
    wait $srv 2>/dev/null || true
}

tool=$(command -v fi_rma_bw >/dev/null && echo fi_rma_bw || echo fi_pingpong)
# The machine is shared: ours and theirs run alternately REPEAT times and the medians
# are compared (REPEAT=1 in short mode).
REPEAT=${REPEAT:-$([ "${KV_COMPARE_SHORT:-0}" = 1 ] && echo 1 || echo 3)}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '%-12s %-6s %12s %12s %7s   (%s, %s B, %s iterations, median of %s, %s)\n' provider op ours theirs ratio "$tool" $SIZE "$ITERS" "$REPEAT" "$(date -u '+%F %H:%M UTC')"
for prov in "tcp;ofi_rxm" shm; do
    refs=""; w=""; r=""
    for _ in $(seq 1 "$REPEAT"); do
        refs="$refs $(theirs "$prov")"
        while read -r tag p op mbs; do
            [ "$tag" = ours ] || { echo "$tag $p $op $mbs"; continue; }
            case $op in write) w="$w $mbs" ;; read) r="$r $mbs" ;; esac
        done < <(KV_FABRIC_COMPARE=$ITERS KV_FABRIC_COMPARE_PROVIDER=$prov "$BENCH")
    done
    ref=$(echo $refs | tr ' ' '\n' | grep -v '^$' | median)
    for op in write read; do
        if [ $op = write ]; then vals=$w; else vals=$r; fi
        mbs=$(echo $vals | tr ' ' '\n' | grep -v '^$' | median)
        ratio=$(awk -v a="$mbs" -v b="$ref" 'BEGIN{ if (b > 0 && a > 0) printf "%.2f", a/b; else print "n/a" }')
        printf '%-12s %-6s %12s %12s %7s   runs: ours%s | theirs%s\n' "$prov" "$op" "$mbs" "${ref:-n/a}" "$ratio" "$vals" "$refs"
    done
done
