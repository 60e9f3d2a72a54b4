"""End-to-end fixtures: a real cubicled (as root) per test, driven with boto3.

Each daemon gets its own port, state directory and cgroup parent, so tests run in parallel
(pytest -n) and a failing test still stops its daemon and checks what it left behind.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

import boto3
import pytest
from botocore.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRODUCTS = os.environ.get("CUBICLE_PRODUCTS", os.path.join(REPO, ".build", "debug"))
CGROUP_ROOT = "/sys/fs/cgroup"
ARN_PREFIX = "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/"


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: changes host-wide settings; run alone, after the parallel tests")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="end-to-end tests start cubicled, which needs root (namespaces, cgroups)")
        for item in items:
            item.add_marker(skip)
        print("\nend-to-end tests skipped: not root")


def free_port(address="127.0.0.1"):
    """A port free on `address` now. Another process may take it before the caller binds it, so servers that
    can report their own port (cubicled) bind port 0 instead; a server that cannot (haproxy) is given an
    address of its own as well (private_loopback_address), where nothing else binds."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def private_loopback_address():
    """An address in 127/8 that no other test uses: every one of them is this host's, on lo."""
    return f"127.{random.randrange(1, 255)}.{random.randrange(0, 256)}.{random.randrange(1, 255)}"


def new_session_id():
    return "e2e-" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


def cgroup_dirs(parent):
    """Every directory of `parent` in each hierarchy (v1: one per controller; v2: one)."""
    out = []
    for entry in sorted(os.listdir(CGROUP_ROOT)):
        path = os.path.join(CGROUP_ROOT, entry, parent)
        if os.path.isdir(path):
            out.append(path)
    direct = os.path.join(CGROUP_ROOT, parent)
    if os.path.isdir(direct):
        out.append(direct)
    return out


class Daemon:
    def __init__(self, tmp_path, config=None, extra_args=(), env=None, wait=True, listen_host="127.0.0.1", insecure_no_auth=False):
        # Port 0: the kernel picks a free port at bind, and cubicled's "cubicled ready" line names it (a port
        # found free beforehand could be taken by another test's connection before cubicled binds it).
        self._port = None
        self.listen_host = listen_host
        tag = uuid.uuid4().hex[:10]
        self.state_dir = f"/tmp/cubicle-e2e-{tag}"
        self.cgroup_parent = f"cubicle-e2e-{tag}"
        self.log_path = tmp_path / "cubicled.log"
        self.admin_socket = os.path.join(self.state_dir, "admin.sock")
        args = [os.path.join(PRODUCTS, "cubicled"), "--listen", f"{listen_host}:0", "--state-dir", self.state_dir,
                "--cgroup-parent", self.cgroup_parent, "--admin-socket", self.admin_socket,
                "--log-level", "debug"]
        if config is not None:
            path = tmp_path / "cubicle.yaml"
            path.write_text(config)
            args += ["--config", str(path)]
        if insecure_no_auth:
            args.append("--insecure-no-auth")
        # A data directory (the runtime store, images) of the daemon's own unless the test names one, so
        # parallel daemons never share a store by accident.
        self.data_dir = None
        if "--data-dir" not in extra_args:
            self.data_dir = f"/tmp/cubicle-e2e-data-{tag}"
            args += ["--data-dir", self.data_dir]
        args += list(extra_args)
        self.args, self.env = args, None if env is None else {**os.environ, **env}
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            try:
                self.wait_ready()
            except Exception:
                # A daemon that did not start (some tests expect that) is not the fixture's to stop later:
                # nothing of it may outlive the test.
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
                self.log.close()
                self.force_cleanup()
                raise

    @property
    def port(self):
        """The data-plane port, from cubicled's ready line (waits for it)."""
        if self._port is None:
            deadline = time.time() + 20
            while self._port is None:
                found = re.search(r"listen=\S*:(\d+) .*cubicled ready", self.log_text())
                if found:
                    self._port = int(found.group(1))
                elif self.process.poll() is not None:
                    raise RuntimeError(f"cubicled exited with {self.process.returncode} before listening:\n{self.log_text()}")
                elif time.time() > deadline:
                    raise RuntimeError("cubicled did not say it was ready:\n" + self.log_text())
                else:
                    time.sleep(0.02)
        return self._port

    @property
    def endpoint(self):
        reach = "127.0.0.1" if self.listen_host in ("0.0.0.0", "[::]") else self.listen_host
        return f"http://{reach}:{self.port}"

    def restart(self):
        """Starts cubicled again with the same port, state, cgroup parent and config (after a kill)."""
        assert self.process.poll() is not None, "the previous cubicled still runs"
        # The same port as before: clients of the killed daemon reconnect where they were.
        self.args[self.args.index("--listen") + 1] = f"{self.listen_host}:{self.port}"
        self.log.close()
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_ready()

    def wait_ready(self):
        deadline = time.time() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"cubicled exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/ping", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("cubicled did not answer /ping:\n" + self.log_text())
            time.sleep(0.05)
        while not os.path.exists(self.admin_socket):
            if time.time() > deadline:
                raise RuntimeError("cubicled made no admin socket:\n" + self.log_text())
            time.sleep(0.02)

    def cubicle_args(self, *args):
        return [os.path.join(PRODUCTS, "cubicle"), *args[:1], "--admin-socket", self.admin_socket, *args[1:]]

    def cubicle(self, *args, check=True, timeout=60, **kwargs):
        """Runs the `cubicle` CLI against this daemon; returns the CompletedProcess."""
        r = subprocess.run(self.cubicle_args(*args), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and r.returncode != 0:
            raise AssertionError(f"cubicle {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    def cubicle_json(self, *args):
        return json.loads(self.cubicle(*args, "--json").stdout)

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, **config):
        return boto3.client(
            "bedrock-agentcore", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="local", aws_secret_access_key="local",
            config=Config(retries={"max_attempts": 1}, read_timeout=120, **config))

    def control(self, **config):
        """boto3's bedrock-agentcore-control client for this daemon (the same endpoint as the data plane)."""
        return boto3.client(
            "bedrock-agentcore-control", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="local", aws_secret_access_key="local",
            config=Config(retries={"max_attempts": 1}, read_timeout=120, **config))

    def invoke(self, payload, session_id, runtime="demo", client=None, **kwargs):
        c = client or self.client()
        response = c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + runtime, runtimeSessionId=session_id,
                                          payload=json.dumps(payload) if not isinstance(payload, bytes) else payload, **kwargs)
        return response, response["response"].read()

    def invoke_json(self, payload, session_id, runtime="demo"):
        return json.loads(self.invoke(payload, session_id, runtime)[1])

    def pids_in_cgroups(self):
        pids = set()
        for d in cgroup_dirs(self.cgroup_parent):
            for root, _, files in os.walk(d):
                if "cgroup.procs" in files:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        pids.update(int(p) for p in f.read().split())
        return pids

    def leftovers(self):
        """What of this daemon remains on the host; empty after a clean stop."""
        left = []
        if os.path.exists(self.state_dir):
            left.append(f"state dir {self.state_dir}: {os.listdir(self.state_dir)}")
        left += [f"cgroup {d}" for d in cgroup_dirs(self.cgroup_parent)]
        with open("/proc/self/mounts") as f:
            left += [f"mount {line.split()[1]}" for line in f if self.state_dir in line]
        return left

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        self.log.close()
        return self.process.returncode

    def force_cleanup(self):
        """After a failed test: kill what the daemon left, so the next run starts clean."""
        for pid in self.pids_in_cgroups():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
        for d in cgroup_dirs(self.cgroup_parent):
            for root, dirs, _ in sorted(os.walk(d, topdown=False), key=lambda x: -len(x[0])):
                try:
                    os.rmdir(root)
                except OSError:
                    pass
        subprocess.run(["rm", "-rf", self.state_dir], check=False)
        if self.data_dir:
            subprocess.run(["rm", "-rf", self.data_dir], check=False)


