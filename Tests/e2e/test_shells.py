"""Interactive shells (issue 29): AgentCore's InvokeAgentRuntimeCommandShell on the data plane
(`/runtimes/{arn}/ws/shells?shellId=`), a terminal in the session spoken to in its channel protocol
(the bedrock-agentcore SDK's ShellFramer: one channel byte, then the payload), and `cubicle exec -it` over
the admin socket, driven in tmux."""
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import uuid

import pytest

from conftest import ARN_PREFIX, new_session_id

websockets = pytest.importorskip("websockets", reason="the shell tests' client (pip install websockets)")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
SHELL_ID_HEADER = "X-Amzn-Bedrock-AgentCore-Shell-Id"
STDIN, STDOUT, STDERR, STATUS, RESIZE, HEARTBEAT, CLOSE = 0, 1, 2, 3, 4, 5, 0xFF


def shell_url(d, shell_id=None, runtime="demo"):
    arn = urllib.parse.quote(ARN_PREFIX + runtime, safe="")
    query = f"?{urllib.parse.urlencode({'shellId': shell_id})}" if shell_id else ""
    return f"ws://127.0.0.1:{d.port}/runtimes/{arn}/ws/shells{query}"


class ShellClient:
    """The SDK's framing over a `websockets` connection."""

    def __init__(self, d, sid, shell_id=None):
        self.ws = connect(shell_url(d, shell_id), additional_headers={SESSION_HEADER: sid}, open_timeout=60, max_size=None)
        self.shell_id = self.ws.response.headers[SHELL_ID_HEADER]
        self.output = b""
        self.exit_status = None
        channel, payload = self.frame()
        assert channel == STATUS
        self.confirmation = json.loads(payload)

    def frame(self, timeout=10):
        message = self.ws.recv(timeout=timeout)
        assert isinstance(message, bytes) and message, "every shell frame is binary, with a channel byte"
        return message[0], message[1:]

    def send(self, text):
        self.ws.send(bytes([STDIN]) + text.encode())

    def resize(self, cols, rows):
        self.ws.send(bytes([RESIZE]) + json.dumps({"width": cols, "height": rows}).encode())

    def next_on(self, wanted, timeout=10):
        """The next frame on channel `wanted`, keeping terminal output met on the way."""
        while True:
            channel, payload = self.frame(timeout=timeout)
            if channel == wanted:
                return payload
            if channel == STDOUT:
                self.output += payload

    def read_until(self, needle, why="", timeout=15):
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{why}: {needle!r} never came; the terminal showed {self.output[-2000:]!r}"
            channel, payload = self.frame(timeout=left)
            if channel == STDOUT:
                self.output += payload
            elif channel == STATUS:
                self.exit_status = json.loads(payload)
        return self.output

    def wait_exit(self, timeout=15):
        """(exit code from the status frame, close code)."""
        try:
            while self.exit_status is None:
                channel, payload = self.frame(timeout=timeout)
                if channel == STDOUT:
                    self.output += payload
                elif channel == STATUS:
                    self.exit_status = json.loads(payload)
            self.ws.recv(timeout=timeout)
        except ConnectionClosed as e:
            return exit_code(self.exit_status), e.rcvd.code if e.rcvd else None
        raise AssertionError("the connection stayed open after the exit status")


def exit_code(status):
    if status is None:
        return None
    if status["status"] == "Success":
        return 0
    return int(next(c["message"] for c in status["details"]["causes"] if c["reason"] == "ExitCode"))


def test_a_shell_runs_commands_resizes_and_reports_its_exit(daemon):
    sid = new_session_id()
    daemon.invoke_json({"prompt": "1+1"}, sid)
    sh = ShellClient(daemon, sid)
    assert sh.confirmation["metadata"] == {"shellId": sh.shell_id, "reconnected": False}
    assert sh.ws.response.headers[SESSION_HEADER] == sid
    sh.send("echo hello-$((6*7)); id -u; echo $TERM; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; echo E$((1+1))ND\n")
    out = sh.read_until("E2ND").replace(b"\r", b"")
    assert b"hello-42" in out and b"\n1000\n" in out, "the agent's user, in the agent's session"
    for line in [b"CapEff:\t0000000000000000", b"CapBnd:\t0000000000000000", b"NoNewPrivs:\t1", b"Seccomp:\t2"]:
        assert line in out, f"a shell has the agent's confinement: {line!r} (got {out!r})"
    sh.resize(111, 33)
    sh.send("stty size\n")
    sh.read_until("33 111")
    sh.ws.send(bytes([HEARTBEAT]))
    assert sh.next_on(HEARTBEAT) == b"", "heartbeats are echoed"
    sh.send("exit 3\n")
    assert sh.wait_exit() == (3, 1000), "the exit status, then a normal close"


