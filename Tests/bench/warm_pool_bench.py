"""Cold invoke of the bedrock-agentcore SDK agent, with and without a warm pool, in the same run.

    python3 Tests/bench/warm_pool_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

Both runtimes run sandbox/agents/runtime_context_agent.py from the same virtualenv. "Cold" is a new
session id -> full response. With a pool the measured invocation claims a sandbox that was started and
answered /ping before the session existed; the bench waits for the pool to refill between invocations, so
each one measures a claim, not a pool run dry.
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
from agent_venv import ensure_agent_venv, python_runtime  # noqa: E402
from dataplane_bench import SESSION_HEADER, free_port, pct, sid, wait_http  # noqa: E402

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")


def path(runtime):
    return "/runtimes/" + urllib.parse.quote(f"arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/{runtime}", safe="") + "/invocations"


def cold_invoke(port, runtime, body):
    session = sid()
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    t0 = time.perf_counter()
    conn.request("POST", path(runtime), body=body, headers={SESSION_HEADER: session, "Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    took = time.perf_counter() - t0
    assert r.status == 200 and json.loads(data)["session_id"] == session, (r.status, data[:200])
    conn.close()
    stop = http.client.HTTPConnection("127.0.0.1", port)
    stop.request("POST", path(runtime).replace("/invocations", "/stopruntimesession"), body=b"{}", headers={SESSION_HEADER: session})
    stop.getresponse().read()
    return took


def direct_first_invocation(venv, body):
    """The peer: the same agent started straight on the host (no sandbox, no cubicled), its /ping answered,
    then its first /invocations on a new connection, the request a claimed warm sandbox serves first."""
    port = free_port()
    agents = os.path.join(os.path.dirname(os.path.dirname(HERE)), "sandbox", "agents")
    agent = subprocess.Popen([f"{venv}/bin/python", "-c", f"import runtime_context_agent as a; a.app.run(port={port})"],
                             cwd=agents, env={"PYTHONDONTWRITEBYTECODE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port)
        time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.connect()
        t0 = time.perf_counter()
        conn.request("POST", "/invocations", body=body, headers={SESSION_HEADER: sid(), "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        took = time.perf_counter() - t0
        assert r.status == 200
        return took
    finally:
        agent.kill()
        agent.wait()


def warm_count(admin_socket, runtime):
    out = subprocess.run([f"{PRODUCTS}/cubicle", "ps", "--admin-socket", admin_socket, "--json"], capture_output=True, text=True, check=True).stdout
    return sum(1 for w in json.loads(out)["warm"] if w["runtime"] == runtime and w["state"] == "warm")


def main():
    venv = ensure_agent_venv()
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    state = f"/tmp/cubicle-bench-{tag}"
    admin = f"{state}/admin.sock"
    config = f"{state}.yaml"
    pool = 2
    with open(config, "w") as f:
        f.write("runtimes:\n" + python_runtime("sdk", "runtime_context_agent.py", venv)
                + python_runtime("sdkpool", "runtime_context_agent.py", venv, extra=f"    warmPool: {pool}\n"))
    daemon = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", f"127.0.0.1:{port}", "--state-dir", state, "--admin-socket", admin, "--data-dir", f"{state}-data",
                               "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "warning", "--config", config])
    body = json.dumps({"prompt": "2+5", "user_id": "1"}).encode()
    try:
        direct = [direct_first_invocation(venv, body) for _ in range(15)]
        wait_http(port)
        cold_invoke(port, "sdk", body)
        without = [cold_invoke(port, "sdk", body) for _ in range(15)]
        with_pool = []
        for _ in range(40):
            deadline = time.time() + 60
            while warm_count(admin, "sdkpool") < pool:
                assert time.time() < deadline, "the warm pool did not refill"
                time.sleep(0.05)
            with_pool.append(cold_invoke(port, "sdkpool", body))
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        os.unlink(config)
        subprocess.run(["rm", "-rf", f"{state}-data"])

    ms = lambda x: f"{x * 1e3:.2f} ms"
    p50_without, p50_with = statistics.median(without), statistics.median(with_pool)
    print("## Warm pool: cold invoke of the bedrock-agentcore SDK agent\n")
    print("`python3 Tests/bench/warm_pool_bench.py .build/release` (run by `make bench`): "
          "sandbox/agents/runtime_context_agent.py (bedrock-agentcore 1.25, uvicorn) under Debian's Python 3.11. "
          f"Without a pool: 15 new sessions; with `warmPool: {pool}`: 40 new sessions, each after the pool refilled; the peer is the same agent started straight on the host.\n")
    print("| cold invoke (new session id -> full response) | p50 | p99 | goal |")
    print("|---|---|---|---|")
    print(f"| without a warm pool | {ms(p50_without)} | {ms(pct(without, 0.99))} | |")
    print(f"| with a warm pool | {ms(p50_with)} | {ms(pct(with_pool, 0.99))} | p50 ≤ 5 ms |")
    print(f"| peer: the agent's first invocation called directly on the host (15 fresh processes) | {ms(statistics.median(direct))} | {ms(pct(direct, 0.99))} | |")
    print(f"\nThe pool makes a new session's first answer {p50_without / p50_with:.0f}× faster; with it, that answer takes "
          f"{p50_with / statistics.median(direct):.2f}× the agent's own first answer called directly (p50), so what is left "
          "is mostly the agent's first-request cost (Python's first-use work), not the sandbox.")


if __name__ == "__main__":
    main()
