"""Data-plane benchmark: cubicled beside the same agent called directly, in the same run.

    python3 Tests/bench/dataplane_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

- cold invoke: a new session id each time -> full response (sandbox spawn, agent start, first /ping, invoke)
- warm invoke: one session, one keep-alive connection, through cubicled vs straight to cubicle-demo-agent
- 100 MB echo: streamed both ways through cubicled vs direct, byte-exact, with cubicled's RSS growth
"""
import http.client
import json
import os
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


def main():
    tag = uuid.uuid4().hex[:8]
    port, agent_port = free_port(), free_port()
    state = f"/tmp/cubicle-bench-{tag}"
    daemon = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--state-dir", state,
                               "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning"])
    agent = subprocess.Popen([f"{PRODUCTS}/cubicle-demo-agent"], env={"PORT": str(agent_port)}, stdout=subprocess.DEVNULL)
    try:
        wait_http(port)
        wait_http(agent_port)
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

        # 100 MB echo, three rounds each, best of three.
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
        echo_via, echo_direct, exact = [], [], True
        for _ in range(3):
            e, ok = echo(port, PATH, size, warm_session); echo_via.append(e); exact &= ok
            e, ok = echo(agent_port, "/invocations", size, warm_session); echo_direct.append(e); exact &= ok
        sampling[0] = False
        sampler.join()
        stop(port, warm_session)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        agent.kill()
        agent.wait()

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
    print(f"| 100 MB echo, best of 3 | {ev:.3f} s | {ed:.3f} s | {ev / ed:.2f}× direct, byte-exact: {'yes' if exact else 'NO'} | ≤ 1.3× |")
    print(f"| cubicled RSS during the echoes | {rss_before / 1024:.1f} MiB before | peak {peak[0] / 1024:.1f} MiB | growth {(peak[0] - rss_before) / 1024:.1f} MiB | ≤ 32 MiB |")


if __name__ == "__main__":
    main()
