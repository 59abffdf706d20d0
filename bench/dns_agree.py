#!/usr/bin/env python3
"""Asks two DNS servers for dl.meridian.test A with an ECS option of /32 for
each of N random addresses drawn inside the networks listed in NETS, and
reports how often the first answers agree. Loopback only, bounded by N.
usage: dns_agree.py NETS N PORT_A PORT_B"""
import ipaddress, random, socket, struct, sys

def query(port, ip, qid):
    name = b"".join(bytes([len(p)]) + p for p in b"dl.meridian.test".split(b".")) + b"\0"
    addr = socket.inet_aton(ip)
    ecs = struct.pack("!HBB", 1, 32, 0) + addr
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 4 + len(ecs)) + struct.pack("!HH", 8, len(ecs)) + ecs
    pkt = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 1) + name + struct.pack("!HH", 1, 1) + opt
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(pkt, ("127.0.0.1", port))
    data = s.recv(4096)
    s.close()
    an = struct.unpack("!H", data[6:8])[0]
    i = 12
    while data[i] != 0:  # skip question name
        i += data[i] + 1
    i += 5
    for _ in range(an):
        if data[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while data[i] != 0:
                i += data[i] + 1
            i += 1
        rtype, _, _, rdlen = struct.unpack("!HHIH", data[i:i + 10])
        i += 10
        if rtype == 1:
            return socket.inet_ntoa(data[i:i + 4])
        i += rdlen
    return None

nets = [ipaddress.ip_network(l.strip()) for l in open(sys.argv[1]) if l.strip()]
n, pa, pb = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(42)
agree = 0
for k in range(n):
    net = rng.choice(nets)
    ip = str(net.network_address + rng.randrange(net.num_addresses))
    a, b = query(pa, ip, k & 0xFFFF), query(pb, ip, k & 0xFFFF)
    agree += (a is not None and a == b)
print(f"agreement on the nearest datacenter: {agree}/{n} = {100.0 * agree / n:.2f}%")
