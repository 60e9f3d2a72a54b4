"""The AgentCore data plane through boto3, against a real cubicled and real sandboxes."""
import json
import os
import subprocess
import threading
import uuid
import time

import botocore
import pytest

from conftest import ARN_PREFIX, PRODUCTS, new_session_id, short_lifecycle_config


def test_tutorial_five_invocations(daemon):
    """The runtime-context tutorial: continuity inside a session, isolation between sessions."""
    s1, s2, s3 = new_session_id(), new_session_id(), new_session_id()
    r1 = daemon.invoke_json({"prompt": "外の天気はどうですか?", "user_id": "1"}, s1)
    r2 = daemon.invoke_json({"prompt": "2+5の答えは?", "user_id": "1"}, s1)
    r3 = daemon.invoke_json({"prompt": "それに 34 を足すとどうなりますか?", "user_id": "1"}, s1)
    r4 = daemon.invoke_json({"prompt": "そしてそれにさらに 10 を足すとどうなりますか?", "user_id": "1"}, s2)
    r5 = daemon.invoke_json({"prompt": "天気はどうですか？", "user_id": "2"}, s3)

    assert (r1["answer"], r1["user"], r1["session_id"], r1["turn"]) == ("sunny", "Maira", s1, 1)
    assert (r2["answer"], r2["turn"]) == (7, 2)
    assert (r3["answer"], r3["turn"]) == (41, 3), "session 1 remembers 2+5 across invocations"
    assert r4["answer"] is None and r4["turn"] == 1 and r4["session_id"] == s2, "session 2 has no memory of session 1"
    assert "no previous result" in r4["message"]
    assert (r5["answer"], r5["user"], r5["turn"], r5["session_id"]) == ("sunny", "Mani", 1, s3)


def test_response_headers_and_content_type(daemon):
    sid = new_session_id()
    response, body = daemon.invoke({"prompt": "2*5"}, sid, traceId="Root=1-abc", traceParent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert response["contentType"] == "application/json"
    assert response["runtimeSessionId"] == sid
    assert response["traceId"] == "Root=1-abc"
    assert response["statusCode"] == 200
    assert json.loads(body)["answer"] == 10


def test_bare_runtime_name_with_account_id(daemon):
    c = daemon.client()
    r = c.invoke_agent_runtime(agentRuntimeArn="demo", accountId="123456789012", runtimeSessionId=new_session_id(),
                               payload=json.dumps({"prompt": "weather"}))
    assert json.loads(r["response"].read())["answer"] == "sunny"


def test_sse_arrives_event_by_event(daemon):
    sid = new_session_id()
    c = daemon.client()
    r = c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                               payload=json.dumps({"prompt": "2+5", "stream": True, "stream_events": 5, "stream_interval_ms": 300}))
    assert r["contentType"] == "text/event-stream"
    arrivals, events = [], []
    for line in r["response"].iter_lines(chunk_size=1):
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic())
            events.append(json.loads(line[6:]))
    assert [e.get("index") for e in events[:5]] == [0, 1, 2, 3, 4]
    assert events[-1]["answer"] == 7
    # The agent sleeps 300 ms between events; had cubicled buffered, they would arrive together.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(g > 0.15 for g in gaps) >= 4, gaps


def test_octet_stream_echo_is_byte_exact(daemon):
    import os
    blob = os.urandom(3 << 20)
    response, body = daemon.invoke(blob, new_session_id(), contentType="application/octet-stream")
    assert response["contentType"] == "application/octet-stream"
    assert body == blob


# --- errors, each as the modelled boto3 exception ---

def error_of(call):
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call()
    return info.value.response["Error"]["Code"], info.value.response["Error"]["Message"], info.value.response


def test_session_id_too_short_and_too_long(daemon):
    c = daemon.client(parameter_validation=False)
    for sid in ["x" * 32, "x" * 257]:
        code, message, _ = error_of(lambda: c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid, payload=b"{}"))
        assert code == "ValidationException" and "runtimeSessionId" in message
    with pytest.raises(c.exceptions.ValidationException):
        c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId="short")


def test_payload_over_limit(daemon):
    c = daemon.client(parameter_validation=False)
    code, message, _ = error_of(lambda: c.invoke_agent_runtime(
        agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=new_session_id(), payload=b"x" * 100_000_001))
    assert code == "ValidationException" and "100000000" in message


def test_malformed_command_body(daemon):
    c = daemon.client()

    def corrupt(request, **kwargs):
        request.body = b'{"command": '
        request.headers["Content-Length"] = str(len(request.body))

    c.meta.events.register("before-send.bedrock-agentcore.InvokeAgentRuntimeCommand", corrupt)
    with pytest.raises(c.exceptions.ValidationException) as info:
        c.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=new_session_id(), body={"command": "true"})
    assert info.value.response["reason"] == "CannotParse"


