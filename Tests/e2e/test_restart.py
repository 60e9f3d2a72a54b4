"""Restart without loss: cubicled killed with SIGKILL and started again takes over the live sessions. Their
sandboxes keep running (same init, same agent, same memory), their ids keep working, and nothing leaks."""
import os
import signal
import time

from conftest import PRODUCTS, cgroup_dirs, new_session_id


def config(grace=60):
    return f"""restartGraceSeconds: {grace}
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
"""


def sandboxes(d):
    return sorted(os.listdir(os.path.join(d.state_dir, "sandboxes")))


def fork_servers(daemon_pid):
    """The daemon's init fork server: its child with the server's marker, in the host's pid namespace (the
    inits it cloned carry the marker too, but each is in a pid namespace of its own)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/environ", "rb") as f:
                marked = b"CUBICLE_INIT_FORK_SERVER=1" in f.read().split(b"\0")
            same_pid_ns = os.readlink(f"/proc/{name}/ns/pid") == os.readlink("/proc/self/ns/pid")
        except OSError:
            continue
        if int(fields[1]) == daemon_pid and marked and same_pid_ns and fields[0] != "Z":
            found.append(int(name))
    return found


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_sigkilled_cubicled_is_replaced_without_losing_sessions(start_daemon, tmp_path):
    leases = tmp_path / "leases"
    d = start_daemon(config(), extra_args=["--uid-lease-dir", str(leases)])
    sessions = [new_session_id() for _ in range(3)]
    for sid in sessions:
        assert d.invoke_json({"prompt": "2+5"}, sid)["turn"] == 1
    before = {sid: d.cubicle_json("inspect", sid) for sid in sessions}
    d.invoke_json({"prompt": "add 1"}, sessions[0])  # turn 2, answer 8: memory the agent must keep
    servers = fork_servers(d.process.pid)
    assert len(servers) == 1, "cubicled clones inits from one fork server"

    d.process.send_signal(signal.SIGKILL)
    d.process.wait()
    time.sleep(0.5)
    # Its socket closed with the daemon, the fork server ends on its own; the sandboxes do not need it.
    for _ in range(40):
        if gone(servers[0]):
            break
        time.sleep(0.05)
    assert gone(servers[0]), "the fork server outlived its daemon"
    for info in before.values():
        assert os.path.exists(f"/proc/{info['initPID']}"), "sandboxes outlive the daemon"
        assert os.path.exists(f"/proc/{info['agentHostPID']}")

    d.restart()
    assert "session adopted from a previous cubicled" in d.log_text()
    listed = {s["id"]: s for s in d.cubicle_json("ps")["sessions"]}
    assert set(listed) == set(sessions)
    for sid in sessions:
        after = d.cubicle_json("inspect", sid)
        assert after["initPID"] == before[sid]["initPID"] and after["sandbox"] == before[sid]["sandbox"]
        assert after["agentHostPID"] == before[sid]["agentHostPID"], "the same agent process"
    again = d.invoke_json({"prompt": "add 1"}, sessions[0])
    assert again["turn"] == 3 and again["answer"] == 9, "the agent kept its memory across the restart"
    assert d.invoke_json({"prompt": "2*5"}, sessions[1])["turn"] == 2
    # Logs and commands work on an adopted session; new sessions work too.
    r = d.cubicle("exec", sessions[2], "--", "sh", "-c", "echo adopted")
    assert r.stdout.strip() == "adopted"
    assert d.invoke_json({"prompt": "2+5"}, new_session_id())["turn"] == 1
    d.cubicle("stop", sessions[1])
    assert not os.path.exists(f"/proc/{before[sessions[1]]['initPID']}") or \
        open(f"/proc/{before[sessions[1]]['initPID']}/stat").read().split(")")[1].split()[0] == "Z"

    assert d.stop() == 0
    assert d.leftovers() == []
    assert os.listdir(leases) == [], "every uid lease released, adopted ones included"


def test_a_sandbox_that_died_while_no_daemon_ran_is_cleaned_up_and_its_id_starts_over(start_daemon, tmp_path):
    leases = tmp_path / "leases"
    d = start_daemon(config(), extra_args=["--uid-lease-dir", str(leases)])
    alive, dead = new_session_id(), new_session_id()
    d.invoke_json({"prompt": "2+5"}, alive)
    d.invoke_json({"prompt": "2+5"}, dead)
    dead_info = d.cubicle_json("inspect", dead)
    d.process.send_signal(signal.SIGKILL)
    d.process.wait()
    os.kill(dead_info["initPID"], signal.SIGKILL)
    time.sleep(0.3)

    d.restart()
    assert [s["id"] for s in d.cubicle_json("ps")["sessions"]] == [alive]
    assert dead_info["sandbox"] not in sandboxes(d), "its state is removed"
    assert not [p for p in cgroup_dirs(d.cgroup_parent) if os.path.exists(os.path.join(p, dead_info["sandbox"]))]
    assert len(os.listdir(leases)) == 1, "its uid lease is released; the live one's stays"
    assert d.invoke_json({"prompt": "add 1"}, dead)["turn"] == 1, "the id starts over in a fresh sandbox"
    assert d.invoke_json({"prompt": "add 1"}, alive)["answer"] == 8


def test_without_a_new_daemon_sandboxes_end_after_the_grace_period(start_daemon, tmp_path):
    d = start_daemon(config(grace=1))
    sid = new_session_id()
    d.invoke_json({"prompt": "hi"}, sid)
    info = d.cubicle_json("inspect", sid)
    d.process.send_signal(signal.SIGKILL)
    d.process.wait()
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{info['agentHostPID']}") and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{info['agentHostPID']}"), "the orphaned sandbox ended after its grace"
    d.restart()  # finds the remains and removes them
    assert d.cubicle_json("ps")["sessions"] == []
    assert sandboxes(d) == []
