"""The AgentCore control plane through boto3's own bedrock-agentcore-control client, unmodified: the
tutorial's deploy, invoke and clean-up against cubicled, runtimes kept in the store across a restart,
qualifiers, versions and endpoints, and hostile or malformed calls refused with the modelled errors."""
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.request

import botocore.exceptions
import pytest

from conftest import PRODUCTS, demo_config, new_session_id
from test_images import push, python_image_layout, registry  # noqa: F401 (the fixture)

ROLE = "arn:aws:iam::123456789012:role/AgentRuntimeRole"


def wait_status(get, want=("READY",), timeout=60):
    """Polls a Get call as CDK, Terraform and the starter toolkit do, until its status leaves CREATING/UPDATING."""
    deadline = time.time() + timeout
    while True:
        r = get()
        if r["status"] not in ("CREATING", "UPDATING"):
            assert r["status"] in want, r
            return r
        assert time.time() < deadline, f"still {r['status']}"
        time.sleep(0.1)


def error_code(call):
    with pytest.raises(botocore.exceptions.ClientError) as e:
        call()
    return e.value.response["Error"]["Code"], e.value.response["Error"]["Message"]


def invoke(d, arn, session, payload, qualifier="DEFAULT"):
    r = d.client().invoke_agent_runtime(agentRuntimeArn=arn, qualifier=qualifier, runtimeSessionId=session,
                                        payload=json.dumps(payload))
    return json.loads(r["response"].read())


def host_runtime(code_dir, **extra):
    """CreateAgentRuntime's arguments for the demo agent from a host code directory (Cubicle's host: extension)."""
    args = dict(agentRuntimeArtifact={"containerConfiguration": {"containerUri": f"host:{code_dir}"}}, roleArn=ROLE,
                networkConfiguration={"networkMode": "SANDBOX"})
    args.update(extra)
    return args


