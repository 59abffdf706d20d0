#!/usr/bin/env python3
"""Writes (once) the million-file benchmark tree, in the shape of a
distribution archive, and caches it on disk between runs.

    usage: bench/gen_big_tree.py DIR [FILES]     (default 1,000,000)

Shape (deterministic, seeded):
  pool/<component>/<prefix>/<package>/<file>   most files: many small ones
      (lognormal sizes, median ~4 KiB), a package directory of 1-60 files,
      prefixes a..z and liba..libz as in a Debian pool;
  dists/<suite>/<component>/<section>/<arch>/i18n/<lang>/...   deep and narrow;
  indices/files/<file>   one wide directory of 50,000 files;
  cdimage/release/<version>/<arch>/iso-cd/<image>.iso   a few large files
      (256 MiB each).

About 15 GB in all: small enough to stay in the page cache of a 24 GiB
machine, so that what the benchmarks time is the software, not a disk
reading a million small files at random (about 5 MB/s on the CI disk).

Every file's bytes start with its index, so no two files share a hash.
DIR.complete (beside DIR, not in it) records what was written; a rerun with the same arguments
and generator version does nothing (the tree is reused), any other
content in DIR is an error rather than something this script deletes.
"""
import json, os, random, sys, time

VERSION = 2


def plan(n):
    """Yields (relative path, size) for every file, in directory order."""
    rnd = random.Random(19)
    big = 8
    wide = 50_000
    deep = 100_000
    pool = n - big - wide - deep
    assert pool > 0, "FILES too small for the shape"
    # Deep and narrow: 6 levels, a handful of files per leaf directory.
    i = 0
    suites = ["bookworm", "trixie", "forky", "sid"]
    comps = ["main", "contrib", "non-free", "non-free-firmware"]
    while i < deep:
        s, c = suites[i % 4], comps[(i // 4) % 4]
        sect = f"section{(i // 16) % 25:02d}"
        arch = ["amd64", "arm64", "i386", "riscv64"][(i // 400) % 4]
        lang = f"lang{(i // 1600) % 64:02d}"
        leaf = f"dists/{s}/{c}/{sect}/{arch}/i18n/{lang}"
        for k in range(min(8, deep - i)):
            yield f"{leaf}/Translation-{i:06d}-{k}", int(rnd.lognormvariate(7.5, 1.0)) + 16
            i += 1
    # One wide directory.
    for k in range(wide):
        yield f"indices/files/entry-{k:06d}.list", 64 + rnd.randrange(2048)
    # The pool: packages of 1-60 files.
    prefixes = [chr(c) for c in range(97, 123)] + [f"lib{chr(c)}" for c in range(97, 123)]
    left, pkg = pool, 0
    while left > 0:
        comp = "main" if pkg % 10 < 8 else ("contrib" if pkg % 10 == 8 else "non-free")
        prefix = prefixes[pkg % len(prefixes)]
        name = f"{prefix}pkg{pkg:05d}"
        count = min(left, 1 + int(rnd.expovariate(1 / 20)) % 60)
        for k in range(count):
            ext = ("deb", "dsc", "tar.xz", "changes", "buildinfo")[k % 5]
            size = int(rnd.lognormvariate(8.4, 1.3)) + 32
            if rnd.random() < 0.0015:
                size = rnd.randrange(1 << 20, 4 << 20)  # some medium packages
            yield f"pool/{comp}/{prefix}/{name}/{name}_{k}.{ext}", size
        left -= count
        pkg += 1
    for k in range(big):
        arch = ["amd64", "arm64"][k % 2]
        yield f"cdimage/release/13.{k // 2}.0/{arch}/iso-cd/debian-13.{k // 2}.0-{arch}-netinst.iso", 256 << 20


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    root = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    want = {"version": VERSION, "files": n}
    stamp = root.rstrip("/") + ".complete"
    if os.path.exists(stamp):
        with open(stamp) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            print(f"reusing {root}: {have['files']} files, {have['bytes']} bytes", file=sys.stderr)
            return
        sys.exit(f"{root} holds another tree ({have}); remove it or pick another directory")
    if os.path.isdir(root) and os.listdir(root):
        sys.exit(f"{root} is not empty and has no {stamp}: an interrupted run? remove it and run again")
    os.makedirs(root, exist_ok=True)
    chunk = os.urandom(8 << 20)
    made = set()
    total, count, t0 = 0, 0, time.time()
    for rel, size in plan(n):
        d = os.path.join(root, os.path.dirname(rel))
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            head = count.to_bytes(8, "little")
            off = (count * 104729) % (len(chunk) - min(size, len(chunk)) + 1)
            left = size
            os.write(fd, head)
            left -= len(head)
            while left > 0:
                piece = chunk[off:off + min(left, len(chunk) - off)]
                os.write(fd, piece)
                left -= len(piece)
                off = 0
        finally:
            os.close(fd)
        total += size
        count += 1
        if count % 100_000 == 0:
            print(f"  {count} files, {total / 1e9:.1f} GB, {time.time() - t0:.0f} s", file=sys.stderr)
    with open(stamp, "w") as f:
        json.dump({**want, "bytes": total, "dirs": len(made)}, f)
    print(f"wrote {count} files in {len(made)} directories, {total} bytes under {root} "
          f"in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
