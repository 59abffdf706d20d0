#!/usr/bin/env python3
"""Writes the Kubernetes ConfigMaps' TOML files from the commented examples
in deploy/ (origin.toml, mirror.toml, geodns.toml): every comment kept, and
only the settings a pod needs changed (listen on unprivileged ports on all
interfaces, paths of the mounted volumes), each change marked.

    python3 deploy/kubernetes/configs.py          # rewrite the files
    python3 deploy/kubernetes/configs.py --check  # exit 1 if one is stale

Edit deploy/*.toml (or the table below), never the generated files: CI
runs --check.
"""
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
DEPLOY = HERE.parent

# (example, generated file, {line in the example: (new line, why)}).
CHANGES = [
    ("origin.toml", "origin/origin.toml", {
        'key_file = "/etc/meridian/origin.key"':
            ('key_file = "/etc/meridian/key/origin.key"',
             "the Secret meridian-origin-key, mounted read-only"),
        'listen = "127.0.0.1:8080"':
            ('listen = "0.0.0.0:8080"', "the pod's port; Service meridian-origin"),
    }),
    ("mirror.toml", "base/mirror.toml", {
        'id = "eu-west-1"':
            ('id = "mirror"', "MERIDIAN_ID, the pod's name, overrides it"),
        'region = "eu-west"':
            ('region = ""', "MERIDIAN_REGION, from the overlay, overrides it"),
        'upstreams = ["https://origin.example.org", "http://eu-west-2.example.org"]':
            ('upstreams = ["http://meridian-origin:8080"]',
             "MERIDIAN_UPSTREAMS, from the overlay, overrides it"),
        'trust = ["ed25519:0000000000000000000000000000000000000000000000000000000000000000"]':
            ('trust = ["ed25519:0000000000000000000000000000000000000000000000000000000000000000"]',
             "MERIDIAN_TRUST, from the ConfigMap meridian-trust, overrides it"),
        'listen = "0.0.0.0:80"':
            ('listen = "0.0.0.0:8080"', "the pod's port; the Service maps 80 to it"),
    }),
    ("geodns.toml", "base/geodns.toml", {
        'listen = ["0.0.0.0:53", "[::]:53"]':
            ('listen = ["0.0.0.0:5353"]',
             "an unprivileged port, no capability; the Service maps 53 to it"),
        'listen = "127.0.0.1:8053"':
            ('listen = "0.0.0.0:8053"',
             "the kubelet probes /health; a NetworkPolicy admits operators only"),
        'listen = "127.0.0.1:8054"':
            ('listen = "0.0.0.0:8054"',
             "the status page, read-only; the Service meridian-geodns-status"),
        'listen = "0.0.0.0:80"':
            ('listen = "0.0.0.0:8055"',
             "the redirector on an unprivileged port; the Service meridian-geodns-redirect maps 80 to it"),
        'upstreams = ["https://origin.example.org"]':
            ('upstreams = ["http://meridian-mirror-pods:8080"]',
             "the region's mirrors (metadata only); an overlay may name the origin"),
        'token = "change-me"':
            ('token_file = "/etc/meridian/admin/token"', "the Secret meridian-geodns-admin"),
        'geoip = "/var/lib/GeoIP/GeoLite2-City.mmdb"':
            ('geoip = "/var/lib/GeoIP/GeoLite2-City.mmdb"',
             "the volume geoip (see README.md: how it is filled)"),
    }),
]


def render(example, changes):
    src = (DEPLOY / example).read_text()
    out = [f"# Generated from deploy/{example} by deploy/kubernetes/configs.py; "
           "edit that file and rerun.\n"]
    seen = set()
    for line in src.splitlines(keepends=True):
        key = line.rstrip("\n")
        if key in changes and key not in seen:
            new, why = changes[key]
            seen.add(key)
            out.append(f"# Kubernetes: {why}.\n{new}\n")
        else:
            out.append(line)
    missing = set(changes) - seen
    if missing:
        sys.exit(f"deploy/{example} no longer has the line(s) {sorted(missing)}: "
                 "update CHANGES in deploy/kubernetes/configs.py")
    return "".join(out)


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for example, target, changes in CHANGES:
        text = render(example, changes)
        path = HERE / target
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(DEPLOY.parent)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(DEPLOY.parent)}")
    if stale:
        sys.exit("stale (run python3 deploy/kubernetes/configs.py): " + ", ".join(stale))


if __name__ == "__main__":
    main()
