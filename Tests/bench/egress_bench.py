"""PUBLIC sessions beside SANDBOX ones and beside the host itself, in the same run.

    python3 Tests/bench/egress_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

A fake internet of the bench's own (Tests/e2e/fake_internet.py: a network namespace, a veth pair, test
hosts) holds a sink and an echo server; cubicled's --egress-interface is the host's end of that link.
- new session to first answer, the demo agent, SANDBOX and PUBLIC alternating (the link and its policy
  are made before the sandbox; the spawn itself is the same);
- bulk throughput to the sink, and connect + one-byte round trip to the echo server, from a PUBLIC
  session and from the host (the same Python script, the host's /usr/bin/python3);
- host memory per PUBLIC session over a SANDBOX one: cubicled's RSS and the kernel's (Slab, KernelStack,
  PageTables, Percpu), with N live sessions of each.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "e2e"))
from dataplane_bench import SESSION_HEADER, free_port, pct, rss_kib, sid, wait_http  # noqa: E402
from fake_internet import FakeInternet, session_network  # noqa: E402

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")

SERVERS = r'''
import socket, sys, threading
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], port)); s.listen(512)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def sink(c):
    n, buf = 0, bytearray(1 << 20)
    while True:
        k = c.recv_into(buf)
        if not k: break
        n += k
    c.sendall(str(n).encode()); c.close()
def echo(c):
    d = c.recv(1)
    if d: c.sendall(d)
    c.close()
serve(5001, sink); serve(5002, echo)
print("serving", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import socket, sys, time, json
host, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "bulk":
    chunk = b"x" * (1 << 20)
    t = time.perf_counter()
    s = socket.create_connection((host, 5001))
    for _ in range(n): s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64))
    took = time.perf_counter() - t
    assert got == n << 20
    print(json.dumps({"mib_per_s": n / took}))
else:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s = socket.create_connection((host, 5002)); s.sendall(b"x"); assert s.recv(1) == b"x"; s.close()
        times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}))
'''


def path(runtime, op="invocations"):
    return "/runtimes/" + urllib.parse.quote(f"arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/{runtime}", safe="") + "/" + op


def call(port, runtime, session, op="invocations", body=b'{"prompt": "2+5"}'):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path(runtime, op), body=body, headers={SESSION_HEADER: session, "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.status == 200, (r.status, data[:200])


def new_session(port, runtime):
    session = sid()
    t = time.perf_counter()
    call(port, runtime, session)
    return session, time.perf_counter() - t


def kernel_kib():
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            fields[k] = int(v.split()[0])
    return sum(fields.get(k, 0) for k in ("Slab", "KernelStack", "PageTables", "Percpu"))


def main():
    internet = FakeInternet({})
    tag = uuid.uuid4().hex[:8]
    state = f"/tmp/cubicle-bench-{tag}"
    admin = f"{state}/admin.sock"
    config = f"{state}.yaml"
    port = free_port()
    target = internet.hosts["a"]
    internet.serve(sys.executable, "-c", SERVERS, target)
    with open(config, "w") as f:
        f.write(f"""lifecycleMinimumSeconds: 60
runtimes:
  - name: sbx
    command: [/app/cubicle-demo-agent]
    codeDirectory: {state}-code
    limits: {{memory: 256MiB}}
  - name: pub
    command: [/app/cubicle-demo-agent]
    codeDirectory: {state}-code
    limits: {{memory: 256MiB}}
    networkConfiguration: {{networkMode: PUBLIC}}
    egress: {{allow: [{target}/32]}}
