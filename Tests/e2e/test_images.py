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
  - name: plaintext
    containerUri: localhost:{registry.split(":")[1]}/agents/demo:v1
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
    # The same registry under a host name not configured insecure: HTTPS only, so it cannot be pulled.
    with pytest.raises(Exception, match="its image localhost:[0-9]+/agents/demo:v1 could not be prepared"):
        d.invoke({"prompt": "hi"}, new_session_id(), runtime="plaintext")
    listed = d.cubicle_json("images")["images"]
    assert [(i["reference"], i["runtimes"], i["layers"]) for i in listed] == [(f"{registry}/agents/demo:v1", ["img"], 2)], listed
    assert listed[0]["size"] > 1_000_000
    # Nothing of a session is written into the store: no name carries a session id. Ids are "e2e-" and hex;
    # the store's own names are digests, and a bare "e2e" turns up in one sha256 in hex out of about 66
    # (this check failed on CI that way), so the hyphen is what tells an id.
    assert not any("e2e-" in f for _, dirs, files in os.walk(data) for f in dirs + files)


MAKE_PYTHON_IMAGE = os.path.join(REPO, "Tests", "images", "make_python_image.py")
AGENTS = os.path.join(REPO, "sandbox", "agents")


def python_image_cached(name, venv, build):
    """A directory `build(dir)` fills with an image made by make_python_image.py from `venv` and the agents,
    built once per script, venv and agents under .build/ and shared by parallel workers through a lock."""
    import fcntl
    import hashlib
    h = hashlib.sha256(open(MAKE_PYTHON_IMAGE, "rb").read() + venv.encode())
    for root, dirs, files in sorted(os.walk(AGENTS)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    directory = os.path.join(REPO, ".build", f"{name}-{h.hexdigest()[:12]}")
    with open(os.path.join(REPO, ".build", f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(directory):
            subprocess.run(["rm", "-rf", directory + ".tmp"], check=True)
            os.makedirs(directory + ".tmp")
            build(directory + ".tmp")
            os.rename(directory + ".tmp", directory)
    return directory


def python_image_layout():
    """The SDK agents with Python inside (Tests/images/make_python_image.py)."""
    from agent_venv import VenvUnavailable, ensure_agent_venv
    try:
        venv = ensure_agent_venv()
    except VenvUnavailable as e:
        pytest.skip(str(e))
    return os.path.join(python_image_cached("python-image", venv, lambda d: subprocess.run(
        ["python3", MAKE_PYTHON_IMAGE, os.path.join(d, "layout"), venv, AGENTS, "v1"], check=True)), "layout")


def test_the_sdk_agent_as_an_image_answers_as_the_host_venv_runtime_does(start_daemon, registry, tmp_path):
    push(registry, tmp_path, "agents/sdk", layout=python_image_layout())
    # The image's Entrypoint (the tutorial's agent), and two more SDK agents from the same image by command.
    d = image_daemon(start_daemon, registry, tmp_path, f"""  - name: sdk
    containerUri: {registry}/agents/sdk:v1
    limits: {{memory: 1GiB}}
  - name: stream
    containerUri: {registry}/agents/sdk:v1
    command: [/opt/agent-venv/bin/python, /app/streaming_agent.py]
  - name: mcp
    containerUri: {registry}/agents/sdk:v1
    command: [/opt/agent-venv/bin/python, /app/mcp_server.py]
    protocol: MCP
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
    # The streaming agent's events, and the MCP server's tool, from the same image (one download, one store entry).
    from test_real_agents import invoke, mcp_call, sse_events
    c = d.client()
    events = [e for _, e in sse_events(invoke(c, "stream", new_session_id(), {"events": 3, "interval_ms": 10}))]
    assert [e.get("index") for e in events[:3]] == [0, 1, 2] and events[-1] == {"done": True, "events": 3}, events
    mcp_sid = new_session_id()
    r, init = mcp_call(c, mcp_sid, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "cubicle-test", "version": "1"}}})
    session = r.get("mcpSessionId")
    mcp_call(c, mcp_sid, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    _, called = mcp_call(c, mcp_sid, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                      "params": {"name": "add_numbers", "arguments": {"a": 2, "b": 5}}}, session)
    assert called["result"]["content"][0]["text"] == "7"
    assert [i["runtimes"] for i in d.cubicle_json("images")["images"]] == [["mcp", "sdk", "stream"]]
    # Its Python is the image's; nothing of the host's /usr is there (seen through the agent's own root).
    root = f"/proc/{d.cubicle_json('inspect', s1)['agentHostPID']}/root"
    assert os.path.exists(root + "/usr/lib/python3.11/os.py") and os.path.exists(root + "/opt/agent-venv/bin/python")
    assert not os.path.exists(root + "/usr/share") and not os.path.exists(root + "/usr/bin/gcc")
    # The image has no shell, so a command (run by /bin/sh, as InvokeAgentRuntimeCommand's are) says so.
    r = d.cubicle("exec", s1, "--", "true", check=False)
    assert r.returncode != 0 and "could not start /bin/sh" in r.stderr, r.stderr


TOKEN_SERVER = r'''
import base64, json, subprocess, sys, time, uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlparse, parse_qs
key, cert_der, port, user, password = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
x5c = base64.b64encode(open(cert_der, "rb").read()).decode()
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode():
            self.send_response(401); self.send_header("Content-Length", "0"); self.end_headers(); return
        access = []
        for scope in q.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": "cubicle-test", "sub": user, "aud": q["service"][0], "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing = b64(json.dumps({"alg": "RS256", "typ": "JWT", "x5c": [x5c]}).encode()) + b"." + b64(json.dumps(claims).encode())
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing, capture_output=True, check=True).stdout
        body = json.dumps({"token": (signing + b"." + b64(sig)).decode()}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
server = HTTPServer(("127.0.0.1", port), H)
print("serving", flush=True)
server.serve_forever()
'''


def free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, process):
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.time() < deadline and process.poll() is None, "server did not start"
            time.sleep(0.05)


def test_a_registry_that_asks_for_a_token(start_daemon, tmp_path):
    """The distribution registry with token auth, as Docker Hub and most registries run: a 401 naming a Bearer
    realm, a token from there for the credentials (a JWT the registry verifies against the test's CA)."""
    if not (shutil.which("docker-registry") and shutil.which("skopeo") and os.path.exists("/bin/busybox")):
        pytest.skip("needs docker-registry, skopeo and busybox-static (apt-get install docker-registry skopeo busybox-static)")
    key, cert, der = tmp_path / "token.key", tmp_path / "token.pem", tmp_path / "token.der"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cubicle test token issuer",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)], check=True)
    token_port, registry_port = free_loopback_port(), free_loopback_port()
    issuer = subprocess.Popen(["python3", "-c", TOKEN_SERVER, str(key), str(der), str(token_port), "robot", "s3cret"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    (tmp_path / "registry.yml").write_text(f"""version: 0.1
log: {{level: error}}
storage: {{filesystem: {{rootdirectory: {tmp_path}/registry}}}}
http: {{addr: "127.0.0.1:{registry_port}"}}
auth:
  token: {{realm: "http://127.0.0.1:{token_port}/token", service: cubicle-test-registry, issuer: cubicle-test, rootcertbundle: {cert}}}
""")
    registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert issuer.stdout.readline().strip() == "serving"
        wait_port(registry_port, registry)
        host = f"127.0.0.1:{registry_port}"
        layout = tmp_path / "layout"
        subprocess.run(["python3", MAKE_LAYOUT, str(layout), "v1", "linux/amd64", os.path.join(PRODUCTS, "cubicle-demo-agent")], check=True)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", "robot:s3cret", f"oci:{layout}:v1",
                        f"docker://{host}/agents/private:v1"], check=True)
        d = start_daemon(f"""lifecycleMinimumSeconds: 1
registries: [{{host: "{host}", insecure: true, username: robot, password: s3cret}}]
runtimes:
  - name: private
    containerUri: {host}/agents/private:v1
""", extra_args=["--data-dir", str(tmp_path / "data")])
        assert d.invoke_json({"prompt": "2+5"}, new_session_id(), runtime="private")["answer"] == 7
        # Wrong credentials: the token service refuses them, and the runtime says so.
        wrong = start_daemon(f"""lifecycleMinimumSeconds: 1
registries: [{{host: "{host}", insecure: true, username: robot, password: wrong}}]
runtimes:
  - name: private
    containerUri: {host}/agents/private:v1
""", extra_args=["--data-dir", str(tmp_path / "data-wrong")])
        with pytest.raises(Exception, match="the token service of .* answered 401"):
            wrong.invoke({"prompt": "hi"}, new_session_id(), runtime="private")
    finally:
        registry.terminate()
        issuer.terminate()
        registry.wait()
        issuer.wait()


def test_images_no_runtime_names_are_pruned(start_daemon, registry, tmp_path):
    push(registry, tmp_path, "agents/old", agent=os.path.join(PRODUCTS, "cubicle-demo-agent"))
    push(registry, tmp_path, "agents/new", agent=os.path.join(PRODUCTS, "cubicle-demo-agent"))
    first = image_daemon(start_daemon, registry, tmp_path, f"  - name: app\n    containerUri: {registry}/agents/old:v1\n")
    first.stop()
    # The same store, a config that names another image: the old one is kept until pruned.
    d = image_daemon(start_daemon, registry, tmp_path, f"  - name: app\n    containerUri: {registry}/agents/new:v1\n")
    listed = {i["reference"]: i["runtimes"] for i in d.cubicle_json("images")["images"]}
    assert listed == {f"{registry}/agents/old:v1": [], f"{registry}/agents/new:v1": ["app"]}, listed
    pruned = subprocess.run([os.path.join(PRODUCTS, "cubicle"), "images", "prune", "--admin-socket", d.admin_socket],
                            capture_output=True, text=True, check=True)
    assert pruned.stdout == f"removed {registry}/agents/old:v1\n", pruned.stderr
    assert [i["reference"] for i in d.cubicle_json("images")["images"]] == [f"{registry}/agents/new:v1"]
    # The layers both images share stay for the one still named; its sessions run.
    assert d.invoke_json({"prompt": "2+5"}, new_session_id(), runtime="app")["answer"] == 7
