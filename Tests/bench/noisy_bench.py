"""Noisy neighbours: a neighbour session's warm invoke latency, quiet and while another session runs each hog.

    python3 Tests/bench/noisy_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

Same runtimes and hogs as Tests/e2e/test_noisy_neighbours.py (the culprit: half a CPU, 64 pids, 128 MiB,
32 MiB /tmp); 300 invokes quiet, then 300 with the hog at its limit, for each hog, one daemon.
"""
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
os.environ.setdefault("CUBICLE_PRODUCTS", PRODUCTS)
from test_noisy_neighbours import CONFIG, HOGS, p99  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataplane_bench import free_port, sid  # noqa: E402

ARN = urllib.parse.quote("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/", safe="")
HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"


def invoke(port, runtime, session, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", f"/runtimes/{ARN}{runtime}/invocations", body=b'{"prompt": "2+5"}',
              headers={HEADER: session, "Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 200


def latencies(port, session, n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        invoke(port, "demo", session, c)
        out.append(time.perf_counter() - t)
    return out


def cpus(admin, session):
    r = subprocess.run([f"{PRODUCTS}/cubicle", "inspect", "--admin-socket", admin, session, "--json"], capture_output=True, text=True)
    got = json.loads(r.stdout).get("cpus", []) if r.returncode == 0 else []
    return ",".join(map(str, got)) or "all"


def run_daemon(yield_cpu, hogs):
    """One daemon; for each hog, the neighbour's latencies quiet and beside it. yield_cpu None: the default
    config (sessions below the host while one is throttled); True/False: sessionsYieldCPUToHost set so."""
    work = tempfile.mkdtemp(prefix="cubicle-bench-")
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    with open(f"{work}/c.yaml", "w") as f:
        if yield_cpu is not None:
            f.write(f"sessionsYieldCPUToHost: {'true' if yield_cpu else 'false'}\n")
        f.write(CONFIG.replace("codeDirectory: " + os.environ["CUBICLE_PRODUCTS"], f"codeDirectory: {PRODUCTS}"))
    admin = f"{work}/admin.sock"
    d = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--config", f"{work}/c.yaml",
                          "--state-dir", f"/tmp/cubicle-bench-{tag}", "--admin-socket", admin, "--data-dir", f"{work}/data-{tag}",
                          "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning"])
    rows = []
    try:
        for attempt in range(200):
            try:
                invoke(port, "demo", sid())
                break
            except OSError:
                if d.poll() is not None or attempt == 199:
                    raise RuntimeError(f"cubicled did not come up on port {port}")
                time.sleep(0.05)
        for hog in hogs:
            command = HOGS[hog][0]
            neighbour, culprit = sid(), sid()
            latencies(port, neighbour, 20)
            invoke(port, "culprit", culprit)
            quiet = latencies(port, neighbour, 1000)
            t = threading.Thread(target=subprocess.run, args=([f"{PRODUCTS}/cubicle", "exec", "--admin-socket", admin, culprit,
                                                               "--", "sh", "-c", command.split(" ", 2)[2][1:-1]],),
                                 kwargs={"capture_output": True, "timeout": 60})
            t.start()
            time.sleep(1.0)
            loud = latencies(port, neighbour, 1000)
            t.join()
            name = hog + (", sessionsYieldCPUToHost: false" if yield_cpu is False else "")
            rows.append((name, sorted(quiet)[500], p99(quiet), sorted(loud)[500], p99(loud), cpus(admin, neighbour), cpus(admin, culprit)))
    finally:
        d.terminate()
        d.wait(timeout=120)
        subprocess.run(["rm", "-rf", work])
    return rows


def main():
    only = os.environ.get("CUBICLE_NOISY_HOGS")  # e.g. "cpu-hog" while working on one case
    hogs = [h for h in HOGS if not only or h in only.split(",")]
    rows = run_daemon(None, hogs)
    # The same CPU hog with sessions at the host's weight instead of below it.
    if "cpu-hog" in hogs:
        rows += run_daemon(False, ["cpu-hog"])
    print("## Noisy neighbours\n")
    print("`python3 Tests/bench/noisy_bench.py .build/release` (run by `make bench`): a neighbour's warm invoke "
          "(1,000 quiet, then 1,000 while another session runs the hog at its limits: half a CPU on one core in 10 ms periods, "
          "64 pids, 128 MiB, 32 MiB /tmp). Goal: neighbour p99 within 2× its quiet baseline. The last row runs "
          "the CPU hog again under a daemon with `sessionsYieldCPUToHost: false` (sessions at the host's weight).\n")
    print("| hog | neighbour / culprit CPUs | quiet p50 / p99 | with the hog p50 / p99 | p99 ratio | goal ≤ 2× |")
    print("|---|---|---|---|---|---|")
    for hog, q50, q99, l50, l99, ncpu, ccpu in rows:
        print(f"| {hog} | {ncpu} / {ccpu} | {q50 * 1e3:.2f} / {q99 * 1e3:.2f} ms | {l50 * 1e3:.2f} / {l99 * 1e3:.2f} ms | "
              f"{l99 / q99:.2f}× | {'met' if l99 <= 2 * q99 else 'missed'} |")


main()
