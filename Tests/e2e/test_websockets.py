"""WebSockets on the data plane (issue 29): `/runtimes/{arn}/ws` upgraded by cubicled and relayed to the
agent's `/ws` inside the session, with AgentCore's limits. The agent is the bedrock-agentcore SDK's own
`@app.websocket` (sandbox/agents/websocket_agent.py); the client is the `websockets` package."""
import json
import time
import urllib.parse

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from agent_venv import python_runtime
from conftest import ARN_PREFIX, new_session_id
from test_auth import ALICE, BOB, PRINCIPALS as AUTH_PRINCIPALS, write_credentials

websockets = pytest.importorskip("websockets", reason="the WebSocket tests' client (pip install websockets)")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"


def ws_config(venv, limits="", idle=60, **top):
    lines = ["lifecycleMinimumSeconds: 1", "healthPollSeconds: 0.2"] + [f"{k}: {v}" for k, v in top.items()]
    runtime = python_runtime("ws", "websocket_agent.py", venv, idle=idle)
    if limits:
        runtime = runtime.replace("limits: {memory: 512MiB}", "limits: {memory: 512MiB, " + limits + "}")
    return "\n".join(lines) + "\nruntimes:\n" + runtime


def ws_url(d, runtime="ws", query=""):
    arn = urllib.parse.quote(ARN_PREFIX + runtime, safe="")
    return f"ws://127.0.0.1:{d.port}/runtimes/{arn}/ws" + (f"?{query}" if query else "")


def open_ws(d, sid, runtime="ws", headers=None, **kwargs):
    return connect(ws_url(d, runtime), additional_headers={SESSION_HEADER: sid, **(headers or {})}, open_timeout=60,
                   max_size=None, **kwargs)


def close_code(ws, timeout=10):
    """The close code the server sent, waiting for the connection to end."""
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


