#!/usr/bin/env bash
# Runs ucx_perftest and this crate's criterion bench with the same transport and size,
# and prints ours, theirs and the ratio (MiB/s; ucx_perftest's "MB" is 2^20 bytes).
#
#   kv-backend-ucx/scripts/compare.sh            # from anywhere in the workspace
#
# Cases: put over shm (UCX_TLS=posix,cma,self) at 1 MiB and 16 KiB (our 16 KiB case
# posts 64 x 16 KiB per transfer), and over tcp at 1 MiB against ucx_perftest's tagged
# send (tag_bw). Servers listen on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v ucx_perftest >/dev/null || { echo "ucx_perftest not found: apt-get install ucx-utils" >&2; exit 1; }
PORT=${PORT:-13390}
ITERS=${ITERS:-2000}

# perftest TLS TEST SIZE -> prints overall bandwidth (MiB/s)
perftest() {
    local tls=$1 test=$2 size=$3 srv out
    PORT=$((PORT + 1))
    UCX_TLS=$tls timeout 120 ucx_perftest -p "$PORT" >/dev/null 2>&1 &
    srv=$!
    sleep 1
    out=$(UCX_TLS=$tls timeout 120 ucx_perftest 127.0.0.1 -p "$PORT" -t "$test" -s "$size" -n "$ITERS" 2>/dev/null | awk '/^Final:/ {print $7}')
    wait "$srv" 2>/dev/null || true
    echo "${out:-0}"
}

echo "running our bench (cargo bench -p kv-backend-ucx --bench throughput) ..." >&2
ours=$(cargo bench -j2 -q -p kv-backend-ucx --bench throughput -- --output-format bencher 2>/dev/null | grep '^test ')
# ns/iter of a bench -> MiB/s for BYTES moved per iteration
ours_mibs() {
    local name=$1 bytes=$2 ns
    ns=$(echo "$ours" | awk -v n="ucx/$name" '$2 == n {gsub(",", "", $5); print $5}')
    awk -v ns="${ns:-0}" -v b="$bytes" 'BEGIN { if (ns > 0) printf "%.0f", b / 1048576 / (ns / 1e9); else print 0 }'
}

printf '%s\n' "date: $(date -u +%Y-%m-%dT%H:%MZ)  host: $(hostname)  ucx: $(ucx_info -v | awk '/Version/ {print $3}')"
printf '%-28s %12s %12s %7s %6s\n' case "ours MiB/s" "theirs MiB/s" ratio goal
row() {
    local label=$1 o=$2 t=$3 goal=$4
    awk -v l="$label" -v o="$o" -v t="$t" -v g="$goal" 'BEGIN { r = (t > 0) ? o / t : 0; printf "%-28s %12.0f %12.0f %7.3f %6s\n", l, o, t, r, g }'
}
row "shm put 1MiB"        "$(ours_mibs shm_put/1MiB 1048576)"          "$(perftest posix,cma,self ucp_put_bw 1048576)" 0.95
row "shm put 16KiB batched" "$(ours_mibs shm_put_batched/16KiB 1048576)" "$(perftest posix,cma,self ucp_put_bw 16384)"   0.90
row "tcp put 1MiB vs tag_bw" "$(ours_mibs tcp_put/1MiB 1048576)"         "$(perftest tcp tag_bw 1048576)"           0.90
