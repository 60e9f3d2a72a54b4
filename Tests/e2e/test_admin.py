"""The operator surface: the admin socket, the `cubicle` CLI and /metrics, checked against the kernel's own view
(/proc, the cgroup files) and against what each test did."""
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import cgroup_dirs, new_session_id, short_lifecycle_config


def read_lines_until(process, predicate, timeout=15):
    """Reads `process.stdout` lines on a thread until predicate(lines) holds; returns the lines."""
    lines, done = [], threading.Event()

    def reader():
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if predicate(lines):
                done.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    return lines


def nobody(gid=65534):
    def demote():
        os.setgid(gid)
        os.setgroups([])
        os.setuid(65534)
    return demote


class NobodysCLI:
    """A copy of the CLI that nobody may run, outside root's 0700 build and pytest trees."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.dir = tempfile.mkdtemp(prefix="cubicle-e2e-cli-")
        self.path = os.path.join(self.dir, "cubicle")
        shutil.copy(daemon.cubicle_args("ps")[0], self.path)
        os.chmod(self.dir, 0o755)
        os.chmod(self.path, 0o755)
        os.chmod(daemon.state_dir, 0o755)  # let nobody reach the socket file itself

    def ps(self, gid=65534):
        return subprocess.run([self.path, "ps", "--admin-socket", self.daemon.admin_socket], capture_output=True, text=True,
                              preexec_fn=nobody(gid))

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def test_non_root_caller_is_refused(daemon):
    mode = stat.S_IMODE(os.stat(daemon.admin_socket).st_mode)
    assert mode == 0o600, oct(mode)
    cli = NobodysCLI(daemon)
    try:
        refused = cli.ps()
        assert refused.returncode != 0
        assert "Permission denied" in refused.stderr
        # Loosen the socket's mode by mistake: SO_PEERCRED still refuses a non-root caller.
        os.chmod(daemon.admin_socket, 0o666)
        refused = cli.ps()
        assert refused.returncode == 1
        assert "uid 65534 may not use the admin socket" in refused.stderr
    finally:
        cli.remove()
    # Root still may.
    assert daemon.cubicle("ps").returncode == 0


def test_admin_group_members_are_let_in(start_daemon):
    group = 65534
    d = start_daemon(extra_args=["--admin-group", str(group)])
    st = os.stat(d.admin_socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group)
    cli = NobodysCLI(d)
    try:
        allowed = cli.ps(gid=group)
        assert allowed.returncode == 0, allowed.stderr
        assert "SESSION" in allowed.stdout
        # Another gid: with the mode loosened, SO_PEERCRED still tells the two apart.
        os.chmod(d.admin_socket, 0o666)
        refused = cli.ps(gid=65533)
        assert refused.returncode == 1 and "may not use the admin socket (root or group 65534 only)" in refused.stderr
    finally:
        cli.remove()


def test_ps_and_inspect_report_what_the_kernel_sees(daemon):
    sid = new_session_id()
    daemon.invoke({"prompt": "hello"}, sid)
    daemon.invoke({"prompt": "hello again"}, sid)
    rows = daemon.cubicle_json("ps")["sessions"]
    row = next(r for r in rows if r["id"] == sid)
    assert row["state"] == "ready" and row["runtime"] == "demo" and row["invocations"] == 2

    table = daemon.cubicle("ps").stdout
    assert sid[:12] in table and "ready" in table

    info = daemon.cubicle_json("inspect", sid[:20])  # a unique prefix will do
    assert info["id"] == sid
    init_pid, agent_pid, agent_host = info["initPID"], info["agentPID"], info["agentHostPID"]
    # init is pid 1 of its namespace, the agent pid 2; on the host the agent is init's child.
    assert [l for l in open(f"/proc/{init_pid}/status") if l.startswith("NSpid:")][0].split()[-1] == "1"
    assert agent_pid == 2
    assert str(agent_host) in open(f"/proc/{init_pid}/task/{init_pid}/children").read().split()
    nspid = [l for l in open(f"/proc/{agent_host}/status") if l.startswith("NSpid:")][0].split()
    assert nspid[1:] == [str(agent_host), "2"]
    assert os.readlink(f"/proc/{agent_host}/exe").endswith("cubicle-demo-agent")
    for kind, inode in info["namespaces"].items():
        assert os.readlink(f"/proc/{init_pid}/ns/{kind}") == f"{kind}:[{inode}]"
        assert os.readlink(f"/proc/{init_pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")
    # cgroup: the directories named are where init really is, and the usage matches their files.
    dirs = info["cgroup"]["directories"]
    assert all(os.path.isdir(d) for d in dirs)
    assert any(str(init_pid) in open(os.path.join(d, "cgroup.procs")).read().split() for d in dirs)
    pids_dir = next(d for d in dirs if os.path.exists(os.path.join(d, "pids.current")))
    assert info["usage"]["pids"] == int(open(os.path.join(pids_dir, "pids.current")).read())
    memory_dir = next((d for d in dirs if "/memory/" in d), dirs[0])
    memory_file = "memory.usage_in_bytes" if os.path.exists(os.path.join(memory_dir, "memory.usage_in_bytes")) else "memory.current"
    now = int(open(os.path.join(memory_dir, memory_file)).read())
    assert abs(info["usage"]["memoryBytes"] - now) < 4 << 20
    # ids: the map the kernel holds for init is the range reported.
    uid_map = open(f"/proc/{init_pid}/uid_map").read().split()
    assert [int(x) for x in uid_map] == [0, info["ids"]["hostBase"], info["ids"]["size"]]
    assert os.stat(f"/proc/{agent_host}").st_uid == info["ids"]["agentHostUID"]
    assert info["limits"]["memoryBytes"] == 512 << 20
    assert info["lifecycle"]["state"] == "ready" and info["lifecycle"]["idleDeadline"] > time.time()
    assert info["lifecycle"]["maxLifetimeDeadline"] > info["lifecycle"]["idleDeadline"]
    assert info["invocations"] == 2 and info["lastPing"] == "Healthy"
    assert set(info["tmpfsBytesUsed"]) >= {"root", "tmp", "home"}

    # tmpfs usage is read from the sandbox's own mounts.
    assert daemon.cubicle("exec", sid, "--", "sh", "-c", "head -c 3000000 /dev/zero > /tmp/blob").returncode == 0
    info = daemon.cubicle_json("inspect", sid)
    assert info["tmpfsBytesUsed"]["tmp"] >= 3000000


def test_prefix_must_be_unique_and_errors_are_one_line(daemon):
    a, b = "e2e-prefix-" + uuid.uuid4().hex, "e2e-prefix-" + uuid.uuid4().hex
    daemon.invoke({"prompt": "hi"}, a)
    daemon.invoke({"prompt": "hi"}, b)
    r = daemon.cubicle("inspect", "e2e-prefix-", check=False)
    assert r.returncode == 1 and "matches 2 sessions" in r.stderr and r.stderr.count("\n") == 1
    r = daemon.cubicle("inspect", "no-such-session", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "cubicle: no session matches no-such-session"


def test_logs_follow_streams_new_lines(daemon):
    sid = new_session_id()
    daemon.invoke({"prompt": "hi", "log": "first line"}, sid)
    assert "first line" in daemon.cubicle("logs", sid).stdout
    assert daemon.cubicle("logs", "--tail", "1", sid).stdout.strip() == "first line"
    follower = subprocess.Popen(daemon.cubicle_args("logs", "-f", "--tail", "0", sid), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        marker = "written-" + uuid.uuid4().hex
        daemon.invoke({"prompt": "hi", "log": marker}, sid)
        lines = read_lines_until(follower, lambda ls: marker in ls)
        assert lines == [marker]
        # The follow ends when the session does.
        daemon.cubicle("stop", sid)
        assert follower.wait(timeout=10) == 0
    finally:
        follower.kill()


def test_exec_streams_output_and_propagates_the_exit_code(daemon):
    sid = new_session_id()
    daemon.invoke({"prompt": "hi"}, sid)
    r = daemon.cubicle("exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = daemon.cubicle("exec", sid, "--", "printf", "%s|", "two words", "it's")
    assert r.stdout == "two words|it's|"
    r = daemon.cubicle("exec", sid, "--", "id", "-u")
    assert r.stdout.strip() == "1000"
    r = daemon.cubicle("exec", "--timeout", "1", sid, "--", "sleep", "30", check=False)
    assert r.returncode == 137 and "timed out" in r.stderr


def test_an_exec_whose_cubicle_is_interrupted_is_ended(daemon):
    """Ctrl-C on `cubicle exec` ends the command in the session too (a quiet one, which no failed write
    would end), not only the CLI."""
    import signal
    sid = new_session_id()
    daemon.invoke({"prompt": "hi"}, sid)
    marker = "x" + uuid.uuid4().hex[:12]
    count = ["sh", "-c", f"ps -eo args | grep -c '[{marker[0]}]{marker[1:]}'; true"]
    cli = subprocess.Popen(daemon.cubicle_args("exec", "--timeout", "600", sid, "--", "sh", "-c", f"sleep 600; : {marker}"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        # The CLI runs its argv through sh -c, so the marker is in two processes' arguments.
        while daemon.cubicle("exec", sid, "--", *count).stdout.strip() == "0":
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.1)
        cli.send_signal(signal.SIGINT)
        cli.wait(timeout=20)
        deadline = time.monotonic() + 20
        while (left := daemon.cubicle("exec", sid, "--", *count).stdout.strip()) != "0":
            assert time.monotonic() < deadline, f"the command outlived its cubicle exec ({left})"
            time.sleep(0.2)
    finally:
        cli.kill()
        cli.wait()


def test_stop_ends_the_session_and_ps_all_keeps_its_reason(daemon):
    sid = new_session_id()
    daemon.invoke({"prompt": "hi"}, sid)
    init_pid = daemon.cubicle_json("inspect", sid)["initPID"]
    daemon.cubicle("stop", sid)
    assert not os.path.exists(f"/proc/{init_pid}")
    assert sid not in [r["id"] for r in daemon.cubicle_json("ps")["sessions"]]
    ended = next(r for r in daemon.cubicle_json("ps", "--all")["sessions"] if r["id"] == sid)
    assert ended["state"] == "ended" and ended["endReason"] == "stopped"
    r = daemon.cubicle("stop", sid, check=False)
    assert r.returncode == 1 and "has ended" in r.stderr


def test_runtimes_lists_the_config(start_daemon):
    d = start_daemon(short_lifecycle_config(idle=5, max_lifetime=30))
    runtimes = d.cubicle_json("runtimes")["runtimes"]
    assert [r["name"] for r in runtimes] == ["demo"]
    assert runtimes[0]["idleRuntimeSessionTimeout"] == 5 and runtimes[0]["limits"]["memoryBytes"] == 256 << 20
    assert "demo" in d.cubicle("runtimes").stdout


def test_events_report_created_ready_and_ended_with_reason(start_daemon):
    d = start_daemon(short_lifecycle_config(idle=1))
    feed = subprocess.Popen(d.cubicle_args("events", "--json"), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        stopped, idle = new_session_id(), new_session_id()
        d.invoke({"prompt": "hi"}, stopped)
        d.invoke({"prompt": "hi"}, idle)
        d.cubicle("stop", stopped)
        lines = read_lines_until(feed, lambda ls: sum('"ended"' in l for l in ls) >= 2, timeout=20)
        events = [json.loads(l) for l in lines]
        by_session = {}
        for e in events:
            by_session.setdefault(e["session"], []).append(e["type"])
        assert by_session[stopped] == ["created", "ready", "ended"]
        assert by_session[idle] == ["created", "ready", "ended"]
        reasons = {e["session"]: e["reason"] for e in events if e["type"] == "ended"}
        assert reasons == {stopped: "stopped", idle: "idle_timeout"}
    finally:
        feed.kill()


def test_oom_kill_and_pids_limit_are_events(start_daemon):
    d = start_daemon(short_lifecycle_config())
    feed = subprocess.Popen(d.cubicle_args("events", "--json"), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        sid = new_session_id()
        d.invoke({"prompt": "hi"}, sid)
        # A command that outgrows the session's 256 MiB is killed by the kernel's OOM killer.
        hog = d.cubicle("exec", sid, "--", "sh", "-c", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done", check=False)
        assert hog.returncode == 137
        lines = read_lines_until(feed, lambda ls: any('"oom_kill"' in l for l in ls), timeout=10)
        oom = [json.loads(l) for l in lines if '"oom_kill"' in l]
        assert oom and oom[0]["session"] == sid and oom[0]["count"] >= 1
        info = d.cubicle_json("inspect", sid)
        assert info["usage"]["oomKills"] == oom[-1]["total"]
        assert info["state"] == "ready"  # the agent was not the one killed
        m = scrape(d)
        assert m[("cubicle_oom_kills_total", (("runtime", "demo"),))] == info["usage"]["oomKills"]
    finally:
        feed.kill()


def test_top_renders_live_in_tmux(daemon, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    sid = new_session_id()
    daemon.invoke({"prompt": "hi"}, sid)
    name = "cubicle-top-" + uuid.uuid4().hex[:8]
    command = " ".join(daemon.cubicle_args("top", "--interval", "0.3"))
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "20", command], check=True)
    try:
        def screen():
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout

        deadline = time.time() + 10
        while "INVOCATIONS" not in screen() and time.time() < deadline:
            time.sleep(0.1)
        first = screen()
        assert "1 live session" in first and sid[:12] in first and "ready" in first
        daemon.invoke({"prompt": "again"}, sid)
        deadline = time.time() + 10
        while time.time() < deadline:
            row = next((l for l in screen().splitlines() if l.startswith(sid[:12])), "")
            if row.split()[-1:] == ["2"]:
                break
            time.sleep(0.1)
        row = next(l for l in screen().splitlines() if l.startswith(sid[:12]))
        assert row.split()[-1] == "2", row  # the invocation count moved on the same screen
        assert screen().count("SESSION") == 1  # redrawn in place, not scrolled
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)


def scrape(daemon):
    with urllib.request.urlopen(daemon.endpoint + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_parse_and_match_what_happened(daemon):
    a, b = new_session_id(), new_session_id()
    for _ in range(3):
        daemon.invoke({"prompt": "hi"}, a)
    daemon.invoke({"prompt": "hi"}, b)
    _, body = daemon.invoke(b"x" * 1000, b, contentType="application/octet-stream")
    assert body == b"x" * 1000
    with pytest.raises(Exception):
        daemon.invoke({"prompt": "hi"}, new_session_id(), runtime="no-such-runtime")
    daemon.client().stop_runtime_session(agentRuntimeArn="arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/demo", runtimeSessionId=a)

    m = scrape(daemon)
    assert m[("cubicle_sessions_started_total", (("runtime", "demo"),))] == 2
    assert m[("cubicle_sessions_ended_total", (("reason", "stopped"), ("runtime", "demo")))] == 1
    assert m[("cubicle_sessions_live", (("state", "ready"),))] == 1
    assert m[("cubicle_invocation_duration_seconds_count", (("runtime", "demo"), ("status", "200")))] == 5
    # An unknown runtime name is counted, but not as a label of its own.
    assert m[("cubicle_invocation_duration_seconds_count", (("runtime", "unknown"), ("status", "404")))] == 1
    assert not any(dict(labels).get("runtime") == "no-such-runtime" for _, labels in m)
    assert m[("cubicle_sandbox_spawn_seconds_count", ())] == 2
    assert m[("cubicle_sandbox_teardown_seconds_count", ())] == 1
    assert m[("cubicle_invocation_bytes_sent_total", (("runtime", "demo"),))] >= 1000
    received = m[("cubicle_invocation_bytes_received_total", (("runtime", "demo"),))]
    assert 1000 + 4 * len(b'{"prompt": "hi"}') == received
