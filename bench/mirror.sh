#!/usr/bin/env bash
# Mirror benchmarks (issue 3), Meridian and its peer in the same run, same
# files, same client, loopback only, every load bounded:
#   1. single-stream download of a 1 GiB file (curl)      vs nginx (sendfile on)
#   2. requests/s for a 4 KiB file (wrk, 64 connections)   vs nginx
#   3. peak RSS with 10,000 concurrent slow downloads      vs nginx
#   4. full initial sync, 10,000 files / ~2 GiB            vs rsync daemon (rsync -a)
#   5. incremental sync, 100,000 files, 100 changed        vs rsync -a --delete
# usage: bench/mirror.sh [quick]   (quick: smaller trees, for a smoke run)
#        ONLY=serve|repl|full|inc bench/mirror.sh   (just the serving part, the
#        replication part, or one replication figure)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
QUICK=${1:-}
W=$(mktemp -d /var/tmp/meridian-mbench.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/repl/rsyncd.pid" ] && kill "$(cat "$W/repl/rsyncd.pid")" 2>/dev/null
  sleep 0.5; rm -rf "$W"
}
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT   # KEEP=1: leave the work directory and servers for inspection
ulimit -n 65536 2>/dev/null || ulimit -n 20000
cargo build --release --bins -q
B=${MERIDIAN_BIN:-$PWD/target/release/meridian}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nginx -v 2>&1); $(rsync --version | head -1)"