""")
    os.makedirs(f"{state}-code")
    subprocess.run(["cp", f"{PRODUCTS}/cubicle-demo-agent", f"{state}-code/"], check=True)
    daemon = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--state-dir", state, "--admin-socket", admin, "--data-dir", f"{state}-data",
                               "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning", "--config", config,
                               "--egress-interface", internet.link, "--dns-upstream", internet.dns, "--session-network", session_network()])
    spawn = {"sbx": [], "pub": []}
    try:
        wait_http(port)
        for runtime in ("sbx", "pub"):
            s, _ = new_session(port, runtime)
            call(port, runtime, s, "stopruntimesession", b"{}")
        for _ in range(60):
            for runtime in ("sbx", "pub"):
                s, took = new_session(port, runtime)
                spawn[runtime].append(took)
                call(port, runtime, s, "stopruntimesession", b"{}")
                time.sleep(0.02)

        probe, _ = new_session(port, "pub")

        def in_session(mode, n):
            r = subprocess.run([f"{PRODUCTS}/cubicle", "exec", "--admin-socket", admin, "--timeout", "300", probe, "--",
                                "/usr/bin/python3", "-c", CLIENT, target, mode, str(n)], capture_output=True, text=True, check=True)
            return json.loads(r.stdout)

        def on_host(mode, n):
            r = subprocess.run(["/usr/bin/python3", "-c", CLIENT, target, mode, str(n)], capture_output=True, text=True, check=True)
            return json.loads(r.stdout)

        bulk = {"session": [], "host": []}
        setup = {"session": [], "host": []}
        for _ in range(5):
            bulk["host"].append(on_host("bulk", 1024)["mib_per_s"])
            bulk["session"].append(in_session("bulk", 1024)["mib_per_s"])
            setup["host"].append(on_host("rtt", 2000)["p50_us"])
            setup["session"].append(in_session("rtt", 2000)["p50_us"])
        call(port, "pub", probe, "stopruntimesession", b"{}")

        n = 40
        memory = {}
        for runtime in ("sbx", "pub"):
            time.sleep(2)
            k0, r0 = kernel_kib(), rss_kib(daemon.pid)
            sessions = [new_session(port, runtime)[0] for _ in range(n)]
            time.sleep(2)
            k1, r1 = kernel_kib(), rss_kib(daemon.pid)
            memory[runtime] = ((k1 - k0) / n, (r1 - r0) / n)
            for s in sessions:
                call(port, runtime, s, "stopruntimesession", b"{}")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        internet.close()
        os.unlink(config)
        subprocess.run(["rm", "-rf", f"{state}-code", f"{state}-data"])

    ms = lambda x: f"{x * 1e3:.2f} ms"
    sbx50, pub50 = statistics.median(spawn["sbx"]), statistics.median(spawn["pub"])
    bh, bs = statistics.median(bulk["host"]), statistics.median(bulk["session"])
    sh, ss = statistics.median(setup["host"]), statistics.median(setup["session"])
    print("## PUBLIC sessions: spawn, throughput, connection set-up and memory\n")
    print("`python3 Tests/bench/egress_bench.py .build/release` (run by `make bench`): a fake internet in a network namespace "
          "of the bench's own (a veth pair to the host), the demo agent; 60 new sessions of each mode, alternating; 5 rounds "
          "of 1 GiB bulk and of 2,000 connect + one-byte round trips, session and host alternating, medians; "
          f"memory with {n} live sessions of each mode.\n")
    print("| new session to first answer | p50 | p99 | goal |")
    print("|---|---|---|---|")
    print(f"| SANDBOX | {ms(sbx50)} | {ms(pct(spawn['sbx'], 0.99))} | |")
    print(f"| PUBLIC | {ms(pub50)} | {ms(pct(spawn['pub'], 0.99))} | p50 within 0.5 ms of SANDBOX: {(pub50 - sbx50) * 1e3:+.2f} ms |")
    print()
    print("| to a test host through the fake internet | host | PUBLIC session | session / host | goal |")
    print("|---|---|---|---|---|")
    print(f"| bulk TCP throughput | {bh:.0f} MiB/s | {bs:.0f} MiB/s | {bs / bh:.2f}x | ≥ 0.8x |")
    print(f"| connect + 1-byte round trip, p50 | {sh:.0f} µs | {ss:.0f} µs | {sh / ss:.2f}x the host's rate | ≥ 0.8x |")
    print()
    print("| host memory per session | kernel (Slab, stacks, page tables, per-CPU) | cubicled RSS |")
    print("|---|---|---|")
    for runtime, name in (("sbx", "SANDBOX"), ("pub", "PUBLIC")):
        print(f"| {name} | {memory[runtime][0]:.0f} KiB | {memory[runtime][1]:.0f} KiB |")
    print(f"| PUBLIC's networking (the difference) | {memory['pub'][0] - memory['sbx'][0]:.0f} KiB | {memory['pub'][1] - memory['sbx'][1]:.0f} KiB |")
    print("\nNo process per session: a PUBLIC session's networking is its veth pair, its routes and its set elements in the kernel, "
          "and an entry in cubicled's table of sessions.")


if __name__ == "__main__":
    main()
