"""Writes a small OCI image layout without a container engine: each layer a tar.gz the script assembles,
a config, a manifest per platform, and an index (tagged with org.opencontainers.image.ref.name).

    python3 make_oci_layout.py DIR TAG PLATFORM[,PLATFORM...] [AGENT]    e.g. linux/amd64,linux/arm64

With AGENT (a static executable), it is /usr/local/bin/agent in layer one and the image's Entrypoint.

Layer 1 holds /etc/os-release, /usr/bin/hello (mode 0755), /srv (uid 1000) with /srv/note (uid 1000,
0600) and /etc/motd, and, where the host has a static busybox (Debian's busybox-static), /bin/busybox with
its applets as symlinks and a setuid-root copy at /usr/bin/busybox-suid; layer 2 removes /etc/motd (a
whiteout) and adds /srv/data. The config names Entrypoint, Cmd, Env,
WorkingDir and User (`worker`, uid 1500 in the image's /etc/passwd). Tests and benchmarks share it."""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def blob(root, data):
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(root, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def layer(entries):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, mode, uid in entries:
            i = tarfile.TarInfo(name)
            i.mode, i.uid, i.gid = mode, uid, uid
            if data is None:
                i.type = tarfile.DIRTYPE
                t.addfile(i)
            elif isinstance(data, str) and data.startswith("->"):
                i.type, i.linkname = tarfile.SYMTYPE, data[2:]
                t.addfile(i)
            else:
                i.size = len(data)
                t.addfile(i, io.BytesIO(data))
    return raw.getvalue(), gzip.compress(raw.getvalue(), mtime=0)


def main(root, tag, platforms, agent=None):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    entries = [("etc/", None, 0o755, 0), ("etc/os-release", b"ID=cubicle-test\n", 0o644, 0),
               ("etc/motd", b"hello\n", 0o644, 0), ("usr/bin/hello", b"#!/bin/sh\necho hello\n", 0o755, 0),
               ("srv/", None, 0o755, 1000), ("srv/note", b"from the image\n", 0o600, 1000),
               ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\nworker:x:1500:1500:worker:/srv:/bin/sh\n", 0o644, 0)]
    if os.path.exists("/bin/busybox"):
        with open("/bin/busybox", "rb") as f:
            busybox = f.read()
        entries += [("bin/", None, 0o755, 0), ("bin/busybox", busybox, 0o755, 0), ("usr/bin/busybox-suid", busybox, 0o4755, 0)]
        entries += [(f"bin/{a}", "->busybox", 0o777, 0) for a in ("sh", "cat", "stat", "ls", "id", "echo", "test", "touch", "rm", "sleep",
                                                                             "grep", "sort", "tr", "cut", "tail", "ps", "wc", "hostname", "env", "true",
                                                                             "dd", "df", "timeout", "nc", "sed")]
    if agent:
        with open(agent, "rb") as f:
            entries.append(("usr/local/bin/agent", f.read(), 0o755, 0))
    one_raw, one = layer(entries)
    # Its parents named as image builders write them: a parent a layer leaves out is made root's (0755).
    two_raw, two = layer([("etc/", None, 0o755, 0), ("etc/.wh.motd", b"", 0o644, 0), ("srv/", None, 0o755, 1000),
                          ("srv/data", b"layer two\n", 0o644, 0)])
    layers = [dict(blob(root, one), mediaType="application/vnd.oci.image.layer.v1.tar+gzip"),
              dict(blob(root, two), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")]
    entries = []
    for p in platforms.split(","):
        os_name, arch = p.split("/")[:2]
        config = {"architecture": arch, "os": os_name,
                  "config": {"Entrypoint": ["/usr/local/bin/agent"] if agent else ["/usr/bin/hello"], "Cmd": [] if agent else ["--flag"], "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
                             "WorkingDir": "/srv", "User": "worker"},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(one_raw).hexdigest(),
                                                           "sha256:" + hashlib.sha256(two_raw).hexdigest()]}}
        c = dict(blob(root, json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": layers}
        m = dict(blob(root, json.dumps(manifest).encode()), mediaType="application/vnd.oci.image.manifest.v1+json",
                 platform={"os": os_name, "architecture": arch})
        entries.append(m)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    if len(entries) > 1:
        # A multi-platform image: the layout's index names an index, as `skopeo copy --all` writes it.
        inner = dict(blob(root, json.dumps(index).encode()), mediaType="application/vnd.oci.image.index.v1+json")
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [inner]}
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
