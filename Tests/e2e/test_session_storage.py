"""Session storage (issue 28, first part): filesystemConfigurations' sessionStorage as a file system per
session id (an ext4 image on a loop device), mounted at /mnt/NAME in each sandbox of that session, kept when
the session ends, capped in bytes and inodes."""
import json
import os
import subprocess

import pytest

from conftest import ARN_PREFIX, PRODUCTS, new_session_id

if not os.path.exists("/dev/loop-control"):
    pytest.skip("no /dev/loop-control: session storage needs loop devices", allow_module_level=True)


def storage_config(extra=""):
    return f"""lifecycleMinimumSeconds: 1
healthPollSeconds: 0.2
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    lifecycle: {{idleRuntimeSessionTimeout: 2, maxLifetime: 600}}
    filesystemConfigurations: [{{sessionStorage: {{mountPath: /mnt/data}}}}]
    limits: {{sessionStorage: 32MiB}}
{extra}"""


def run(d, sid, command, timeout=30):
    """A command in the session (invoked first, so the session exists): stdout, exit code."""
    d.invoke_json({"prompt": "1+1"}, sid)
    r = d.client().invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                                body={"command": command, "timeout": timeout})
    events = [e["chunk"] for e in r["stream"]]
    out = "".join(e["contentDelta"].get("stdout", "") for e in events if "contentDelta" in e)
    return out, events[-1]["contentStop"]["exitCode"]


def init_pid(d, sid):
    return [r for r in d.cubicle_json("ps")["sessions"] if r["id"] == sid][0]["initPID"]


def test_files_come_back_with_the_same_session_id_and_no_other(start_daemon):
    d = start_daemon(storage_config())
    sid = new_session_id()
    out, code = run(d, sid, "id -u; stat -c '%u %a' /mnt/data; echo kept > /mnt/data/notes.txt; mkdir -p /mnt/data/pkg && "
                            "printf '#!/bin/sh\\necho installed\\n' > /mnt/data/pkg/tool && chmod +x /mnt/data/pkg/tool; echo tmp > /tmp/gone")
    assert code == 0, out
    assert out.split("\n")[:2] == ["1000", "1000 755"], "the volume's root is the agent's"
    first_init = init_pid(d, sid)
    d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    out, code = run(d, sid, "cat /mnt/data/notes.txt; /mnt/data/pkg/tool; cat /tmp/gone 2>/dev/null || echo fresh-tmp")
    assert (out, code) == ("kept\ninstalled\nfresh-tmp\n", 0)
    assert init_pid(d, sid) != first_init, "a new sandbox"
    other, _ = run(d, new_session_id(), "ls -A /mnt/data | grep -v lost+found | wc -l")
    assert other.strip() == "0", "another id sees an empty volume"
    # docs/security.md: images 0600 in 0700 directories, root's alone.
    for root, dirs, files in os.walk(os.path.join(d.data_dir, "storage", "volumes")):
        assert os.stat(root).st_mode & 0o777 == 0o700, root
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o600, f


def test_kept_across_idle_timeout_and_a_sigkill_of_cubicled(start_daemon):
    d = start_daemon(storage_config())
    sid = new_session_id()
    assert run(d, sid, "echo one > /mnt/data/a")[1] == 0
    # Idle timeout (2 s) ends the session; the next call gets a new sandbox with the file.
    import time
    deadline = time.time() + 30
    while any(r["id"] == sid for r in d.cubicle_json("ps")["sessions"]) and time.time() < deadline:
        time.sleep(0.2)
    assert run(d, sid, "cat /mnt/data/a")[0] == "one\n"
    assert run(d, sid, "echo two > /mnt/data/b; sync")[1] == 0
    d.process.send_signal(9)
    d.process.wait()
    d.restart()
    # Taken over with its storage, or started anew on it: the files are there either way.
    assert run(d, sid, "cat /mnt/data/a /mnt/data/b")[0] == "one\ntwo\n"
    d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    assert run(d, sid, "cat /mnt/data/b")[0] == "two\n"


def test_the_cap_gives_enospc_inside_and_spares_the_neighbour(start_daemon):
    d = start_daemon(storage_config())
    full, neighbour = new_session_id(), new_session_id()
    out, code = run(d, full, "dd if=/dev/zero of=/mnt/data/big bs=1M count=64 2>&1; echo rc=$?")
    assert "No space left on device" in out and "rc=1" in out, out
    out, _ = run(d, full, "i=0; while touch /mnt/data/f$i 2>/dev/null; do i=$((i+1)); done; echo $i")
    assert 0 < int(out.strip()) <= 2048, "an inode flood stops at the volume's own inode cap"
    out, code = run(d, neighbour, "echo fine > /mnt/data/x && cat /mnt/data/x")
    assert (out, code) == ("fine\n", 0), "the neighbour's storage is unaffected"


