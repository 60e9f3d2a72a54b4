"""Density and rates: how many live sessions one host holds, what each costs, and how fast they come and go.

    python3 Tests/bench/scale_bench.py PRODUCTS_DIR [MAX_N] [RATE_SECONDS]   (as root; prints a markdown section)

- density: live, idle demo-agent sessions grown to N = 100, 500, 1,000 (16 clients creating them); at each N the
  host memory per session (MemAvailable's drop, so kernel memory such as network namespaces and page tables is
  counted), cubicled's RSS growth per session, init's and the agent's private memory (smaps_rollup of a sample),
  the time taken to create them, and a warm and a cold invoke's latency with N sessions live;
- teardown: all N ended with StopRuntimeSession by 16 clients (a stop returns once its teardown is done);
- rates: for RATE_SECONDS (30), 16 clients each creating a session (its first invoke) and stopping it, over and over.
"""
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataplane_bench import free_port, pct, wait_http  # noqa: E402
from dataplane_bench import rss_kib as status_kib  # noqa: E402
from dataplane_bench import sid  # noqa: E402

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")
MAX_N = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
RATE_SECONDS = int(sys.argv[3]) if len(sys.argv) > 3 else 30
STEPS = [n for n in (100, 500, 1000) if n <= MAX_N] or [MAX_N]
CLIENTS = 16
ARN = urllib.parse.quote("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/demo", safe="")
PATH = f"/runtimes/{ARN}/invocations"
STOP = f"/runtimes/{ARN}/stopruntimesession"
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
BODY = json.dumps({"prompt": "2+5", "user_id": "1"}).encode()


