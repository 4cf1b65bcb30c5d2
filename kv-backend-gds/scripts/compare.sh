#!/usr/bin/env bash
# Runs fio and the gds bench back to back on the same O_DIRECT file with the same
# parameters, and prints both figures and their ratio (ours / fio).
#
#   1 MiB sequential write and read, iodepth 8   (goal: ours >= 0.95 x fio)
#   4 KiB random read, iodepth 32                (goal: ours >= 0.90 x fio)
#
# The machine is shared, so each pair runs REPEAT times alternately (default 3) and the
# medians are compared; the spread (lowest–highest run) of each side is printed beside
# its median, and the load average before and after. Environment: SIZE (default 256M),
# SECS per run (default 2), REPEAT, CASES (space-separated subset of write_1m_qd8
# read_1m_qd8 randread_4k_qd32), FILE (default a file in
# $TMPDIR or /tmp), FIO_EXTRA (extra fio flags, e.g. "--fixedbufs --registerfiles"),
# KV_GDS_BENCH_ENGINE=threads to measure the thread-pool engine instead of io_uring,
# KV_GDS_BENCH_SUBMIT_BATCH=n for our Options::submit_batch (4096 = a whole queue's
# refill per io_uring_enter, the behaviour before 2026-11-25).
# fio's io_uring engine keeps iodepth_batch_submit=1 (one io_uring_enter per I/O).
# Both sides use iodepth x bs bytes of buffers (fio's own footprint).
#
# PAGES=4k (default): fio's malloc'd buffers vs our heap buffer, both on 4 KiB pages
# wherever the kernel put them. PAGES=huge: both on 2 MiB pages (fio maps a file of a
# private tmpfs mounted huge=always, --mem=mmapshared; ours is advised MADV_HUGEPAGE),
# so a 1 MiB I/O is one physically contiguous segment on both sides. Needs root. On
# 4 KiB pages a 1 MiB I/O has up to 256 segments, more than virtio-blk takes in one
# request (max_segments 254), and the figures follow where the pages happened to land
# (README, "Measured").
set -euo pipefail

# KV_COMPARE_SHORT=1 (scripts/compare.sh --short, CI): one short pass of each.
if [ "${KV_COMPARE_SHORT:-0}" = 1 ]; then SIZE=${SIZE:-128M}; SECS=${SECS:-1}; REPEAT=${REPEAT:-1}; fi
SIZE=${SIZE:-256M}
SECS=${SECS:-2}
REPEAT=${REPEAT:-3}
FILE=${FILE:-${TMPDIR:-/tmp}/kv-gds-compare-$$.dat}
FIO_EXTRA=${FIO_EXTRA:-}
PAGES=${PAGES:-4k}
here=$(cd "$(dirname "$0")/.." && pwd)

command -v fio >/dev/null || { echo "fio not found (apt-get install fio)" >&2; exit 1; }
command -v jq >/dev/null || { echo "jq not found (apt-get install jq)" >&2; exit 1; }

bytes=$(numfmt --from=iec "$SIZE")
huge_dir=
cleanup() {
  rm -f "$FILE"
  if [ -n "$huge_dir" ]; then umount "$huge_dir" 2>/dev/null; rmdir "$huge_dir"; fi
}
trap cleanup EXIT
fio_mem=()
ours_mem=()
case $PAGES in
  4k) ;;
  huge)
    [ "$(id -u)" = 0 ] || { echo "PAGES=huge needs root (it mounts a tmpfs with huge=always)" >&2; exit 1; }
    huge_dir=$(mktemp -d)
    mount -t tmpfs -o size=64m,huge=always kv-gds-huge "$huge_dir"
    truncate -s 32M "$huge_dir/fio.buf"
    fio_mem=(--mem="mmapshared:$huge_dir/fio.buf")
    ours_mem=(KV_GDS_BENCH_THP=1)
    ;;
  *) echo "PAGES must be 4k or huge" >&2; exit 1 ;;
esac

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
    --ioengine=io_uring --direct=1 --runtime="$SECS" --time_based --output-format=json "${fio_mem[@]}" $FIO_EXTRA \
    | jq -r ".jobs[0].$dir.bw_bytes"
}

ours_bw() { # case -> bytes/s
  env "${ours_mem[@]}" KV_GDS_BENCH_RAW=1 KV_GDS_BENCH_FILE="$FILE" KV_GDS_BENCH_SIZE="$bytes" \
    KV_GDS_BENCH_SECS="$SECS" KV_GDS_BENCH_CASES="$1" "$bench" | awk '$1=="RESULT"{print $3}'
}

# "median lowest-highest" of the values (bytes/s), in MiB/s.
summary() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {
  printf "%.0f %.0f-%.0f", v[int((NR+1)/2)] / 1048576, v[1] / 1048576, v[NR] / 1048576 }'; }

run() { # name rw bs qd goal
  case " ${CASES:-write_1m_qd8 read_1m_qd8 randread_4k_qd32} " in *" $1 "*) ;; *) return ;; esac
  local fs=() os=() i
  for ((i = 0; i < REPEAT; i++)); do
    fs+=("$(fio_bw "$2" "$3" "$4")")
    os+=("$(ours_bw "$1")")
  done
  # shellcheck disable=SC2046
  set -- "$1" "$5" $(summary "${os[@]}") $(summary "${fs[@]}")
  awk -v n="$1" -v g="$2" -v o="$3" -v os="$4" -v f="$5" -v fs="$6" 'BEGIN {
    r = (f > 0) ? o / f : 0
    printf "%-18s %8.0f %11s %8.0f %11s %7.3f %6.2f%s\n", n, o, os, f, fs, r, g, (r >= g) ? "" : "  (below goal)"
  }'
}
echo "file $FILE, size $SIZE, $PAGES pages, ${SECS}s per run, median of $REPEAT alternating runs, $(date -u +%Y-%m-%dT%H:%MZ), load before $(cut -d" " -f1-3 /proc/loadavg)"
printf '%-18s %8s %11s %8s %11s %7s %6s\n' case "ours" "(spread)" "fio" "(spread)" ratio goal
run write_1m_qd8 write 1M 8 0.95
run read_1m_qd8 read 1M 8 0.95
run randread_4k_qd32 randread 4k 32 0.90
echo "MiB/s, median (lowest-highest); load after $(cut -d" " -f1-3 /proc/loadavg)"