def test_no_path_leads_out_of_the_volume(start_daemon, tmp_path):
    d = start_daemon(storage_config())
    sid, other = new_session_id(), new_session_id()
    assert run(d, other, "echo theirs > /mnt/data/secret")[1] == 0
    out, _ = run(d, sid, "ln -s / /mnt/data/root; ln /etc/hostname /mnt/data/hard 2>&1; mv /mnt/data /tmp/x 2>&1; "
                         "ls /mnt/data/root/mnt/data; cat /mnt/data/../data/secret 2>&1; echo done")
    assert "theirs" not in out and out.strip().endswith("done"), out
    assert "Invalid cross-device link" in out, "a hard link out of the volume is refused"
    # What the session planted is not followed on the host: its own root holds only its own files.
    assert run(d, other, "cat /mnt/data/secret")[0] == "theirs\n"


@pytest.mark.parametrize("bad", ["/data", "/mnt/a/b", "/mnt/..", "/mnt/"])
def test_mount_paths_are_validated(tmp_path, bad):
    """/mnt/NAME, one level below /mnt, as AWS validates it: anything else stops cubicled at start, naming the field."""
    path = tmp_path / "bad.yaml"
    path.write_text(storage_config().replace("/mnt/data", bad))
    r = subprocess.run([os.path.join(PRODUCTS, "cubicled"), "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                        "--config", str(path), "--admin-socket", str(tmp_path / "admin.sock"), "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "filesystemConfigurations" in r.stderr and "mountPath" in r.stderr, r.stderr


def test_a_new_runtime_version_starts_with_empty_storage(start_daemon, tmp_path):
    """Through the control plane: filesystemConfigurations and a cubicl:sessionStorage cap; UpdateAgentRuntime
    makes a new version, and the same session id then starts on an empty volume, as AWS resets it."""
    from test_control_plane import host_runtime, wait_status
    import shutil
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(os.path.join(PRODUCTS, "cubicle-demo-agent"), code / "cubicle-demo-agent")
    os.chmod(tmp_path, 0o755)
    d = start_daemon(storage_config(), extra_args=["--code-root", str(code)])
    cp = d.control()
    fs = [{"sessionStorage": {"mountPath": "/mnt/work"}}]
    tags = {"cubicle:command": "/app/cubicle-demo-agent", "cubicle:sessionStorage": "24MiB"}
    rid = cp.create_agent_runtime(agentRuntimeName="stored", filesystemConfigurations=fs, tags=tags, **host_runtime(code))["agentRuntimeId"]
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert cp.get_agent_runtime(agentRuntimeId=rid)["filesystemConfigurations"] == fs
    c = d.client()
    sid = new_session_id()

    def cmd(command):
        d.invoke_json({"prompt": "1+1"}, sid, runtime=rid)
        r = c.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + rid, runtimeSessionId=sid, body={"command": command, "timeout": 30})
        return "".join(e["chunk"]["contentDelta"].get("stdout", "") for e in r["stream"] if "contentDelta" in e["chunk"])

    assert cmd("echo v1 > /mnt/work/f; df -k /mnt/work | tail -1 | awk '{print $2}'").strip().isdigit()
    c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + rid, runtimeSessionId=sid)
    assert cmd("cat /mnt/work/f") == "v1\n", "kept while the version stays"
    c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + rid, runtimeSessionId=sid)
    cp.update_agent_runtime(agentRuntimeId=rid, filesystemConfigurations=fs, **host_runtime(code))
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert cmd("cat /mnt/work/f 2>/dev/null || echo empty") == "empty\n", "a new version starts on empty storage"


def volumes(d):
    return d.cubicle_json("storage")["volumes"]  # ls, the default


def test_operators_see_and_remove_volumes_and_unused_ones_expire(start_daemon):
    d = start_daemon(storage_config().replace("lifecycleMinimumSeconds: 1", "lifecycleMinimumSeconds: 1\nsessionStorageExpirySeconds: 3"))
    sid, other = new_session_id(), new_session_id()
    run(d, sid, "head -c 3000000 /dev/urandom > /mnt/data/blob")
    run(d, other, "true")
    sandbox = [r for r in d.cubicle_json("ps")["sessions"] if r["id"] == sid][0]["sandbox"]
    inspect = d.cubicle_json("inspect", sandbox)
    assert inspect["storage"]["mountPath"] == "/mnt/data" and inspect["storage"]["bytesUsed"] >= 3000000
    assert inspect["storage"]["bytesLimit"] <= 32 << 20
    listed = {v["session"]: v for v in volumes(d)}
    assert set(listed) == {sid, other} and listed[sid]["mounted"] and listed[sid]["bytes"] >= 3000000
    assert sid in d.cubicle("storage").stdout
    import urllib.request
    with urllib.request.urlopen(d.endpoint + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "cubicle_session_storage_volumes 2" in text and sid not in text
    # rm of a mounted volume waits for its sandbox; of an unmounted one, at once.
    rm = subprocess.run([os.path.join(PRODUCTS, "cubicle"), "storage", "rm", "--admin-socket", d.admin_socket, other],
                        capture_output=True, text=True, timeout=30)
    assert "when its session's sandbox ends" in rm.stdout, rm.stderr
    d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=other)
    assert other not in {v["session"] for v in volumes(d)}
    # Unused past sessionStorageExpirySeconds (3 s here): removed by the sweep.
    d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    import time
    deadline = time.time() + 20
    while volumes(d) and time.time() < deadline:
        time.sleep(0.25)
    assert volumes(d) == [], "expired"
    assert "session storage expired" in d.log_text()
    assert run(d, sid, "ls /mnt/data | grep -c blob || true")[0].strip() == "0", "the id starts over on an empty volume"


