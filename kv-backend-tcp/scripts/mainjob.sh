#!/usr/bin/env bash
# The main job over TCP beside ucx_perftest, alternating, in one script: `kv-bench
# transfer --params same_host=false` (llama3-8b, 8192 tokens: 1 GiB, 32 layers of 32 MiB
# in 128 descriptors, two processes, verified) and `ucx_perftest -t tag_bw` over UCX's
# tcp transport on loopback, once with 1 MiB messages (the buffer stays in the CPU
# caches) and once with 32 MiB ones (one layer: source and target stream from DRAM,
# as the main job's do). Prints each run, then medians, spread (min-max) and the
# ratios of the medians, with the load average before and after.
#
#   kv-backend-tcp/scripts/mainjob.sh                # 3 rounds
#   ROUNDS=5 NICE=-5 kv-backend-tcp/scripts/mainjob.sh
#
# NICE (root only) runs every measured command at that niceness, ours and theirs
# alike, so other work on a shared machine disturbs them less. ucx_perftest reports
# "MB/s" as MiB/s; it is converted to GB/s (1e9 bytes/s) like kv-bench's figure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-13379}
NICE=${NICE:-0}
BIN=${KV_BENCH:-target/release/kv-bench}
[ -n "${KV_BENCH:-}" ] || cargo build -q --release -j2 -p kv-bench

run() { nice -n "$NICE" "$@"; }

ours() {
    run "$BIN" transfer --model llama3-8b --tokens 8192 --iters 3 --params same_host=false \
        --format table | awk '/bandwidth_gbps/ {print $2}'
}

# tag_bw SIZE ITERS: GB/s of ucx_perftest tag_bw over tcp (empty when it fails).
tag_bw() {
    UCX_TLS=tcp run timeout 120 ucx_perftest -t tag_bw -s "$1" -n "$2" -p "$PORT" >/dev/null 2>&1 &
    local server=$! out=""
    for _ in $(seq 1 50); do
        sleep 0.2
        if out=$(UCX_TLS=tcp run timeout 120 ucx_perftest 127.0.0.1 -t tag_bw -s "$1" -n "$2" -p "$PORT" 2>&1); then
            break
        fi
    done
    wait "$server" || true
    printf '%s\n' "$out" | awk '/^Final:/ {printf "%.2f", $7 * 1048576 / 1e9}'
}

if ! command -v ucx_perftest >/dev/null 2>&1; then
    echo "ucx_perftest not installed (apt install ucx-utils)" >&2
    exit 1
fi

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)  ($(date -u '+%F %T UTC'), $(nproc) cores, niceness $NICE)"
o=() a=() b=()
for r in $(seq 1 "$ROUNDS"); do
    x=$(ours); y=$(tag_bw 1048576 2000); z=$(tag_bw 33554432 100)
    echo "round $r: main job ${x:-?} GB/s, tag_bw 1 MiB ${y:-?} GB/s, tag_bw 32 MiB ${z:-?} GB/s"
    o+=("${x:-}") a+=("${y:-}") b+=("${z:-}")
done
echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)"

# stats VALUES...: "median (min-max)"
stats() {
    printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "-"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.2f (%.2f-%.2f)", m, v[1], v[NR]
        }'
}
median() { stats "$@" | cut -d' ' -f1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

mo=$(median "${o[@]}") ma=$(median "${a[@]}") mb=$(median "${b[@]}")
echo "main job over TCP:   $(stats "${o[@]}") GB/s"
echo "tag_bw 1 MiB:        $(stats "${a[@]}") GB/s   ratio $(ratio "$mo" "$ma")"
echo "tag_bw 32 MiB:       $(stats "${b[@]}") GB/s   ratio $(ratio "$mo" "$mb")"
