"""Runtimes from container images, end to end: a real registry (Debian's docker-registry on a loopback port
of the test's own), an image pushed to it with skopeo (written by Tests/images/make_oci_layout.py: a busybox
userland and the demo agent as its Entrypoint), cubicled pulling it at start and running sessions on it."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import PRODUCTS, new_session_id

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE_LAYOUT = os.path.join(REPO, "Tests", "images", "make_oci_layout.py")


@pytest.fixture
def registry(tmp_path):
    if not (shutil.which("docker-registry") and shutil.which("skopeo") and os.path.exists("/bin/busybox")):
        pytest.skip("needs docker-registry, skopeo and busybox-static (apt-get install docker-registry skopeo busybox-static)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "registry.yml").write_text(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {tmp_path}/registry}}}}\n"
                                           f"http: {{addr: \"127.0.0.1:{port}\"}}\n")
    p = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.time() < deadline and p.poll() is None, "docker-registry did not start"
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    p.terminate()
    p.wait()


def push(registry, tmp_path, repo, agent=None, layout=None):
    """The test image (or `layout`) pushed to the test registry as REPO:v1, every platform of it."""
    if layout is None:
        layout = tmp_path / ("layout-" + repo.replace("/", "-"))
        subprocess.run(["python3", MAKE_LAYOUT, str(layout), "v1", "linux/amd64,linux/arm64"] + ([agent] if agent else []), check=True)
    subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{registry}/{repo}:v1"], check=True)


def image_daemon(start_daemon, registry, tmp_path, runtimes):
    """cubicled with the test registry (plain HTTP), a data directory of the test's own and `runtimes` (YAML)."""
    return start_daemon(f"""lifecycleMinimumSeconds: 1
registries: [{{host: "{registry}", insecure: true}}]
runtimes:
{runtimes}""", extra_args=["--data-dir", str(tmp_path / "data")])


def test_a_runtime_from_an_image_in_a_registry(start_daemon, registry, tmp_path):
    push(registry, tmp_path, "agents/demo", agent=os.path.join(PRODUCTS, "cubicle-demo-agent"))
    data = tmp_path / "data"
    d = image_daemon(start_daemon, registry, tmp_path, f"""  - name: img
    containerUri: {registry}/agents/demo:v1
    limits: {{memory: 256MiB}}
    warmPool: 1
  - name: missing
    containerUri: {registry}/agents/none:v1
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
""")
    # A warm pool of an image runtime fills as any other: a sandbox of the image, started and healthy.
    deadline = time.time() + 30
    while not [w for w in d.cubicle_json("ps").get("warm", []) if w["runtime"] == "img" and w["state"] == "warm"]:
        assert time.time() < deadline, "the image runtime's warm pool did not fill"
        time.sleep(0.1)
    sid = new_session_id()
    # The image's Entrypoint, no command in the config: the demo agent answers from inside the image (the
    # first call claims the warm sandbox).
    assert d.invoke_json({"prompt": "2+5"}, sid, runtime="img")["answer"] == 7
    assert d.cubicle("exec", sid, "--", "cat", "/etc/os-release").stdout == "ID=cubicle-test\n"
    assert d.cubicle_json("inspect", sid)["image"] == f"{registry}/agents/demo:v1"
    # The image's User (`worker`, 1500 in its own /etc/passwd), not Cubicle's default 1000.
    assert d.cubicle("exec", sid, "--", "id", "-u").stdout == "1500\n"
    # The image's userland, not the host's: no host library directory, the image's /etc/passwd.
    r = d.cubicle("exec", sid, "--", "sh", "-c", "test -e /usr/lib/x86_64-linux-gnu && echo host || echo none; grep -c . /etc/passwd")
    assert r.stdout == "none\n3\n", r.stdout
    # The agent runs in the image's WorkingDir, with its Env under Cubicle's.
    agent = d.cubicle_json("inspect", sid)["agentHostPID"]
    assert os.readlink(f"/proc/{agent}/cwd") == "/srv"
    env = open(f"/proc/{agent}/environ", "rb").read().split(b"\0")
    assert b"GREETING=hi" in env and b"AGENTCORE_RUNTIME_NAME=img" in env and b"PATH=/usr/local/bin:/usr/bin:/bin" in env
    # A missing tag leaves that runtime unavailable with the reason; the others are served.
    with pytest.raises(Exception, match="agents/none:v1 not found in the registry"):
        d.invoke({"prompt": "hi"}, new_session_id(), runtime="missing")
    assert d.invoke_json({"prompt": "2+5"}, new_session_id(), runtime="demo")["answer"] == 7
    listed = d.cubicle_json("images")["images"]
    assert [(i["reference"], i["runtimes"], i["layers"]) for i in listed] == [(f"{registry}/agents/demo:v1", ["img"], 2)], listed
    assert listed[0]["size"] > 1_000_000
    # Nothing of a session is written into the store.
    assert not any("e2e" in f for _, _, files in os.walk(data) for f in files)


