#!/usr/bin/env bash
# Compares the TCP backend with ucx_perftest over UCX's tcp transport (tagged send,
# 1 MiB, two processes on loopback) and its same-host paths (cross-memory attach on
# heap buffers, shared memory on `HostBuffer::shared` buffers) with a single-thread
# memcpy, in one run. Prints ours, theirs and the ratios.
#
#   kv-backend-tcp/scripts/compare.sh            # N=2000 ucx iterations, port 13377
#   N=5000 PORT=14000 kv-backend-tcp/scripts/compare.sh
#
# ucx_perftest reports "MB/s" as bytes / 2^20 / s (UCS_MBYTE), the same unit as the
# bench's MiB/s.
set -euo pipefail
cd "$(dirname "$0")/../.."
# KV_COMPARE_SHORT=1 (scripts/compare.sh --short, CI): fewer iterations.
if [ "${KV_COMPARE_SHORT:-0}" = 1 ]; then N=${N:-300}; fi
N=${N:-2000}
PORT=${PORT:-13377}
SIZE=1048576

# Build first so compilation does not overlap the ucx run.
cargo bench -j2 -p kv-backend-tcp --bench transfer --no-run >/dev/null 2>&1

theirs=""
if command -v ucx_perftest >/dev/null 2>&1; then
    UCX_TLS=tcp timeout 120 ucx_perftest -t tag_bw -s "$SIZE" -n "$N" -p "$PORT" >/dev/null 2>&1 &
    server=$!
    out=""
    for _ in $(seq 1 50); do
        sleep 0.2
        if out=$(UCX_TLS=tcp timeout 120 ucx_perftest 127.0.0.1 -t tag_bw -s "$SIZE" -n "$N" -p "$PORT" 2>&1); then
            break
        fi
    done
    wait "$server" || true
    # Final: <iters> <lat50> <lat avg> <lat overall> <bw avg> <bw overall> <rate avg> <rate overall>
    theirs=$(printf '%s\n' "$out" | awk '/^Final:/ {print $7}')
    if [ -z "$theirs" ]; then
        echo "ucx_perftest gave no result:" >&2
        printf '%s\n' "$out" | tail -5 >&2
    fi
else
    echo "ucx_perftest not installed (apt install ucx-utils); reporting ours only" >&2
fi

results=$(KV_TCP_BENCH_ONLY=tcp:1MiB,tcp:1MiB@256MiB,same_host:1MiB,same_host:4KiBx256,shm:1MiB,shm:4KiBx256,shm:1MiB@256MiB \
    cargo bench -j2 -p kv-backend-tcp --bench transfer 2>/dev/null | grep '^RESULT')
printf '%s\n' "$results"

field() { printf '%s\n' "$results" | grep "mode=$1 case=$2 " | sed -E "s/.* $3=([0-9.]+).*/\1/"; }
ours=$(field tcp 1MiB ours_MiBps)
echo
echo "date:                  $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores"
if [ -n "$theirs" ]; then
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
    echo "tcp 1 MiB WRITE:       ours ${ours} MiB/s, ucx_perftest tag_bw (UCX_TLS=tcp) ${theirs} MiB/s, ratio ${ratio} (goal >= 1.0)"
else
    echo "tcp 1 MiB WRITE:       ours ${ours} MiB/s (no ucx_perftest figure)"
fi
echo "tcp 1 MiB, 256 MiB span: ours $(field tcp 1MiB@256MiB ours_MiBps) MiB/s; worker CPU $(field tcp 1MiB@256MiB worker_cpu_ms_per_GiB) ms/GiB against $(field tcp 1MiB worker_cpu_ms_per_GiB) in cache (data from DRAM, as the main job's)"
echo "shm 1 MiB:             ratio to memcpy $(field shm 1MiB ratio) (goal >= 0.8)"
echo "shm 1 MiB, 256 MiB span: ratio to memcpy $(field shm 1MiB@256MiB ratio) (both from DRAM)"
echo "shm 4 KiB x256:        ratio to memcpy $(field shm 4KiBx256 ratio) (goal >= 0.5)"
echo "cma 1 MiB:             ratio to memcpy $(field same_host 1MiB ratio) (fallback for non-shared memory)"
echo "cma 4 KiB x256:        ratio to memcpy $(field same_host 4KiBx256 ratio)"
