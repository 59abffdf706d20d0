#!/usr/bin/env bash
# `meridian get` benchmark (issue 16): four mirrors, each held to an egress
# cap of R bytes/s, and one file; `meridian get` (every 256 KiB block
# verified against the signed root) against `aria2c -x4 -s4` given the same
# four mirror URLs, rounds alternating, in the same run. Loopback only,
# bounded by the file size and the cap.
# Needs: aria2 (apt-get install aria2).
# usage: [ROUNDS=3] [RATE=25000000] [MIB=256] bench/get.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-25000000}
MIB=${MIB:-256}
W=$(mktemp -d /var/tmp/meridian-gbench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
cargo build --release --bins -q
B=${MERIDIAN_BIN:-$PWD/target/release/meridian}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(aria2c --version | head -1)"
wait_log() { for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $2 in $1"; exit 1; }
addr_of() { grep -o "$2 listening on [0-9.:]*" "$1" | head -1 | awk '{print $NF}'; }

mkdir -p "$W/content"
head -c $((MIB << 20)) /dev/urandom > "$W/content/big.bin"
$B keygen --out "$W/key" > "$W/keygen.txt"; PK=$(grep -o 'ed25519:[0-9a-f]*' "$W/keygen.txt")
$B origin --content "$W/content" --state "$W/ostate" --key "$W/key" --listen 127.0.0.1:0 > "$W/origin.log" 2>&1 & PIDS+=($!)
wait_log "$W/origin.log" "listening on"; OADDR=$(addr_of "$W/origin.log" origin)
URLS=(); MIRRORS=()
for i in 1 2 3 4; do
  $B mirror --id "m$i" --upstream "http://$OADDR" --trust "$PK" --state "$W/m$i" --listen "127.0.10.$i:18190" \
    --egress-cap "$RATE" --scrub-interval 0s > "$W/m$i.log" 2>&1 & PIDS+=($!)
  URLS+=("http://127.0.10.$i:18190/big.bin"); MIRRORS+=(--mirror "http://127.0.10.$i:18190")
done
# Until every mirror serves the file (a just-written file waits out the
# origin's quiet period first).
for i in 1 2 3 4; do
  for _ in $(seq 2400); do curl -sf -o /dev/null -r 0-0 "http://127.0.10.$i:18190/big.bin" && break; sleep 0.25; done
done
WANT=$(b3sum --no-names "$W/content/big.bin")
echo "== ${MIB} MiB from 4 mirrors, each capped at $RATE B/s (R); 4R = $((4 * RATE)) B/s; $ROUNDS rounds alternating"
declare -A T
for r in $(seq 1 "$ROUNDS"); do
  for tool in meridian aria2c; do
    rm -rf "$W/out"; mkdir -p "$W/out"
    t0=$(date +%s.%N)
    if [ $tool = meridian ]; then
      "$B" get --trust "$PK" "${MIRRORS[@]}" -o "$W/out/big.bin" big.bin
    else
      aria2c -q -x4 -s4 --min-split-size=1M --file-allocation=none --allow-overwrite=true -d "$W/out" -o big.bin "${URLS[@]}"
    fi
    t1=$(date +%s.%N)
    got=$(b3sum --no-names "$W/out/big.bin")
    [ "$got" = "$WANT" ] || { echo "$tool wrote wrong bytes"; exit 1; }
    s=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
    T[$tool]="${T[$tool]:-} $s"
    printf '  round %s %-9s %7ss  %7.1f MB/s  %.2f R\n' "$r" "$tool" "$s" \
      "$(python3 -c "print(($MIB << 20) / $s / 1e6)")" "$(python3 -c "print(($MIB << 20) / $s / $RATE)")"
  done
done
for tool in meridian aria2c; do
  m=$(median ${T[$tool]})
  printf '%-9s median %.3fs  %.1f MB/s  %.2f R\n' "$tool" "$m" \
    "$(python3 -c "print(($MIB << 20) / $m / 1e6)")" "$(python3 -c "print(($MIB << 20) / $m / $RATE)")"
done
echo "meridian/aria2c throughput: $(python3 -c "print(f'{$(median ${T[aria2c]}) / $(median ${T[meridian]}):.3f}')")x"