def test_deleting_a_runtime_or_an_endpoint_removes_its_storage(start_daemon, tmp_path):
    from test_control_plane import host_runtime, wait_status
    import shutil
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(os.path.join(PRODUCTS, "cubicle-demo-agent"), code / "cubicle-demo-agent")
    os.chmod(tmp_path, 0o755)
    d = start_daemon(storage_config(), extra_args=["--code-root", str(code)])
    cp, c = d.control(), d.client()
    fs = [{"sessionStorage": {"mountPath": "/mnt/work"}}]
    rid = cp.create_agent_runtime(agentRuntimeName="gone", filesystemConfigurations=fs, tags={"cubicle:command": "/app/cubicle-demo-agent"},
                                  **host_runtime(code))["agentRuntimeId"]
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    cp.create_agent_runtime_endpoint(agentRuntimeId=rid, name="side", agentRuntimeVersion="1")
    wait_status(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="side"))
    via_default, via_side = new_session_id(), new_session_id()
    for sid, qualifier in ((via_default, "DEFAULT"), (via_side, "side")):
        c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + rid, runtimeSessionId=sid, qualifier=qualifier, payload=b"{}")["response"].read()
        c.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + rid, runtimeSessionId=sid, qualifier=qualifier)
    images = {v["session"]: os.path.join(d.data_dir, "storage", "volumes", rid, v["name"], "volume.img") for v in volumes(d)}
    assert set(images) == {via_default, via_side} and all(os.path.exists(p) for p in images.values())
    cp.delete_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="side")
    assert {v["session"] for v in volumes(d)} == {via_default}, "the endpoint's sessions' storage went with it"
    assert not os.path.exists(images[via_side])
    cp.delete_agent_runtime(agentRuntimeId=rid)
    import time
    deadline = time.time() + 30
    while volumes(d) and time.time() < deadline:
        time.sleep(0.2)
    assert volumes(d) == [] and not os.path.exists(images[via_default]), "the runtime's storage went with it"


WHEEL = r'''
import zipfile, base64, hashlib
files = {"cubicle_hello/__init__.py": b"GREETING = 'installed into session storage'\n",
         "cubicle_hello-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: cubicle-hello\nVersion: 1.0\n",
         "cubicle_hello-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
record = []
with zipfile.ZipFile("/tmp/cubicle_hello-1.0-py3-none-any.whl", "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("cubicle_hello-1.0.dist-info/RECORD,,")
    z.writestr("cubicle_hello-1.0.dist-info/RECORD", "\n".join(record) + "\n")
'''


def test_a_package_installed_into_storage_is_there_in_the_next_sandbox(start_daemon):
    """The issue's coding agent: a virtualenv made in /mnt/data and a package installed into it (a wheel the
    session builds itself: the sandbox has no network), then a stop; the next sandbox imports it."""
    d = start_daemon(storage_config().replace("32MiB", "256MiB"))
    sid = new_session_id()
    script = WHEEL.replace("'", "'\"'\"'")
    out, code = run(d, sid, f"python3 -c '{script}' && python3 -m venv /mnt/data/venv >/dev/null 2>&1 && "
                            "/mnt/data/venv/bin/python -m pip install -q --no-index /tmp/cubicle_hello-1.0-py3-none-any.whl 2>&1; echo rc=$?",
                    timeout=300)
    if "No module named venv" in out or "ensurepip" in out:
        pytest.skip(f"the host's python3 has no venv/ensurepip, which the sandbox sees through /usr: {out}")
    assert out.strip().endswith("rc=0"), out
    d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    out, code = run(d, sid, "/mnt/data/venv/bin/python -c 'import cubicle_hello; print(cubicle_hello.GREETING)'; ls /tmp | grep -c whl || true")
    assert out == "installed into session storage\n0\n", out


def test_a_warm_sandbox_gets_the_sessions_storage_when_claimed(start_daemon):
    """With warmPool, a new session claims a sandbox started ahead: its volume is attached at the claim,
    before the first request reaches the agent, and comes back in the next warm sandbox of that id."""
    d = start_daemon(storage_config().replace("    limits: {sessionStorage: 32MiB}", "    limits: {sessionStorage: 32MiB}\n    warmPool: 1"))
    import time
    deadline = time.time() + 30
    while not d.cubicle_json("ps").get("warm") and time.time() < deadline:
        time.sleep(0.1)
    sid = new_session_id()
    assert run(d, sid, "echo warm > /mnt/data/w; stat -c %u /mnt/data")[0] == "1000\n"
    assert "session claimed a warm sandbox" in d.log_text()
    d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    deadline = time.time() + 30
    while not d.cubicle_json("ps").get("warm") and time.time() < deadline:
        time.sleep(0.1)
    assert run(d, sid, "cat /mnt/data/w")[0] == "warm\n"
    assert d.log_text().count("session claimed a warm sandbox") >= 2
