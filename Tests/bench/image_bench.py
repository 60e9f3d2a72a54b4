"""An image-based sandbox beside a host-root one and beside crun running the same image, in the same run.

    python3 Tests/bench/image_bench.py PRODUCTS_DIR [N]   (as root; prints a markdown section)

The image is Tests/images/make_oci_layout.py's (a static busybox userland in two layers). Cubicle: N
sandboxes with a host root and N with the image's root, alternating (`cubicle-sandbox-bench image`), each
timed from launch to init's ready. crun: the same image's layers flattened into an OCI bundle's rootfs
(whiteouts applied), with the sandbox's isolation (Tests/bench/oci_bundle.py, without the host /usr bind),
timed from spawn to exit of the image's /bin/true, as sandbox_peers.py times it.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import oci_bundle  # noqa: E402

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100
PEER_UID_BASE = 3_000_000_000


def load(path):
    with open(path) as f:
        return sorted(int(x) for x in f.read().split())


def pct(xs, p):
    return xs[min(len(xs) - 1, int((len(xs) - 1) * p))] / 1e6


def flatten(layout, rootfs):
    """The image's layers applied in order to `rootfs`, whiteouts removing what they name."""
    index = json.load(open(os.path.join(layout, "index.json")))
    blob = lambda d: os.path.join(layout, "blobs", "sha256", d.split(":")[1])
    manifest = json.load(open(blob(index["manifests"][0]["digest"])))
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=gzip.open(blob(layer["digest"]))) as t:
            for m in t.getmembers():
                base = os.path.basename(m.name)
                if base.startswith(".wh."):
                    target = os.path.join(rootfs, os.path.dirname(m.name), base[4:])
                    if os.path.lexists(target):
                        shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.unlink(target)
                    continue
                t.extract(m, rootfs, numeric_owner=True, filter="fully_trusted") if sys.version_info >= (3, 12) else t.extract(m, rootfs, numeric_owner=True)


def main():
    if not shutil.which("crun") or not os.path.exists("/bin/busybox"):
        print("## Image sandboxes\n\nskipped: needs crun and busybox-static (make bench-deps)")
        return
    work = tempfile.mkdtemp(prefix="cubicle-bench-image-")
    os.chmod(work, 0o755)
    try:
        layout = os.path.join(work, "layout")
        subprocess.run([sys.executable, os.path.join(REPO, "Tests", "images", "make_oci_layout.py"), layout, "v1", "linux/amd64"], check=True)
        samples = os.path.join(work, "samples")
        subprocess.run([f"{PRODUCTS}/cubicle-sandbox-bench", "image", REPO, PRODUCTS, str(N), layout, samples], check=True)
        bundle = oci_bundle.make(os.path.join(work, "bundle"), REPO, PEER_UID_BASE)
        rootfs = os.path.join(bundle, "rootfs")
        shutil.rmtree(rootfs)
        os.makedirs(rootfs)
        flatten(layout, rootfs)
        for d in ("proc", "dev", "tmp"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        config = json.load(open(os.path.join(bundle, "config.json")))
        config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/usr"]
        json.dump(config, open(os.path.join(bundle, "config.json"), "w"))
        subprocess.run(["chown", "-R", f"{PEER_UID_BASE}:{PEER_UID_BASE}", rootfs], check=True)
        run = ["crun", "--root", os.path.join(work, "crun-state"), "run", "-b", bundle, f"cubicle-bench-image-crun-{os.getpid()}"]
        if os.path.ismount("/sys/fs/cgroup/unified"):
            quoted = " ".join("'" + c + "'" for c in run)
            run = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"umount /sys/fs/cgroup/unified && exec {quoted}"]
        subprocess.run([f"{PRODUCTS}/cubicle-sandbox-bench", "peer", str(N), os.path.join(samples, "crun.txt")] + run, check=True)
        host, image, crun = (load(os.path.join(samples, f)) for f in ("host-spawn.txt", "image-spawn.txt", "crun.txt"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("## Image sandboxes: spawn beside a host root and beside crun\n")
    print(f"`python3 Tests/bench/image_bench.py .build/release {N}` (run by `make bench`): the test image (a static busybox in two "
          f"layers); {N} Cubicle sandboxes of each root, alternating, launch to init's ready; crun running the same image, "
          "flattened into a bundle, spawn to exit of its /bin/true.\n")
    print("| | p50 ms | p99 ms | goal |")
    print("|---|---|---|---|")
    print(f"| Cubicle, host root (fork server, template) | {pct(host, .5):.2f} | {pct(host, .99):.2f} | |")
    print(f"| Cubicle, image root (fork server, idmapped layers, overlay) | {pct(image, .5):.2f} | {pct(image, .99):.2f} | "
          f"p50 within 1 ms of the host root: {pct(image, .5) - pct(host, .5):+.2f} ms |")
    print(f"| crun, the same image | {pct(crun, .5):.2f} | {pct(crun, .99):.2f} | image root / crun: {pct(image, .5) / pct(crun, .5):.2f}x |")


if __name__ == "__main__":
    main()