class HeldRegistry:
    """A registry that takes connections and answers nothing until `release`, then 404 to everything: an
    image pull that holds a version's work (UPDATING) for exactly as long as a test needs."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.held, self.released = [], threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.released.is_set():
                self._answer(conn)
            else:
                self.held.append(conn)

    @staticmethod
    def _answer(conn):
        try:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        conn.close()

    def release(self):
        self.released.set()
        for conn in self.held:
            self._answer(conn)

    def close(self):
        self.release()
        self.listener.close()

    def config(self):
        """A cubicled config with the demo runtime that reaches this registry over plain HTTP."""
        return demo_config(f"registries: [{{host: \"{self.address}\", insecure: true}}]\n")

    def artifact(self):
        return {"agentRuntimeArtifact": {"containerConfiguration": {"containerUri": f"{self.address}/agents/x:v1"}}}


@pytest.fixture
def held_registry():
    r = HeldRegistry()
    yield r
    r.close()


@pytest.fixture
def code_dir(tmp_path):
    d = tmp_path / "code"
    d.mkdir()
    shutil.copy(os.path.join(PRODUCTS, "cubicle-demo-agent"), d / "cubicle-demo-agent")
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    return d


def test_the_tutorials_deploy_invoke_update_and_clean_up(start_daemon, registry, tmp_path):  # noqa: F811
    """The tutorial's agent as an image in a registry: created, polled to READY, invoked through its new ARN
    with qualifier DEFAULT, updated (version 2: new sessions get it, a live one stays on 1), pinned by a
    named endpoint, listed page by page, the whole state kept across a SIGKILL and restart of cubicled, then
    deleted: its sessions end, and invoking it is ResourceNotFoundException."""
    push(registry, tmp_path, "agents/tutor", layout=python_image_layout())
    d = start_daemon(demo_config(f"registries: [{{host: \"{registry}\", insecure: true}}]\n"))
    cp = d.control()
    artifact = {"containerConfiguration": {"containerUri": f"{registry}/agents/tutor:v1"}}
    created = cp.create_agent_runtime(agentRuntimeName="strands_tutor", agentRuntimeArtifact=artifact, roleArn=ROLE,
                                      networkConfiguration={"networkMode": "SANDBOX"}, description="the tutorial's agent",
                                      protocolConfiguration={"serverProtocol": "HTTP"}, tags={"cubicle:memory": "1GiB", "team": "docs"})
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 202 and created["status"] == "CREATING", created
    rid, arn = created["agentRuntimeId"], created["agentRuntimeArn"]
    assert rid.startswith("strands_tutor-") and len(rid) == len("strands_tutor-") + 10
    assert arn == f"arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{rid}" and created["agentRuntimeVersion"] == "1"
    got = wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert (got["agentRuntimeVersion"], got["description"], got["roleArn"]) == ("1", "the tutorial's agent", ROLE)
    assert got["agentRuntimeArtifact"] == artifact and got["networkConfiguration"] == {"networkMode": "SANDBOX"}
    assert cp.list_tags_for_resource(resourceArn=arn)["tags"] == {"cubicle:memory": "1GiB", "team": "docs"}
    # The store is root's alone: the file 0600 in a 0700 data directory.
    assert os.stat(d.data_dir).st_mode & 0o777 == 0o700 and os.stat(os.path.join(d.data_dir, "runtimes.db")).st_mode & 0o777 == 0o600

    s1 = new_session_id()
    r = invoke(d, arn, s1, {"prompt": "What is 2+5?", "user_id": "1"})
    assert (r["session_id"], r["answer"], r["turn"]) == (s1, 7, 1), r
    info = d.cubicle_json("inspect", s1)
    assert (info["runtime"], info["runtimeVersion"]) == (rid, 1)
    assert info["limits"]["memoryBytes"] == 1 << 30, "the cubicle:memory tag set the version's limit"

    # Version 2: new sessions get it through DEFAULT; s1 stays on version 1 and keeps its memory.
    updated = cp.update_agent_runtime(agentRuntimeId=rid, agentRuntimeArtifact=artifact, roleArn=ROLE,
                                      networkConfiguration={"networkMode": "SANDBOX"}, environmentVariables={"TUTOR_VERSION": "2"})
    assert (updated["agentRuntimeVersion"], updated["status"]) == ("2", "UPDATING")
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert cp.get_agent_runtime(agentRuntimeId=rid, agentRuntimeVersion="1")["agentRuntimeVersion"] == "1"
    s2 = new_session_id()
    assert invoke(d, arn, s2, {"prompt": "What is 2+5?", "user_id": "1"})["turn"] == 1
    assert d.cubicle_json("inspect", s2)["runtimeVersion"] == 2
    assert invoke(d, arn, s1, {"prompt": "And if you add 34 to that?", "user_id": "1"})["answer"] == 41
    assert d.cubicle_json("inspect", s1)["runtimeVersion"] == 1

    # A named endpoint pinned to version 1, and invoking through it.
    ep = cp.create_agent_runtime_endpoint(agentRuntimeId=rid, name="pinned", agentRuntimeVersion="1", description="stays on 1")
    assert (ep["targetVersion"], ep["endpointName"], ep["status"]) == ("1", "pinned", "CREATING")
    got_ep = wait_status(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned"))
    assert (got_ep["liveVersion"], got_ep["targetVersion"], got_ep["name"]) == ("1", "1", "pinned")
    s3 = new_session_id()
    invoke(d, arn, s3, {"prompt": "hi", "user_id": "1"}, qualifier="pinned")
    assert d.cubicle_json("inspect", s3)["runtimeVersion"] == 1
    code, _ = error_code(lambda: invoke(d, arn, new_session_id(), {"prompt": "hi"}, qualifier="nosuch"))
    assert code == "ResourceNotFoundException"
    runtimes = d.cubicle_json("runtimes")["runtimes"]
    row = next(r for r in runtimes if r["name"] == rid)
    assert [(v["version"], v["sessions"]) for v in row["versions"]] == [(1, 2), (2, 1)], row
    assert {e["name"]: e["liveVersion"] for e in row["endpoints"]} == {"DEFAULT": 2, "pinned": 1}
    assert next(r for r in runtimes if r["name"] == "demo")["declared"] is True
    table = d.cubicle("runtimes").stdout
    assert "v1(2) v2(1)" in table and "DEFAULT=2 pinned=1" in table and "READY (declared)" in table, table

    # Pages, as the paginators walk them.
    versions = [v["agentRuntimeVersion"] for page in cp.get_paginator("list_agent_runtime_versions").paginate(
        agentRuntimeId=rid, PaginationConfig={"PageSize": 1}) for v in page["agentRuntimes"]]
    assert versions == ["2", "1"]
    first = cp.list_agent_runtime_endpoints(agentRuntimeId=rid, maxResults=1)
    second = cp.list_agent_runtime_endpoints(agentRuntimeId=rid, maxResults=1, nextToken=first["nextToken"])
    assert [e["name"] for e in first["runtimeEndpoints"] + second["runtimeEndpoints"]] == ["DEFAULT", "pinned"]
    assert "nextToken" not in second
    listed = {r["agentRuntimeId"]: r for r in cp.list_agent_runtimes()["agentRuntimes"]}
    assert set(listed) == {"demo", rid} and listed[rid]["agentRuntimeVersion"] == "2"

    # SIGKILL and start again: the store has every runtime, version and endpoint; the sessions are adopted
    # on the versions they had.
    d.process.send_signal(signal.SIGKILL)
    d.process.wait()
    d.restart()
    cp = d.control()
    assert cp.get_agent_runtime(agentRuntimeId=rid)["agentRuntimeVersion"] == "2"
    assert cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned")["liveVersion"] == "1"
    assert invoke(d, arn, s1, {"prompt": "What is 2+5?", "user_id": "1"})["turn"] == 3
    assert d.cubicle_json("inspect", s1)["runtimeVersion"] == 1
    assert invoke(d, arn, new_session_id(), {"prompt": "hi"})["turn"] == 1

    # The tutorial's clean-up cell.
    init_pids = [d.cubicle_json("inspect", s)["initPID"] for s in (s1, s2, s3)]
    deleted = cp.delete_agent_runtime(agentRuntimeId=rid)
    assert (deleted["status"], deleted["agentRuntimeId"]) == ("DELETING", rid)
    code, message = error_code(lambda: invoke(d, arn, new_session_id(), {"prompt": "hi"}))
    assert code == "ResourceNotFoundException" and rid in message
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{p}") for p in init_pids) or rid in [r["agentRuntimeId"] for r in cp.list_agent_runtimes()["agentRuntimes"]]:
        assert time.time() < deadline, "the deleted runtime's sessions or record remain"
        time.sleep(0.1)
    ended = {r["id"]: r for r in d.cubicle_json("ps", "--all")["sessions"] if r["id"] in (s1, s2, s3)}
    assert {r["endReason"] for r in ended.values()} == {"runtime_deleted"}, ended
    assert error_code(lambda: cp.get_agent_runtime(agentRuntimeId=rid))[0] == "ResourceNotFoundException"
    # The declared runtime was never touched.
    assert d.invoke_json({"prompt": "2+5"}, new_session_id())["answer"] == 7


def test_hostile_and_malformed_calls_get_the_modelled_errors_and_change_nothing(start_daemon, code_dir, held_registry):
    d = start_daemon(held_registry.config(), extra_args=["--code-root", str(code_dir)])
    cp = d.control()
    good = host_runtime(code_dir, tags={"cubicle:command": "/app/cubicle-demo-agent"})

    def refused(expect, **overrides):
        args = {"agentRuntimeName": "agent_x", **good, **overrides}
        code, message = error_code(lambda: cp.create_agent_runtime(**args))
        assert code == expect, (code, message)
        return message

    assert "pattern" in refused("ValidationException", agentRuntimeName="bad-name")
    assert "pattern" in refused("ValidationException", agentRuntimeName="x" * 49)
    assert "4096" in refused("ValidationException", description="d" * 4097)
    assert "networkMode" in refused("ValidationException", networkConfiguration={"networkMode": "BOGUS"})
    assert "VPC" in refused("ValidationException", networkConfiguration={"networkMode": "VPC", "networkModeConfig": {
        "securityGroups": ["sg-01234567"], "subnets": ["subnet-01234567"]}})
    assert "serverProtocol" in refused("ValidationException", protocolConfiguration={"serverProtocol": "XYZ"})
    assert "codeConfiguration" in refused("ValidationException", agentRuntimeArtifact={"codeConfiguration": {
        "code": {"s3": {"bucket": "my-bucket", "prefix": "agent.zip"}}, "runtime": "PYTHON_3_12", "entryPoint": ["main.py"]}})
    assert "discoveryUrl" in refused("ValidationException", authorizerConfiguration={"customJWTAuthorizer": {
        "discoveryUrl": "https://issuer.example.com/keys"}})
    assert "mountPath" in refused("ValidationException", filesystemConfigurations=[{"sessionStorage": {"mountPath": "/mnt/a/b"}}])
    assert "cubicle:bogus" in refused("ValidationException", tags={"cubicle:bogus": "1"})
    assert "--code-root" in refused("ValidationException", agentRuntimeArtifact={"containerConfiguration": {"containerUri": "host:/etc"}})
    assert "roleCredentials" in refused("ValidationException", networkConfiguration={"networkMode": "PUBLIC"})
    assert refused("ConflictException", agentRuntimeName="demo")  # the declared runtime's name is taken
    # Raw HTTP: a body that is not JSON, an id that is no id, an unknown field.
    for method, path, body, expect in [("PUT", "/runtimes/", b"{not json", 400), ("GET", "/runtimes/..%2F..%2Fetc/", b"", 400),
                                       ("PUT", "/runtimes/", json.dumps({**good, "agentRuntimeName": "x", "evil": 1}).encode(), 400)]:
        req = urllib.request.Request(d.endpoint + path, data=body or None, method=method, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == expect and e.value.headers["x-amzn-ErrorType"] == "ValidationException", (path, e.value.read())
    assert [r["agentRuntimeId"] for r in cp.list_agent_runtimes()["agentRuntimes"]] == ["demo"], "a refused call changed nothing"

    # The declared runtime is changed only in the file.
    for call in (lambda: cp.delete_agent_runtime(agentRuntimeId="demo"),
                 lambda: cp.update_agent_runtime(agentRuntimeId="demo", **host_runtime(code_dir)),
                 lambda: cp.tag_resource(resourceArn="arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/demo", tags={"a": "b"})):
        code, message = error_code(call)
        assert code == "ConflictException" and "config file" in message

    # clientToken: the same request again is answered as the first; another request with it is a conflict.
    token = "t" * 40
    a = cp.create_agent_runtime(agentRuntimeName="agent_a", clientToken=token, **good)
    b = cp.create_agent_runtime(agentRuntimeName="agent_a", clientToken=token, **good)
    assert a["agentRuntimeId"] == b["agentRuntimeId"]
    assert error_code(lambda: cp.create_agent_runtime(agentRuntimeName="agent_b", clientToken=token, **good))[0] == "ConflictException"
    assert error_code(lambda: cp.create_agent_runtime(agentRuntimeName="agent_a", **good))[0] == "ConflictException"
    rid = a["agentRuntimeId"]
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))

    # Concurrent updates of one runtime while its last update's work runs (an image pull from a registry
    # that accepts and never answers, so the work is held for as long as the test needs): exactly one makes
    # version 2, the others are ConflictException.
    stuck = held_registry.artifact()
    results = []

    def update(i):
        try:
            results.append(cp.update_agent_runtime(agentRuntimeId=rid, environmentVariables={"N": str(i)}, **{**host_runtime(code_dir), **stuck})["agentRuntimeVersion"])
        except botocore.exceptions.ClientError as e:
            results.append(e.response["Error"]["Code"])
    try:
        threads = [threading.Thread(target=update, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["2"] + ["ConflictException"] * 5, results
        assert cp.get_agent_runtime(agentRuntimeId=rid)["status"] == "UPDATING"
    finally:
        held_registry.release()
    failed = wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid), want=("UPDATE_FAILED",))
    assert "agents/x" in failed["failureReason"], failed
    assert [v["agentRuntimeVersion"] for v in cp.list_agent_runtime_versions(agentRuntimeId=rid)["agentRuntimes"]] == ["2", "1"]
    cp.update_agent_runtime(agentRuntimeId=rid, **host_runtime(code_dir))
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))

    # Endpoints: DEFAULT is the runtime's; versions must exist; names are unique.
    assert error_code(lambda: cp.delete_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="DEFAULT"))[0] == "ConflictException"
    assert error_code(lambda: cp.create_agent_runtime_endpoint(agentRuntimeId=rid, name="e1", agentRuntimeVersion="9"))[0] == "ResourceNotFoundException"
    cp.create_agent_runtime_endpoint(agentRuntimeId=rid, name="e1", agentRuntimeVersion="1")
    assert error_code(lambda: cp.create_agent_runtime_endpoint(agentRuntimeId=rid, name="e1"))[0] == "ConflictException"
    wait_status(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="e1"))
    cp.update_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="e1", agentRuntimeVersion="3")
    assert wait_status(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="e1"))["liveVersion"] == "3"
    assert "UPDATE_FAILED" in error_code(lambda: cp.update_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="e1", agentRuntimeVersion="2"))[1]
    cp.delete_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="e1")
    assert error_code(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="e1"))[0] == "ResourceNotFoundException"

    # Tags: added, listed, removed; a bad Cubicle setting is refused whole.
    arn = a["agentRuntimeArn"]
    cp.tag_resource(resourceArn=arn, tags={"owner": "me", "cubicle:warmPool": "0"})
    assert error_code(lambda: cp.tag_resource(resourceArn=arn, tags={"cubicle:memory": "lots"}))[0] == "ValidationException"
    cp.untag_resource(resourceArn=arn, tagKeys=["owner", "cubicle:warmPool"])
    assert cp.list_tags_for_resource(resourceArn=arn)["tags"] == {"cubicle:command": "/app/cubicle-demo-agent"}
    assert error_code(lambda: cp.list_tags_for_resource(resourceArn=arn + "x"))[0] == "ResourceNotFoundException"
    assert error_code(lambda: cp.list_agent_runtimes(nextToken="forged"))[0] == "ValidationException"


def test_a_failed_version_keeps_the_last_good_one_serving(start_daemon, code_dir):
    """An update whose work fails (here: its code directory is gone) is UPDATE_FAILED with the reason, and
    DEFAULT stays on the version before it; nothing was left for a session's first call to find out."""
    d = start_daemon(extra_args=["--code-root", str(code_dir.parent)])
    cp = d.control()
    rid = cp.create_agent_runtime(agentRuntimeName="agent_f", tags={"cubicle:command": "/app/cubicle-demo-agent"},
                                  **host_runtime(code_dir))["agentRuntimeId"]
    arn = wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))["agentRuntimeArn"]
    cp.update_agent_runtime(agentRuntimeId=rid, **host_runtime(code_dir.parent / "missing"))
    failed = wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid), want=("UPDATE_FAILED",))
    assert "missing" in failed["failureReason"], failed
    s = new_session_id()
    assert invoke(d, arn, s, {"prompt": "2+5"})["answer"] == 7
    assert d.cubicle_json("inspect", s)["runtimeVersion"] == 1
    code, _ = error_code(lambda: invoke(d, arn, new_session_id(), {"prompt": "hi"}, qualifier="2"))
    assert code == "ResourceNotFoundException"
    # StopRuntimeSession and InvokeAgentRuntimeCommand honour the qualifier too.
    c = d.client()
    code, _ = error_code(lambda: c.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=s, qualifier="nosuch"))
    assert code == "ResourceNotFoundException"
    code, _ = error_code(lambda: c.invoke_agent_runtime_command(agentRuntimeArn=arn, runtimeSessionId=s, qualifier="2", body={"command": "true"}))
    assert code == "ResourceNotFoundException"
    r = c.invoke_agent_runtime_command(agentRuntimeArn=arn, runtimeSessionId=s, qualifier="1", body={"command": "echo $TUTOR", "timeout": 30})
    assert any("chunk" in e and "contentDelta" in e["chunk"] for e in r["stream"])
    c.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=s, qualifier="DEFAULT")
    assert s not in [x["id"] for x in d.cubicle_json("ps")["sessions"]]
    # A failed create: the runtime exists, CREATE_FAILED, and cannot be invoked.
    rid2 = cp.create_agent_runtime(agentRuntimeName="agent_g", tags={"cubicle:command": "/app/cubicle-demo-agent"},
                                   **host_runtime(code_dir.parent / "missing"))["agentRuntimeId"]
    assert "missing" in wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid2), want=("CREATE_FAILED",))["failureReason"]
    assert error_code(lambda: invoke(d, f"arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{rid2}", new_session_id(), {}))[0] == "ResourceNotFoundException"


