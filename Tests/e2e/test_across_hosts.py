"""Sessions across hosts: three cubicled instances behind a stock HAProxy that hashes the session id header.

Each instance stands in for one host (its own port, state dir, cgroup parent). HAProxy is Debian's package,
configured as docs/deploy.md says: `balance hdr(X-Amzn-Bedrock-AgentCore-Runtime-Session-Id)` with
`hash-type consistent`, and `/ping` as the health check.
"""
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import time

import boto3
import pytest
from botocore.config import Config

from conftest import ARN_PREFIX, free_port, new_session_id, private_loopback_address

SESSIONS = 40


def haproxy_config(address, port, stats_socket, servers):
    lines = [
        "global",
        f"  stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "  mode http",
        "  timeout connect 2s",
        "  timeout client 60s",
        "  timeout server 60s",
        "  retries 3",
        "  option redispatch",
        "frontend agentcore",
        f"  bind {address}:{port}",
        "  default_backend cubicled",
        "backend cubicled",
        "  balance hdr(X-Amzn-Bedrock-AgentCore-Runtime-Session-Id)",
        "  hash-type consistent",
        "  option httpchk GET /ping",
        "  default-server inter 200ms fall 1 rise 1",
    ]
    lines += [f"  server {name} 127.0.0.1:{p} check" for name, p in servers]
    return "\n".join(lines) + "\n"


class HAProxy:
    def __init__(self, tmp_path, servers):
        # haproxy cannot report a port it picked, so it gets an address no other test binds.
        self.address = private_loopback_address()
        self.port = free_port(self.address)
        self.stats_socket = str(tmp_path / "haproxy.sock")
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.address, self.port, self.stats_socket, servers))
        self.log = open(tmp_path / "haproxy.log", "wb")
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        # An empty status (the stats socket not up yet) is not "every server UP": waiting on it alone once
        # let a test connect before haproxy listened.
        self.wait_until(lambda: self.listening() and self.all_up(len(servers)), "listening with every server UP")

    def all_up(self, count):
        status = self.server_status()
        return len(status) == count and all(s == "UP" for s in status.values())

    def listening(self):
        try:
            socket.create_connection((self.address, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def server_status(self):
        """{server name: UP/DOWN/...} from the stats socket."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.stats_socket)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "cubicled" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_until(self, condition, what, timeout=20):
        deadline = time.time() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.process.returncode}")
            if time.time() > deadline:
                raise AssertionError(f"haproxy: not {what} after {timeout}s: {self.server_status()}")
            time.sleep(0.05)

    def client(self):
        return boto3.client("bedrock-agentcore", endpoint_url=f"http://{self.address}:{self.port}", region_name="us-east-1",
                            aws_access_key_id="local", aws_secret_access_key="local",
                            config=Config(retries={"max_attempts": 1}, read_timeout=60))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)  # soft stop
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def haproxy(tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    started = []

    def start(servers):
        proxy = HAProxy(tmp_path, servers)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def where_sessions_live(daemons):
    """{session id: [names of the instances that list it live]}."""
    seen = {}
    for name, d in daemons.items():
        for row in d.cubicle_json("ps")["sessions"]:
            seen.setdefault(row["id"], []).append(name)
    return seen


def test_sessions_stick_to_one_instance_spread_and_move_only_when_theirs_stops(start_daemon, haproxy):
    daemons = {name: start_daemon() for name in ("a", "b", "c")}
    proxy = haproxy([(name, d.port) for name, d in daemons.items()])
    client = proxy.client()
    sessions = [new_session_id() for _ in range(SESSIONS)]

    def turn(sid):
        import json
        r = client.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                        payload=json.dumps({"prompt": "2+5"}))
        return json.loads(r["response"].read())["turn"]

    # Every call of a session reaches the same agent process: its turn counter goes 1, 2, 3.
    for expected in (1, 2, 3):
        assert [turn(s) for s in sessions] == [expected] * SESSIONS

    placement = where_sessions_live(daemons)
    assert set(placement) == set(sessions)
    assert all(len(names) == 1 for names in placement.values()), "a session id has sandboxes on two instances"
    counts = {name: sum(names == [name] for names in placement.values()) for name in daemons}
    assert all(n > 0 for n in counts.values()), f"sessions did not spread over the three instances: {counts}"

    # One instance goes away: only its sessions end; the consistent hash leaves everyone else's where it was.
    assert daemons["b"].stop() == 0
    proxy.wait_until(lambda: proxy.server_status().get("b", "").startswith("DOWN"), "b DOWN")
    on_b = {s for s, names in placement.items() if names == ["b"]}
    turns = {s: turn(s) for s in sessions}
    assert {s for s, t in turns.items() if t == 1} == on_b, "only b's sessions start over"
    assert all(turns[s] == 4 for s in sessions if s not in on_b), "sessions on a and c kept their sandboxes"

    survivors = {name: d for name, d in daemons.items() if name != "b"}
    after = where_sessions_live(survivors)
    assert set(after) == set(sessions), "b's session ids got fresh sandboxes on a or c"
    assert all(len(names) == 1 for names in after.values())
    assert all(after[s] == placement[s] for s in sessions if s not in on_b)