wait_log() { for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $2 in $1"; exit 1; }
addr_of() { grep -o "$2 listening on [0-9.:]*" "$1" | head -1 | awk '{print $NF}'; }
gen_of() { curl -s "http://$1/.meridian/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }
metric() { curl -s "http://$1/.meridian/metrics" | awk -v m="$2" '$1==m {print $2}'; }
rss_peak() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

# ---------- serving: one tree, served by nginx and by a Meridian mirror ----------
S=$W/serve; mkdir -p "$S/content"
$B keygen --out "$S/key" > "$S/keygen.txt"; PK=$(grep ed25519 "$S/keygen.txt")
if [ "${ONLY:-all}" = all ] || [ "${ONLY:-all}" = serve ]; then
head -c $((1024 * 1024 * 1024)) /dev/zero | tr '\0' 'M' > "$S/content/big.img"
head -c 4096 /dev/urandom > "$S/content/small.bin"
head -c $((1024 * 1024)) /dev/urandom > "$S/content/medium.bin"
$B origin --once --content "$S/content" --state "$S/ostate" --key "$S/key" > /dev/null 2>&1
$B origin --content "$S/content" --state "$S/ostate" --key "$S/key" --listen 127.0.0.1:0 > "$S/origin.log" 2>&1 & PIDS+=($!)
wait_log "$S/origin.log" "listening on"; OADDR=$(addr_of "$S/origin.log" origin)
$B mirror --id bench --upstream "http://$OADDR" --trust "$PK" --state "$S/mstate" --listen 127.0.0.1:18090 --scrub-interval 0s --max-connections-per-client 0 > "$S/mirror.log" 2>&1 & MPID=$!; PIDS+=($MPID)
for _ in $(seq 1200); do [ "$(gen_of 127.0.0.1:18090 2>/dev/null || echo 0)" -ge 1 ] && break; sleep 0.25; done
cat > "$S/nginx.conf" <<NGINX
user root;
worker_processes auto;
pid $S/nginx.pid;
error_log $S/nginx-error.log;
events { worker_connections 20000; }
worker_rlimit_nofile 65536;
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    server { listen 127.0.0.1:18091; root $S/content; }
}
NGINX
nginx -c "$S/nginx.conf" -p "$S"; sleep 0.5
PIDS+=($(cat "$S/nginx.pid"))

echo; echo "== 1. single-stream 1 GiB download (curl -o /dev/null), 5 rounds alternating, median"
declare -A SPEED
for r in 1 2 3 4 5; do
  for name in meridian:18090 nginx:18091; do
    s=$(curl -s -o /dev/null -w '%{speed_download}' "http://127.0.0.1:${name#*:}/big.img")
    SPEED[${name%%:*}]="${SPEED[${name%%:*}]:-} $s"
    printf '  round %s %-9s %8.0f MB/s\n' "$r" "${name%%:*}" "$(python3 -c "print($s/1e6)")"
  done
done
for name in meridian nginx; do
  printf '%-9s median %8.0f MB/s\n' "$name" "$(python3 -c "print($(median ${SPEED[$name]}) / 1e6)")"
done

echo; echo "== 2. 4 KiB file, wrk -t2 -c64 -d5s, 4 rounds alternating (the VM drifts), median"
declare -A RPS
for r in 1 2 3 4; do
  for name in meridian:18090 nginx:18091; do
    rps=$(wrk -t2 -c64 -d5s "http://127.0.0.1:${name#*:}/small.bin" | awk '/Requests\/sec/ {print $2}')
    RPS[${name%%:*}]="${RPS[${name%%:*}]:-} $rps"
    printf '  round %s %-9s %10s req/s\n' "$r" "${name%%:*}" "$rps"
  done
done
for name in meridian nginx; do
  printf '%-9s median %10.0f req/s\n' "$name" "$(median ${RPS[$name]})"
done

echo; echo "== 3. 10,000 concurrent slow downloads of a 1 MiB file for 20 s: peak RSS"
python3 bench/slow_clients.py 127.0.0.1 18090 /medium.bin 10000 20
echo "meridian  peak RSS $(rss_peak $MPID) KiB (one process)"
nginx -s stop -c "$S/nginx.conf" -p "$S" 2>/dev/null || true; sleep 0.5
nginx -c "$S/nginx.conf" -p "$S"; sleep 0.5
python3 bench/slow_clients.py 127.0.0.1 18091 /medium.bin 10000 20
# The master (its pid file) and its workers (its children: their command
# line is "nginx: worker process", which names no config file).
master=$(cat "$S/nginx.pid"); tot=0; n=0
for p in "$master" $(pgrep -P "$master"); do tot=$((tot + $(rss_peak "$p"))); n=$((n + 1)); done
echo "nginx     peak RSS $tot KiB (master + $((n - 1)) workers, each process's peak, summed)"
nginx -s stop -c "$S/nginx.conf" -p "$S" 2>/dev/null || true
kill $MPID; rm -rf "$S/mstate"
fi
[ "${ONLY:-all}" = serve ] && exit 0

# ---------- replication ----------
R=$W/repl; mkdir -p "$R"
if [ "$QUICK" = quick ]; then N_FULL=1000; N_INC=10000; else N_FULL=10000; N_INC=100000; fi
cat > "$R/rsyncd.conf" <<RSYNCD
use chroot = no
pid file = $R/rsyncd.pid
[full]
  path = $R/full
  read only = yes
[inc]
  path = $R/inc
  read only = yes
RSYNCD

if [ "${ONLY:-all}" != inc ]; then
echo; echo "== 4. full initial sync, $N_FULL files"
python3 - "$R/full" "$N_FULL" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
pool = os.urandom(1 << 22)
for i in range(n):
    d = os.path.join(root, f"d{i // 500:03d}"); os.makedirs(d, exist_ok=True)
    size = 1024 + (i * 7919) % (2 * 214_000)    # average ~210 KiB: ~2 GiB for 10,000 files
    off = (i * 104729) % (len(pool) - size)
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(i.to_bytes(8, "little") + pool[off:off + size - 8])
PY
du -sh --apparent-size "$R/full" | cut -f1 | sed 's/^/tree size: /'
rsync --daemon --config="$R/rsyncd.conf" --port=18730 --address=127.0.0.1; sleep 0.5
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
rsync_full() {  # $1: target dir name, then extra rsync options
  local d=$1; shift
  drop; local t0 t1; t0=$(date +%s.%N); rsync -a "$@" rsync://127.0.0.1:18730/full/ "$R/$d/"; t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.2f}')"
}
# Prints the seconds until the mirror serves the generation, and (second
# word) until the flusher has made it durable on disk.
mirror_full() {  # $1: origin address, $2: state dir name
  drop; local t0 t1 t2; t0=$(date +%s.%N)
  $B mirror --id full --upstream "http://$1" --trust "$PK" --state "$R/$2" --listen 127.0.0.1:0 --scrub-interval 0s > "$R/$2.log" 2>&1 & MP=$!; PIDS+=($MP)
  wait_log "$R/$2.log" "now serving generation"; t1=$(date +%s.%N)
  wait_log "$R/$2.log" "is durable"; t2=$(date +%s.%N); kill $MP
  python3 -c "print(f'{$t1-$t0:.2f} {$t2-$t0:.2f}')"
}
# The origin publishes with link snapshots (hash in place) and makes its
# private copies in the background. Steady state: those copies exist (the
# copier has finished) before the mirror starts, as they do for every
# generation but the very first seconds after a publish.
$B origin --once --content "$R/full" --state "$R/ostate-full" --key "$S/key" > /dev/null 2>&1
$B origin --content "$R/full" --state "$R/ostate-full" --key "$S/key" --listen 127.0.0.1:0 > "$R/origin-full.log" 2>&1 & OP=$!; PIDS+=($OP)
wait_log "$R/origin-full.log" "listening on"; OA=$(addr_of "$R/origin-full.log" origin)
wait_log "$R/origin-full.log" "made private copies"
RS1=$(rsync_full rsync-full1); echo "rsync -a                      $RS1 s"
read -r MS MD <<< "$(mirror_full "$OA" m-full)"
echo "meridian mirror               $MS s serving (every blob blake3-verified, switched atomically); durable on disk at $MD s"
RS2=$(rsync_full rsync-full2); echo "rsync -a (again)              $RS2 s"
RSF=$(rsync_full rsync-full3 --fsync); echo "rsync -a --fsync              $RSF s (for the durable figure)"
RS=$(python3 -c "print(f'{($RS1 + $RS2) / 2:.2f}')")
echo "ratio meridian/rsync (mean of the two rsync -a runs): $(python3 -c "print(f'{$MS/$RS:.2f}')"); durable vs rsync --fsync: $(python3 -c "print(f'{$MD/$RSF:.2f}')")"
kill $OP
# Cold: the mirror starts the moment the first generation is published,
# so the origin makes each private copy as the mirror first asks for it.
$B origin --once --content "$R/full" --state "$R/ostate-cold" --key "$S/key" > /dev/null 2>&1
$B origin --content "$R/full" --state "$R/ostate-cold" --key "$S/key" --listen 127.0.0.1:0 > "$R/origin-cold.log" 2>&1 & OP=$!; PIDS+=($OP)
wait_log "$R/origin-cold.log" "listening on"; OA=$(addr_of "$R/origin-cold.log" origin)
read -r MC _ <<< "$(mirror_full "$OA" m-cold)"
echo "meridian mirror, cold origin  $MC s (copies made on first read): ratio $(python3 -c "print(f'{$MC/$RS:.2f}')")"
rm -rf "$R/rsync-full1" "$R/rsync-full2" "$R/rsync-full3" "$R/m-full" "$R/m-cold" "$R/ostate-cold"
kill $OP
fi

[ "${ONLY:-all}" = full ] && exit 0
rsync --daemon --config="$R/rsyncd.conf" --port=18730 --address=127.0.0.1 2>/dev/null || true; sleep 0.5
echo; echo "== 5. incremental sync, $N_INC files, 100 changed"
python3 bench/gen_tree.py "$R/inc" "$N_INC" 2>/dev/null
rsync -a rsync://127.0.0.1:18730/inc/ "$R/rsync-inc/"
$B origin --once --content "$R/inc" --state "$R/ostate-inc" --key "$S/key" > /dev/null 2>&1
$B origin --content "$R/inc" --state "$R/ostate-inc" --key "$S/key" --listen 127.0.0.1:0 --quiet 200ms > "$R/origin-inc.log" 2>&1 & OP=$!; PIDS+=($OP)
wait_log "$R/origin-inc.log" "listening on"; OA=$(addr_of "$R/origin-inc.log" origin)
$B mirror --id inc --upstream "http://$OA" --trust "$PK" --state "$R/m-inc" --listen 127.0.0.1:18092 --scrub-interval 0s > "$R/m-inc.log" 2>&1 & MP=$!; PIDS+=($MP)
wait_log "$R/m-inc.log" "now serving generation"
G0=$(gen_of 127.0.0.1:18092); B0=$(metric 127.0.0.1:18092 meridian_mirror_bytes_fetched_total)
S0=$(metric 127.0.0.1:18092 meridian_mirror_sync_seconds_sum)
step=$((N_INC / 100))
for i in $(seq 0 "$step" $((N_INC - 1)) | head -100); do printf 'changed %s' "$i" >> "$R/inc/dir$(printf %03d $((i / 1000)))/file$(printf %06d "$i").bin"; done
t0=$(date +%s.%N)
for _ in $(seq 600); do [ "$(gen_of 127.0.0.1:18092)" -gt "$G0" ] && break; sleep 0.05; done
t1=$(date +%s.%N)
B1=$(metric 127.0.0.1:18092 meridian_mirror_bytes_fetched_total); S1=$(metric 127.0.0.1:18092 meridian_mirror_sync_seconds_sum)
MSYNC=$(python3 -c "print(f'{$S1-$S0:.3f}')"); MBYTES=$(python3 -c "print(int($B1-$B0))")
echo "meridian mirror sync $MSYNC s, $MBYTES bytes (end to end incl. 200 ms quiet period and publish: $(python3 -c "print(f'{$t1-$t0:.2f}')") s)"
t0=$(date +%s.%N); OUT=$(rsync -a --delete --stats rsync://127.0.0.1:18730/inc/ "$R/rsync-inc/"); t1=$(date +%s.%N)
RBYTES=$(echo "$OUT" | awk -F: '/Total bytes received/ {gsub(/[ ,]/,"",$2); r=$2} /Total bytes sent/ {gsub(/[ ,]/,"",$2); s=$2} END {print r+s}')
RT=$(python3 -c "print(f'{$t1-$t0:.3f}')")
echo "rsync -a --delete    $RT s, $RBYTES bytes"
echo "ratio meridian/rsync: time $(python3 -c "print(f'{$MSYNC/$RT:.3f}')"), bytes $(python3 -c "print(f'{$MBYTES/$RBYTES:.3f}')")"
kill $MP $OP
kill "$(cat "$R/rsyncd.pid")" 2>/dev/null || true