def post(port, path, session, body=BODY, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", path, body=body, headers={SESSION_HEADER: session, "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if conn is None:
        c.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
    return data


def meminfo(key="MemAvailable"):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def private_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            v = {l.split(":")[0]: int(l.split()[1]) for l in f if l.split(":")[0] in ("Private_Clean", "Private_Dirty")}
        return v.get("Private_Clean", 0) + v.get("Private_Dirty", 0)
    except OSError:
        return None


def sandbox_processes(tag):
    """(init pids, agent pids) of this run's sandboxes, found by their cgroup."""
    inits, agents = [], []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cgroup") as f:
                if f"cubicle-bench-{tag}/" not in f.read():
                    continue
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == "cubicle-init":
            inits.append(int(p))
        elif comm.startswith("cubicle-demo"):
            agents.append(int(p))
    return inits, agents


def main():
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    work = tempfile.mkdtemp(prefix="cubicle-bench-")
    config = os.path.join(work, "cubicled.yaml")
    with open(config, "w") as f:
        f.write(f"""maxSessions: {max(STEPS) + CLIENTS + 100}
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    lifecycle: {{idleRuntimeSessionTimeout: 28800, maxLifetime: 28800}}
    limits: {{memory: 256MiB}}
""")
    avail_before = meminfo()
    daemon = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--config", config,
                               "--state-dir", f"/tmp/cubicle-bench-{tag}", "--admin-socket", f"{work}/admin.sock", "--data-dir", f"{work}/data",
                               "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning"])
    rows, teardown, rate = [], None, None
    try:
        wait_http(port)
        # Warm-up, outside every figure.
        for _ in range(5):
            s = sid(); post(port, PATH, s); post(port, STOP, s, b"{}")
        time.sleep(0.5)
        rss_before = status_kib(daemon.pid)
        avail_before = meminfo()
        live = []
        pool = ThreadPoolExecutor(CLIENTS)
        for n in STEPS:
            new = [sid() for _ in range(n - len(live))]
            t0 = time.perf_counter()
            list(pool.map(lambda s: post(port, PATH, s), new))
            created_in = time.perf_counter() - t0
            live += new
            time.sleep(1.0)  # let the last agents settle before reading memory
            inits, agents = sandbox_processes(tag)
            sample = lambda pids: [x for x in (private_kib(p) for p in random.sample(pids, min(30, len(pids)))) if x is not None]
            init_priv, agent_priv = sample(inits), sample(agents)
            host_per = (avail_before - meminfo()) / n
            daemon_per = (status_kib(daemon.pid) - rss_before) / n
            # A warm invoke on a live session, and a cold one (stopped afterwards, outside the timing).
            target = random.choice(live)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            post(port, PATH, target, conn=conn)
            warm = []
            for _ in range(200):
                t = time.perf_counter(); post(port, PATH, target, conn=conn); warm.append(time.perf_counter() - t)
            conn.close()
            cold = []
            for _ in range(20):
                s = sid()
                t = time.perf_counter(); post(port, PATH, s); cold.append(time.perf_counter() - t)
                post(port, STOP, s, b"{}")
            rows.append(dict(n=n, found=(len(inits), len(agents)), created=len(new), created_in=created_in,
                             host_per=host_per, daemon_per=daemon_per,
                             init=statistics.median(init_priv) if init_priv else 0,
                             agent=statistics.median(agent_priv) if agent_priv else 0,
                             warm50=statistics.median(warm), warm99=pct(warm, .99), cold50=statistics.median(cold)))

        t0 = time.perf_counter()
        list(pool.map(lambda s: post(port, STOP, s, b"{}"), live))
        teardown = (len(live), time.perf_counter() - t0)
        live = []

        # Sustained: 16 clients, each creating a session and stopping it, for RATE_SECONDS.
        counts = {"created": 0, "stopped": 0, "errors": 0}
        create_latency = []
        lock = threading.Lock()
        deadline = time.perf_counter() + RATE_SECONDS

        def churn():
            while time.perf_counter() < deadline:
                s = sid()
                try:
                    t = time.perf_counter()
                    post(port, PATH, s)
                    took = time.perf_counter() - t
                    with lock:
                        counts["created"] += 1
                        create_latency.append(took)
                    post(port, STOP, s, b"{}")
                    with lock:
                        counts["stopped"] += 1
                except Exception:
                    with lock:
                        counts["errors"] += 1
        t0 = time.perf_counter()
        workers = [threading.Thread(target=churn) for _ in range(CLIENTS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rate = (counts, time.perf_counter() - t0, create_latency)
        pool.shutdown()
    finally:
        daemon.terminate()
        daemon.wait(timeout=300)
        subprocess.run(["rm", "-rf", work])

    print("## Density and rates\n")
    print(f"`python3 Tests/bench/scale_bench.py .build/release {MAX_N} {RATE_SECONDS}` (run by `make bench`): idle "
          f"demo-agent sessions (memory limit 256 MiB each), created by {CLIENTS} Python clients, each session by its first "
          f"invoke. Host memory per session is MemAvailable's drop divided by N, so it counts the kernel's share "
          f"(network namespace, tmpfs, page tables) too; init's and the agent's are the median private memory "
          f"(smaps_rollup) of 30 of them.\n")
    print("| live sessions | created in | created/s | host memory per session | cubicled RSS per session | init private | agent private | warm invoke p50 / p99 | cold invoke p50 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} (found {r['found'][0]} inits, {r['found'][1]} agents) | {r['created_in']:.1f} s for {r['created']:,} | "
              f"{r['created'] / r['created_in']:.0f} | {r['host_per'] / 1024:.2f} MiB | {r['daemon_per']:.0f} KiB | "
              f"{r['init'] / 1024:.2f} MiB | {r['agent'] / 1024:.2f} MiB | "
              f"{r['warm50'] * 1e6:.0f} / {r['warm99'] * 1e6:.0f} µs | {r['cold50'] * 1e3:.2f} ms |")
    if teardown:
        print(f"\nEnding all {teardown[0]:,} with StopRuntimeSession ({CLIENTS} clients; each stop returns after its "
              f"teardown): {teardown[1]:.1f} s, **{teardown[0] / teardown[1]:.0f} teardowns/s**.")
    if rate:
        counts, seconds, lat = rate
        print(f"\nSustained for {seconds:.0f} s, {CLIENTS} clients each creating a session (its first invoke: sandbox, "
              f"agent start, first /ping, answer) and stopping it: **{counts['created'] / seconds:.0f} sessions created/s** "
              f"and {counts['stopped'] / seconds:.0f} teardowns/s, {counts['errors']} errors; a cold invoke at concurrency "
              f"{CLIENTS} took p50 {statistics.median(lat) * 1e3:.1f} ms, p99 {pct(lat, .99) * 1e3:.1f} ms. "
              f"Goal: ≥ 200 sessions/s created; ≥ 1,000 live sessions.")


if __name__ == "__main__":
    main()