def cubicled_rss_kib(d):
    with open(f"/proc/{d.process.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_frames_both_ways_in_one_session_that_stays_busy_while_connected(start_daemon, venv):
    d = start_daemon(ws_config(venv, idle=2))
    sid = new_session_id()
    with open_ws(d, sid, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Custom-Team": "blue"}) as ws:
        assert ws.response.headers[SESSION_HEADER] == sid
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo: hello"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv(timeout=10) == b"\x00\x01binary\xff", "binary frames pass unchanged"
        ws.send("push 5 1000")
        frames = [ws.recv(timeout=10) for _ in range(6)]
        assert [len(f) for f in frames[:5]] == [1000] * 5 and frames[5] == "pushed 5", "the agent pushes frames unasked"
        ws.send("context")
        context = json.loads(ws.recv(timeout=10))
        assert context["session_id"] == sid
        assert {k.lower(): v for k, v in context["custom"].items()} == {"x-amzn-bedrock-agentcore-runtime-custom-team": "blue"}
        # Idle timeout 2 s: a session with a socket open is busy, not idle.
        time.sleep(4)
        ws.send("context")
        assert json.loads(ws.recv(timeout=10))["pid"] == context["pid"], "the session outlived its idle timeout while connected"
    # The socket closed: now idle, the session ends.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and d.cubicle_json("ps", "--json")["sessions"]:
        time.sleep(0.2)
    assert d.cubicle_json("ps", "--json")["sessions"] == [], "idle once the socket closed, the session ended"
    # The same id through invoke: another session, since that one ended; a WebSocket shares invoke's sessions.
    r = json.loads(d.client().invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "ws", runtimeSessionId=sid, payload="{}")["response"].read())
    with open_ws(d, sid) as ws:
        ws.send("context")
        assert json.loads(ws.recv(timeout=10))["pid"] == r["pid"], "a WebSocket reaches the session invoke made"


def test_a_new_id_or_none_starts_a_session_and_the_query_carries_the_session_id(start_daemon, venv):
    """Also: `?qualifier=` names the endpoint, as for invoke."""
    d = start_daemon(ws_config(venv))
    with connect(ws_url(d), open_timeout=60) as ws:
        made = ws.response.headers[SESSION_HEADER]
        assert len(made) >= 33, "without an id, a new session, its id returned in the 101"
        ws.send("context")
        assert json.loads(ws.recv(timeout=10))["session_id"] == made
    sid = new_session_id()
    query = urllib.parse.urlencode({"qualifier": "DEFAULT", SESSION_HEADER: sid, "X-Amzn-Bedrock-AgentCore-Runtime-Custom-Mode": "q"})
    with connect(ws_url(d, query=query), open_timeout=60) as ws:
        ws.send("context")
        context = json.loads(ws.recv(timeout=10))
        assert context["session_id"] == sid
        assert {k.lower(): v for k, v in context["custom"].items()} == {"x-amzn-bedrock-agentcore-runtime-custom-mode": "q"}


def test_close_codes_pass_both_ways(start_daemon, venv):
    d = start_daemon(ws_config(venv))
    sid = new_session_id()
    with open_ws(d, sid) as ws:
        ws.send("close 4002")
        assert close_code(ws) == 4002, "the agent's close code reaches the client"
    ws = open_ws(d, sid)
    ws.close(code=4001, reason="client done")
    with open_ws(d, sid) as ws:
        ws.send("lastclose")
        assert ws.recv(timeout=10) == "4001", "the client's close code reaches the agent"


def test_oversize_frames_and_floods_are_closed_with_their_codes(start_daemon, venv):
    d = start_daemon(ws_config(venv))
    sid = new_session_id()
    with open_ws(d, sid) as ws:
        ws.send(b"\x00" * (64 << 10))
        assert len(ws.recv(timeout=10)) == 64 << 10, "a 64 KiB frame is within the limit"
        ws.send(b"\x00" * ((64 << 10) + 1))
        assert close_code(ws) == 1009, "a frame over 64 KiB from the client: 1009"
    with open_ws(d, sid) as ws:
        ws.send("big")
        assert close_code(ws) == 1009, "a frame over 64 KiB from the agent: 1009"
    with open_ws(d, sid) as ws:
        try:
            for i in range(400):
                ws.send(f"f{i}")
        except ConnectionClosed:
            pass
        assert close_code(ws) == 1008, "more than 250 frames in a second: 1008"
    with open_ws(d, sid) as ws:
        ws.send("still served")
        assert ws.recv(timeout=10) == "echo: still served", "the session serves the next connection"


def test_a_client_that_stops_reading_is_throttled_without_cubicled_growing(start_daemon, venv):
    d = start_daemon(ws_config(venv))
    sid = new_session_id()
    with open_ws(d, sid, max_queue=4) as ws:
        ws.send("push 1 10")
        assert len(ws.recv(timeout=10)) == 10 and ws.recv(timeout=10) == "pushed 1"
        before = cubicled_rss_kib(d)
        ws.send("flood")
        # The client reads nothing for a while: the agent can only send what the buffers on the way hold.
        time.sleep(6)
        after = cubicled_rss_kib(d)
        sent = int(d.cubicle("exec", sid, "--", "cat", "/tmp/flood-sent").stdout.strip() or 0)
    print(f"agent sent {sent >> 20} MiB while the client read nothing; cubicled RSS {before >> 10} -> {after >> 10} MiB")
    assert sent < 64 << 20, f"the agent was held back ({sent} bytes sent of the 2 GiB it tried)"
    assert after - before < 32 << 10, f"cubicled's memory did not grow with the flood ({before} -> {after} KiB)"


def test_the_time_limit_and_stop_end_the_socket(start_daemon, venv):
    d = start_daemon(ws_config(venv, limits="webSocketSeconds: 2"))
    sid = new_session_id()
    with open_ws(d, sid) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo: hello"
        started = time.monotonic()
        assert close_code(ws, timeout=20) == 1008, "the connection time limit closes with 1008"
        assert 1.5 < time.monotonic() - started < 15
    d2 = start_daemon(ws_config(venv))
    sid = new_session_id()
    with open_ws(d2, sid) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo: hello"
        d2.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "ws", runtimeSessionId=sid)
        assert close_code(ws) == 1001, "stopping the session ends its sockets"


def test_a_plain_get_and_an_agent_without_ws_are_refused_as_errors(start_daemon, venv):
    d = start_daemon(ws_config(venv) + python_runtime("plain", "runtime_context_agent.py", venv))
    import urllib.request
    try:
        urllib.request.urlopen(ws_url(d).replace("ws://", "http://"), timeout=10)
        raise AssertionError("a GET without an upgrade was answered")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and e.headers["x-amzn-ErrorType"] == "ValidationException"
    with pytest.raises(InvalidStatus) as info:
        open_ws(d, new_session_id(), runtime="plain")
    assert info.value.response.status_code == 424
    assert info.value.response.headers["x-amzn-ErrorType"] == "RuntimeClientError"
    assert b"/ws" in info.value.response.body
    with pytest.raises(InvalidStatus) as info:
        open_ws(d, new_session_id(), runtime="nosuch")
    assert info.value.response.status_code == 404


