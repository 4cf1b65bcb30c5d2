#!/usr/bin/env bash
# Runs fio and the gds bench back to back on the same O_DIRECT file with the same
# parameters, and prints both figures and their ratio (ours / fio).
#
#   1 MiB sequential write and read, iodepth 8   (goal: ours >= 0.95 x fio)
#   4 KiB random read, iodepth 32                (goal: ours >= 0.90 x fio)
#
# The machine is shared, so each pair runs REPEAT times alternately (default 3) and the
# medians are compared. Environment: SIZE (default 256M), SECS per run (default 2),
# REPEAT, FILE (default a file in
# $TMPDIR or /tmp), FIO_EXTRA (extra fio flags, e.g. "--fixedbufs --registerfiles"),
# KV_GDS_BENCH_ENGINE=threads to measure the thread-pool engine instead of io_uring,
# KV_GDS_BENCH_SUBMIT_BATCH=n for our Options::submit_batch (4096 = a whole queue's
# refill per io_uring_enter, the behaviour before 2026-11-25).
# fio's io_uring engine keeps iodepth_batch_submit=1 (one io_uring_enter per I/O).
set -euo pipefail

# KV_COMPARE_SHORT=1 (scripts/compare.sh --short, CI): one short pass of each.
if [ "${KV_COMPARE_SHORT:-0}" = 1 ]; then SIZE=${SIZE:-128M}; SECS=${SECS:-1}; REPEAT=${REPEAT:-1}; fi
SIZE=${SIZE:-256M}
SECS=${SECS:-2}
REPEAT=${REPEAT:-3}
FILE=${FILE:-${TMPDIR:-/tmp}/kv-gds-compare-$$.dat}
FIO_EXTRA=${FIO_EXTRA:-}
here=$(cd "$(dirname "$0")/.." && pwd)

command -v fio >/dev/null || { echo "fio not found (apt-get install fio)" >&2; exit 1; }
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }

bytes=$(numfmt --from=iec "$SIZE")
trap 'rm -f "$FILE"' EXIT

echo "building the bench (release)..." >&2
(cd "$here" && cargo bench -j2 -p kv-backend-gds --bench storage --no-run 2>&1 | tail -1) >&2
bench=$(cd "$here" && cargo bench -j2 -p kv-backend-gds --bench storage --no-run --message-format=json 2>/dev/null \
  | jq -r 'select(.reason=="compiler-artifact" and .target.name=="storage" and .executable!=null) | .executable' | tail -1)

# Lay the file out with real data first, so reads never hit holes.
fio --name=layout --filename="$FILE" --size="$SIZE" --rw=write --bs=1M --iodepth=8 \
  --ioengine=io_uring --direct=1 --output-format=terse >/dev/null

fio_bw() { # rw bs iodepth -> bytes/s
  local rw=$1 bs=$2 qd=$3 dir
  case $rw in write) dir=write ;; *) dir=read ;; esac
  fio --name=ref --filename="$FILE" --size="$SIZE" --rw="$rw" --bs="$bs" --iodepth="$qd" \
    --ioengine=io_uring --direct=1 --runtime="$SECS" --time_based --output-format=json $FIO_EXTRA \
    | jq -r ".jobs[0].$dir.bw_bytes"
}

ours_bw() { # case -> bytes/s
  KV_GDS_BENCH_RAW=1 KV_GDS_BENCH_FILE="$FILE" KV_GDS_BENCH_SIZE="$bytes" \
    KV_GDS_BENCH_SECS="$SECS" KV_GDS_BENCH_CASES="$1" "$bench" | awk '$1=="RESULT"{print $3}'
}

median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

run() { # name rw bs qd goal
  local f o fs=() os=() i
  for ((i = 0; i < REPEAT; i++)); do
    fs+=("$(fio_bw "$2" "$3" "$4")")
    os+=("$(ours_bw "$1")")
  done
  f=$(median "${fs[@]}")
  o=$(median "${os[@]}")
  awk -v n="$1" -v o="$o" -v f="$f" -v g="$5" 'BEGIN {
    r = (f > 0) ? o / f : 0
    printf "%-18s %12.0f %12.0f %7.3f %6.2f%s\n", n, o / 1048576, f / 1048576, r, g, (r >= g) ? "" : "  (below goal)"
  }'
}
echo "file $FILE, size $SIZE, ${SECS}s per run, median of $REPEAT alternating runs, $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d" " -f1-3 /proc/loadavg)"
printf '%-18s %12s %12s %7s %6s\n' case "ours MiB/s" "fio MiB/s" ratio goal
run write_1m_qd8 write 1M 8 0.95
run read_1m_qd8 read 1M 8 0.95
run randread_4k_qd32 randread 4k 32 0.90