def test_sighup_reloads_the_file_and_spares_unchanged_runtimes(start_daemon, tmp_path):
    def config(second):
        return f"""lifecycleMinimumSeconds: 1
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
{second}"""
    extra = f"""  - name: other
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    environmentVariables: {{X: "1"}}
"""
    d = start_daemon(config(extra))
    path = tmp_path / "d0" / "cubicle.yaml"
    keep, changed = new_session_id(), new_session_id()
    d.invoke_json({"prompt": "2+5"}, keep)
    d.invoke_json({"prompt": "2+5"}, changed, runtime="other")
    keep_pid = d.cubicle_json("inspect", keep)["initPID"]
    path.write_text(config(extra.replace('X: "1"', 'X: "2"') + f"""  - name: third
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
"""))
    d.process.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while "config reloaded" not in d.log_text():
        assert time.time() < deadline, d.log_text()[-2000:]
        time.sleep(0.05)
    # The unchanged runtime's session is the same sandbox; the changed one's session stays on version 1 and
    # new ones get 2; the new runtime serves.
    assert d.invoke_json({"prompt": "add 1"}, keep)["answer"] == 8 and d.cubicle_json("inspect", keep)["initPID"] == keep_pid
    assert d.cubicle_json("inspect", changed)["runtimeVersion"] == 1
    fresh = new_session_id()
    d.invoke_json({"prompt": "hi"}, fresh, runtime="other")
    assert d.cubicle_json("inspect", fresh)["runtimeVersion"] == 2
    d.invoke_json({"prompt": "hi"}, new_session_id(), runtime="third")
    # Removed from the file: its sessions end as runtime_deleted.
    path.write_text(config(""))
    d.process.send_signal(signal.SIGHUP)
    deadline = time.time() + 20
    while d.log_text().count("config reloaded") < 2 or any(r["id"] in (changed, fresh) for r in d.cubicle_json("ps")["sessions"]):
        assert time.time() < deadline
        time.sleep(0.05)
    ended = {r["id"]: r["endReason"] for r in d.cubicle_json("ps", "--all")["sessions"] if r["id"] in (changed, fresh)}
    assert ended == {changed: "runtime_deleted", fresh: "runtime_deleted"}
    assert [r["name"] for r in d.cubicle_json("runtimes")["runtimes"]] == ["demo"]


