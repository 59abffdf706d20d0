#!/usr/bin/env python3
"""Writes a synthetic content tree: N files in directories of 1000, sizes
spread deterministically so the total is about N * 21.5 KiB."""
import os, sys

def main():
    root, n = sys.argv[1], int(sys.argv[2])
    total = 0
    pool = os.urandom(1 << 20)
    for i in range(n):
        d = os.path.join(root, f"dir{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(d, exist_ok=True)
        size = 1024 + (i * 7919) % 40960
        off = (i * 104729) % (len(pool) - size)
        with open(os.path.join(d, f"file{i:06d}.bin"), "wb") as f:
            f.write(i.to_bytes(8, "little") + pool[off:off + size - 8])
        total += size
    print(f"wrote {n} files, {total} bytes under {root}", file=sys.stderr)

if __name__ == "__main__":
    main()
