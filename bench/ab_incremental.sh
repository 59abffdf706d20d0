#!/usr/bin/env bash
# A/B of the mirror's incremental sync between two builds of meridian (for
# a change on the sync path): one binary at a time, an origin and a mirror
# on loopback over the same 100,000-file tree, 100 files changed in one
# burst per round, ROUNDS rounds per binary, PASSES passes alternating the
# binaries. Prints the mirror's own sync seconds for each round.
# usage: [ROUNDS=5] [PASSES=2] bench/ab_incremental.sh BINARY_A BINARY_B
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:?usage: bench/ab_incremental.sh BINARY_A BINARY_B}; Bb=${2:?usage: bench/ab_incremental.sh BINARY_A BINARY_B}
ROUNDS=${ROUNDS:-5}; PASSES=${PASSES:-2}
W=$(mktemp -d /var/tmp/meridian-abinc.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
python3 bench/gen_tree.py "$W/content" 100000 2>/dev/null
PK=$("$A" keygen --out "$W/key" 2>&1 | grep -o 'ed25519:[0-9a-f]*' | head -1)
served() { grep -c "now serving generation" "$1" || true; }
for pass in $(seq "$PASSES"); do
  for which in A B; do
    if [ "$which" = A ]; then B=$A; else B=$Bb; fi
    D=$W/$which-$pass; mkdir -p "$D"
    "$B" origin --once --content "$W/content" --state "$D/ostate" --key "$W/key" > /dev/null 2>&1
    "$B" origin --content "$W/content" --state "$D/ostate" --key "$W/key" --listen 127.0.0.1:0 --quiet 200ms > "$D/origin.log" 2>&1 & OP=$!; PIDS+=($OP)
    for _ in $(seq 100); do grep -q "listening on" "$D/origin.log" && break; sleep 0.1; done
    OA=$(grep -o 'listening on [0-9.:]*' "$D/origin.log" | head -1 | awk '{print $3}')
    "$B" mirror --id m --upstream "http://$OA" --trust "$PK" --state "$D/m" --listen 127.0.0.1:0 --scrub-interval 0s > "$D/m.log" 2>&1 & MP=$!; PIDS+=($MP)
    for _ in $(seq 600); do [ "$(served "$D/m.log")" -gt 0 ] && break; sleep 0.1; done
    sleep 2
    for round in $(seq "$ROUNDS"); do
      n=$(served "$D/m.log")
      python3 - "$W/content" "$pass$which$round" <<'PY'
import sys
root, tag = sys.argv[1], sys.argv[2]
for i in range(0, 100000, 1000):
    with open(f"{root}/dir{i//1000:03d}/file{i:06d}.bin", "ab") as f:
        f.write(f"changed {tag} {i}".encode())
PY
      for _ in $(seq 200); do [ "$(served "$D/m.log")" -gt "$n" ] && break; sleep 0.05; done
      sleep 1
    done
    echo "$which pass $pass ($B): $(grep 'now serving generation' "$D/m.log" | tail -"$ROUNDS" | grep -o 'blobs=[0-9]* seconds=[0-9.]*' | tr '\n' ' ')"
    kill "$OP" "$MP"; wait "$OP" "$MP" 2>/dev/null || true
  done
done
