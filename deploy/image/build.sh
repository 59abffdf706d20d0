#!/usr/bin/env bash
# Builds Meridian's container image with no registry: the release binary and
# the shared libraries `ldd` names, a passwd/group with the non-root user
# 10001, and the commented configs, assembled into a root file system that
# deploy/image/Containerfile copies onto `scratch`.
#
# usage: deploy/image/build.sh [TAG]     (default localhost/meridian:VERSION)
#        ROOTFS_ONLY=1 deploy/image/build.sh   (assemble target/image only)
#        MERIDIAN_BIN=path deploy/image/build.sh   (that binary; no cargo build)
#        IMAGE_CONTEXT=dir deploy/image/build.sh   (assemble there, not target/image)
# Needs: cargo, ldd, podman (Debian: apt-get install podman).
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${1:-localhost/meridian:$VERSION}
CTX=${IMAGE_CONTEXT:-target/image}
ROOT=$CTX/rootfs

if [ -n "${MERIDIAN_BIN:-}" ]; then
  echo "[1/3] using $MERIDIAN_BIN"
  BIN=$MERIDIAN_BIN
else
  echo "[1/3] building the release binary"
  cargo build --release --locked --bin meridian
  BIN=target/release/meridian
fi

echo "[2/3] assembling $ROOT"
rm -rf "$CTX"
mkdir -p "$ROOT"/{usr/bin,etc/meridian,var/lib/meridian,tmp,usr/share/doc/meridian/examples}
install -m 0755 "$BIN" "$ROOT/usr/bin/meridian"
# Every library the binary links, and the dynamic loader, at the path the
# binary asks for (symlinks resolved: the file itself is copied).
libs=$(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
[ -n "$libs" ] || { echo "ldd named no libraries for $BIN" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
  echo "  $lib"
done
printf 'root:x:0:0:root:/:/nonexistent\nmeridian:x:10001:10001:meridian:/var/lib/meridian:/nonexistent\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\nmeridian:x:10001:\n' > "$ROOT/etc/group"
cp deploy/origin.toml deploy/mirror.toml deploy/geodns.toml "$ROOT/usr/share/doc/meridian/examples/"
cp deploy/OPERATORS.md "$ROOT/usr/share/doc/meridian/"
chmod 1777 "$ROOT/tmp"
# The state volume belongs to the user the image runs as.
chown -R 10001:10001 "$ROOT/var/lib/meridian" 2>/dev/null || true
cp deploy/image/Containerfile "$CTX/Containerfile"
du -sh "$ROOT" | awk '{print "  root file system: " $1}'
[ -n "${ROOTFS_ONLY:-}" ] && exit 0

echo "[3/3] podman build -t $TAG"
podman build --format docker --pull=never -f "$CTX/Containerfile" -t "$TAG" "$CTX"
echo "built $TAG"
