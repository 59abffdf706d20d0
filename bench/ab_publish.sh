#!/usr/bin/env bash
# A/B of the origin's first publish between two builds of meridian (for a
# change on the publish path): one 100,000-file tree (~2 GiB, page cache
# warm), `meridian origin --once` into a fresh state directory, PASSES
# passes alternating the binaries. Prints each run's publish seconds (the
# origin's own figure) and wall time, then the medians.
# usage: [PASSES=3] [FILES=100000] bench/ab_publish.sh BINARY_A BINARY_B
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
A=${1:?usage: bench/ab_publish.sh BINARY_A BINARY_B}; Bb=${2:?usage: bench/ab_publish.sh BINARY_A BINARY_B}
PASSES=${PASSES:-3}; FILES=${FILES:-100000}
W=$(mktemp -d /var/tmp/meridian-abpub.XXXX)
trap 'rm -rf "$W"' EXIT
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
python3 bench/gen_tree.py "$W/content" "$FILES"
sync
(cd "$W/content" && find . -type f -print0 | xargs -0 cat > /dev/null)
"$A" keygen --out "$W/key" > /dev/null
declare -A PUB
for pass in $(seq "$PASSES"); do
  for which in A B; do
    if [ "$which" = A ]; then B=$A; else B=$Bb; fi
    rm -rf "$W/state"
    out=$(/usr/bin/time -f "%e s wall, %M KiB peak RSS" "$B" origin --once --content "$W/content" --state "$W/state" --key "$W/key" 2>&1 | grep -v INFO)
    p=$(echo "$out" | grep -o 'publish [0-9.]* s' | awk '{print $2}')
    PUB[$which]="${PUB[$which]:-} $p"
    printf '  pass %s %s: publish %s s; %s\n' "$pass" "$which" "$p" "$(echo "$out" | grep 'wall')"
  done
done
for which in A B; do
  printf '%s median publish %s s (runs:%s)\n' "$which" \
    "$(median ${PUB[$which]})" "${PUB[$which]}"
done
