"""Hostile input: from clients (bad ids, ARNs, JSON, trickled heads, thousands of idle connections) and from
inside sandboxes (an agent that breaks HTTP). Each gets its error; nothing else is affected."""
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse

import pytest

from conftest import ARN_PREFIX, REPO, new_session_id, short_lifecycle_config

HOSTILE = os.path.join(REPO, "Tests", "e2e", "hostile")
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"


def hostile_config(**top):
    return short_lifecycle_config(idle=60, initializationTimeoutSeconds=3, extra_runtimes=f"""  - name: hostile
    command: [/usr/bin/python3, /app/hostile_agent.py]
    codeDirectory: {HOSTILE}
    limits: {{memory: 256MiB}}
  - name: mute
    command: [/usr/bin/python3, /app/hostile_agent.py]
    codeDirectory: {HOSTILE}
    environmentVariables: {{HOSTILE_PING: never}}
""", **top)


def path_for(runtime):
    return "/runtimes/" + urllib.parse.quote(ARN_PREFIX + runtime, safe="") + "/invocations"


def raw_invoke(port, runtime, session, body, timeout=30):
    """(status, headers, body bytes, error) over plain http.client, so a broken stream is seen as such."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", path_for(runtime), body=json.dumps(body).encode() if not isinstance(body, bytes) else body,
              headers={SESSION_HEADER: session, "Content-Type": "application/json"})
    r = c.getresponse()
    got, error = 0, None
    try:
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    except (http.client.IncompleteRead, ConnectionError, socket.timeout) as e:
        error = e
    declared = r.getheader("Content-Length")
    if error is None and declared is not None and got < int(declared):
        error = http.client.IncompleteRead(b"", int(declared) - got)  # http.client returns short reads silently
    c.close()
    return r.status, dict(r.getheaders()), got, error


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def still_serves(d):
    """Another session on another runtime works, and the hostile session itself still answers."""
    assert d.invoke_json({"prompt": "2+5"}, new_session_id())["answer"] == 7


@pytest.fixture
def hostile(start_daemon):
    return start_daemon(hostile_config())


# --- from inside the sandbox ---

@pytest.mark.parametrize("mode", ["malformed", "endless-headers", "bad-chunk"])
def test_agent_breaking_http_before_its_body_is_a_424_and_the_session_goes_on(hostile, mode):
    sid = new_session_id()
    c = hostile.client()
    assert json.loads(hostile.invoke({"mode": "ok"}, sid, runtime="hostile", client=c)[1])["answer"] == "fine"
    if mode == "bad-chunk":
        # The head is valid, so the response has begun: the client sees the stream cut, not a 424.
        status, _, _, error = raw_invoke(hostile.port, "hostile", sid, {"mode": mode})
        assert status == 200 and error is not None, "a body that is not HTTP ends the client's stream short"
    else:
        with pytest.raises(c.exceptions.RuntimeClientError) as info:
            hostile.invoke({"mode": mode}, sid, runtime="hostile", client=c)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424
        assert "did not answer" in info.value.response["Error"]["Message"]
    again = json.loads(hostile.invoke({"mode": "ok"}, sid, runtime="hostile", client=c)[1])
    assert again["answer"] == "fine", "the agent is still there, on a fresh connection"
    still_serves(hostile)


def test_agent_sending_a_1_gib_chunk_is_streamed_not_buffered(hostile):
    sid = new_session_id()
    hostile.invoke({"mode": "ok"}, sid, runtime="hostile")
    before = rss_kib(hostile.process.pid)
    status, _, got, error = raw_invoke(hostile.port, "hostile", sid, {"mode": "huge-chunk"}, timeout=60)
    growth_mib = (rss_kib(hostile.process.pid) - before) / 1024
    assert status == 200
    assert got == 64 << 20, "every byte the agent sent reached the client"
    assert error is not None, "the agent closed inside its declared chunk: the client's stream is cut"
    assert growth_mib < 32, f"cubicled grew {growth_mib:.1f} MiB relaying 64 MiB"
    still_serves(hostile)


def test_agent_closing_mid_response_cuts_the_clients_stream(hostile):
    sid = new_session_id()
    status, headers, got, error = raw_invoke(hostile.port, "hostile", sid, {"mode": "close-mid"})
    assert status == 200 and got == 10 and error is not None
    assert json.loads(hostile.invoke({"mode": "ok"}, sid, runtime="hostile")[1])["answer"] == "fine"
    still_serves(hostile)


def test_agent_that_never_answers_ping_fails_initialization_only(hostile):
    c = hostile.client()
    sid = new_session_id()
    with pytest.raises(c.exceptions.RuntimeClientError) as info:
        hostile.invoke({"mode": "ok"}, sid, runtime="mute", client=c)
    assert info.value.response["Error"]["Message"].startswith("Runtime initialization time exceeded.")
    still_serves(hostile)
    assert not [s for s in hostile.cubicle_json("ps")["sessions"] if s["id"] == sid], "the failed session is not live"


def test_client_disconnecting_from_an_agent_that_never_answers_frees_the_request(hostile):
    sid = new_session_id()
    hostile.invoke({"mode": "ok"}, sid, runtime="hostile")
    s = socket.create_connection(("127.0.0.1", hostile.port))
    body = json.dumps({"mode": "never"}).encode()
    s.sendall((f"POST {path_for('hostile')} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n{SESSION_HEADER}: {sid}\r\n\r\n").encode() + body)
    time.sleep(0.5)
    s.close()
    assert json.loads(hostile.invoke({"mode": "ok"}, sid, runtime="hostile")[1])["answer"] == "fine"
    still_serves(hostile)


# --- from clients ---

@pytest.mark.parametrize("arn", [
    "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/",          # no name
    "arn:aws:bedrock-agentcore:us-east-1:123456789012:agent/demo",        # not a runtime
    "arn:aws:s3:::bucket",                                                # another service
    "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/de mo\x00",  # hostile bytes
    "x" * 5000,                                                           # huge
])
def test_bad_arns_are_typed_errors(daemon, arn):
    c = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    c.request("POST", "/runtimes/" + urllib.parse.quote(arn, safe="") + "/invocations", body=b"{}",
              headers={SESSION_HEADER: new_session_id()})
    r = c.getresponse()
    body = r.read()
    assert 400 <= r.status < 500, (r.status, body)
    assert r.getheader("x-amzn-ErrorType"), "the error names its type, as AWS's do"
    assert json.loads(body)["message"]
    still_serves(daemon)


@pytest.mark.parametrize("sid", ["short", "x" * 32, "x" * 257, "x" * 5000, "id with spaces" + "x" * 30, "tab\there" + "x" * 30])
def test_session_ids_of_the_wrong_length_or_with_blanks_are_validation_errors(daemon, sid):
    c = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    c.request("POST", path_for("demo"), body=b"{}", headers={SESSION_HEADER: sid})
    r = c.getresponse()
    body = r.read()
    assert r.status == 400 and r.getheader("x-amzn-ErrorType", "").startswith("ValidationException"), (r.status, body)
    assert daemon.cubicle_json("ps")["sessions"] == [], "nothing was created"


@pytest.mark.parametrize("sid", ["../../../../../../etc/passwd" + "x" * 10, "id;$(reboot)`id`|&<>" + "x" * 20,
                                 "%2e%2e%2f" * 5, "a" * 256])
def test_odd_but_legal_session_ids_are_opaque(daemon, sid):
    """AWS puts no pattern on the id (33..256 characters), so neither do we; it never names a file or a cgroup."""
    assert daemon.invoke_json({"prompt": "2+5"}, sid)["session_id"] == sid
    assert daemon.invoke_json({"prompt": "add 1"}, sid)["answer"] == 8, "the same id reaches the same sandbox"
    for root, dirs, files in os.walk(daemon.state_dir):
        for name in dirs + files:
            assert "passwd" not in name and "$" not in name and "%" not in name, os.path.join(root, name)


@pytest.mark.parametrize("body", [b"{not json", b"[1,2", b"\xff\xfe\x00", b'{"command": 5}'])
def test_malformed_command_bodies_are_validation_errors(daemon, body):
    c = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    c.request("POST", "/runtimes/" + urllib.parse.quote(ARN_PREFIX + "demo", safe="") + "/commands", body=body,
              headers={SESSION_HEADER: new_session_id(), "Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 400 and r.getheader("x-amzn-ErrorType", "").startswith("ValidationException")
    assert daemon.cubicle_json("ps")["sessions"] == []


def test_a_client_trickling_its_request_head_is_cut_off(start_daemon):
    d = start_daemon(short_lifecycle_config(clientIdleTimeoutSeconds=1))
    s = socket.create_connection(("127.0.0.1", d.port))
    s.settimeout(10)
    head = f"POST {path_for('demo')} HTTP/1.1\r\nHost: x\r\n{SESSION_HEADER}: {new_session_id()}\r\n".encode()
    start, closed = time.monotonic(), False
    for byte in head:
        try:
            s.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
        # Meanwhile others are served.
        if byte == ord("\n"):
            still_serves(d)
    if not closed:
        closed = s.recv(1) == b""
    elapsed = time.monotonic() - start
    s.close()
    assert closed, "the server closed the trickling connection"
    assert elapsed < 8, f"it took {elapsed:.1f} s"
    still_serves(d)


def test_thousands_of_idle_connections_neither_block_service_nor_leak(start_daemon):
    d = start_daemon(short_lifecycle_config(clientIdleTimeoutSeconds=2))
    still_serves(d)
    baseline = fd_count(d.process.pid)
    conns = []
    for _ in range(2000):
        conns.append(socket.create_connection(("127.0.0.1", d.port)))
    t0 = time.monotonic()
    still_serves(d)
    assert time.monotonic() - t0 < 10
    # After the idle timeout every one of them is closed by the server and its descriptor released.
    deadline = time.monotonic() + 30
    open_left = conns
    while open_left and time.monotonic() < deadline:
        time.sleep(0.5)
        still = []
        for s in open_left:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            still.append(s)
        open_left = still
    for s in open_left:
        s.close()
    assert not open_left, f"{len(open_left)} idle connections were never closed"
    deadline = time.monotonic() + 10
    while fd_count(d.process.pid) > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fd_count(d.process.pid) <= baseline + 5, f"cubicled holds {fd_count(d.process.pid)} fds, {baseline} before"
    still_serves(d)
