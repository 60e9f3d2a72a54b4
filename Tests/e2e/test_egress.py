"""PUBLIC sessions: policed egress, the session DNS, and role credentials from the metadata endpoint.

Every address these tests send to is loopback, a session's, the host's end of the test's own link, or a test
host inside the test's own network namespace (fake_internet.py); cubicled's --egress-interface is the host's
end of that link, so even a wrong policy could not send a packet off this machine."""
import json
import os
import subprocess
import time

import pytest

from conftest import ARN_PREFIX, PRODUCTS, new_session_id
from fake_internet import FakeInternet, session_network

NAMES = {"api.example.test": "a", "x.wild.test": "b", "y.wild.test": "c", "denied.wild.test": "d", "other.test": "e",
         "private.test": "private"}


@pytest.fixture
def internet():
    fi = FakeInternet(NAMES)
    yield fi
    fi.close()


def public_config(internet, allow=None, deny=None, extra="", top=""):
    egress = ""
    if allow is not None or deny is not None:
        egress = "    egress:\n"
        if allow is not None:
            egress += f"      allow: {json.dumps(allow)}\n"
        if deny is not None:
            egress += f"      deny: {json.dumps(deny)}\n"
    return f"""lifecycleMinimumSeconds: 1
healthPollSeconds: 0.2
{top}
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
  - name: web
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
    networkConfiguration: {{networkMode: PUBLIC}}
{egress}{extra}"""


def start_public(start_daemon, internet, tmp_path=None, **kw):
    net = session_network()
    d = start_daemon(public_config(internet, **kw), extra_args=["--egress-interface", internet.link, "--dns-upstream", internet.dns,
                                                                "--session-network", net])
    d.session_network = net
    return d


def new_session(d, runtime="web"):
    sid = new_session_id()
    d.invoke({"prompt": "hi"}, sid, runtime=runtime)
    return sid


def run_in(d, sid, script, timeout=30):
    """Runs a Python script inside the session (the host's /usr is its userland); returns (rc, stdout, stderr)."""
    r = d.cubicle("exec", "--timeout", str(timeout), sid, "--", "/usr/bin/python3", "-c", script, check=False, timeout=timeout + 10)
    return r.returncode, r.stdout, r.stderr


CONNECT = r'''
import socket, sys, time, json
out = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    t = time.monotonic()
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = s.recv(200).decode(errors="replace")
        out.append([target, "ok", data.split("\r\n")[0], round(time.monotonic() - t, 3)])
    except OSError as e:
        out.append([target, type(e).__name__ + ":" + str(e.errno), "", round(time.monotonic() - t, 3)])
print(json.dumps(out))
'''


def connect_from(d, sid, *targets):
    rc, out, err = run_in(d, sid, CONNECT.replace("sys.argv[1:]", repr(list(targets))))
    assert rc == 0, err
    return {t: (result, line, seconds) for t, result, line, seconds in json.loads(out)}


def test_public_session_reaches_allowed_cidr_and_nothing_else(start_daemon, internet):
    a, b = internet.hosts["a"], internet.hosts["b"]
    d = start_public(start_daemon, internet, allow=[a + "/32"])
    sid = new_session(d)
    got = connect_from(d, sid, f"{a}:80", f"{b}:80")
    assert got[f"{a}:80"][0] == "ok" and "200" in got[f"{a}:80"][1], got
    assert got[f"{b}:80"][0] != "ok", got
    # Refused at once (a reset or an ICMP error), not after a timeout.
    assert got[f"{b}:80"][2] < 1.0, got
