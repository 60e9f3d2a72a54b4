"""Data-plane benchmark: cubicled beside the same agent called directly, in the same run.

    python3 Tests/bench/dataplane_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

- cold invoke: a new session id each time -> full response (sandbox spawn, agent start, first /ping, invoke)
- warm invoke: one session, one keep-alive connection, through cubicled vs straight to cubicle-demo-agent
- throughput: wrk at concurrency 1 and 16 on one warm session, through cubicled vs straight to the agent vs
  HAProxy (Debian's) proxying to the same agent
- 100 MB echo: streamed both ways through cubicled vs direct vs HAProxy, byte-exact, with cubicled's RSS growth
With CUBICLE_BENCH_SAMPLES=DIR, each cold invoke's nanoseconds go to DIR/cold-invoke.txt for the plot.
"""
import http.client
import json
import os
import shutil
import tempfile
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")
ARN = urllib.parse.quote("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/demo", safe="")
PATH = f"/runtimes/{ARN}/invocations"
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path="/ping"):
    for _ in range(400):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"nothing on port {port}")


def pct(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, int((len(s) - 1) * p))]


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


ECHO_ROUNDS = 7


def sid():
    return "bench-" + uuid.uuid4().hex + uuid.uuid4().hex[:6]


def invoke(conn, session, body, path=PATH):
    conn.request("POST", path, body=body, headers={SESSION_HEADER: session, "Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, (r.status, data[:200])
    return data


def stop(port, session):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", f"/runtimes/{ARN}/stopruntimesession", body=b"{}", headers={SESSION_HEADER: session})
    c.getresponse().read()


def echo(port, path, size, session):
    """Streams `size` random-ish bytes up while reading the echo down; returns (seconds, ok)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
            f"{SESSION_HEADER}: {session}\r\n\r\n").encode()
    block = os.urandom(1 << 20)
    sent_crc = [0]

    def send():
        s.sendall(head)
        left, crc = size, 0
        while left:
            chunk = block[:min(left, len(block))]
            s.sendall(chunk)
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        sent_crc[0] = crc

    start = time.perf_counter()
    t = threading.Thread(target=send)
    t.start()
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head_end = buf.index(b"\r\n\r\n") + 4
    body = buf[head_end:]
    got, crc = len(body), zlib.crc32(body)
    while got < size:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
        crc = zlib.crc32(chunk, crc)
    elapsed = time.perf_counter() - start
    t.join()
    s.close()
    return elapsed, got == size and crc == sent_crc[0]


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"prompt": "2+5", "user_id": "1"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"] = os.getenv("CUBICLE_SID")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status + e.connect + e.read + e.write + e.timeout))
end
"""


def start_haproxy(work, port, agent_port):
    cfg = os.path.join(work, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend agentcore
    bind 127.0.0.1:{port}
    default_backend agent
backend agent
    server agent 127.0.0.1:{agent_port}
""")
    return subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk(url, script, session, connections, seconds):
    """Requests per second, p50 and p99 in microseconds, and errors, from one wrk run."""
    threads = 1 if connections == 1 else 2
    r = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", script, url],
                       capture_output=True, text=True, env=dict(os.environ, CUBICLE_SID=session))
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk: {r.stdout}{r.stderr}")
    n, duration_us, p50, p99, errors = map(int, line.split()[1:])
    return n / (duration_us / 1e6), p50, p99, errors


def throughput(port, agent_port, haproxy_port, session, work):
    """Rounds at each concurrency, the three targets interleaved; the best round's rate and its latencies."""
    script = os.path.join(work, "invoke.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    targets = {"cubicled": f"http://127.0.0.1:{port}{PATH}", "direct": f"http://127.0.0.1:{agent_port}/invocations",
               "haproxy": f"http://127.0.0.1:{haproxy_port}/invocations"}
    results = {}
    for c in (1, 16):
        for _ in range(2):
            for name, url in targets.items():
                got = wrk(url, script, session, c, 4)
                if (name, c) not in results or got[0] > results[(name, c)][0]:
                    results[(name, c)] = got
    return results


def main():
    tag = uuid.uuid4().hex[:8]
    port, agent_port, haproxy_port = free_port(), free_port(), free_port()
    work = tempfile.mkdtemp(prefix="cubicle-bench-")
    haproxy = None
    state = f"/tmp/cubicle-bench-{tag}"
    daemon = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--state-dir", state,
                               "--data-dir", f"{work}/data", "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning"])
    agent = subprocess.Popen([f"{PRODUCTS}/cubicle-demo-agent"], env={"PORT": str(agent_port)}, stdout=subprocess.DEVNULL)
    try:
        wait_http(port)
        wait_http(agent_port)
        if shutil.which("haproxy") and shutil.which("wrk"):
            haproxy = start_haproxy(work, haproxy_port, agent_port)
            wait_http(haproxy_port)
        body = json.dumps({"prompt": "2+5", "user_id": "1"}).encode()

        # Cold: a new session each time; the session is stopped afterwards, outside the timing.
        for _ in range(5):
            s = sid(); invoke(http.client.HTTPConnection("127.0.0.1", port), s, body); stop(port, s)
        cold = []
        for _ in range(100):
            s = sid()
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.connect()
            t0 = time.perf_counter()
            invoke(conn, s, body)
            cold.append(time.perf_counter() - t0)
            conn.close()
            stop(port, s)

        # Warm: interleaved rounds, so drift on the machine hits both sides alike.
        warm_session = sid()
        via = http.client.HTTPConnection("127.0.0.1", port)
        direct = http.client.HTTPConnection("127.0.0.1", agent_port)
        invoke(via, warm_session, body)
        warm_via, warm_direct = [], []
        for _ in range(200):
            invoke(via, warm_session, body); invoke(direct, warm_session, body, "/invocations")
        for _ in range(20):
            for _ in range(100):
                t0 = time.perf_counter(); invoke(via, warm_session, body); warm_via.append(time.perf_counter() - t0)
            for _ in range(100):
                t0 = time.perf_counter(); invoke(direct, warm_session, body, "/invocations"); warm_direct.append(time.perf_counter() - t0)

        rates = throughput(port, agent_port, haproxy_port, warm_session, work) if haproxy else None

        # 100 MB echo, seven rounds with the targets interleaved: best of seven, and the medians beside it.
        size = 100_000_000
        rss_before = rss_kib(daemon.pid)
        peak = [rss_before]
        sampling = [True]

        def sample():
            while sampling[0]:
                peak[0] = max(peak[0], rss_kib(daemon.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        echo_via, echo_direct, echo_haproxy, exact = [], [], [], True
        for _ in range(ECHO_ROUNDS):
            e, ok = echo(port, PATH, size, warm_session); echo_via.append(e); exact &= ok
            e, ok = echo(agent_port, "/invocations", size, warm_session); echo_direct.append(e); exact &= ok
            if haproxy:
                e, ok = echo(haproxy_port, "/invocations", size, warm_session); echo_haproxy.append(e); exact &= ok
        sampling[0] = False
        sampler.join()
        stop(port, warm_session)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        agent.kill()
        agent.wait()
        if haproxy:
            haproxy.kill()
            haproxy.wait()
        shutil.rmtree(work, ignore_errors=True)

    if os.environ.get("CUBICLE_BENCH_SAMPLES"):
        with open(os.path.join(os.environ["CUBICLE_BENCH_SAMPLES"], "cold-invoke.txt"), "w") as f:
            f.write("".join(f"{int(x * 1e9)}\n" for x in cold))

    ms = lambda x: f"{x * 1e3:.2f} ms"
    us = lambda x: f"{x * 1e6:.0f} µs"
    wv, wd = statistics.median(warm_via), statistics.median(warm_direct)
    ev, ed = min(echo_via), min(echo_direct)
    print("## Data plane: cubicled beside the agent called directly\n")
    print(f"`python3 Tests/bench/dataplane_bench.py .build/release` (run by `make bench`), cubicle-demo-agent, "
          f"Python http.client on loopback. Cold: 100 new sessions; warm: 2,000 requests each side, interleaved in rounds of 100.\n")
    print("| measure | cubicled | direct | result | goal |")
    print("|---|---|---|---|---|")
    print(f"| cold invoke (new session id -> full response), p50 | {ms(statistics.median(cold))} | — | p99 {ms(pct(cold, 0.99))} | p50 ≤ 15 ms |")
    print(f"| warm invoke, p50 | {us(wv)} | {us(wd)} | added {us(wv - wd)} | added ≤ 150 µs |")
    print(f"| warm invoke, p99 | {us(pct(warm_via, 0.99))} | {us(pct(warm_direct, 0.99))} | | |")
    mv, md = statistics.median(echo_via), statistics.median(echo_direct)
    print(f"| 100 MB echo, best of {ECHO_ROUNDS} | {ev:.3f} s | {ed:.3f} s | {ev / ed:.2f}× direct (medians {mv / md:.2f}×), byte-exact: {'yes' if exact else 'NO'} | ≤ 1.3× |")
    if echo_haproxy:
        eh, mh = min(echo_haproxy), statistics.median(echo_haproxy)
        print(f"| 100 MB echo through HAProxy (the peer), best of {ECHO_ROUNDS} | {eh:.3f} s | {ed:.3f} s | {eh / ed:.2f}× direct (medians {mh / md:.2f}×); cubicled {ev / eh:.2f}× HAProxy | |")
    print(f"| cubicled RSS during the echoes | {rss_before / 1024:.1f} MiB before | peak {peak[0] / 1024:.1f} MiB | growth {(peak[0] - rss_before) / 1024:.1f} MiB | ≤ 32 MiB |")
    print()
    print("### Warm throughput: cubicled, the agent directly, and HAProxy in front of the same agent\n")
    if rates is None:
        print("Not measured: needs `haproxy` and `wrk` (Debian packages).")
        return
    print(f"`wrk -t1 -c1` and `wrk -t2 -c16`, 4 s per run, two rounds with the three targets interleaved, best round kept; "
          f"every request is a warm invoke of one session (`{{\"prompt\": \"2+5\"}}`). HAProxy {haproxy_version()} "
          f"with its defaults (keep-alive both sides) proxies to the same cubicle-demo-agent the direct runs reach.\n")
    print("| concurrency | target | requests/s | p50 | p99 | errors | cubicled ÷ it (requests/s) |")
    print("|---|---|---|---|---|---|---|")
    for c in (1, 16):
        mine = rates[("cubicled", c)][0]
        for name in ("cubicled", "direct", "haproxy"):
            rps, p50, p99, errors = rates[(name, c)]
            ratio = "" if name == "cubicled" else f"{mine / rps:.2f}×"
            print(f"| {c} | {name} | {rps:,.0f} | {p50} µs | {p99} µs | {errors} | {ratio} |")
    print(f"\nGoal: cubicled's warm throughput ≥ 0.8× HAProxy's in front of the same agent. At concurrency 16 it is "
          f"{rates[('cubicled', 16)][0] / rates[('haproxy', 16)][0]:.2f}×; at concurrency 1, "
          f"{rates[('cubicled', 1)][0] / rates[('haproxy', 1)][0]:.2f}×.")


def haproxy_version():
    r = subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
    return r.stdout.split()[2] if r.returncode == 0 and len(r.stdout.split()) > 2 else "?"


if __name__ == "__main__":
    main()
