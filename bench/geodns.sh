#!/usr/bin/env bash
# GeoDNS benchmark (issue 4): gdnsd 3.8 (geoip plugin, auto_dc_coords) and
# Meridian side by side in the same run: same synthetic GeoLite2-City
# database, same 8 datacenters, same dnsperf query file with an ECS option,
# loopback only, bounded by time. Also: agreement on the nearest datacenter
# over 10,000 random IPv4 addresses.
# usage: bench/geodns.sh [SECONDS]   (dnsperf duration per server, default 10)
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
B=$PWD/target/release/meridian
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
echo; echo "== dnsperf -c 4 -T 2 -q 200 -l $SECS, ECS $IP/32 on every query"
for srv in gdnsd:15354 meridian:15355; do
  name=${srv%%:*}; port=${srv#*:}
  dnsperf -s 127.0.0.1 -p "$port" -d "$W/queries" -c 4 -T 2 -q 200 -l "$SECS" -E "8:$HEX" -v 2>/dev/null > "$W/$name.perf" || true
  QPS=$(awk '/Queries per second/ {print $4}' "$W/$name.perf")
  LOST=$(awk '/Queries lost/ {print $3}' "$W/$name.perf")
  awk '$1 == ">" && $NF ~ /^[0-9.]+$/ {print $NF}' "$W/$name.perf" | sort -g > "$W/$name.lat"
  STATS=$(python3 - "$W/$name.lat" <<'PY'
import sys
v = [float(x) for x in open(sys.argv[1]) if x.strip()]
if not v:
    print("no latency samples"); sys.exit()
mean = sum(v) / len(v)
p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
print(f"mean {mean * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us ({len(v)} samples)")
PY
)
  printf '%-9s %10s q/s  lost %s  %s\n' "$name" "$QPS" "$LOST" "$STATS"
done

echo; echo "== nearest-datacenter agreement over 10,000 random addresses (ECS /32)"
python3 bench/dns_agree.py "$W/nets.txt" 10000 15354 15355
echo "meridian geodns peak RSS $(awk '/VmHWM/ {print $2}' /proc/$MPID/status) KiB"