# --- Who may connect: SigV4 headers, a presigned URL ---

# test_auth's principals (alice may do anything; bob may invoke, run commands and stop, but not open WebSockets
# or shells), and carol, a second principal who may.
CAROL = ("AKIACAROL00000000001", "carol-secret-0123456789abcdef")
PRINCIPALS = AUTH_PRINCIPALS + f"""  - name: carol
    accessKeys: [{{accessKeyId: {CAROL[0]}, secretAccessKey: {CAROL[1]}}}]
    allow:
      - actions: ["bedrock-agentcore:*"]
        resources: ["*"]
"""


def signed_headers(url, keys):
    request = AWSRequest(method="GET", url=url.replace("ws://", "http://"))
    SigV4Auth(Credentials(*keys), "bedrock-agentcore", "us-east-1").add_auth(request)
    return {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-amz-date")}


def presigned(url, keys, expires=300):
    request = AWSRequest(method="GET", url=url.replace("ws://", "http://"))
    SigV4QueryAuth(Credentials(*keys), "bedrock-agentcore", "us-east-1", expires=expires).add_auth(request)
    return request.url.replace("http://", "ws://")


def test_upgrades_are_signed_by_header_or_presigned_url(start_daemon, venv, tmp_path):
    d = start_daemon(ws_config(venv), extra_args=["--credentials", write_credentials(tmp_path, PRINCIPALS)])
    sid = new_session_id()
    url = ws_url(d)
    with connect(url, additional_headers={SESSION_HEADER: sid, **signed_headers(url, ALICE)}, open_timeout=60) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo: hi", "SigV4 in the headers"
    url = ws_url(d, query=urllib.parse.urlencode({SESSION_HEADER: sid}))
    with connect(presigned(url, ALICE), open_timeout=60) as ws:
        ws.send("context")
        assert json.loads(ws.recv(timeout=10))["session_id"] == sid, "a presigned URL reaches alice's same session"
    for bad, code in [(lambda: connect(url, open_timeout=30), "MissingAuthenticationTokenException"),
                      (lambda: connect(presigned(url, (ALICE[0], "wrong-secret-000000000000")), open_timeout=30), "InvalidSignatureException"),
                      (lambda: connect(presigned(url, ALICE).replace(sid, new_session_id()), open_timeout=30), "InvalidSignatureException"),
                      (lambda: connect(presigned(url, BOB), open_timeout=30), "AccessDeniedException")]:
        with pytest.raises(InvalidStatus) as info:
            bad()
        assert info.value.response.status_code == 403
        assert info.value.response.headers["x-amzn-ErrorType"] == code


def test_a_shell_answers_only_the_principal_whose_session_it_is(start_daemon, venv, tmp_path):
    d = start_daemon(ws_config(venv), extra_args=["--credentials", write_credentials(tmp_path, PRINCIPALS)])
    sid, shell_id = new_session_id(), "shared-name"
    arn = urllib.parse.quote(ARN_PREFIX + "ws", safe="")
    url = f"ws://127.0.0.1:{d.port}/runtimes/{arn}/ws/shells?" + urllib.parse.urlencode({"shellId": shell_id, SESSION_HEADER: sid})

    def open_shell(keys):
        ws = connect(presigned(url, keys), open_timeout=60)
        message = ws.recv(timeout=10)
        assert message[0] == 3
        return ws, json.loads(message[1:])

    alice, confirmation = open_shell(ALICE)
    assert confirmation["metadata"] == {"shellId": shell_id, "reconnected": False}
    alice.send(b"\x00export SECRET=alices\n")
    alice.close()
    carol, confirmation = open_shell(CAROL)
    assert confirmation["metadata"]["reconnected"] is False, "the same session id and shellId from another principal: a shell of its own"
    carol.send(b"\x00echo [$SECRET]\n")
    seen = b""
    while b"[]" not in seen and b"[alices]" not in seen:
        seen += carol.recv(timeout=10)[1:]
    assert b"[]" in seen, "carol's shell is in carol's own session"
    carol.close()
    with pytest.raises(InvalidStatus) as info:
        connect(presigned(url, BOB), open_timeout=30)
    assert info.value.response.headers["x-amzn-ErrorType"] == "AccessDeniedException", "InvokeAgentRuntimeCommandShell is its own permission"
    again, confirmation = open_shell(ALICE)
    assert confirmation["metadata"]["reconnected"] is True, "alice's shell waited for alice"
    again.close()
