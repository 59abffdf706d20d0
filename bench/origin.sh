#!/usr/bin/env bash
# Origin benchmarks (issue 2): hashing throughput against b3sum, first and
# incremental publish of 100,000 files (~2 GiB), manifest bytes a mirror
# fetches for the incremental generation. Loopback only; bounded.
#   usage: bench/origin.sh [FILES]   (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
W=$(mktemp -d /var/tmp/meridian-bench.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
cargo build --release --bins -q
B=target/release/meridian
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
python3 bench/gen_tree.py "$W/content" "$N"
sync   # let the freshly written tree reach the disk before anything is timed
BYTES=$(find "$W/content" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f", s}')

echo "== b3sum over the same files (page cache warm)"
(cd "$W/content" && find . -type f -print0 | xargs -0 cat > /dev/null)
t0=$(date +%s.%N); (cd "$W/content" && find . -type f -print0 | xargs -0 b3sum --num-threads 1 > /dev/null); t1=$(date +%s.%N)
B3_1=$(python3 -c "print(f'{$BYTES/($t1-$t0)/1e6:.0f}')")
t0=$(date +%s.%N); (cd "$W/content" && find . -type f -print0 | xargs -0 b3sum > /dev/null); t1=$(date +%s.%N)
B3_N=$(python3 -c "print(f'{$BYTES/($t1-$t0)/1e6:.0f}')")
t0=$(date +%s.%N); (cd "$W/content" && find . -type f -print0 | xargs -0 b3sum --num-threads 1 --no-mmap > /dev/null); t1=$(date +%s.%N)
B3_R=$(python3 -c "print(f'{$BYTES/($t1-$t0)/1e6:.0f}')")
echo "b3sum --num-threads 1: $B3_1 MB/s; with --no-mmap (reads, as Meridian does): $B3_R MB/s; b3sum (all cores): $B3_N MB/s"

$B keygen --out "$W/key" > /dev/null
echo "== first publish: $N files, $BYTES bytes"
MERIDIAN_LOG=info,meridian_origin::scan=debug /usr/bin/time -f "%e s wall, %M KiB peak RSS" \
  $B origin --once --content "$W/content" --state "$W/state" --key "$W/key" > "$W/first.log" 2>&1
sed 's/\x1b\[[0-9;]*m//g' "$W/first.log" | grep -E "scan phases|published generation|peak RSS" | sed 's/^.*meridian_origin::scan: //'
# The hashing stage (walk, open, read, hash; the links into the store are the
# next stage) per core it ran on, against single-threaded b3sum.
python3 - "$W/first.log" "$BYTES" "$B3_1" "$B3_R" <<'PY'
import re, sys
log = re.sub(r"\x1b\[[0-9;]*m", "", open(sys.argv[1]).read())
m = re.search(r"threads=(\d+) walk_and_hash=([0-9.eE+-]+) link=([0-9.eE+-]+)", log)
threads, hashing, link = int(m.group(1)), float(m.group(2)), float(m.group(3))
per_core = int(sys.argv[2]) / hashing / threads / 1e6
b3, b3r = float(sys.argv[3]), float(sys.argv[4])
print(f"hashing stage: {hashing:.3f} s on {threads} threads = {per_core:.0f} MB/s per core = "
      f"{100 * per_core / b3:.0f}% of b3sum --num-threads 1, {100 * per_core / b3r:.0f}% of its --no-mmap run; "
      f"then linking {link:.3f} s")
PY
echo "== second publish: 100 files changed"
for i in $(seq 0 100 9900); do printf 'changed %s' "$i" >> "$W/content/dir$(printf %03d $((i / 1000)))/file$(printf %06d "$i").bin"; done
/usr/bin/time -f "%e s wall, %M KiB peak RSS" $B origin --once --content "$W/content" --state "$W/state" --key "$W/key" 2>&1 | grep -v INFO

echo "== manifest bytes a mirror fetches for that generation"
# Mirror syncs generation 2, then the origin publishes generation 3 (100 more changes).
$B origin --content "$W/content" --state "$W/state" --key "$W/key" --listen 127.0.0.1:0 --quiet 200ms > "$W/origin.log" 2>&1 &
for _ in $(seq 100); do grep -q "listening on" "$W/origin.log" && break; sleep 0.1; done
OADDR=$(grep -o 'listening on [0-9.:]*' "$W/origin.log" | head -1 | cut -d' ' -f3)
PK=$(grep -o 'ed25519:[0-9a-f]*' "$W/origin.log" | head -1)
$B mirror --id bench --upstream "http://$OADDR" --trust "$PK" --state "$W/mirror" --listen 127.0.0.1:0 > "$W/mirror.log" 2>&1 &
for _ in $(seq 100); do grep -q "listening on" "$W/mirror.log" && break; sleep 0.1; done
MADDR=$(grep -o 'listening on [0-9.:]*' "$W/mirror.log" | head -1 | cut -d' ' -f3)
metric() { curl -s "http://$1/.meridian/metrics" | awk -v m="$2" '$1==m {print $2}'; }
gen() { curl -s "http://$1/.meridian/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }
G=$(curl -s "http://$OADDR/.meridian/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
for _ in $(seq 600); do [ "$(gen "$MADDR")" -ge "$G" ] && break; sleep 0.5; done
FULL=$(metric "$MADDR" meridian_mirror_manifest_bytes_fetched_total)
for i in $(seq 50 100 9950); do printf 'again %s' "$i" >> "$W/content/dir$(printf %03d $((i / 1000)))/file$(printf %06d "$i").bin"; done
for _ in $(seq 600); do [ "$(gen "$MADDR")" -gt "$G" ] && break; sleep 0.2; done
AFTER=$(metric "$MADDR" meridian_mirror_manifest_bytes_fetched_total)
INC=$(python3 -c "print(int($AFTER - $FULL))")
echo "manifest bytes for the full tree: $FULL; for a 100-file change: $INC ($(python3 -c "print(f'{100*$INC/$FULL:.2f}')")% of full)"
grep -o 'published generation.*' "$W/origin.log" | tail -1
