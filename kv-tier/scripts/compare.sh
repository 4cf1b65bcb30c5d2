#!/usr/bin/env bash
# NVMe-tier reads vs fio, same block size and queue depth, on the same file system.
#
#   kv-tier/scripts/compare.sh [dir]      (env: QD=16 BLOCKS=128 SECS=5 ROUNDS=3)
#
# Runs `fio --ioengine=io_uring --direct=1` random reads of 2052 KiB (a 2 MiB block plus
# its 4 KiB record header, what the tier reads per block) at queue depth QD over a file
# as large as the bench's data, then the kv-tier bench in raw mode, and prints both and
# the ratio of the medians (goal >= 0.9); the two alternate ROUNDS times.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-${TMPDIR:-/tmp}}
QD=${QD:-16}
BLOCKS=${BLOCKS:-128}
SECS=${SECS:-5}
BS_K=2052
command -v fio >/dev/null || { echo "fio not found (apt-get install fio)"; exit 1; }
FILE="$DIR/kv-tier-fio.dat"
SIZE_K=$((BLOCKS * BS_K))
ROUNDS=${ROUNDS:-3}
fio_all=(); ours_all=()
# Alternate the two so both see the same (shared, noisy) disk.
for _ in $(seq "$ROUNDS"); do
  fio_json=$(fio --name=kvtier --filename="$FILE" --size="${SIZE_K}k" --bs="${BS_K}k" \
    --rw=randread --iodepth="$QD" --ioengine=io_uring --direct=1 --time_based \
    --runtime="$SECS" --group_reporting --output-format=json)
  fio_all+=("$(printf '%s' "$fio_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"])')")
  ours_all+=("$(KV_TIER_BENCH_RAW=1 KV_TIER_BENCH_DIR="$DIR" KV_TIER_BENCH_QD="$QD" \
    KV_TIER_BENCH_BLOCKS="$BLOCKS" KV_TIER_BENCH_SECS="$SECS" \
    cargo bench -q -j2 -p kv-tier --bench nvme 2>/dev/null | awk '/^RESULT nvme_read/ {print $3}')")
done
rm -f "$FILE"
fio_bw=$(IFS=,; echo "${fio_all[*]}")
ours=$(IFS=,; echo "${ours_all[*]}")
python3 - "$fio_bw" "$ours" "$QD" <<'PY'
import statistics, sys
fio = [float(x) for x in sys.argv[1].split(",")]
ours = [float(x) for x in sys.argv[2].split(",")]
qd, mib = sys.argv[3], 1 << 20
show = lambda v: " ".join(f"{x / mib:.0f}" for x in v)
print(f"fio io_uring O_DIRECT randread 2052k QD{qd}: median {statistics.median(fio) / mib:.0f} MiB/s  (runs: {show(fio)})")
print(f"kv-tier fetch (NVMe -> DRAM) 2052k QD{qd}: median {statistics.median(ours) / mib:.0f} MiB/s  (runs: {show(ours)})")
print(f"RATIO kv-tier/fio {statistics.median(ours) / statistics.median(fio):.2f} (medians)")
PY