@pytest.fixture
def start_daemon(tmp_path):
    """start_daemon(config_yaml=None, extra_args=(), env=None, wait=True, listen_host="127.0.0.1", insecure_no_auth=False)
    -> Daemon; stopped
    with SIGTERM at the end, which must leave nothing."""
    daemons = []

    def start(config=None, extra_args=(), env=None, wait=True, listen_host="127.0.0.1", insecure_no_auth=False):
        sub = tmp_path / f"d{len(daemons)}"
        sub.mkdir()
        d = Daemon(sub, config, extra_args, env, wait, listen_host, insecure_no_auth)
        daemons.append(d)
        return d

    yield start
    problems = []
    for d in daemons:
        try:
            code = d.stop()
            if code != 0:
                problems.append(f"cubicled exited {code}")
            left = d.leftovers()
            if left:
                problems.append(f"left behind: {left}")
        finally:
            d.force_cleanup()
    if problems:
        pytest.fail("; ".join(problems) + "\n" + "\n".join(d.log_text()[-4000:] for d in daemons))


@pytest.fixture
def daemon(start_daemon):
    """cubicled with no config: the embedded demo runtime."""
    return start_daemon()


def demo_config(top=""):
    """A config with the embedded demo agent as its one declared runtime and `top` (YAML lines) above it:
    for tests whose runtimes come through the control plane."""
    return f"""lifecycleMinimumSeconds: 1
{top}runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
"""


def short_lifecycle_config(idle=2, max_lifetime=60, extra_runtimes="", **top):
    lines = ["lifecycleMinimumSeconds: 1", "healthPollSeconds: 0.2"] + [f"{k}: {v}" for k, v in top.items()]
    return "\n".join(lines) + f"""
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    lifecycle: {{idleRuntimeSessionTimeout: {idle}, maxLifetime: {max_lifetime}}}
    limits: {{memory: 256MiB}}
{extra_runtimes}"""


@pytest.fixture(scope="session")
def venv():
    """The SDK agents' virtualenv (agent_venv.py), or a skip saying why it cannot be made."""
    from agent_venv import VenvUnavailable, ensure_agent_venv
    try:
        return ensure_agent_venv()
    except VenvUnavailable as e:
        pytest.skip(f"no virtualenv for the SDK agents: {e}")
