"""Churn: sessions created and ended in a loop leave cubicled's descriptors, threads and memory where they
were, and nothing of any ended session on the host. CUBICLE_CHURN sets how many (300 here; `make soak`: 10,000)."""
import http.client
import json
import os
import re
import subprocess
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from conftest import ARN_PREFIX, PRODUCTS, cgroup_dirs, new_session_id
from fake_internet import FakeInternet, session_network

CHURN = int(os.environ.get("CUBICLE_CHURN", "300"))
ARN = urllib.parse.quote(ARN_PREFIX + "demo", safe="")
HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"


def post(port, path, sid, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, body=body, headers={HEADER: sid, "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.status == 200, (r.status, data[:300])
    return data


def one_session(port):
    sid = new_session_id()
    assert json.loads(post(port, f"/runtimes/{ARN}/invocations", sid, b'{"prompt": "2+5"}'))["answer"] == 7
    post(port, f"/runtimes/{ARN}/stopruntimesession", sid, b"{}")


def footprint(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), rss


def settle(pid, baseline, timeout=30):
    """Descriptors and threads come back (Dispatch lets idle threads go after a few seconds)."""
    deadline = time.time() + timeout
    while True:
        now = footprint(pid)
        if (now[0] <= baseline[0] and now[1] <= baseline[1] + 4) or time.time() > deadline:
            return now
        time.sleep(0.5)


def churn_config(runtime_extra=""):
    """The demo runtime, its ended sessions not kept; `runtime_extra`: more of its YAML fields."""
    return f"""endedRetentionSeconds: 0
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
{runtime_extra}"""


def test_churn_leaves_no_trace(start_daemon, tmp_path):
    leases = tmp_path / "leases"
    d = start_daemon(churn_config(), extra_args=["--uid-lease-dir", str(leases)])
    pool = ThreadPoolExecutor(8)
    # Warm-up: pools, caches and lazily made state reach their steady size before the baseline.
    list(pool.map(lambda _: one_session(d.port), range(40)))
    baseline = settle(d.process.pid, (10**9, 10**9), timeout=0)
    time.sleep(6)
    baseline = footprint(d.process.pid)

    start = time.time()
    list(pool.map(lambda _: one_session(d.port), range(CHURN)))
    elapsed = time.time() - start
    pool.shutdown()
    fds, threads, rss = settle(d.process.pid, baseline)
    print(f"\n{CHURN} sessions in {elapsed:.1f} s; fds {baseline[0]} -> {fds}, threads {baseline[1]} -> {threads}, "
          f"RSS {baseline[2] / 1024:.1f} -> {rss / 1024:.1f} MiB")

    assert fds <= baseline[0], f"descriptors grew from {baseline[0]} to {fds}"
    # Dispatch keeps a few idle workers for the blocking sandbox work; what matters is that they do not grow with N.
    assert threads <= baseline[1] + 4, f"threads grew from {baseline[1]} to {threads}"
    # malloc keeps the high-water mark of eight sessions at once (measured: +10 MiB after 300, +13 MiB after
    # 1,200 and after 3,000); a flat bound, so a leak of a few KiB per session fails `make soak`'s 10,000.
    assert rss - baseline[2] <= 16 * 1024, f"RSS grew {(rss - baseline[2]) / 1024:.1f} MiB over {CHURN} sessions"

    assert d.cubicle_json("ps")["sessions"] == []
    assert not d.pids_in_cgroups(), "no process of an ended session"
    children = [os.path.join(p, c) for p in cgroup_dirs(d.cgroup_parent) for c in os.listdir(p)
                if os.path.isdir(os.path.join(p, c))]
    # Spare cgroups made ahead of time (cgroup v1's pool, `pool-*`) never held a session.
    spares = [c for c in children if os.path.basename(c).startswith("pool-")]
    assert len({os.path.basename(c) for c in spares}) <= 2, f"more spares than the pool keeps: {spares}"
    assert all(open(os.path.join(c, "cgroup.procs")).read() == "" for c in spares), "a spare cgroup holds a process"
    assert not [c for c in children if c not in spares], f"cgroups left: {children[:5]}"
    assert os.listdir(os.path.join(d.state_dir, "sandboxes")) == [], "no state of an ended sandbox"
    assert os.listdir(leases) == [], "no uid range still leased"
    with open("/proc/self/mounts") as f:
        assert not [l for l in f if d.state_dir in l]


def test_public_churn_leaves_no_link_route_rule_or_element(start_daemon, tmp_path):
    """PUBLIC sessions churned: each one's link, route, set elements and DNS grants go with it; only the
    links made ahead of time (two) remain, and cubicled's descriptors come back."""
    internet = FakeInternet({"api.example.test": "a"})
    try:
        net = session_network()
        d = start_daemon(churn_config(f"""    networkConfiguration: {{networkMode: PUBLIC}}
    egress: {{allow: [api.example.test, {internet.hosts['b']}/32]}}
"""), extra_args=["--egress-interface", internet.link, "--dns-upstream", internet.dns, "--session-network", net])
        def one_public_session(_):
            # Each one resolves a name, so its DNS grant is in the kernel when it ends.
            sid = new_session_id()
            assert json.loads(post(d.port, f"/runtimes/{ARN}/invocations", sid, b'{"prompt": "2+5"}'))["answer"] == 7
            r = d.cubicle("exec", sid, "--", "getent", "hosts", "api.example.test", check=False)
            assert internet.hosts["a"] in r.stdout, (r.stdout, r.stderr)
            post(d.port, f"/runtimes/{ARN}/stopruntimesession", sid, b"{}")

        pool = ThreadPoolExecutor(8)
        list(pool.map(one_public_session, range(20)))
        time.sleep(6)
        baseline = footprint(d.process.pid)
        count = max(CHURN // 3, 30)
        list(pool.map(one_public_session, range(count)))
        pool.shutdown()
        fds, threads, _ = settle(d.process.pid, baseline)
        assert fds <= baseline[0], f"descriptors grew from {baseline[0]} to {fds}"
        assert threads <= baseline[1] + 4, f"threads grew from {baseline[1]} to {threads}"
        prefix = net.rsplit(".", 1)[0] + "."
        routes = [l for l in subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout.splitlines() if l.startswith(prefix)]
        assert len(routes) <= 2, f"routes of ended sessions: {routes}"
        table = re.search(r"table=(cubicle_\w+)", d.log_text()).group(1)
        listing = json.loads(subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True, check=True).stdout)
        leftover = {o["set"]["name"]: o["set"]["elem"] for o in listing["nftables"]
                    if "set" in o and o["set"]["name"] not in ("refused", "private") and o["set"].get("elem")}
        assert leftover == {}, f"elements of ended sessions: {leftover}"
    finally:
        internet.close()
