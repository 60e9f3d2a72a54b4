"""A fleet's runtimes defined once: two cubicleds sharing one PostgreSQL (Debian's, started by the test from
its binaries on a loopback port of its own, in a directory of its own). A runtime created through one is
invoked through the other, an update through the second is seen by the first, and a delete through the
first ends the second's sessions of it."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import botocore.exceptions
import pytest

from conftest import new_session_id
from test_control_plane import code_dir, held_registry, host_runtime, invoke, wait_status  # noqa: F401 (fixtures)


@pytest.fixture
def postgres():
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.skip("needs PostgreSQL's server binaries (apt-get install postgresql)")
    bindir = os.path.dirname(binaries[-1])
    data = f"/tmp/cubicle-pg-{uuid.uuid4().hex[:10]}"
    os.mkdir(data, 0o700)
    shutil.chown(data, "postgres", "postgres")
    # PostgreSQL refuses to run as root; its own user runs it (exec'd as that user, so signals reach it),
    # with trust for the loopback-only listener.
    as_postgres = dict(user="postgres", group="postgres", extra_groups=[])
    subprocess.run([f"{bindir}/initdb", "-D", data + "/db", "-A", "trust", "-U", "cubicle"], check=True, capture_output=True, **as_postgres)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([f"{bindir}/postgres", "-D", data + "/db", "-p", str(port),
                               "-k", data, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=open(data + ".log", "wb"), **as_postgres)
    deadline = time.time() + 30
    while True:
        r = subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        if r.returncode == 0:
            break
        assert server.poll() is None and time.time() < deadline, open(data + ".log").read()
        time.sleep(0.1)
    class Server:
        url = f"postgres://cubicle@127.0.0.1:{port}/postgres"

        @staticmethod
        def sql(statement):
            return subprocess.run([f"{bindir}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "cubicle", "-d", "postgres", "-tAc", statement],
                                  check=True, capture_output=True, text=True, **as_postgres).stdout
    try:
        yield Server
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(data, ignore_errors=True)
        os.unlink(data + ".log")


def eventually(check, timeout=20):
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except botocore.exceptions.ClientError:
            pass
        assert time.time() < deadline, "the other cubicled did not see the change"
        time.sleep(0.05)


# postgres before start_daemon: the daemons stop before the server does.
def test_two_cubicleds_share_the_runtimes_in_one_postgresql(postgres, start_daemon, code_dir, held_registry):  # noqa: F811
    args = ["--store", postgres.url, "--code-root", str(code_dir)]
    a, b = start_daemon(held_registry.config(), extra_args=args), start_daemon(held_registry.config(), extra_args=args)
    ca, cb = a.control(), b.control()
    created = ca.create_agent_runtime(agentRuntimeName="fleet_agent", tags={"cubicle:command": "/app/cubicle-demo-agent"},
                                      **host_runtime(code_dir))
    rid, arn = created["agentRuntimeId"], created["agentRuntimeArn"]
    wait_status(lambda: ca.get_agent_runtime(agentRuntimeId=rid))
    # B hears of it through LISTEN/NOTIFY and serves it.
    started = time.time()
    eventually(lambda: cb.get_agent_runtime(agentRuntimeId=rid)["status"] == "READY")
    print(f"B saw A's runtime READY {time.time() - started:.3f}s after A did")
    s = new_session_id()
    assert invoke(b, arn, s, {"prompt": "2+5"})["answer"] == 7
    assert b.cubicle_json("inspect", s)["runtime"] == rid
    # Both declared demo runtimes stay each daemon's own; the stored one is listed by both.
    assert {r["agentRuntimeId"] for r in cb.list_agent_runtimes()["agentRuntimes"]} == {"demo", rid}

    # An update through B is version 2 for A too; B's live session stays on 1.
    cb.update_agent_runtime(agentRuntimeId=rid, environmentVariables={"V": "2"}, **host_runtime(code_dir))
    wait_status(lambda: cb.get_agent_runtime(agentRuntimeId=rid))
    eventually(lambda: ca.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="DEFAULT")["liveVersion"] == "2")
    s2 = new_session_id()
    invoke(a, arn, s2, {"prompt": "hi"})
    assert a.cubicle_json("inspect", s2)["runtimeVersion"] == 2
    assert b.cubicle_json("inspect", s)["runtimeVersion"] == 1
    # Updates through both daemons at once (each held UPDATING by a registry that never answers): the
    # store's compare-and-swap, or the winner's UPDATING status, lets exactly one make version 3.
    stuck = held_registry.artifact()
    results = []

    def update(client):
        try:
            results.append(client.update_agent_runtime(agentRuntimeId=rid, **{**host_runtime(code_dir), **stuck})["agentRuntimeVersion"])
        except botocore.exceptions.ClientError as e:
            results.append(e.response["Error"]["Code"])
    try:
        threads = [threading.Thread(target=update, args=(c,)) for c in (ca, cb, ca, cb)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["3"] + ["ConflictException"] * 3, results
    finally:
        held_registry.release()
    # Either daemon may have won; each sees the failure once the winner has written it.
    for c in (ca, cb):
        eventually(lambda: c.get_agent_runtime(agentRuntimeId=rid)["status"] == "UPDATE_FAILED")
    assert [v["agentRuntimeVersion"] for v in cb.list_agent_runtime_versions(agentRuntimeId=rid)["agentRuntimes"]] == ["3", "2", "1"]
    assert eventually(lambda: cb.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="DEFAULT")["liveVersion"] == "2")

    # Deleted through A: B's session ends and B no longer serves it.
    b_init = b.cubicle_json("inspect", s)["initPID"]
    ca.delete_agent_runtime(agentRuntimeId=rid)
    eventually(lambda: not os.path.exists(f"/proc/{b_init}"))
    ended = next(r for r in b.cubicle_json("ps", "--all")["sessions"] if r["id"] == s)
    assert ended["endReason"] == "runtime_deleted", ended
    with pytest.raises(botocore.exceptions.ClientError) as e:
        invoke(b, arn, new_session_id(), {"prompt": "hi"})
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"

    # Every LISTEN connection cut, and a runtime created through A at once, while B's feed is down (it
    # reconnects after 0.5 s): the NOTIFY reaches no one, and B learns of the runtime by comparing the whole
    # store with its catalog once it listens again.
    assert postgres.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'").strip() == "2"
    rid3 = ca.create_agent_runtime(agentRuntimeName="fleet_missed", tags={"cubicle:command": "/app/cubicle-demo-agent"},
                                   **host_runtime(code_dir))["agentRuntimeId"]
    wait_status(lambda: ca.get_agent_runtime(agentRuntimeId=rid3))
    eventually(lambda: cb.get_agent_runtime(agentRuntimeId=rid3)["status"] == "READY")
    assert "LISTEN lost" in b.log_text()

    # Restarted, a daemon finds the fleet's runtimes where it left them.
    rid2 = ca.create_agent_runtime(agentRuntimeName="fleet_two", tags={"cubicle:command": "/app/cubicle-demo-agent"},
                                   **host_runtime(code_dir))["agentRuntimeId"]
    wait_status(lambda: ca.get_agent_runtime(agentRuntimeId=rid2))
    b.stop()
    b.restart()
    assert b.control().get_agent_runtime(agentRuntimeId=rid2)["status"] == "READY"
