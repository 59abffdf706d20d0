#!/usr/bin/env bash
# GeoDNS benchmark (issue 4): gdnsd 3.8 (geoip plugin, auto_dc_coords) and
# Meridian side by side in the same run: same synthetic GeoLite2-City
# database, same 8 datacenters, same dnsperf query file with an ECS option,
# loopback only, bounded by time. Also: agreement on the nearest datacenter
# over 10,000 random IPv4 addresses.
# usage: [ROUNDS=5] [MERIDIAN_BIN=...] bench/geodns.sh [SECONDS]   (dnsperf duration per server
# and round, default 10; the servers alternate round by round)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
W=$(mktemp -d /var/tmp/meridian-dnsbench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; pkill -f "gdnsd -c $W" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
cargo build --release --bins -q
cargo build --release -q -p meridian-geodns --example gen_geoip
B=${MERIDIAN_BIN:-$PWD/target/release/meridian}   # MERIDIAN_BIN: another build, for an A/B
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(gdnsd -c /nonexistent checkconf 2>&1 | grep -o 'gdnsd version [0-9.]*' | head -1); dnsperf $(dnsperf 2>&1 | grep -o 'Version [0-9.]*')"
mkdir -p "$W/gdnsd/zones" "$W/gdnsd/geoip" "$W/status"
target/release/examples/gen_geoip "$W/gdnsd/geoip/city.mmdb" "$W/nets.txt" 5000 7
DCS=("jkt -6.2 106.8" "lon 51.5 -0.1" "iad 39.0 -77.5" "gru -23.5 -46.6" "fra 50.1 8.7" "nrt 35.7 139.7" "syd -33.9 151.2" "bom 19.1 72.9")

# gdnsd: city-auto-mode with the 8 datacenters, 2 addresses per answer.
{
  echo 'options => { listen => [ 127.0.0.1:15354 ], edns_client_subnet => true }'
  echo 'plugins => { geoip => { maps => { world => { geoip2_db => city.mmdb, auto_dc_limit => 2'
  printf '  datacenters => ['; for d in "${DCS[@]}"; do printf '%s, ' "${d%% *}"; done; echo ']'
  echo '  auto_dc_coords => {'; for d in "${DCS[@]}"; do set -- $d; echo "    $1 => [ $2, $3 ]"; done; echo '  } } }'
  echo '  resources => { dl => { map => world, dcmap => {'; i=1; for d in "${DCS[@]}"; do echo "    ${d%% *} => 127.0.10.$i"; i=$((i+1)); done; echo '  } } } } }'
} > "$W/gdnsd/config"
printf '@ 60 SOA ns1 hostmaster 1 3600 600 604800 60\n@ 86400 NS ns1\nns1 86400 A 127.0.0.1\ndl 30 DYNA geoip!dl\n' > "$W/gdnsd/zones/meridian.test"
gdnsd -c "$W/gdnsd" start > "$W/gdnsd.log" 2>&1 &
PIDS+=($!)

# Meridian: the same datacenters as mirrors, each "healthy" via a static
# status document, nearest-only band so the answer is the nearest like gdnsd's.
# One status server per mirror, as in production (one host each).
for i in $(seq 1 ${#DCS[@]}); do
  python3 -m http.server $((18100 + i)) --bind 127.0.0.1 --directory "$W/status" > /dev/null 2>&1 &
  PIDS+=($!)
done
{
  echo "listen = [\"127.0.0.1:15355\"]"; echo "udp_threads = ${UDP_THREADS:-0}"
  echo "geoip = \"$W/gdnsd/geoip/city.mmdb\""
  echo "[selection]"; echo "answers = 2"; echo "band = 1.0"; echo "band_km = 0.0"
  echo "[health]"; echo "interval = \"1s\""; echo "timeout = \"500ms\""
  echo "[[zones]]"; echo "name = \"meridian.test\""; echo "ns = [\"ns1.meridian.test.\"]"
  i=1
  for d in "${DCS[@]}"; do
    set -- $d
    echo "{\"generation\": 1, \"capacity_bytes_per_sec\": 1000000000}" > "$W/status/$1.json"
    printf '[[mirrors]]\nid = "%s"\nlatitude = %s\nlongitude = %s\nipv4 = ["127.0.10.%s"]\nstatus_url = "http://127.0.0.1:%s/%s.json"\n' "$1" "$2" "$3" "$i" "$((18100 + i))" "$1"
    i=$((i+1))
  done
} > "$W/meridian.toml"
MERIDIAN_LOG=warn $B geodns --config "$W/meridian.toml" > "$W/meridian.log" 2>&1 &
MPID=$!; PIDS+=($MPID)
sleep 3
for p in 15354 15355; do dig @127.0.0.1 -p $p dl.meridian.test +short +subnet=81.2.69.0/24 > /dev/null || { echo "server on $p not answering"; exit 1; }; done

# One ECS'd query, repeated; the ECS address is inside a database network.
NET=$(head -1 "$W/nets.txt"); IP=${NET%/*}
HEX=$(python3 -c "import socket,sys; print('0001' + '20' + '00' + socket.inet_aton('$IP').hex())")
python3 -c "import sys; sys.stdout.write('dl.meridian.test A\\n' * 100000)" > "$W/queries"
ROUNDS=${ROUNDS:-5}
echo; echo "== dnsperf -c 4 -T 2 -q 200 -l $SECS, ECS $IP/32 on every query; $ROUNDS rounds, the servers alternating (this VM drifts by tens of percent over a minute, so one long run each is not a fair comparison)"
GPID=$(pgrep -of "gdnsd -c $W")
# Server CPU (user + system clock ticks) spent per answered query: less
# sensitive to the VM's drift than queries/s, since both share 2 cores with
# dnsperf.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for r in $(seq 1 "$ROUNDS"); do
  for srv in gdnsd:15354:$GPID meridian:15355:$MPID; do
    IFS=: read -r name port pid <<< "$srv"
    t0=$(ticks "$pid")
    dnsperf -s 127.0.0.1 -p "$port" -d "$W/queries" -c 4 -T 2 -q 200 -l "$SECS" -E "8:$HEX" -v 2>/dev/null > "$W/$name.$r.perf" || true
    t1=$(ticks "$pid")
    done_q=$(awk '/Queries completed/ {print $3}' "$W/$name.$r.perf")
    cpu=$(python3 -c "print(f'{($t1 - $t0) * 1e6 / $(getconf CLK_TCK) / max(1, $done_q):.2f}')")
    echo "$cpu" > "$W/$name.$r.cpu"
    printf '  round %s %-9s %10s q/s  %s us server CPU per query\n' "$r" "$name" "$(awk '/Queries per second/ {print $4}' "$W/$name.$r.perf")" "$cpu"
  done
done
for name in gdnsd meridian; do
  cat "$W/$name".*.perf | awk '$1 == ">" && $NF ~ /^[0-9.]+$/ {print $NF}' | sort -g > "$W/$name.lat"
  STATS=$(python3 - "$W/$name.lat" "$W"/$name.*.perf <<'PY'
import re, statistics, sys
v = [float(x) for x in open(sys.argv[1]) if x.strip()]
qps, lost = [], 0
for f in sys.argv[2:]:
    t = open(f).read()
    m = re.search(r"Queries per second:\s+([0-9.]+)", t)
    if m:
        qps.append(float(m.group(1)))
    m = re.search(r"Queries lost:\s+([0-9]+)", t)
    lost += int(m.group(1)) if m else 0
if not v or not qps:
    print("no samples"); sys.exit()
mean = sum(v) / len(v)
p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
cpu = [float(open(f[:-5] + ".cpu").read()) for f in sys.argv[2:]]
print(f"median {statistics.median(qps):10.0f} q/s (min {min(qps):.0f}, max {max(qps):.0f})  lost {lost}  mean {mean * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us ({len(v)} samples)  CPU/query median {statistics.median(cpu):.2f} us")
PY
)
  printf '%-9s %s\n' "$name" "$STATS"
done

echo; echo "== nearest-datacenter agreement over 10,000 random addresses (ECS /32)"
python3 bench/dns_agree.py "$W/nets.txt" 10000 15354 15355
echo "meridian geodns peak RSS $(awk '/VmHWM/ {print $2}' /proc/$MPID/status) KiB"
