#!/usr/bin/env python3
"""Makes the status page's world map from Natural Earth data.

Input: the npm packages world-atlas@2.0.2 (Natural Earth 1:110m and 1:50m
countries as TopoJSON, public domain; package ISC) and
i18n-iso-countries@7.14.0 (ISO 3166 numeric -> alpha-2 codes, MIT), in
NODE_MODULES (default: target/npm/node_modules, where .ci/run puts them).

Output (committed; the test `status_map_is_what_make_map_makes` checks they
are exactly what this script makes):
  world.svg    one <path> per country of the 1:110m set, id "c-XX" (ISO
               alpha-2), equirectangular, 1000 units = 360 degrees, x from
               longitude -180, y from latitude +90, coordinates rounded to
               whole units (0.36 degrees) and written relative; Antarctica
               left out; rings that round to fewer than 3 points dropped;
               rings across the antimeridian (Russia, Fiji) drawn at both
               edges.
  places.json  ISO alpha-2 -> [x, y] in the same projection: the centroid of
               each country's largest polygon in the 1:50m set (which has
               the small countries 1:110m leaves out), for steering arcs.

usage: python3 geodns/status/make_map.py [NODE_MODULES [OUT_DIR]]
(OUT_DIR defaults to this directory)
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCALE = 1000 / 360
# Features with no ISO numeric id in Natural Earth, by name.
BY_NAME = {"Kosovo": "XK", "Somaliland": "SO", "N. Cyprus": "CY", "Siachen Glacier": "IN",
           "Indian Ocean Ter.": "AU"}


def project(lon, lat):
    return (lon + 180) * SCALE, (90 - lat) * SCALE


def decode(topo):
    sx, sy = topo["transform"]["scale"]
    tx, ty = topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x += dx
            y += dy
            pts.append(project(x * sx + tx, y * sy + ty))
        arcs.append(pts)
    return arcs


def ring(arcs, idx):
    out = []
    for i in idx:
        pts = arcs[i] if i >= 0 else arcs[~i][::-1]
        out.extend(pts if not out else pts[1:])
    return out


def polygons(geom):
    if geom["type"] == "Polygon":
        return [geom["arcs"]]
    if geom["type"] == "MultiPolygon":
        return geom["arcs"]
    return []


def code_of(geom, numeric):
    if "id" in geom:
        return numeric.get(geom["id"])
    return BY_NAME.get(geom["properties"]["name"])


def unwrapped(pts):
    """A ring that crosses the antimeridian (a jump of over half the map
    between two points), made continuous, and a copy shifted by the map's
    width so both edges of the map show their part; other rings as they are."""
    out = [pts[0]]
    shift = 0
    for (x0, _), (x1, y1) in zip(pts, pts[1:]):
        if x1 - x0 > 500:
            shift -= 1000
        elif x0 - x1 > 500:
            shift += 1000
        out.append((x1 + shift, y1))
    if out == pts:
        return [pts]
    lo, hi = min(x for x, _ in out), max(x for x, _ in out)
    copies = [out]
    if lo < 0:
        copies.append([(x + 1000, y) for x, y in out])
    if hi > 1000:
        copies.append([(x - 1000, y) for x, y in out])
    return copies


def path_of(ring_pts):
    """SVG path data of one ring, whole units, relative moves; none for a
    ring that rounds to fewer than 3 points."""
    pts = []
    for x, y in ring_pts:
        p = (round(x), round(y))
        if not pts or pts[-1] != p:
            pts.append(p)
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts.pop()
    if len(pts) < 3:
        return []
    rel = " ".join("%d %d" % (b[0] - a[0], b[1] - a[1]) for a, b in zip(pts, pts[1:]))
    return ["M%d %dl%sz" % (pts[0][0], pts[0][1], rel)]


def area_centroid(pts):
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        c = x0 * y1 - x1 * y0
        a += c
        cx += (x0 + x1) * c
        cy += (y0 + y1) * c
    if abs(a) < 1e-12:
        return 0.0, pts[0]
    return abs(a) / 2, (cx / (3 * a), cy / (3 * a))


def main():
    nm = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../target/npm/node_modules")
    out = sys.argv[2] if len(sys.argv) > 2 else HERE
    codes = json.load(open(os.path.join(nm, "i18n-iso-countries/codes.json")))
    numeric = {c[2]: c[0] for c in codes}

    t110 = json.load(open(os.path.join(nm, "world-atlas/countries-110m.json")))
    arcs = decode(t110)
    shapes = {}
    for g in t110["objects"]["countries"]["geometries"]:
        code = code_of(g, numeric)
        if code is None or code == "AQ":
            continue
        d = []
        for poly in polygons(g):
            for r in poly:
                for shifted in unwrapped(ring(arcs, r)):
                    d.extend(path_of(shifted))
        if d:
            # Parts named apart (N. Cyprus, Somaliland) join their country.
            name, parts = shapes.setdefault(code, [None, []])
            if "id" in g or name is None:
                shapes[code][0] = g["properties"]["name"]
            parts.extend(d)
    paths = []
    for code, (name, d) in sorted(shapes.items()):
        name = name.replace("&", "&amp;").replace("<", "&lt;")
        paths.append('<path id="c-%s" d="%s"><title>%s</title></path>' % (code, "".join(d), name))
    with open(os.path.join(out, "world.svg"), "w") as f:
        f.write("\n".join(paths) + "\n")

    t50 = json.load(open(os.path.join(nm, "world-atlas/countries-50m.json")))
    arcs = decode(t50)
    best = {}
    for g in t50["objects"]["countries"]["geometries"]:
        code = code_of(g, numeric)
        if code is None:
            continue
        for poly in polygons(g):
            a, (cx, cy) = area_centroid(unwrapped(ring(arcs, poly[0]))[0])
            c = (cx % 1000, cy)
            if code not in best or a > best[code][0]:
                best[code] = (a, c)
    places = {k: [round(v[1][0], 1), round(v[1][1], 1)] for k, v in sorted(best.items())}
    with open(os.path.join(out, "places.json"), "w") as f:
        json.dump(places, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")
    print("world.svg: %d countries, %d bytes; places.json: %d places" % (
        len(paths), os.path.getsize(os.path.join(out, "world.svg")), len(places)))


if __name__ == "__main__":
    main()
