#!/usr/bin/env bash
# Mirror memory before, during and after floods of slow downloads: does RSS
# come back down, or ratchet? Loopback only; every flood is bounded (N
# clients for S seconds).
# usage: bench/rss_after_flood.sh [BINARY] [CLIENTS] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/meridian}; N=${2:-10000}; SECS=${3:-10}; ROUNDS=${4:-3}
W=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
mkdir -p "$W/content"
head -c $((1 << 20)) /dev/urandom > "$W/content/medium.bin"
head -c 4096 /dev/urandom > "$W/content/small.bin"
PK=$($B keygen --out "$W/key" | grep '^ed25519:')
$B origin --content "$W/content" --state "$W/o" --key "$W/key" --listen 127.0.0.1:0 --quiet 0s > "$W/origin.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "origin listening on" "$W/origin.log" && break; sleep 0.1; done
OADDR=$(grep -o 'origin listening on [0-9.:]*' "$W/origin.log" | head -1 | awk '{print $4}')
$B mirror --id rss --upstream "http://$OADDR" --trust "$PK" --state "$W/m" --listen 127.0.0.1:0 --scrub-interval 0s --max-connections-per-client 0 > "$W/mirror.log" 2>&1 & MPID=$!; PIDS+=($MPID)
for _ in $(seq 100); do grep -q "mirror listening on" "$W/mirror.log" && break; sleep 0.1; done
MADDR=$(grep -o 'mirror listening on [0-9.:]*' "$W/mirror.log" | head -1 | awk '{print $4}')
for _ in $(seq 100); do curl -sf "http://$MADDR/medium.bin" -o /dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$MPID/status"; }
peak() { awk '/VmHWM/ {print $2}' "/proc/$MPID/status"; }
echo "== $N slow downloads of 1 MiB for $SECS s, $ROUNDS rounds; mirror RSS in kB"
echo "baseline: $(rss)"
for r in $(seq "$ROUNDS"); do
  python3 bench/slow_clients.py "${MADDR%:*}" "${MADDR##*:}" /medium.bin "$N" "$SECS"
  echo "round $r: peak so far $(peak), at the end $(rss)"
  sleep 12
  echo "round $r: 12 s later $(rss)"
done
