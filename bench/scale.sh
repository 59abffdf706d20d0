#!/usr/bin/env bash
# The million-file benchmarks (issue 19), on the tree bench/gen_big_tree.py
# writes once and keeps (MERIDIAN_BENCH_CACHE, default
# /var/tmp/meridian-bench-cache; about 21 GB, and as much again for the
# origin's state while it runs):
#   - rsync -a --dry-run of the tree against an up-to-date copy (a no-op
#     walk: the yardstick for an incremental publish);
#   - the origin's first publish: wall time, peak RSS, hashing per core
#     against b3sum --num-threads 1 --no-mmap over the same files;
#   - a running origin: ROUNDS rounds of 100 files rewritten across the
#     tree, each timed from the change to the new generation, with the
#     publish's own phases from its log; the origin's peak and steady RSS;
#   - (ONLY=origin stops here) a mirror's full sync of that tree from the
#     origin, against rsync -a of the same tree into an empty directory,
#     then ROUNDS incremental syncs of 100 files against rsync of the same
#     change; the mirror's peak and steady RSS.
# usage: [ROUNDS=5] [ONLY=origin] [MERIDIAN_BIN=…] bench/scale.sh
#   RSYNC_NOOP=SECONDS skips the rsync walk (a figure from an earlier run),
#   SKIP_B3SUM=1 the page-cache warm-up and b3sum (then the hashing ratio
#   is not printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-5}
CACHE=${MERIDIAN_BENCH_CACHE:-/var/tmp/meridian-bench-cache}
T=$CACHE/tree-1m
if [ -z "${MERIDIAN_BIN:-}" ]; then cargo build --release --bins -q; fi
B=${MERIDIAN_BIN:-target/release/meridian}
W=$(mktemp -d /var/tmp/meridian-scale.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
mkdir -p "$CACHE"
python3 bench/gen_big_tree.py "$T"
FILES=$(python3 -c "import json; print(json.load(open('$T.complete'))['files'])")
BYTES=$(python3 -c "import json; print(json.load(open('$T.complete'))['bytes'])")
# The files rewritten in each round: 100 spread over the tree (every
# FILES/100-th in walk order, sizes kept), listed once.
if [ ! -f "$T.changed" ]; then
  (cd "$T" && find . -type f -size -1000k | sort | awk -v n="$FILES" 'NR % int(n / 110) == 0' | head -100 | sed 's|^\./||') > "$T.changed"
fi
change() {  # change TAG: rewrites the first bytes of the 100 files in place
  python3 - "$T" "$T.changed" "$1" <<'PY'
import os, sys
root, listing, tag = sys.argv[1], sys.argv[2], sys.argv[3]
for i, rel in enumerate(open(listing).read().split()):
    with open(os.path.join(root, rel), "r+b") as f:
        f.write(f"{tag}:{i}:".encode()[:8].ljust(8, b"."))
PY
}
rss() { awk -v k="$2" '$1 == k":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }  # MB

if [ -z "${RSYNC_NOOP:-}" ]; then
echo "== rsync -a --dry-run against an up-to-date copy (a no-op walk), page cache warm"
if [ ! -f "$T.links.complete" ]; then rm -rf "$T.links"; cp -al "$T" "$T.links"; touch "$T.links.complete"; fi
RS=()
for r in 1 2 3; do
  t0=$(date +%s.%N); rsync -a --dry-run "$T/" "$T.links/"; t1=$(date +%s.%N)
  RS+=("$(python3 -c "print(f'{$t1 - $t0:.3f}')")")
done
RSYNC_NOOP=$(median "${RS[@]}")
echo "rsync no-op walk: ${RS[*]} s (median $RSYNC_NOOP s)"
fi
if [ -z "${SKIP_B3SUM:-}" ]; then
echo "== page cache: every file read once (the first publish and b3sum are timed warm, alike)"
t0=$(date +%s.%N); (cd "$T" && find . -type f -print0 | xargs -0 -n 2000 cat > /dev/null); t1=$(date +%s.%N)
echo "read in $(python3 -c "print(f'{$t1 - $t0:.1f}')") s; $(free -g | awk '/Mem:/ {print $6}') GiB cached"
echo "== b3sum --num-threads 1 --no-mmap over the same files"
t0=$(date +%s.%N); (cd "$T" && find . -type f -print0 | xargs -0 -n 2000 b3sum --num-threads 1 --no-mmap > /dev/null); t1=$(date +%s.%N)
B3=$(python3 -c "print(f'{$BYTES / ($t1 - $t0) / 1e6:.0f}')")
echo "b3sum: $B3 MB/s"
fi
B3=${B3:-0}
"$B" keygen --out "$W/key" > /dev/null 2>&1
echo "== origin: first publish of $FILES files, $BYTES bytes"
MERIDIAN_LOG=info,meridian_origin::scan=debug /usr/bin/time -f "%e s wall, %M KiB peak RSS" \
  "$B" origin --once --content "$T" --state "$W/ostate" --key "$W/key" > "$W/first.log" 2>&1
sed 's/\x1b\[[0-9;]*m//g' "$W/first.log" | grep -E "scan phases|published generation|peak RSS" | sed 's/^.*meridian_origin::scan: //'
[ "$B3" = 0 ] || python3 - "$W/first.log" "$BYTES" "$B3" <<'PY'
import re, sys
log = re.sub(r"\x1b\[[0-9;]*m", "", open(sys.argv[1]).read())
m = re.search(r"threads=(\d+) walk_and_hash=([0-9.eE+-]+) link=([0-9.eE+-]+)", log)
threads, hashing, link = int(m.group(1)), float(m.group(2)), float(m.group(3))
per_core = int(sys.argv[2]) / hashing / threads / 1e6
print(f"hashing stage: {hashing:.1f} s on {threads} threads = {per_core:.0f} MB/s per core = "
      f"{100 * per_core / float(sys.argv[3]):.0f}% of b3sum --num-threads 1 --no-mmap; then linking {link:.1f} s")
PY

echo "== origin running: $ROUNDS rounds of 100 files rewritten"
MERIDIAN_LOG=info,meridian_origin::publisher=debug "$B" origin --content "$T" --state "$W/ostate" --key "$W/key" \
  --listen 127.0.0.1:0 --quiet 200ms > "$W/origin.log" 2>&1 & OP=$!; PIDS+=($OP)
for _ in $(seq 600); do grep -q "listening on" "$W/origin.log" && break; sleep 0.1; done
OA=$(grep -o 'listening on [0-9.:]*' "$W/origin.log" | head -1 | awk '{print $3}')
gen() { curl -s "http://$OA/.meridian/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }
phases() { sed 's/\x1b\[[0-9;]*m//g' "$W/origin.log" | grep -c "publish phases" || true; }
# Steady state: the start's own full scans are over and the background
# copier has made its private copies of the files hashed in place (as
# for every generation but the first moments after a big publish).
for _ in $(seq 6000); do sed 's/\x1b\[[0-9;]*m//g' "$W/origin.log" | grep -q "made private copies" && break; sleep 0.1; done
sleep 3
echo "origin after start and its private copies: RSS $(rss $OP VmRSS) MB, peak $(rss $OP VmHWM) MB"
PUB=()
for round in $(seq "$ROUNDS"); do
  g=$(gen); p=$(phases)
  t0=$(date +%s.%N); change "r$round"
  for _ in $(seq 600); do [ "$(gen)" -gt "$g" ] && break; sleep 0.01; done
  t1=$(date +%s.%N)
  for _ in $(seq 100); do [ "$(phases)" -gt "$p" ] && break; sleep 0.05; done
  line=$(sed 's/\x1b\[[0-9;]*m//g' "$W/origin.log" | grep "publish phases" | tail -1)
  own=$(echo "$line" | python3 -c "import re,sys; l=sys.stdin.read(); print(f'{sum(float(x) for x in re.findall(r\"(?:scan|tree|nodes|sync|commit)=([0-9.eE+-]+)\", l)):.3f}')")
  PUB+=("$own")
  echo "round $round: change → generation $(gen) in $(python3 -c "print(f'{$t1 - $t0:.3f}')") s (debounce included); publish itself $own s: $(echo "$line" | grep -o 'full=[a-z]* .*commit=[0-9.e-]*')"
done
PUB_MED=$(median "${PUB[@]}")
echo "incremental publish of 100 files: median $PUB_MED s = $(python3 -c "print(f'{$PUB_MED / $RSYNC_NOOP:.3f}')")× the rsync no-op walk ($RSYNC_NOOP s)"
echo "origin steady: RSS $(rss $OP VmRSS) MB, peak $(rss $OP VmHWM) MB (the peak includes the start's full scan)"
[ "${ONLY:-}" = origin ] && exit 0

wait_log() {  # wait_log FILE PATTERN [TENTHS]: until the log has the line
  for _ in $(seq "${3:-36000}"); do sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -q "$2" && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; return 1
}
mmetric() { curl -s "http://$1/.meridian/metrics" | awk -v m="$2" '$1==m {print $2}'; }
echo "== mirror: full sync of the tree from the origin (it published moments ago: its private copies are still being made)"
PK=$(sed 's/\x1b\[[0-9;]*m//g' "$W/origin.log" | grep -o 'ed25519:[0-9a-f]*' | head -1)
sync
t0=$(date +%s.%N)
MERIDIAN_LOG=info,meridian_mirror::sync=debug "$B" mirror --id m --upstream "http://$OA" --trust "$PK" --state "$W/m" \
  --listen 127.0.0.1:0 --scrub-interval 0s > "$W/m.log" 2>&1 & MP=$!; PIDS+=($MP)
wait_log "$W/m.log" "now serving generation"; t1=$(date +%s.%N)
wait_log "$W/m.log" "is durable"; t2=$(date +%s.%N)
MFULL=$(python3 -c "print(f'{$t1 - $t0:.1f}')"); MDUR=$(python3 -c "print(f'{$t2 - $t0:.1f}')")
echo "meridian mirror: serving after $MFULL s (every blob verified), durable after $MDUR s; peak RSS $(rss $MP VmHWM) MB"
MA=$(sed 's/\x1b\[[0-9;]*m//g' "$W/m.log" | grep -o 'listening on [0-9.:]*' | head -1 | awk '{print $3}')
sleep 5
echo "mirror steady: RSS $(rss $MP VmRSS) MB"
echo "== mirror: $ROUNDS incremental syncs of 100 files"
MS=()
for round in $(seq "$ROUNDS"); do
  n=$(sed 's/\x1b\[[0-9;]*m//g' "$W/m.log" | grep -c "now serving generation" || true)
  b0=$(mmetric "$MA" meridian_mirror_bytes_fetched_total)
  change "m$round"
  for _ in $(seq 1200); do [ "$(sed 's/\x1b\[[0-9;]*m//g' "$W/m.log" | grep -c "now serving generation")" -gt "$n" ] && break; sleep 0.05; done
  b1=$(mmetric "$MA" meridian_mirror_bytes_fetched_total)
  own=$(sed 's/\x1b\[[0-9;]*m//g' "$W/m.log" | grep "now serving generation" | tail -1 | grep -o 'seconds=[0-9.e-]*' | cut -d= -f2)
  ph=$(sed 's/\x1b\[[0-9;]*m//g' "$W/m.log" | grep "sync phases" | tail -1 | grep -o 'delta=.*switch=[0-9.e-]*')
  MS+=("$own")
  echo "round $round: mirror sync $own s, $(python3 -c "print(int($b1 - $b0))") bytes fetched ($ph)"
done
MSYNC=$(median "${MS[@]}")
echo "mirror steady after syncs: RSS $(rss $MP VmRSS) MB, peak $(rss $MP VmHWM) MB"
kill "$MP" "$OP"; wait "$MP" "$OP" 2>/dev/null || true; rm -rf "$W/m" "$W/ostate"

echo "== rsync -a of the same tree (rsync daemon on loopback), then the same 100-file change"
cat > "$W/rsyncd.conf" <<RSYNCD
use chroot = no
pid file = $W/rsyncd.pid
[full]
  path = $T
  read only = yes
RSYNCD
rsync --daemon --config="$W/rsyncd.conf" --port=18731 --address=127.0.0.1; sleep 0.5
sync
t0=$(date +%s.%N); rsync -a rsync://127.0.0.1:18731/full/ "$W/rsync-copy/"; t1=$(date +%s.%N)
RFULL=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
echo "rsync -a: $RFULL s"
RI=(); RB=()
for round in $(seq "$ROUNDS"); do
  change "r$round-rsync"
  t0=$(date +%s.%N); OUT=$(rsync -a --delete --stats rsync://127.0.0.1:18731/full/ "$W/rsync-copy/"); t1=$(date +%s.%N)
  RI+=("$(python3 -c "print(f'{$t1 - $t0:.3f}')")")
  RB+=("$(echo "$OUT" | awk -F: '/Total bytes received/ {gsub(/[ ,]/,"",$2); r=$2} /Total bytes sent/ {gsub(/[ ,]/,"",$2); s=$2} END {print r+s}')")
done
kill "$(cat "$W/rsyncd.pid")" 2>/dev/null || true
RINC=$(median "${RI[@]}")
echo "rsync -a --delete of 100 changed files: ${RI[*]} s (median $RINC s), bytes ${RB[*]}"
echo "full sync: mirror $MFULL s / rsync $RFULL s = $(python3 -c "print(f'{$MFULL / $RFULL:.2f}')")×"
echo "incremental sync: mirror median $MSYNC s / rsync $RINC s = $(python3 -c "print(f'{$MSYNC / $RINC:.3f}')")×"
