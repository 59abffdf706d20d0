#!/usr/bin/env bash
# Redirector benchmark (issue 15): redirects per second and p99 latency,
# Meridian's redirector (a per-file lookup in the verified tree, per-file
# mirror choice, Link headers) against nginx answering a static
# `return 302` on the same machine, in the same run, rounds alternating.
# The same wrk client and Lua script (random paths among 1,000 of a
# 10,000-file tree in 100 directories) for both; loopback only; bounded by
# time. Needs: nginx, wrk (apt-get install nginx wrk).
# usage: [ROUNDS=4] [PERF=file] bench/redirect.sh [SECONDS]
#   (PERF: perf record -g of the redirector during its first round, to file)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SECS=${1:-5}
ROUNDS=${ROUNDS:-4}
W=$(mktemp -d /var/tmp/meridian-rbench.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
cargo build --release --bins -q
B=${MERIDIAN_BIN:-$PWD/target/release/meridian}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1)"

wait_log() { for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $2 in $1"; exit 1; }
addr_of() { grep -o "$2 listening on [0-9.:]*" "$1" | head -1 | awk '{print $NF}'; }
gen_of() { curl -s "http://$1/.meridian/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }

# A 10,000-file tree (small files: the lookup, not the bytes, is measured).
python3 - "$W/content" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    os.makedirs(f"{root}/d{d:02}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/d{d:02}/f{d * 100 + f:05}.bin", "wb") as fh:
            fh.write(f"{d}/{f}\n".encode())
PY
python3 - "$W/paths.lua" <<'PY'
import random, sys
random.seed(7)
paths = [f"/d{(n // 100):02}/f{n:05}.bin" for n in random.sample(range(10000), 1000)]
with open(sys.argv[1], "w") as f:
    f.write("local paths = {" + ",".join(f'"{p}"' for p in paths) + "}\n")
    f.write("local i = 0\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format('GET', paths[i])\nend\n")
PY

$B keygen --out "$W/key" > "$W/keygen.txt"; PK=$(grep ed25519 "$W/keygen.txt")
$B origin --content "$W/content" --state "$W/ostate" --key "$W/key" --listen 127.0.0.1:0 > "$W/origin.log" 2>&1 & PIDS+=($!)
wait_log "$W/origin.log" "listening on"; OADDR=$(addr_of "$W/origin.log" origin)
for i in 1 2 3 4; do
  $B mirror --id "m$i" --upstream "http://$OADDR" --trust "$PK" --state "$W/m$i" --listen "127.0.10.$i:18090" --scrub-interval 0s > "$W/m$i.log" 2>&1 & PIDS+=($!)
done
for i in 1 2 3 4; do
  for _ in $(seq 1200); do [ "$(gen_of "127.0.10.$i:18090" 2>/dev/null || echo 0)" -ge 1 ] && break; sleep 0.25; done
done
{
  echo 'listen = ["127.0.0.1:0"]'
  echo '[[zones]]'; echo 'name = "meridian.test"'; echo 'ns = ["ns1.meridian.test."]'
  echo '[health]'; echo 'interval = "1s"'
  echo '[[overrides]]'; echo 'network = "127.0.0.0/8"'; echo 'latitude = 51.5'; echo 'longitude = -0.1'
  echo '[redirector]'; echo 'listen = "127.0.0.1:18095"'
  echo "upstreams = [\"http://$OADDR\"]"; echo "trust = [\"$PK\"]"
  i=1
  for c in "51.5 -0.1 gb" "50.1 8.7 de" "39.0 -77.5 us" "-6.2 106.8 id"; do
    set -- $c
    printf '[[mirrors]]\nid = "m%s"\nlatitude = %s\nlongitude = %s\ncountry = "%s"\nipv4 = ["127.0.10.%s"]\nstatus_url = "http://127.0.10.%s:18090/.meridian/status"\n' "$i" "$1" "$2" "$3" "$i" "$i"
    i=$((i + 1))
  done
} > "$W/geodns.toml"
MERIDIAN_LOG=warn $B geodns --config "$W/geodns.toml" > "$W/geodns.log" 2>&1 & GPID=$!; PIDS+=($GPID)
# Until all four mirrors are in the redirect (the target and 3 duplicates).
for _ in $(seq 600); do
  [ "$(curl -s -o /dev/null -D - http://127.0.0.1:18095/d00/f00000.bin | grep -ci 'rel=duplicate')" = 3 ] && break; sleep 0.1
done
echo "meridian: $(curl -s -o /dev/null -D - http://127.0.0.1:18095/d00/f00000.bin | grep -ci '^link:') Link headers, $(curl -s -o /dev/null -D - http://127.0.0.1:18095/d00/f00000.bin | wc -c) bytes of head per redirect"

cat > "$W/nginx.conf" <<NGINX
user root;
worker_processes auto;
pid $W/nginx.pid;
error_log $W/nginx-error.log;
events { worker_connections 20000; }
worker_rlimit_nofile 65536;
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:18096; location / { return 302 http://127.0.10.1:18090\$request_uri; } }
}
NGINX
nginx -c "$W/nginx.conf" -p "$W"; sleep 0.5
echo "nginx: $(curl -s -o /dev/null -D - http://127.0.0.1:18096/d00/f00000.bin | wc -c) bytes of head per redirect"

echo; echo "== wrk -t2 -c64 -d${SECS}s --latency, random paths among 1,000; $ROUNDS rounds alternating, median"
# The server's own CPU time (user + system, all its processes), in clock
# ticks: CPU per request is less moved than req/s by what else the VM runs.
NGINX_PIDS="$(cat "$W/nginx.pid") $(pgrep -P "$(cat "$W/nginx.pid")" | xargs)"
ticks() { for p in $1; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{s += $1} END {print s}'; }
HZ=$(getconf CLK_TCK)
declare -A RPS P99 CPU
for r in $(seq 1 "$ROUNDS"); do
  for name in meridian:18095 nginx:18096; do
    if [ -n "${PERF:-}" ] && [ "$r" = 1 ] && [ "${name%%:*}" = meridian ]; then
      perf record -g -o "$PERF" -p "$GPID" -- sleep "$SECS" > /dev/null 2>&1 &
    fi
    if [ "${name%%:*}" = meridian ]; then P=$GPID; else P=$NGINX_PIDS; fi
    t0=$(ticks "$P")
    out=$(wrk -t2 -c64 -d"${SECS}s" --latency -s "$W/paths.lua" "http://127.0.0.1:${name#*:}/")
    t1=$(ticks "$P")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    us=$(python3 -c "print(f'{($t1 - $t0) / $HZ * 1e6 / $n:.2f}')")
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    non3xx=$(echo "$out" | awk '/Non-2xx or 3xx/ {print $NF}')
    RPS[${name%%:*}]="${RPS[${name%%:*}]:-} $rps"; P99[${name%%:*}]="${P99[${name%%:*}]:-} $p99"; CPU[${name%%:*}]="${CPU[${name%%:*}]:-} $us"
    printf '  round %s %-9s %10s req/s  p99 %8s  CPU %6s us/request  %s\n' "$r" "${name%%:*}" "$rps" "$p99" "$us" "${non3xx:+(non-3xx: $non3xx)}"
  done
done
for name in meridian nginx; do
  printf '%-9s median CPU %.2f us/request\n' "$name" "$(median ${CPU[$name]})"
done
for name in meridian nginx; do
  printf '%-9s median %10.0f req/s  p99s: %s\n' "$name" \
    "$(median ${RPS[$name]})" "${P99[$name]}"
done
# Each round's pair ran back to back: the median of the per-round ratios
# is the figure least moved by the VM's drift.
read -r -a M <<< "${RPS[meridian]}"; read -r -a N <<< "${RPS[nginx]}"
RATIOS=$(for i in "${!M[@]}"; do python3 -c "print(f'{${M[$i]} / ${N[$i]}:.3f}')"; done | xargs)
echo "meridian/nginx per round: $RATIOS; median $(python3 -c "print(f'{$(median $RATIOS):.3f}')")"
echo "meridian geodns peak RSS $(awk '/VmHWM/ {print $2}' /proc/$GPID/status) KiB"
