"""An OCI image layout with the bedrock-agentcore SDK agents and their Python inside, made without a
container engine from what Debian installed on this host: /usr/bin/python3.11 with its standard library and
every shared library it and its extension modules load (found with ldd), the agents' virtualenv at
/opt/agent-venv, and sandbox/agents at /app. Entrypoint: the runtime-context tutorial's agent.

    python3 make_python_image.py LAYOUT VENV AGENTS_DIR TAG
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_oci_layout import blob  # noqa: E402

SKIP_DIRS = {"__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip"}


class Layer:
    def __init__(self):
        self.raw = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.raw, mode="w", format=tarfile.PAX_FORMAT)
        self.seen = set()

    def parents(self, name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.seen:
                self.seen.add(d)
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                self.tar.addfile(info)

    def add(self, source, name):
        """`source` (a host path) at `name` in the image; a symlink stays a symlink."""
        if name in self.seen:
            return
        self.parents(name)
        self.seen.add(name)
        info = tarfile.TarInfo(name)
        st = os.lstat(source)
        info.mode = st.st_mode & 0o7777
        if os.path.islink(source):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(source)
            self.tar.addfile(info)
        elif os.path.isdir(source):
            info.type = tarfile.DIRTYPE
            self.tar.addfile(info)
        else:
            info.size = st.st_size
            with open(source, "rb") as f:
                self.tar.addfile(info, f)

    def symlink(self, name, target):
        self.parents(name)
        self.seen.add(name)
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self.tar.addfile(info)

    def tree(self, source, name):
        for dirpath, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            rel = os.path.relpath(dirpath, source)
            base = name if rel == "." else f"{name}/{rel}"
            self.add(dirpath, base)
            for f in sorted(files):
                if not f.endswith(".pyc"):
                    self.add(os.path.join(dirpath, f), f"{base}/{f}")
            for d in dirs:
                if os.path.islink(os.path.join(dirpath, d)):
                    self.add(os.path.join(dirpath, d), f"{base}/{d}")

    def finish(self):
        self.tar.close()
        return gzip.compress(self.raw.getvalue(), compresslevel=1, mtime=0)


def libraries(paths):
    """Every shared library the ELF files in `paths` load, as ldd resolves them on this host."""
    found = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            for part in parts:
                if part.startswith("/") and os.path.exists(part):
                    found.add(os.path.normpath(part))  # a wheel's libraries come as .../pkg/../pkg.libs/...
    return sorted(found)


def main(layout, venv, agents, tag):
    os.makedirs(layout, exist_ok=True)
    python = os.path.realpath("/usr/bin/python3")
    stdlib = "/usr/lib/python3.11"
    site = os.path.join(venv, "lib", "python3.11", "site-packages")
    elves = [python] + [os.path.join(d, f) for root in (stdlib, site) for d, _, fs in os.walk(root) for f in fs if ".so" in f]
    runtime = Layer()
    # Debian's merged /usr: /lib and /lib64 are links into /usr.
    runtime.symlink("lib", "usr/lib")
    runtime.symlink("lib64", "usr/lib64")
    runtime.symlink("bin", "usr/bin")
    # Each library under the name the loader looks for (its soname's path), with the file's contents.
    for lib in libraries(elves):
        if lib.startswith(os.path.realpath(venv) + "/") or lib.startswith(venv.rstrip("/") + "/"):
            continue  # a wheel's own libraries are in the venv's layer, found through its RPATH
        name = ("usr" + lib) if lib.startswith("/lib/") else lib.lstrip("/")
        if name.startswith("lib64/"):
            continue  # the loader, reached through the usr/lib64 link below
        runtime.add(os.path.realpath(lib), name)
    runtime.add(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    runtime.symlink("usr/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    runtime.add(python, "usr/bin/python3.11")
    runtime.symlink("usr/bin/python3", "python3.11")
    runtime.tree(stdlib, "usr/lib/python3.11")
    runtime.add("/etc/os-release", "etc/os-release")
    for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n"),
                       ("etc/group", "root:x:0:\nagent:x:1000:\n")):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(text), 0o644
        runtime.tar.addfile(info, io.BytesIO(text.encode()))
    packages = Layer()
    packages.tree(venv, "opt/agent-venv")
    code = Layer()
    code.tree(agents, "app")
    layers = [runtime.finish(), packages.finish(), code.finish()]
    descriptors = [dict(blob(layout, l), mediaType="application/vnd.oci.image.layer.v1.tar+gzip") for l in layers]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": ["/opt/agent-venv/bin/python", "/app/runtime_context_agent.py"],
                         "Env": ["PATH=/opt/agent-venv/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"],
                         "WorkingDir": "/app"},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(gzip.decompress(l)).hexdigest() for l in layers]}}
    c = dict(blob(layout, json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": descriptors}
    m = dict(blob(layout, json.dumps(manifest).encode()), mediaType="application/vnd.oci.image.manifest.v1+json",
             annotations={"org.opencontainers.image.ref.name": tag})
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [m]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
