"""Crashes: the agent dying or init being killed ends the session with its reason, leaves nothing of that
sandbox behind, and the next invoke with the same id gets a fresh sandbox."""
import os
import signal
import time

from conftest import cgroup_dirs, new_session_id


def ended_row(d, sid, timeout=15):
    deadline = time.time() + timeout
    while True:
        rows = [r for r in d.cubicle_json("ps", "--all")["sessions"] if r["id"] == sid and r["state"] == "ended"]
        if rows:
            return rows[0]
        assert time.time() < deadline, f"{sid} did not end: {d.cubicle_json('ps', '--all')}"
        time.sleep(0.05)


def sandbox_gone(d, sandbox_id):
    assert not [p for p in cgroup_dirs(d.cgroup_parent) if os.path.exists(os.path.join(p, sandbox_id))], "its cgroup is gone"
    assert not os.path.exists(os.path.join(d.state_dir, "sandboxes", sandbox_id)), "its state is gone"


def test_agent_killed_by_a_signal_ends_the_session_and_the_id_starts_over(daemon):
    sid = new_session_id()
    assert daemon.invoke_json({"prompt": "2+5"}, sid)["turn"] == 1
    info = daemon.cubicle_json("inspect", sid)
    os.kill(info["agentHostPID"], signal.SIGSEGV)
    row = ended_row(daemon, sid)
    assert row["endReason"] == "agent_exited"
    assert "11" in row["endDetail"] or "SEGV" in row["endDetail"], row
    sandbox_gone(daemon, info["sandbox"])
    again = daemon.invoke_json({"prompt": "add 1"}, sid)
    assert again["turn"] == 1 and again["answer"] is None, "a fresh sandbox: no memory of 2+5"
    assert daemon.cubicle_json("inspect", sid)["sandbox"] != info["sandbox"]


def test_init_killed_from_the_host_ends_the_session_and_leaves_nothing(daemon):
    sid = new_session_id()
    daemon.invoke_json({"prompt": "2+5"}, sid)
    info = daemon.cubicle_json("inspect", sid)
    os.kill(info["initPID"], signal.SIGKILL)
    row = ended_row(daemon, sid)
    assert row["endReason"] == "sandbox_failed", row
    assert not os.path.exists(f"/proc/{info['agentHostPID']}"), "the agent died with its pid namespace"
    sandbox_gone(daemon, info["sandbox"])
    again = daemon.invoke_json({"prompt": "2+5"}, sid)
    assert again["turn"] == 1
    other = new_session_id()
    assert daemon.invoke_json({"prompt": "2*5"}, other)["answer"] == 10, "other sessions are unaffected"