def test_unknown_runtime(daemon):
    c = daemon.client()
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "nope", runtimeSessionId=new_session_id(), payload=b"{}")
    with pytest.raises(c.exceptions.ValidationException):
        c.invoke_agent_runtime(agentRuntimeArn="arn:aws:s3:::bucket", runtimeSessionId=new_session_id(), payload=b"{}")


def test_stop_unknown_and_ended_session(daemon):
    c = daemon.client()
    sid = new_session_id()
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    daemon.invoke_json({"prompt": "2+5"}, sid)
    assert c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)["runtimeSessionId"] == sid
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)


def test_live_session_quota(start_daemon):
    d = start_daemon(short_lifecycle_config(idle=60, maxSessions=2))
    a, b = new_session_id(), new_session_id()
    d.invoke_json({"prompt": "1+1"}, a)
    d.invoke_json({"prompt": "1+1"}, b)
    c = d.client()
    with pytest.raises(c.exceptions.ServiceQuotaExceededException):
        d.invoke({"prompt": "1+1"}, new_session_id(), client=c)
    assert d.invoke_json({"prompt": "1+1"}, a)["turn"] == 2, "existing sessions still work at the quota"
    c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=a)
    assert d.invoke_json({"prompt": "1+1"}, new_session_id())["turn"] == 1, "a stopped session frees its slot"


def test_runtime_that_cannot_start(start_daemon):
    """A missing code directory is the runtime's fault, reported as RuntimeClientError (not retried), not 500."""
    d = start_daemon(short_lifecycle_config(extra_runtimes="""  - name: broken
    command: [/app/agent]
    codeDirectory: /nonexistent/cubicle-code
"""))
    c = d.client()
    with pytest.raises(c.exceptions.RuntimeClientError) as info:
        d.invoke({"prompt": "hi"}, new_session_id(), runtime="broken", client=c)
    assert "/nonexistent/cubicle-code" in info.value.response["Error"]["Message"]
    assert d.invoke_json({"prompt": "1+1"}, new_session_id())["answer"] == 2, "other runtimes are unaffected"


def test_agent_not_healthy_in_time(start_daemon):
    d = start_daemon(short_lifecycle_config(initializationTimeoutSeconds=1.5, extra_runtimes="""  - name: silent
    command: [/bin/sleep, "1000"]
"""))
    c = d.client()
    with pytest.raises(c.exceptions.RuntimeClientError) as info:
        d.invoke({"prompt": "hi"}, new_session_id(), runtime="silent", client=c)
    assert info.value.response["Error"]["Message"].startswith("Runtime initialization time exceeded.")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424


# --- sessions and lifecycle ---

def test_stop_ends_session_and_its_stream(daemon):
    sid = new_session_id()
    c = daemon.client()
    r = c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                               payload=json.dumps({"prompt": "2+5", "stream": True, "stream_events": 100, "stream_interval_ms": 100}))
    lines = r["response"].iter_lines(chunk_size=1)
    first = next(line for line in lines if line)
    assert first.startswith(b"data: ")
    daemon.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    rest = []
    with pytest.raises(Exception):
        for line in lines:
            rest.append(line)
    assert not any(b'"answer"' in line for line in rest), "the stream ended before the agent finished"
    assert daemon.invoke_json({"prompt": "1+1"}, sid)["turn"] == 1, "the stopped id gets a fresh sandbox"


def test_command_streams_output_and_exit_code(daemon):
    c = daemon.client()
    sid = new_session_id()
    daemon.invoke_json({"prompt": "2+5"}, sid)
    r = c.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                       body={"command": "echo out; echo err >&2; id -u; cat /proc/1/comm; ls /app; exit 7", "timeout": 30})
    assert r["contentType"] == "application/vnd.amazon.eventstream"
    events = [e["chunk"] for e in r["stream"]]
    assert events[0] == {"contentStart": {}}
    stdout = "".join(e["contentDelta"].get("stdout", "") for e in events if "contentDelta" in e)
    stderr = "".join(e["contentDelta"].get("stderr", "") for e in events if "contentDelta" in e)
    assert stdout.splitlines()[:2] == ["out", "1000"]
    assert "cubicle-demo-agent" in stdout, "the command sees the session's filesystem"
    assert stderr == "err\n"
    assert events[-1] == {"contentStop": {"exitCode": 7, "status": "COMPLETED"}}
    assert daemon.invoke_json({"prompt": "add 1"}, sid)["answer"] == 8, "the command ran in the same session"


