#!/usr/bin/env python3
"""A tree of N tiny files (1-7 bytes each) in the pool's shape, for the
mirror's memory at a given file count (memory follows the number of files,
not their bytes): pool/mainAA/libpackage-BBB-perl/…_1.C.AA-1_amd64.deb, 17
files a directory, 600 directories a group.

usage: bench/gen_tiny_tree.py DIR [FILES]   (default 1,000,000)
Then: meridian origin --content DIR …; meridian mirror --upstream … and
read the mirror's VmHWM in /proc/PID/status when it logs "is durable"
(BENCHMARKS.md, "A million files, session 16")."""
import os
import sys

root = sys.argv[1]
total = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
groups = max(1, -(-total // (600 * 17)))
n = 0
for a in range(groups):
    for b in range(600):
        if n >= total:
            break
        d = os.path.join(root, "pool", f"main{a:02d}", f"libpackage-{b:03d}-perl")
        os.makedirs(d, exist_ok=True)
        for c in range(17):
            if n >= total:
                break
            with open(os.path.join(d, f"libpackage-{b:03d}-perl_1.{c}.{a}-1_amd64.deb"), "wb") as f:
                f.write(b"%d" % n)
            n += 1
print(f"wrote {n} files under {root}")