def test_a_dropped_shell_is_resumed_by_its_id_with_what_it_missed(daemon):
    sid = new_session_id()
    shell_id = "build-" + uuid.uuid4().hex[:8]
    sh = ShellClient(daemon, sid, shell_id)
    assert sh.shell_id == shell_id
    sh.send("cd /tmp && X=kept; sleep 1; echo missed-$((2+3))\n")
    sh.ws.close()  # dropped before the output came
    time.sleep(2)
    again = ShellClient(daemon, sid, shell_id)
    assert again.confirmation["metadata"] == {"shellId": shell_id, "reconnected": True}
    again.read_until("missed-5")
    again.send("echo $X $(pwd)\n")
    again.read_until("kept /tmp", "the same shell: its variables and directory")
    # A second client takes the shell over; the first is told with 4000.
    third = ShellClient(daemon, sid, shell_id)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            again.frame()
    assert closed.value.rcvd.code == 4000
    third.ws.send(bytes([CLOSE]))
    code, close = third.wait_exit()
    assert code is not None and code != 0 and close == 1000, "CLOSE ends the shell (hung up)"
    fresh = ShellClient(daemon, sid, shell_id)
    assert fresh.confirmation["metadata"]["reconnected"] is False, "once ended, the id starts a new shell"
    fresh.ws.close()


def test_a_dropped_shell_is_hung_up_after_the_reconnect_window(start_daemon):
    from conftest import demo_config
    d = start_daemon(demo_config("shellReconnectSeconds: 1\n"))
    sid = new_session_id()
    sh = ShellClient(d, sid, "short-window")
    assert d.cubicle_json("inspect", sid)["shells"] == 1
    sh.send("export MARK=first\n")
    sh.ws.close()
    # Hung up once the window has passed: inspect counts the shells a client can still use. (Waited for, not
    # slept: under load the window's timer may fire late, and a fixed sleep would race it.)
    deadline = time.monotonic() + 30
    while d.cubicle_json("inspect", sid)["shells"] != 0:
        assert time.monotonic() < deadline, "the dropped shell was never hung up"
        time.sleep(0.2)
    again = ShellClient(d, sid, "short-window")
    assert again.confirmation["metadata"]["reconnected"] is False, "past the window, the dropped shell was hung up"
    again.send("echo [$MARK]\n")
    again.read_until("[]")
    again.ws.send(bytes([CLOSE]))
    again.wait_exit()


def test_ctrl_c_reaches_the_foreground_job_and_the_session_ends_its_shells(daemon):
    sid = new_session_id()
    sh = ShellClient(daemon, sid)
    sh.send("sleep 60\n")
    time.sleep(1)
    sh.send("\x03")
    sh.send("echo after-sleep-$?\n")
    sh.read_until("after-sleep-130")
    sh.send("echo still-$((40+2))\n")
    sh.read_until("still-42", "Ctrl-C ended sleep, not the shell")
    daemon.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    code, _ = sh.wait_exit()
    assert code is not None and code != 0, "the session's end ends its shells"


def test_hostile_frames_close_the_connection_not_the_shell(daemon):
    sid = new_session_id()
    shell_id = "h-" + uuid.uuid4().hex[:8]
    sh = ShellClient(daemon, sid, shell_id)
    sh.ws.send(bytes([RESIZE]) + b'{"width": 0, "height": 99999}')
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            sh.frame()
    assert closed.value.rcvd.code == 1007
    sh = ShellClient(daemon, sid, shell_id)
    assert sh.confirmation["metadata"]["reconnected"] is True, "the shell outlived its client's bad frame"
    sh.ws.send(bytes([0x42]) + b"?")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            sh.frame()
    assert closed.value.rcvd.code == 1003
    with pytest.raises(InvalidStatus) as refused:
        connect(shell_url(daemon, "bad&id"), additional_headers={SESSION_HEADER: sid}, open_timeout=30)
    assert refused.value.response.status_code == 400
    sh = ShellClient(daemon, sid, shell_id)
    sh.ws.send(bytes([CLOSE]))
    sh.wait_exit()


