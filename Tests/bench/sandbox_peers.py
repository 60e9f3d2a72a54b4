"""Cubicle's sandbox beside unshare, crun and runc, each run the same way in the same run.

    python3 Tests/bench/sandbox_peers.py PRODUCTS_DIR SAMPLES_DIR [N]   (as root; prints a markdown section)

Reads cubicle-spawn.txt, cubicle-teardown.txt and bwrap.txt that `cubicle-sandbox-bench bench ... SAMPLES_DIR`
wrote, then times each peer with `cubicle-sandbox-bench peer` (posix_spawn to exit, as bwrap is timed):
- unshare --fork --pid --mount --net --ipc --uts --mount-proc true
- crun and runc running /bin/true from an OCI bundle with a Cubicle sandbox's isolation and limits
  (Tests/bench/oci_bundle.py). On a cgroup v1 hybrid host crun runs in a private mount namespace with
  /sys/fs/cgroup/unified unmounted, or it would take the empty v2 hierarchy for the real one.
"""
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oci_bundle  # noqa: E402

PRODUCTS = os.path.abspath(sys.argv[1])
SAMPLES = os.path.abspath(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 200
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(PRODUCTS, "cubicle-sandbox-bench")
# Far above the ranges cubicled leases (--first-host-uid), so the peers never share ids with a sandbox.
PEER_UID_BASE = 1_900_000_000


def load(name):
    path = os.path.join(SAMPLES, name + ".txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


def pct(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, int((len(s) - 1) * p))] / 1e6


def peer(name, argv, wrap=None):
    out = os.path.join(SAMPLES, name + ".txt")
    cmd = [BENCH, "peer", str(N), out] + argv
    if wrap:
        cmd = wrap(cmd)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return f"{name} failed: {(r.stdout + r.stderr).strip()[:300]}"
    return None


def main():
    failures = []
    f = peer("unshare", ["unshare", "--fork", "--pid", "--mount", "--net", "--ipc", "--uts", "--mount-proc", "true"])
    failures += [f] if f else []
    work = tempfile.mkdtemp(prefix="cubicle-bench-oci-")
    os.chmod(work, 0o755)  # the bundle's root user is an unprivileged host uid that must reach rootfs
    try:
        bundle = oci_bundle.make(os.path.join(work, "bundle"), REPO, PEER_UID_BASE)
        os.chown(os.path.join(bundle, "rootfs"), PEER_UID_BASE, PEER_UID_BASE)
        v1_hybrid = os.path.ismount("/sys/fs/cgroup/unified")
        if shutil.which("crun"):
            run = ["crun", "--root", os.path.join(work, "crun-state"), "run", "-b", bundle, f"cubicle-bench-crun-{os.getpid()}"]
            wrap = None
            if v1_hybrid:
                def wrap(cmd):
                    quoted = " ".join("'" + c + "'" for c in cmd)
                    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"umount /sys/fs/cgroup/unified && exec {quoted}"]
            f = peer("crun", run, wrap)
            failures += [f] if f else []
        if shutil.which("runc"):
            f = peer("runc", ["runc", "--root", os.path.join(work, "runc-state"), "run", "-b", bundle, f"cubicle-bench-runc-{os.getpid()}"])
            failures += [f] if f else []
    finally:
        shutil.rmtree(work, ignore_errors=True)

    spawn, teardown = load("cubicle-spawn"), load("cubicle-teardown")
    whole = [s + t for s, t in zip(spawn, teardown)]
    with open(os.path.join(SAMPLES, "cubicle-lifecycle.txt"), "w") as out:
        out.write("".join(f"{x}\n" for x in whole))
    print("## Sandbox beside bubblewrap, unshare, crun and runc")
    print()
    print(f"`python3 Tests/bench/sandbox_peers.py {' '.join(sys.argv[1:])}` (run by `make bench`). "
          "Every peer is timed from posix_spawn to its exit by `cubicle-sandbox-bench peer`, so a peer's figure "
          "includes its own teardown; Cubicle's is shown both as spawn-to-ready and as spawn-to-ready plus teardown. "
          "crun and runc run `/bin/true` from an OCI bundle with the sandbox's namespaces (user with an unprivileged "
          "range, pid, mount, net, ipc, uts, cgroup), read-only /usr, masked /proc, tmpfs /dev and /tmp, no "
          "capabilities, no_new_privs, Cubicle's seccomp allowlist and its cgroup limits (memory 1 GiB without swap, "
          "2 CPUs, 512 pids); `Tests/bench/oci_bundle.py` writes it.")
    print()
    print("| run | p50 ms | p99 ms | Cubicle spawn-to-ready ÷ it (p50) | Cubicle spawn + teardown ÷ it (p50) |")
    print("|---|---|---|---|---|")
    print(f"| Cubicle spawn-to-ready | {pct(spawn, .5):.2f} | {pct(spawn, .99):.2f} | | |")
    print(f"| Cubicle spawn-to-ready + teardown | {pct(whole, .5):.2f} | {pct(whole, .99):.2f} | | |")
    peers = [("bwrap", "bwrap --unshare-all … /bin/true"),
             ("unshare", "unshare --fork --pid --mount --net --ipc --uts --mount-proc true"),
             ("crun", f"crun {subprocess.run(['crun', '--version'], capture_output=True, text=True).stdout.split()[2] if shutil.which('crun') else ''} run (OCI bundle)"),
             ("runc", f"runc {subprocess.run(['runc', '--version'], capture_output=True, text=True).stdout.split()[2] if shutil.which('runc') else ''} run (OCI bundle)")]
    for name, label in peers:
        xs = load(name)
        if not xs:
            print(f"| {label} | not run | | | |")
            continue
        print(f"| {label} | {pct(xs, .5):.2f} | {pct(xs, .99):.2f} | {pct(spawn, .5) / pct(xs, .5):.2f}× | {pct(whole, .5) / pct(xs, .5):.2f}× |")
    for f in failures:
        print(f"\nNot measured: {f}")


main()
