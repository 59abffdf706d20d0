#!/usr/bin/env bash
# Restore benchmark (issue 13): rebuilding a lost origin from a mirror with
# `meridian restore` (every node and blob blake3-verified, content written
# with modes and mtimes, origin state written, hash cache seeded) against
# `rsync -a` of the same tree from an rsync daemon over loopback, in the
# same run, alternating rounds, page cache dropped before each (as root).
# usage: bench/restore.sh [FILES]     (default 100000 files, ~2.1 GB)
#        ROUNDS=3 bench/restore.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
ROUNDS=${ROUNDS:-2}
W=$(mktemp -d /var/tmp/meridian-rbench.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/rsyncd.pid" ] && kill "$(cat "$W/rsyncd.pid")" 2>/dev/null
  sleep 0.5; rm -rf "$W"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
cargo build --release --bins -q
B=$PWD/target/release/meridian
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(rsync --version | head -1)"
wait_log() { for _ in $(seq 3000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $2 in $1"; exit 1; }
addr_of() { grep -o "$2 listening on [0-9.:]*" "$1" | head -1 | awk '{print $NF}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

python3 bench/gen_tree.py "$W/content" "$N"
du -sh --apparent-size "$W/content" | cut -f1 | sed 's/^/tree size: /'
$B keygen --out "$W/key" > "$W/keygen.txt"; PK=$(grep ed25519 "$W/keygen.txt")
$B origin --once --content "$W/content" --state "$W/ostate" --key "$W/key" > /dev/null 2>&1
$B origin --content "$W/content" --state "$W/ostate" --key "$W/key" --listen 127.0.0.1:0 > "$W/origin.log" 2>&1 & OP=$!; PIDS+=($OP)
wait_log "$W/origin.log" "listening on"; OA=$(addr_of "$W/origin.log" origin)
$B mirror --id m --upstream "http://$OA" --trust "$PK" --state "$W/mstate" --listen 127.0.0.1:0 --scrub-interval 0s > "$W/mirror.log" 2>&1 & PIDS+=($!)
wait_log "$W/mirror.log" "is durable"; MA=$(addr_of "$W/mirror.log" mirror)
# The origin is lost: stopped, so its background copying does not compete
# with either side. rsync reads the same tree from the content directory.
kill "$OP"; rm -rf "$W/ostate"; sync
cat > "$W/rsyncd.conf" <<RSYNCD
use chroot = no
pid file = $W/rsyncd.pid
[tree]
  path = $W/content
  read only = yes
RSYNCD
rsync --daemon --config="$W/rsyncd.conf" --port=18731 --address=127.0.0.1; sleep 0.5

secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
# rsync -a does not make what it wrote durable; the restore does (syncfs
# before the content is renamed into place), so rsync is also timed up to
# the end of a `sync` (the same durability).
RS=(); RSS=(); MS=()
for r in $(seq "$ROUNDS"); do
  drop; t0=$(date +%s.%N); rsync -a rsync://127.0.0.1:18731/tree/ "$W/rsync-$r/"; t1=$(date +%s.%N); sync; t2=$(date +%s.%N)
  RS+=("$(secs "$t0" "$t1")"); RSS+=("$(secs "$t0" "$t2")"); echo "round $r: rsync -a           ${RS[-1]} s; with sync ${RSS[-1]} s"
  rm -rf "$W/rsync-$r"
  drop; t0=$(date +%s.%N)
  $B restore --from "http://$MA" --trust "$PK" --content "$W/restored-$r" --state "$W/rstate-$r" > "$W/restore-$r.log" 2>&1
  t1=$(date +%s.%N)
  MS+=("$(secs "$t0" "$t1")")
  FETCH=$(grep -o 'blobs=[0-9]* seconds=[0-9.]*' "$W/restore-$r.log" | head -1 | sed 's/.*seconds=//')
  WRITE=$(grep 'content written and made durable' "$W/restore-$r.log" | grep -o 'seconds=[0-9.]*' | sed 's/seconds=//')
  echo "round $r: meridian restore   ${MS[-1]} s (fetch and verify ${FETCH} s, content and syncfs ${WRITE} s)"
  [ "$r" = 1 ] && { diff -r "$W/content" "$W/restored-1" > /dev/null && echo "round 1: diff -r content restored: identical"; }
  rm -rf "$W/restored-$r" "$W/rstate-$r"; sync
done
python3 - "${RS[*]}" "${RSS[*]}" "${MS[*]}" <<'PY'
import sys, statistics as st
rs, rss, ms = ([float(x) for x in a.split()] for a in sys.argv[1:4])
m = st.median(ms)
print(f"median: rsync -a {st.median(rs):.2f} s (with sync {st.median(rss):.2f} s), meridian restore {m:.2f} s")
print(f"ratio restore/rsync -a {m/st.median(rs):.2f}; restore/(rsync -a + sync) {m/st.median(rss):.2f}")
PY
