"""What checking callers costs: a warm small invoke SigV4-signed to a cubicled with --credentials, beside the
same invoke unsigned to a cubicled without, in the same run.

    python3 Tests/bench/auth_bench.py PRODUCTS_DIR   (as root; prints a markdown section)

Both daemons serve the embedded demo runtime from the same build; each side has one warm session on one
keep-alive connection, and the rounds interleave so drift on the machine hits both alike. The signature is
botocore's own, made once before timing (a SigV4 signature stays valid for five minutes and has no nonce),
so the client's cost is the same on both sides but for the header bytes: what differs is cubicled's
verification (parsing, the canonical request, SHA-256 of the body, one HMAC with a cached signing key, the
permission check) and the warm road's holding of the body until it verifies.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

PRODUCTS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/release")
ARN = urllib.parse.quote("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/demo", safe="")
PATH = f"/runtimes/{ARN}/invocations"
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
KEY = ("AKIABENCH00000000001", "bench-secret-0123456789abcdef")
ROUNDS, PER_ROUND, PAIRS = 30, 100, 7


def start(work, name, extra):
    out = open(f"{work}/{name}.log", "wb")
    tag = uuid.uuid4().hex[:8]
    p = subprocess.Popen([f"{PRODUCTS}/cubicled", "--listen", "127.0.0.1:0", "--state-dir", f"/tmp/cubicle-bench-{tag}",
                          "--admin-socket", f"{work}/{name}.sock", "--data-dir", f"{work}/{name}-data",
                          "--cgroup-parent", f"cubicle-bench-{tag}", "--log-level", "notice", *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        text = open(f"{work}/{name}.log", errors="replace").read()
        for line in text.splitlines():
            if "cubicled ready" in line and "listen=" in line:
                return p, int(line.split("listen=")[1].split()[0].rsplit(":", 1)[1].rstrip("]"))
        if p.poll() is not None:
            raise RuntimeError(text)
        time.sleep(0.05)
    raise RuntimeError("cubicled did not start")


def send(conn, headers, body):
    conn.request("POST", PATH, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, (r.status, data[:300])


def cpu_seconds(pid):
    """User and system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(work, credentials, n):
    """One fresh pair of daemons: p50 and p90 of the signed and the unsigned invoke, alternating request by request."""
    plain, plain_port = start(work, f"unsigned-{n}", [])
    checked, checked_port = start(work, f"signed-{n}", ["--credentials", credentials])
    try:
        body = json.dumps({"prompt": "2+5", "user_id": "1"}).encode()
        session = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex[:6]
        unsigned_headers = {SESSION_HEADER: session, "Content-Type": "application/json", "Content-Length": str(len(body))}
        request = AWSRequest(method="POST", url=f"http://127.0.0.1:{checked_port}{PATH}", data=body,
                             headers={SESSION_HEADER: session, "Content-Type": "application/json"})
        SigV4Auth(Credentials(*KEY), "bedrock-agentcore", "us-east-1").add_auth(request)
        signed_headers = {**dict(request.headers.items()), "Content-Length": str(len(body))}
        a = http.client.HTTPConnection("127.0.0.1", plain_port)
        b = http.client.HTTPConnection("127.0.0.1", checked_port)
        for _ in range(300):
            send(a, unsigned_headers, body); send(b, signed_headers, body)
        unsigned, signed = [], []
        cpu0 = (cpu_seconds(plain.pid), cpu_seconds(checked.pid))
        for _ in range(ROUNDS * PER_ROUND):
            t0 = time.perf_counter(); send(a, unsigned_headers, body); t1 = time.perf_counter()
            send(b, signed_headers, body); t2 = time.perf_counter()
            unsigned.append(t1 - t0); signed.append(t2 - t1)
        cpu1 = cpu_seconds(plain.pid)
        n = ROUNDS * PER_ROUND
        cpu = ((cpu_seconds(checked.pid) - cpu0[1]) / n, (cpu1 - cpu0[0]) / n)
        return body, statistics.median(signed), statistics.median(unsigned), cpu
    finally:
        for p in (plain, checked):
            p.terminate()
            p.wait(timeout=60)


def main():
    work = tempfile.mkdtemp(prefix="cubicle-auth-bench-")
    credentials = f"{work}/principals.yaml"
    with open(credentials, "w") as f:
        f.write(f"principals:\n  - name: bench\n    accessKeys: [{{accessKeyId: {KEY[0]}, secretAccessKey: {KEY[1]}}}]\n"
                "    allow: [{actions: ['bedrock-agentcore:InvokeAgentRuntime'], resources: ['*']}]\n")
    os.chmod(credentials, 0o600)
    runs = [measure(work, credentials, n) for n in range(PAIRS)]
    body = runs[0][0]
    added = statistics.median(r[1] - r[2] for r in runs)
    cpu_added = statistics.median(r[3][0] - r[3][1] for r in runs)
    print("### Checking callers (SigV4)\n")
    print(f"{PAIRS} fresh pairs of cubicled (one with `--credentials`, one without), each with one warm session on one keep-alive "
          f"connection; {ROUNDS * PER_ROUND:,} invokes each side per pair, alternating request by request; the body `{body.decode()}`. "
          "Signed: botocore's SigV4; unsigned: the same request without. Python http.client on loopback. Which CPU each process "
          "wakes on moves a pair's figures by tens of µs either way, so the goal is judged on the median over the pairs.\n")
    print("| pair | signed p50 | unsigned p50 | added | cubicled CPU per invoke, signed | unsigned | added |")
    print("|---|---|---|---|---|---|---|")
    for n, (_, s, u, c) in enumerate(runs):
        print(f"| {n + 1} | {s * 1e6:.0f} µs | {u * 1e6:.0f} µs | {(s - u) * 1e6:+.1f} µs | {c[0] * 1e6:.0f} µs | {c[1] * 1e6:.0f} µs | {(c[0] - c[1]) * 1e6:+.1f} µs |")
    print(f"\nMedian over the pairs: a signed invoke takes {added * 1e6:+.1f} µs more than the same invoke unsigned (goal ≤ 20 µs: "
          f"{'met' if added <= 20e-6 else 'NOT met'}); cubicled's CPU per invoke {cpu_added * 1e6:+.1f} µs.")


if __name__ == "__main__":
    main()