def test_command_timeout(daemon):
    c = daemon.client()
    sid = new_session_id()
    daemon.invoke_json({"prompt": "1+1"}, sid)
    start = time.monotonic()
    r = c.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                       body={"command": "echo started; sleep 30", "timeout": 1})
    events = [e["chunk"] for e in r["stream"]]
    assert events[-1]["contentStop"]["status"] == "TIMED_OUT"
    assert any(e.get("contentDelta", {}).get("stdout") == "started\n" for e in events)
    assert time.monotonic() - start < 20


def test_a_command_needs_a_live_session_and_never_starts_one(daemon):
    """Commands run in a session the caller already has: an id with no live session (never used, or
    stopped) is ResourceNotFoundException, and nothing is started for it."""
    c = daemon.client()
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        c.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=new_session_id(), body={"command": "true"})
    assert daemon.cubicle_json("ps")["sessions"] == []


def command_output(d, sid, command):
    r = d.client().invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                                body={"command": command, "timeout": 30})
    return "".join(e["chunk"].get("contentDelta", {}).get("stdout", "") for e in r["stream"])


def test_a_command_whose_client_goes_away_is_ended(daemon):
    """A quiet command (nothing it writes would fail) with a ten-minute timeout: when its client leaves, init
    kills its process group at once instead of letting it run to the timeout."""
    sid = new_session_id()
    daemon.invoke_json({"prompt": "2+5"}, sid)
    marker = "q" + uuid.uuid4().hex[:12]
    r = daemon.client().invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                                     body={"command": f"echo started; sleep 600 & sleep 601; : {marker}", "timeout": 600})
    events = iter(r["stream"])
    assert next(events)["chunk"] == {"contentStart": {}}
    assert next(events)["chunk"]["contentDelta"]["stdout"] == "started\n"
    count = f"ps -eo args | grep -c -e '^sleep 60[01]$' -e '[{marker[0]}]{marker[1:]}'; true"
    assert command_output(daemon, sid, count).strip() == "3", "the command and both its sleeps run while their client is there"
    r["stream"].close()
    deadline = time.monotonic() + 20
    while (left := command_output(daemon, sid, count).strip()) != "0":
        assert time.monotonic() < deadline, f"{left} of the command's processes outlived its client"
        time.sleep(0.2)
    assert daemon.invoke_json({"prompt": "add 1"}, sid)["answer"] == 8, "only the command ended, not the session"


def test_a_client_gone_mid_command_does_not_keep_its_session_busy(start_daemon):
    """A command's output is streamed by the request that asked for it: when that client goes away the
    command is ended (init kills its process group), and once init has reaped it the session is idle again
    and ends by its idle timeout. Before, the output waited for a reader that had left, and the session
    stayed busy until its max lifetime."""
    d = start_daemon(short_lifecycle_config(idle=2))
    sid = new_session_id()
    d.invoke_json({"prompt": "2+5"}, sid)
    r = d.client().invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                                body={"command": "yes", "timeout": 3})
    events = iter(r["stream"])
    assert next(events)["chunk"] == {"contentStart": {}}
    assert "contentDelta" in next(events)["chunk"]
    r["stream"].close()
    # 3 s of command, 2 s of idle timeout, then the next invoke finds a fresh sandbox.
    def rows():
        return [row for row in d.cubicle_json("ps", "--all")["sessions"] if row["id"] == sid]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(row["state"] == "ended" for row in rows()):
        time.sleep(0.5)
    ended = [row for row in rows() if row["state"] == "ended"]
    assert ended and ended[-1]["endReason"] == "idle_timeout", rows()


def test_idle_timeout_ends_idle_session_not_busy_one(start_daemon):
    d = start_daemon(short_lifecycle_config(idle=2))
    idle, busy = new_session_id(), new_session_id()
    d.invoke_json({"prompt": "2+5"}, idle)
    d.invoke_json({"prompt": "2+5", "background_seconds": 5}, busy)
    time.sleep(3.5)
    assert d.invoke_json({"prompt": "add 1"}, busy)["answer"] == 8, "HealthyBusy kept the session past the idle timeout"
    after = d.invoke_json({"prompt": "add 1"}, idle)
    assert after["turn"] == 1 and after["answer"] is None, "the idle session ended; its id got a fresh sandbox"
    assert "reason=idle_timeout" in d.log_text()


def test_max_lifetime_ends_busy_session(start_daemon):
    d = start_daemon(short_lifecycle_config(idle=2, max_lifetime=3))
    sid = new_session_id()
    d.invoke_json({"prompt": "2+5", "background_seconds": 30}, sid)
    time.sleep(4)
    assert d.invoke_json({"prompt": "add 1"}, sid)["turn"] == 1
    assert "reason=max_lifetime" in d.log_text()


