#!/usr/bin/env bash
# Propagation benchmark (issue 19): a file written and closed in the
# origin's content directory, until every one of the demo's four mirrors
# serves it (sa-east pulls from us-east: two hops). 50 changes, one at a
# time; p50 and p99. Loopback only, bounded (50 changes, 10 s each at most).
# usage: [CHANGES=50] bench/propagation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CHANGES=${CHANGES:-50}
W=$(mktemp -d /var/tmp/meridian-pbench.XXXX)
cleanup() { [ -n "${DEMO:-}" ] && kill "$DEMO" 2>/dev/null; sleep 0.5; rm -rf "$W"; }
trap cleanup EXIT
cargo build --release --bins -q
B=${MERIDIAN_BIN:-$PWD/target/release/meridian}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$B" demo --dir "$W/demo" --origin-port 0 --mirror-port 0 --dns-port 0 --admin-port 0 \
  --status-port 0 --redirect-port 0 --big-file-mib 0 > "$W/demo.log" 2>&1 & DEMO=$!
for _ in $(seq 900); do [ -f "$W/demo/network.json" ] && break; sleep 0.1; done
[ -f "$W/demo/network.json" ] || { echo "demo did not start"; cat "$W/demo.log"; exit 1; }
python3 - "$W/demo/network.json" "$CHANGES" <<'PY'
import json, os, statistics, sys, time, urllib.request
net = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
content = net["content"]
mirrors = list(net["mirrors"].items())
def serves(addr, name, want):
    try:
        with urllib.request.urlopen(f"http://{addr}/bench/{name}", timeout=2) as r:
            return r.read() == want
    except Exception:
        return False
os.makedirs(f"{content}/bench", exist_ok=True)
# The directory itself first, so every change below is one file.
open(f"{content}/bench/.keep", "w").close()
time.sleep(2)
times = []
for i in range(n):
    name, body = f"f{i:03}.txt", f"change {i} {time.time()}\n".encode()
    t0 = time.monotonic()
    with open(f"{content}/bench/{name}", "wb") as f:
        f.write(body)
    left = dict(mirrors)
    while left and time.monotonic() - t0 < 10:
        for region, addr in list(left.items()):
            if serves(addr, name, body):
                del left[region]
        time.sleep(0.005)
    if left:
        print(f"change {i}: not served by {sorted(left)} within 10 s")
        sys.exit(1)
    times.append(time.monotonic() - t0)
times.sort()
p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(f"{n} changes, written and closed -> served on all {len(mirrors)} mirrors:")
print(f"  p50 {statistics.median(times) * 1000:.0f} ms  p90 {p(0.9) * 1000:.0f} ms  p99 {p(0.99) * 1000:.0f} ms  max {times[-1] * 1000:.0f} ms  min {times[0] * 1000:.0f} ms")
PY