def python_image_layout():
    """The SDK agents with Python inside (Tests/images/make_python_image.py), built once per venv and script
    under .build/ and shared by parallel workers through a lock."""
    import fcntl
    import hashlib
    from agent_venv import VenvUnavailable, ensure_agent_venv
    try:
        venv = ensure_agent_venv()
    except VenvUnavailable as e:
        pytest.skip(str(e))
    script = os.path.join(REPO, "Tests", "images", "make_python_image.py")
    key = hashlib.sha256(open(script, "rb").read() + venv.encode()).hexdigest()[:12]
    layout = os.path.join(REPO, ".build", f"python-image-{key}")
    with open(os.path.join(REPO, ".build", "python-image.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(layout, "index.json")):
            subprocess.run(["rm", "-rf", layout], check=True)
            subprocess.run(["python3", script, layout + ".tmp", venv, os.path.join(REPO, "sandbox", "agents"), "v1"], check=True)
            os.rename(layout + ".tmp", layout)
    return layout


def test_the_sdk_agent_as_an_image_answers_as_the_host_venv_runtime_does(start_daemon, registry, tmp_path):
    push(registry, tmp_path, "agents/sdk", layout=python_image_layout())
    d = image_daemon(start_daemon, registry, tmp_path, f"""  - name: sdk
    containerUri: {registry}/agents/sdk:v1
    limits: {{memory: 1GiB}}
""")

    def ask(session, prompt, user):
        return d.invoke_json({"prompt": prompt, "user_id": user}, session, runtime="sdk")

    s1, s2, s3 = new_session_id(), new_session_id(), new_session_id()
    # The runtime-context tutorial's five invocations, as test_real_agents.py makes them of the host-venv runtime.
    r1 = ask(s1, "外の天気はどうですか?", "1")
    r2 = ask(s1, "2+5の答えは?", "1")
    r3 = ask(s1, "それに 34 を足すとどうなりますか?", "1")
    r4 = ask(s2, "そしてそれにさらに 10 を足すとどうなりますか?", "1")
    r5 = ask(s3, "天気はどうですか？", "2")
    assert (r1["session_id"], r1["user"], r1["answer"], r1["turn"]) == (s1, "Maira", "sunny", 1)
    assert (r2["answer"], r2["turn"], r3["answer"], r3["turn"]) == (7, 2, 41, 3)
    assert r4["session_id"] == s2 and r4["answer"] is None and r4["turn"] == 1
    assert (r5["session_id"], r5["user"], r5["answer"]) == (s3, "Mani", "sunny")
    # Its Python is the image's; nothing of the host's /usr is there (seen through the agent's own root).
    root = f"/proc/{d.cubicle_json('inspect', s1)['agentHostPID']}/root"
    assert os.path.exists(root + "/usr/lib/python3.11/os.py") and os.path.exists(root + "/opt/agent-venv/bin/python")
    assert not os.path.exists(root + "/usr/share") and not os.path.exists(root + "/usr/bin/gcc")
    # The image has no shell, so a command (run by /bin/sh, as InvokeAgentRuntimeCommand's are) says so.
    r = d.cubicle("exec", s1, "--", "true", check=False)
    assert r.returncode != 0 and "could not start /bin/sh" in r.stderr, r.stderr
