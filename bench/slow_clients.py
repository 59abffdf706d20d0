#!/usr/bin/env python3
"""Opens N concurrent downloads of one URL and reads each slowly (a few KiB
per second) for a bounded time, to measure server memory under many slow
clients. Loopback only. usage: slow_clients.py HOST PORT PATH N SECONDS"""
import asyncio, sys, time

async def one(host, port, path, until, stats):
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        stats["failed"] += 1
        return
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    stats["open"] += 1
    try:
        while time.monotonic() < until:
            b = await r.read(4096)
            if not b:
                break
            stats["bytes"] += len(b)
            await asyncio.sleep(1.0)
    except OSError:
        pass
    finally:
        w.close()

async def main():
    host, port, path, n, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    until = time.monotonic() + secs
    stats = {"open": 0, "failed": 0, "bytes": 0}
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(host, port, path, until, stats)))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    print(f"slow clients: {stats['open']} connected, {stats['failed']} failed, {stats['bytes']} bytes read", file=sys.stderr)

asyncio.run(main())
