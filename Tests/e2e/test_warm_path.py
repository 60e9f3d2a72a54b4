"""The warm path: once a session is live and an agent link is open on the client connection's event loop,
InvokeAgentRuntime is forwarded part by part on that loop instead of through a request task. It must
answer exactly as the task path does, stream both ways, and fail the same way. Each test first drives its
own keep-alive connection until /metrics shows a forwarded invocation, so what follows takes that path."""
import http.client
import json
import os
import shutil
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from conftest import ARN_PREFIX, new_session_id, short_lifecycle_config
from test_hostile import hostile_config, still_serves

SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
FORWARDED = re.compile(r'^cubicle_invocations_forwarded_on_event_loop_total\{runtime="(\w+)"\} (\d+)', re.M)


def path_for(runtime):
    return "/runtimes/" + urllib.parse.quote(ARN_PREFIX + runtime, safe="") + "/invocations"


def forwarded(d, runtime="demo"):
    with urllib.request.urlopen(d.endpoint + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(n) for name, n in FORWARDED.findall(text) if name == runtime)


def post(conn, runtime, sid, body, content_type="application/json", headers=None):
    conn.request("POST", path_for(runtime), body=body,
                 headers={SESSION_HEADER: sid, "Content-Type": content_type, **(headers or {})})
    return conn.getresponse()


def raw_request(sid, body, content_type="application/json"):
    """An InvokeAgentRuntime as bytes, for tests that write to the socket themselves."""
    return (f"POST {path_for('demo')} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{SESSION_HEADER}: {sid}\r\n\r\n").encode() + body