def admin_call(d, method, path, body=None):
    """An HTTP request over the admin socket (root's alone), as `curl --unix-socket` makes it."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(d.admin_socket)
    c = UnixConnection("localhost", timeout=10)
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.getheader("x-amzn-ErrorType"), r.read()


def test_the_control_plane_answers_only_on_loopback_and_the_admin_socket(start_daemon, code_dir):
    """Until callers are authenticated, a listener other hosts can reach refuses every control-plane call;
    the admin socket, root's alone, serves it whatever the listener."""
    d = start_daemon(listen_host="0.0.0.0", insecure_no_auth=True, extra_args=["--code-root", str(code_dir)])
    code, message = error_code(lambda: d.control().list_agent_runtimes())
    assert code == "AccessDeniedException" and "loopback" in message
    code, _ = error_code(lambda: d.control().create_agent_runtime(agentRuntimeName="sneaky", **host_runtime(code_dir)))
    assert code == "AccessDeniedException"
    assert d.invoke_json({"prompt": "2+5"}, new_session_id())["answer"] == 7, "the data plane still serves"
    status, _, body = admin_call(d, "PUT", "/runtimes/", {"agentRuntimeName": "by_root", "tags": {"cubicle:command": "/app/cubicle-demo-agent"},
                                                         **host_runtime(code_dir)})
    assert status == 202, body
    rid = json.loads(body)["agentRuntimeId"]
    status, _, body = admin_call(d, "POST", "/runtimes/")
    assert status == 200 and {r["agentRuntimeId"] for r in json.loads(body)["agentRuntimes"]} == {"demo", rid}
    status, error_type, _ = admin_call(d, "GET", "/runtimes/nosuch-0123456789/")
    assert (status, error_type) == (404, "ResourceNotFoundException")


