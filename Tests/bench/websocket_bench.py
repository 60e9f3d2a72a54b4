"""What cubicled's WebSocket relay costs: the bedrock-agentcore SDK's `@app.websocket` agent
(sandbox/agents/websocket_agent.py) reached through cubicled (`/runtimes/ARN/ws`, in a session), beside the
same agent run on the host and connected to directly, in the same run.

    python3 Tests/bench/websocket_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

- echo round trip: one 64-byte text frame out, its echo back, on one connection, paced under AgentCore's 250
  frames a second (cubicled closes a faster client); rounds alternate between the two targets so drift on the
  machine hits both alike
- push: the agent sends 2,000 frames of 16 KiB; the time until the client has them all
"""
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from agent_venv import VenvUnavailable, ensure_agent_venv, python_runtime  # noqa: E402
from dataplane_bench import free_port, pct  # noqa: E402

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
ROUNDS, PER_ROUND, PUSHES, PUSH_FRAMES, PUSH_BYTES = 10, 100, 5, 2000, 16 << 10
PACE = 1 / 200  # seconds between echoes: under the 250 frames a second a client may send


def wait_port(port, deadline=60):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


def main():
    try:
        from websockets.sync.client import connect
    except ImportError:
        print("## WebSockets: cubicled's relay beside the agent directly\n\nNot measured: needs the `websockets` package.\n")
        return
    try:
        venv = ensure_agent_venv()
    except VenvUnavailable as e:
        print(f"## WebSockets: cubicled's relay beside the agent directly\n\nNot measured: {e}\n")
        return
    work = tempfile.mkdtemp(prefix="cubicle-wsbench-")
    tag = uuid.uuid4().hex[:8]
    port, agent_port = free_port(), free_port()
    config = os.path.join(work, "cubicle.yaml")
    with open(config, "w") as f:
        f.write("runtimes:\n" + python_runtime("ws", "websocket_agent.py", venv))
    log = open(os.path.join(work, "cubicled.log"), "wb")
    daemon = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--state-dir", f"/tmp/cubicle-bench-{tag}",
                               "--admin-socket", f"{work}/admin.sock", "--data-dir", f"{work}/data", "--config", config,
                               "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    agent = subprocess.Popen([os.path.join(venv, "bin", "python"), os.path.join(REPO, "sandbox", "agents", "websocket_agent.py")],
                             env={"PORT": str(agent_port), "PYTHONDONTWRITEBYTECODE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_port(agent_port)
        arn = urllib.parse.quote("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/ws", safe="")
        session = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex[:6]
        via = connect(f"ws://127.0.0.1:{port}/runtimes/{arn}/ws", additional_headers={SESSION_HEADER: session}, open_timeout=120, max_size=None)
        direct = connect(f"ws://127.0.0.1:{agent_port}/ws", additional_headers={SESSION_HEADER: session}, open_timeout=30, max_size=None)
        text = "x" * 64

        def echo(ws):
            t0 = time.perf_counter(); ws.send(text); ws.recv(); t = time.perf_counter() - t0
            time.sleep(max(0.0, PACE - t))
            return t
        for ws in (via, direct):
            for _ in range(50):
                echo(ws)
        rtt = {"via": [], "direct": []}
        for _ in range(ROUNDS):
            for name, ws in (("via", via), ("direct", direct)):
                rtt[name] += [echo(ws) for _ in range(PER_ROUND)]
        push = {"via": [], "direct": []}
        for _ in range(PUSHES):
            for name, ws in (("via", via), ("direct", direct)):
                t0 = time.perf_counter()
                ws.send(f"push {PUSH_FRAMES} {PUSH_BYTES}")
                for _ in range(PUSH_FRAMES):
                    ws.recv()
                assert ws.recv() == f"pushed {PUSH_FRAMES}"
                push[name].append(time.perf_counter() - t0)
        via.close(); direct.close()
    finally:
        agent.terminate(); agent.wait()
        daemon.terminate(); daemon.wait()
        subprocess.run(["rm", "-rf", work])

    us = lambda s: f"{s * 1e6:.0f} µs"
    v, d = statistics.median(rtt["via"]), statistics.median(rtt["direct"])
    pv, pd = min(push["via"]), min(push["direct"])
    mb = PUSH_FRAMES * PUSH_BYTES / 1e6
    print("## WebSockets: cubicled's relay beside the agent directly\n")
    print(f"`python3 Tests/bench/websocket_bench.py .build/release` (run by `make bench`): the SDK's `@app.websocket` agent in a "
          f"session through cubicled, and the same agent on the host connected to directly; {ROUNDS} interleaved rounds of {PER_ROUND} echoes, "
          f"{PUSHES} interleaved pushes of {PUSH_FRAMES} × {PUSH_BYTES >> 10} KiB frames (best kept).\n")
    print("| measure | cubicled | direct | result | goal |")
    print("|---|---|---|---|---|")
    print(f"| 64-byte echo round trip, p50 | {us(v)} | {us(d)} | added {us(v - d)} | added ≤ 150 µs |")
    print(f"| 64-byte echo round trip, p99 | {us(pct(rtt['via'], 0.99))} | {us(pct(rtt['direct'], 0.99))} | | |")
    print(f"| push {mb:.0f} MB in 16 KiB frames | {mb / pv:.0f} MB/s | {mb / pd:.0f} MB/s | {pd / pv:.2f}× direct's rate | ≥ 0.8× |")
    print()


if __name__ == "__main__":
    main()