def test_agent_exit_ends_session(daemon):
    sid = new_session_id()
    daemon.invoke_json({"prompt": "2+5", "exit_code": 3}, sid)
    deadline = time.time() + 10
    while "reason=agent_exited" not in daemon.log_text() and time.time() < deadline:
        time.sleep(0.05)
    assert daemon.invoke_json({"prompt": "add 1"}, sid)["turn"] == 1


def test_racing_first_calls_make_one_sandbox(daemon):
    sid = new_session_id()
    results, errors = [], []
    barrier = threading.Barrier(4)

    def call():
        try:
            barrier.wait()
            results.append(daemon.invoke_json({"prompt": "1+1"}, sid))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    # One agent process served all four: its turn counter went 1..4. Two sandboxes would repeat a turn.
    assert sorted(r["turn"] for r in results) == [1, 2, 3, 4]
    assert daemon.log_text().count("session ready") == 1


def test_sigterm_leaves_nothing_behind(daemon):
    sids = [new_session_id() for _ in range(3)]
    for sid in sids:
        daemon.invoke_json({"prompt": "2+5"}, sid)
    c = daemon.client()
    r = c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sids[0],
                               payload=json.dumps({"stream": True, "stream_events": 1000, "stream_interval_ms": 50}))
    next(line for line in r["response"].iter_lines(chunk_size=1) if line)
    pids = daemon.pids_in_cgroups()
    assert len(pids) >= 6, "three sandboxes, each with init and the agent"
    assert daemon.stop() == 0
    assert daemon.leftovers() == []
    import os
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert alive == []
    assert "reason=daemon_shutdown" in daemon.log_text()


def test_client_disconnect_cancels_agent_request(start_daemon):
    """Closing the client mid-stream closes the agent's connection: the request is no longer in flight, so
    the session goes idle and its short idle timeout ends it, long before the agent's stream would finish."""
    import socket
    import urllib.parse
    d = start_daemon(short_lifecycle_config(idle=2))
    sid = new_session_id()
    body = json.dumps({"stream": True, "stream_events": 600, "stream_interval_ms": 100}).encode()
    path = "/runtimes/" + urllib.parse.quote(ARN_PREFIX + "demo", safe="") + "/invocations"
    s = socket.create_connection(("127.0.0.1", d.port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
              f"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id: {sid}\r\n\r\n".encode() + body)
    assert b"data: " in s.recv(65536) + s.recv(65536)
    s.close()
    deadline = time.time() + 15
    while "reason=idle_timeout" not in d.log_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "reason=idle_timeout" in d.log_text(), "the 60 s stream still held the session busy"


@pytest.mark.parametrize("listen_host", ["0.0.0.0", "[::]", "192.0.2.1", "example.org"])
def test_a_listener_other_hosts_can_reach_needs_insecure_no_auth(tmp_path, listen_host):
    """Without --credentials the data plane checks no caller and runs commands in sessions, so cubicled
    refuses to start on anything but a loopback address unless --insecure-no-auth says the operator knows. It fails (exit 1,
    so a service manager sees it) before it makes its state directory or binds anything, naming the flag."""
    state = tmp_path / "state"
    r = subprocess.run([os.path.join(PRODUCTS, "cubicled"), "--listen", f"{listen_host}:0", "--state-dir", str(state),
                        "--admin-socket", str(tmp_path / "admin.sock"), "--cgroup-parent", f"cubicle-e2e-refused-{uuid.uuid4().hex[:8]}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "--insecure-no-auth" in r.stderr and "checks no caller" in r.stderr, r.stderr
    assert not state.exists() and not (tmp_path / "admin.sock").exists(), "refused before anything was made"


@pytest.mark.parametrize("config, says", [("runtimes: [", "is not valid YAML"), ("runtimes: []\n", "must be a non-empty list")])
def test_a_daemon_that_refuses_its_config_leaves_no_state_directory(tmp_path, config, says):
    """A refusal after the state directory was made (here: the config) removes the directory it made."""
    state, path = tmp_path / "state", tmp_path / "bad.yaml"
    path.write_text(config)
    r = subprocess.run([os.path.join(PRODUCTS, "cubicled"), "--listen", "127.0.0.1:0", "--state-dir", str(state), "--config", str(path),
                        "--admin-socket", str(tmp_path / "admin.sock"), "--data-dir", str(tmp_path / "data"),
                        "--cgroup-parent", f"cubicle-e2e-refused-{uuid.uuid4().hex[:8]}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and says in r.stderr, (r.returncode, r.stderr)
    assert not state.exists(), "the refused daemon left its state directory"


@pytest.mark.parametrize("listen_host", ["127.0.0.2", "[::1]"])
def test_loopback_listeners_need_no_flag(start_daemon, listen_host):
    d = start_daemon(listen_host=listen_host)
    assert d.process.poll() is None