def test_a_frame_sent_with_the_upgrade_request_is_not_lost(daemon):
    """A client may send its first frame right behind its upgrade request, before the 101: here both go in
    one write, so cubicled reads them together while it is still deciding the upgrade, and the keystrokes
    must reach the shell once it is up. (The CLI's side, the 101 and the first frames in one read, is
    `WebSocketClientTests.aFrameThatCameInTheSameReadAsThe101IsKept`.)"""
    import os as _os
    import socket
    import struct
    sid = new_session_id()
    daemon.invoke_json({"prompt": "1+1"}, sid)
    arn = urllib.parse.quote(ARN_PREFIX + "demo", safe="")
    keys = bytes([STDIN]) + b"echo early-$((3+4)); exit 5\n"
    mask = _os.urandom(4)
    frame = bytes([0x82, 0x80 | len(keys)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(keys))
    request = (f"GET /runtimes/{arn}/ws/shells HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"{SESSION_HEADER}: {sid}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as s:
        s.sendall(request + frame)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, "cubicled closed the connection before answering"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        output, status = b"", None

        def need(n):
            nonlocal data
            while len(data) < n:
                chunk = s.recv(65536)
                assert chunk, f"the connection ended first; the terminal showed {output!r}"
                data += chunk

        while status is None:
            need(2)
            length = data[1] & 0x7F
            start = 2
            if length == 126:
                need(4)
                length, start = struct.unpack(">H", data[2:4])[0], 4
            elif length == 127:
                need(10)
                length, start = struct.unpack(">Q", data[2:10])[0], 10
            need(start + length)
            opcode, payload, data = data[0] & 0x0F, data[start:start + length], data[start + length:]
            assert opcode == 0x2, f"a binary shell frame, not opcode {opcode}; the terminal showed {output!r}"
            if payload[0] == STDOUT:
                output += payload[1:]
            elif payload[0] == STATUS and "shellId" not in json.loads(payload[1:])["metadata"]:  # not the confirmation
                status = json.loads(payload[1:])
    assert b"early-7" in output, f"the keys sent with the request never reached the shell: {output!r}"
    assert exit_code(status) == 5


def test_a_shell_that_ignores_its_hang_up_is_ended(daemon):
    """A hang-up is SIGHUP to the shell; one that ignores it is killed by init a few seconds later, so a
    client's close never leaves a process running in the session. (Over the admin socket, whose shells end
    with their connection.)"""
    from websockets.sync.client import unix_connect
    sid = new_session_id()
    daemon.invoke_json({"prompt": "1+1"}, sid)
    marker = "h" + uuid.uuid4().hex[:12]
    command = json.dumps(["sh", "-c", f"trap '' HUP; echo ready-{marker}; while :; do sleep 1; done"])
    uri = f"ws://localhost/v1/sessions/{sid}/shell?rows=24&cols=80&command={urllib.parse.quote(command)}"
    ws = unix_connect(daemon.admin_socket, uri, open_timeout=30, max_size=None)
    output = b""
    while f"ready-{marker}".encode() not in output:
        message = ws.recv(timeout=15)
        if message[0] == STDOUT:
            output += message[1:]
    ws.close()

    def left():
        r = daemon.client().invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                                         body={"command": f"ps -eo args | grep -c '[{marker[0]}]{marker[1:]}'; true", "timeout": 30})
        return "".join(e["chunk"].get("contentDelta", {}).get("stdout", "") for e in r["stream"]).strip()
    deadline = time.monotonic() + 30
    while (n := left()) != "0":
        assert time.monotonic() < deadline, f"the shell that ignored SIGHUP is still running ({n})"
        time.sleep(0.5)
    assert daemon.cubicle_json("inspect", sid)["shells"] == 0


def test_a_shell_keeps_its_session_busy(start_daemon):
    from conftest import short_lifecycle_config
    d = start_daemon(short_lifecycle_config(idle=2), extra_args=[])
    sid = new_session_id()
    pid = d.invoke_json({"prompt": "1+1"}, sid)["pid"]
    sh = ShellClient(d, sid)
    time.sleep(4)
    sh.send("echo alive\n")
    sh.read_until("alive")
    assert d.invoke_json({"prompt": "1+1"}, sid)["pid"] == pid, "the session outlived its idle timeout with a shell open"
    sh.ws.send(bytes([CLOSE]))
    sh.wait_exit()


def test_a_shell_whose_client_left_before_the_upgrade_does_not_hold_its_session(start_daemon):
    """The client's connection is reset while its session and shell are being made: the shell is hung up at
    once, not kept for the reconnect window (900 s here), so the session still idles out. (A client that
    merely closes its side is a dropped client: its shell waits for it, as AgentCore's does.)"""
    import socket
    import struct
    from conftest import short_lifecycle_config
    d = start_daemon(short_lifecycle_config(idle=2))
    sid = new_session_id()
    arn = urllib.parse.quote(ARN_PREFIX + "demo", safe="")
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close resets
        s.sendall((f"GET /runtimes/{arn}/ws/shells?shellId=gone HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   f"{SESSION_HEADER}: {sid}\r\n\r\n").encode())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not d.cubicle_json("ps", "--json")["sessions"]:
        time.sleep(0.05)
    assert d.cubicle_json("ps", "--json")["sessions"], "the upgrade started the session"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and d.cubicle_json("ps", "--json")["sessions"]:
        time.sleep(0.2)
    assert d.cubicle_json("ps", "--json")["sessions"] == [], "no shell kept the session busy past its 2 s idle timeout"


# --- cubicle exec -it, in tmux ---

@pytest.fixture
def tmux():
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed (apt-get install tmux)")
    name = "cubicle-" + uuid.uuid4().hex[:8]
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def pane(name):
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def wait_pane(name, needle, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = pane(name)
        if needle in text:
            return text
        time.sleep(0.1)
    # What else to know when it fails: whether the session and the `cubicle exec` process are still there.
    state = subprocess.run(["sh", "-c", "tmux ls; ps -eo pid,stat,wchan:20,args | grep '[c]ubicle exec'"], capture_output=True, text=True)
    raise AssertionError(f"{needle!r} never showed; the pane:\n{pane(name)}\ntmux and cubicle: {state.stdout!r} {state.stderr!r}")


def test_exec_it_in_tmux_prompt_output_resize_ctrl_c_and_exit_status(daemon, tmux, tmp_path):
    sid = new_session_id()
    daemon.invoke_json({"prompt": "1+1"}, sid)
    status_file = tmp_path / "status"
    command = " ".join(daemon.cubicle_args("exec", "-it", sid, "--", "sh")) + f"; echo $? > {status_file}"
    subprocess.run(["tmux", "new-session", "-d", "-s", tmux, "-x", "120", "-y", "40", command], check=True)
    wait_pane(tmux, "$")  # the prompt (capture-pane drops its trailing space)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "echo out-$((6*7))", "Enter"], check=True)
    wait_pane(tmux, "out-42")
    subprocess.run(["tmux", "send-keys", "-t", tmux, "stty size", "Enter"], check=True)
    wait_pane(tmux, "40 120")
    subprocess.run(["tmux", "resize-window", "-t", tmux, "-x", "100", "-y", "30"], check=True)
    time.sleep(0.5)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "clear; stty size", "Enter"], check=True)
    wait_pane(tmux, "30 100")
    subprocess.run(["tmux", "send-keys", "-t", tmux, "sleep 60", "Enter"], check=True)
    time.sleep(1)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-c"], check=True)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "echo slept-$?", "Enter"], check=True)
    wait_pane(tmux, "slept-130")
    subprocess.run(["tmux", "send-keys", "-t", tmux, "echo still-here", "Enter"], check=True)
    wait_pane(tmux, "still-here")
    subprocess.run(["tmux", "send-keys", "-t", tmux, "exit 7", "Enter"], check=True)
    deadline = time.monotonic() + 20
    while not status_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status_file.read_text().strip() == "7", "cubicle exec -it exits with the shell's status"