def test_a_versions_warm_pool_is_filled_before_it_is_ready(start_daemon, code_dir):
    """cubicle:warmPool sandboxes of a version start in its CREATING/UPDATING work: READY means the first
    sessions find them warm; an update swaps the pool to the new version; an agent that cannot start fails
    the version, not a session."""
    d = start_daemon(extra_args=["--code-root", str(code_dir)])
    cp = d.control()
    tags = {"cubicle:command": "/app/cubicle-demo-agent", "cubicle:warmPool": "2"}
    rid = cp.create_agent_runtime(agentRuntimeName="pooled", tags=tags, **host_runtime(code_dir))["agentRuntimeId"]
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    warm = [w for w in d.cubicle_json("ps")["warm"] if w["runtime"] == rid]
    assert [(w["state"], w["runtimeVersion"]) for w in warm] == [("warm", 1)] * 2, warm
    cp.update_agent_runtime(agentRuntimeId=rid, environmentVariables={"V": "2"}, **host_runtime(code_dir))
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    warm = [w for w in d.cubicle_json("ps")["warm"] if w["runtime"] == rid]
    assert sorted(w["runtimeVersion"] for w in warm) == [2, 2], warm
    # The agent's program is missing in version 3: its pool cannot start, so the version fails and 2 serves.
    cp.tag_resource(resourceArn=f"arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{rid}", tags={"cubicle:command": "/app/missing-agent"})
    cp.update_agent_runtime(agentRuntimeId=rid, **host_runtime(code_dir))
    failed = wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid), want=("UPDATE_FAILED",))
    assert "warm pool could not start" in failed["failureReason"], failed
    arn = failed["agentRuntimeArn"]
    s = new_session_id()
    invoke(d, arn, s, {"prompt": "hi"})
    assert d.cubicle_json("inspect", s)["runtimeVersion"] == 2