def warm_connection(d, sid, runtime="demo", body=None):
    """A keep-alive connection whose next invocation of `sid` is forwarded on the event loop."""
    body = body or json.dumps({"prompt": "1+1"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    for _ in range(50):
        before = forwarded(d, runtime)
        r = post(conn, runtime, sid, body)
        r.read()
        assert r.status == 200
        if forwarded(d, runtime) > before:
            return conn
        time.sleep(0.05)
    raise AssertionError("no invocation was forwarded on the event loop")


def test_warm_invocations_answer_as_the_task_path_does(daemon):
    sid = new_session_id()
    conn = warm_connection(daemon, sid)
    before = forwarded(daemon)
    r = post(conn, "demo", sid, json.dumps({"prompt": "2*5", "user_id": "3"}).encode(),
             headers={"X-Amzn-Trace-Id": "Root=1-abc", "X-Amzn-Bedrock-AgentCore-Runtime-Custom-Color": "teal"})
    body = json.loads(r.read())
    assert forwarded(daemon) == before + 1, "this invocation took the event-loop path"
    assert r.status == 200
    assert r.getheader(SESSION_HEADER) == sid
    assert r.getheader("Content-Type") == "application/json"
    assert r.getheader("X-Amzn-Trace-Id") == "Root=1-abc", "trace headers come back as on the task path"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", r.getheader("x-amzn-RequestId"))
    assert body["session_id"] == sid and body["user"] == "Mark" and body["answer"] == 10
    # The same agent process, so memory carries over between the two paths.
    r = post(conn, "demo", sid, json.dumps({"prompt": "add 5 to that"}).encode())
    follow = json.loads(r.read())
    assert follow["answer"] == 15 and follow["pid"] == body["pid"] and follow["turn"] == body["turn"] + 1
    # Another client's first call on the same session goes through a task and reaches the same agent.
    assert daemon.invoke_json({"prompt": "1+2"}, sid)["pid"] == body["pid"]


def test_warm_request_ids_are_fresh_and_reach_the_agent(daemon):
    sid = new_session_id()
    conn = warm_connection(daemon, sid)
    before = forwarded(daemon)
    ids = set()
    for _ in range(5):
        r = post(conn, "demo", sid, json.dumps({"prompt": "1+1"}).encode())
        r.read()
        ids.add(r.getheader("x-amzn-RequestId"))
    assert forwarded(daemon) == before + 5
    assert len(ids) == 5


def test_a_new_sessions_second_call_is_forwarded(daemon):
    """The first call starts the session through a task; when its response ends, a link is opened on the
    connection's loop, so the second call on that connection is forwarded."""
    sid = new_session_id()
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    before = forwarded(daemon)
    r = post(conn, "demo", sid, json.dumps({"prompt": "1+1"}).encode())
    assert json.loads(r.read())["turn"] == 1
    assert forwarded(daemon) == before
    time.sleep(0.5)  # the link is opened in the background: an RPC to init and a connect
    r = post(conn, "demo", sid, json.dumps({"prompt": "1+2"}).encode())
    assert json.loads(r.read())["turn"] == 2
    assert forwarded(daemon) == before + 1


def test_warm_sse_arrives_event_by_event(daemon):
    sid = new_session_id()
    conn = warm_connection(daemon, sid)
    r = post(conn, "demo", sid, json.dumps({"prompt": "2+5", "stream": True, "stream_events": 5, "stream_interval_ms": 300}).encode())
    assert r.getheader("Content-Type") == "text/event-stream"
    arrivals, events = [], []
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic())
            events.append(json.loads(line[6:]))
            if "answer" in events[-1]:
                break
    assert [e.get("index") for e in events[:5]] == [0, 1, 2, 3, 4]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(g > 0.15 for g in gaps) >= 4, f"events were held back and arrived together: {gaps}"


def congestion_controls(ss_args, netns_pid=None):
    """The congestion control of each established TCP socket `ss` lists (`ss -ti` prints it as a word)."""
    known = set(open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().split())
    argv = (["nsenter", "-t", str(netns_pid), "-n"] if netns_pid else []) + ["ss", "-tinH", "state", "established"] + ss_args
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [word for word in out.split() if word in known]


def server_end(d, conn):
    """The congestion control of cubicled's end of `conn`."""
    here = conn.sock.getsockname()[1]
    return congestion_controls([f"( sport = :{d.port} and dport = :{here} )"])


def non_loopback_address():
    """One of this host's own IPv4 addresses outside 127/8 (a connection to it still never leaves the host),
    from the kernel's routing table of local addresses; None if it has none."""
    with open("/proc/net/fib_trie") as f:
        lines = f.read().splitlines()
    for previous, line in zip(lines, lines[1:]):
        if line.strip() == "/32 host LOCAL":
            address = previous.split()[-1]
            if not address.startswith("127."):
                return address
    return None


def congestion_lists():
    """What the kernel offers: `available` is every registered algorithm (a socket of a process with
    CAP_NET_ADMIN in its namespace's owner may take any of them), `allowed` the ones anyone may take, and the
    only ones a network namespace other than the host's may make its default (tcp_set_default_congestion_control
    refuses the rest with EPERM, whatever the writer's capabilities)."""
    read = lambda name: open(f"/proc/sys/net/ipv4/tcp_{name}_congestion_control").read().split()
    return read("available"), read("allowed")


def expected_loopback_choices():
    """How the kernel decides for cubicled's two kinds of loopback socket. cubicled asks for CUBIC, then Reno
    (registered on every kernel, always allowed). Its own sockets live in the host's namespace and it has
    CAP_NET_ADMIN there, so it gets CUBIC whenever CUBIC is available (asking may load the module: read the
    list after the daemon has asked). A sandbox's namespace defaults to CUBIC only where CUBIC is allowed."""
    available, allowed = congestion_lists()
    return ("cubic" if "cubic" in available else "reno"), ("cubic" if "cubic" in allowed else "reno")


@pytest.mark.parametrize("listen_host", ["0.0.0.0", "[::]"])
def test_loopback_hops_do_not_pace_but_remote_clients_keep_the_hosts_choice(start_daemon, listen_host):
    """BBR (a common host default) paces every connection with timers; on loopback that doubled cubicled's CPU
    in a 100 MB echo. cubicled's end of a client connection from a loopback address (127/8, ::1, or 127/8
    mapped into IPv6 on a dual-stack listener) uses CUBIC whenever the kernel has it; both ends of its link to
    the agent, in the sandbox's namespace, use the namespace's default, CUBIC where CUBIC is allowed and Reno
    otherwise (neither paces); a client from another address keeps the host's default. The expectations come
    from the kernel's lists the way the kernel applies them (expected_loopback_choices). Where the host's
    default is already what cubicled picks, that half cannot tell, and it prints so."""
    missing = [tool for tool in ("ss", "nsenter") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (iproute2, util-linux): a socket's algorithm cannot be read")
    host_default = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    d = start_daemon(listen_host=listen_host, insecure_no_auth=True)
    sid = new_session_id()
    conn = warm_connection(d, sid)
    host_side, sandbox_side = expected_loopback_choices()
    for side, wanted in (("cubicled's sockets", host_side), ("the sandbox's namespace", sandbox_side)):
        if host_default == wanted:
            print(f"{side}: the host's default is {wanted} already; this run cannot tell it was chosen")
    assert server_end(d, conn) == [host_side]
    agent_side = congestion_controls([], netns_pid=d.cubicle_json("inspect", sid)["initPID"])
    assert agent_side and set(agent_side) == {sandbox_side}, agent_side  # both ends of each link, in the sandbox
    others = []
    if listen_host == "[::]":
        others.append(("::1", host_side))
    outside = non_loopback_address()
    if outside:
        others.append((outside, host_default))
    else:
        print("no IPv4 address but loopback here: a client from another address is not checked")
    for address, expected in others:
        c = http.client.HTTPConnection(address, d.port, timeout=10)
        c.request("GET", "/ping")
        assert c.getresponse().status == 200
        assert server_end(d, c) == [expected], address
        c.close()
    conn.close()


def test_warm_echo_of_64_mib_is_byte_exact_and_not_held(daemon):
    """Full duplex, as an echo needs: the client sends while it reads (a client that sends everything before
    reading would deadlock against any streaming echo, proxied or not)."""
    sid = new_session_id()
    sock = warm_connection(daemon, sid).sock
    pid = daemon.process.pid
    rss = lambda: next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    before, peak = rss(), [0]
    blob = os.urandom(1 << 20) * 64
    start = forwarded(daemon)
    sender = threading.Thread(target=lambda: sock.sendall(raw_request(sid, blob, "application/octet-stream")))
    sender.start()
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(65536)
    response_head, _, got = got.partition(b"\r\n\r\n")
    received = [got]
    total = len(got)
    while total < len(blob):
        chunk = sock.recv(1 << 20)
        assert chunk, "the echo was cut short"
        received.append(chunk)
        total += len(chunk)
        peak[0] = max(peak[0], rss())
    sender.join()
    assert forwarded(daemon) == start + 1
    assert b"200 OK" in response_head.split(b"\r\n")[0]
    assert b"content-type: application/octet-stream" in response_head.lower()
    assert b"".join(received) == blob
    growth = (peak[0] - before) / 1024
    assert growth < 32, f"cubicled grew {growth:.1f} MiB relaying 64 MiB each way"


def test_pipelined_requests_behind_a_forwarded_one_are_answered_in_order(daemon):
    """A client may send its next requests before the first is answered; a forwarded response must not
    interleave with the task path's (here a GET /ping and an invocation of another, cold session)."""
    sid, cold = new_session_id(), new_session_id()
    s = socket.create_connection(("127.0.0.1", daemon.port))
    request = lambda session, prompt: raw_request(session, json.dumps({"prompt": prompt}).encode())
    f = s.makefile("rb")

    def response():
        status = f.readline()
        headers = {}
        while (line := f.readline()) != b"\r\n":
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers, f.read(int(headers["content-length"]))

    for _ in range(50):
        before = forwarded(daemon)
        s.sendall(request(sid, "1+1"))
        response()
        if forwarded(daemon) > before:
            break
    s.sendall(request(sid, "1+2") + b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n" + request(cold, "2+2") + request(sid, "3+3"))
    answers = [response() for _ in range(4)]
    assert [a[0].split()[1] for a in answers] == [b"200"] * 4
    assert json.loads(answers[0][2])["answer"] == 3
    assert json.loads(answers[1][2]) == {"status": "Healthy"}
    assert json.loads(answers[2][2])["answer"] == 4 and answers[2][1][SESSION_HEADER.lower()] == cold
    assert json.loads(answers[3][2])["answer"] == 6 and answers[3][1][SESSION_HEADER.lower()] == sid
    s.close()


def test_a_warm_request_asking_to_close_gets_its_answer_and_the_close(daemon):
    sid = new_session_id()
    conn = warm_connection(daemon, sid)
    sock = conn.sock
    r = post(conn, "demo", sid, json.dumps({"prompt": "3+4"}).encode(), headers={"Connection": "close"})
    assert json.loads(r.read())["answer"] == 7
    sock.settimeout(10)
    assert sock.recv(1) == b"", "cubicled closed the connection after the response"


def test_stop_ends_a_warm_stream(daemon):
    sid = new_session_id()
    conn = warm_connection(daemon, sid)
    r = post(conn, "demo", sid, json.dumps({"prompt": "2+5", "stream": True, "stream_events": 100, "stream_interval_ms": 100}).encode())
    assert r.readline().startswith(b"data: ")
    daemon.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    rest = b""
    with pytest.raises((http.client.IncompleteRead, ConnectionError, ValueError)):
        rest = r.read()
    assert b'"answer"' not in rest
    assert daemon.invoke_json({"prompt": "1+1"}, sid)["turn"] == 1, "the stopped id gets a fresh sandbox"


def test_client_leaving_a_warm_stream_cancels_the_agents_request(start_daemon):
    d = start_daemon(short_lifecycle_config(idle=2))
    sid = new_session_id()
    conn = warm_connection(d, sid)
    r = post(conn, "demo", sid, json.dumps({"stream": True, "stream_events": 600, "stream_interval_ms": 100}).encode())
    assert r.readline().startswith(b"data: ")
    r.close()
    conn.close()
    deadline = time.time() + 15
    while "reason=idle_timeout" not in d.log_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "reason=idle_timeout" in d.log_text(), "the 60 s stream still held the session busy"


def test_agent_exit_under_a_warm_request_is_a_424_naming_why(daemon):
    sid = new_session_id()
    conn = warm_connection(daemon, sid)
    host_pid = daemon.cubicle_json("inspect", sid)["agentHostPID"]
    before = forwarded(daemon)
    # The body is ten bytes short, so the agent is still reading it when it is killed.
    body = json.dumps({"prompt": "1+1"}).encode()
    conn.putrequest("POST", path_for("demo"))
    for k, v in {SESSION_HEADER: sid, "Content-Type": "application/json", "Content-Length": str(len(body) + 10)}.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    time.sleep(0.3)
    os.kill(host_pid, signal.SIGKILL)
    r = conn.getresponse()
    payload = json.loads(r.read())
    assert forwarded(daemon) == before + 1
    assert r.status == 424 and r.getheader("x-amzn-ErrorType", "").startswith("RuntimeClientError")
    assert "did not answer" in payload["message"] and "agent exited (signal 9)" in payload["message"], payload
    assert daemon.invoke_json({"prompt": "1+1"}, sid)["turn"] == 1, "the id starts over in a fresh sandbox"


@pytest.mark.parametrize("mode,breaks", [("malformed", "before"), ("endless-headers", "before"),
                                          ("close-mid", "mid-body"), ("bad-chunk", "mid-body")])
def test_agent_breaking_http_on_the_warm_path_fails_as_on_the_task_path(start_daemon, mode, breaks):
    """Before the response began: a 424 and the session goes on. Mid-body: the client's stream is cut."""
    d = start_daemon(hostile_config())
    sid = new_session_id()
    conn = warm_connection(d, sid, runtime="hostile", body=json.dumps({"mode": "ok"}).encode())
    before = forwarded(d, "hostile")
    r = post(conn, "hostile", sid, json.dumps({"mode": mode}).encode())
    if breaks == "before":
        payload = json.loads(r.read())
        assert r.status == 424 and "did not answer" in payload["message"]
    else:
        assert r.status == 200
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            r.read()
    assert forwarded(d, "hostile") == before + 1
    assert json.loads(d.invoke({"mode": "ok"}, sid, runtime="hostile")[1])["answer"] == "fine"
    still_serves(d)
