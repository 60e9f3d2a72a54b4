"""The virtualenv the Python agents in sandbox/agents run from: made once with the host's /usr/bin/python3
(a sandbox sees the host's /usr, not pyenv's or a toolchain's), cached under .build by the hash of
sandbox/agents/requirements.txt, and shared by parallel test workers through a lock."""
import fcntl
import hashlib
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENTS = os.path.join(REPO, "sandbox", "agents")
REQUIREMENTS = os.path.join(AGENTS, "requirements.txt")
SYSTEM_PYTHON = "/usr/bin/python3"
VENV_IN_SANDBOX = "/opt/agent-venv"


class VenvUnavailable(Exception):
    """The host lacks what a virtualenv needs (a reason to skip); a failing pip install is an error instead."""


TUTORIAL_REQUIREMENTS = os.path.join(AGENTS, "tutorial-requirements.txt")


def ensure_agent_venv(requirements=REQUIREMENTS):
    """Path of a ready virtualenv with `requirements` (the SDK by default); raises VenvUnavailable with the
    reason when it cannot be made."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise VenvUnavailable(f"{SYSTEM_PYTHON} is missing (apt-get install python3 python3-venv)")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
        raise VenvUnavailable(f"{SYSTEM_PYTHON} has no venv/ensurepip (apt-get install python3-venv)")
    with open(requirements, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    base = os.path.join(REPO, ".build")
    os.makedirs(base, exist_ok=True)
    venv = os.path.join(base, f"agent-venv-{digest}")
    with open(os.path.join(base, "agent-venv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(venv, ".complete")):
            return venv
        subprocess.run(["rm", "-rf", venv], check=True)
        steps = [[SYSTEM_PYTHON, "-m", "venv", venv],
                 [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", "-r", requirements]]
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(step)} failed: {r.stderr[-2000:]}")
        # The sandbox mounts it read-only and as another uid: everything must be world-readable.
        subprocess.run(["chmod", "-R", "a+rX", venv], check=True)
        open(os.path.join(venv, ".complete"), "w").close()
    return venv


def python_runtime(name, script, venv, protocol="HTTP", memory="512MiB", idle=60, max_lifetime=600, extra=""):
    """A runtime config entry (YAML) for one of sandbox/agents' programs."""
    return f"""  - name: {name}
    command: [{VENV_IN_SANDBOX}/bin/python, /app/{script}]
    codeDirectory: {AGENTS}
    protocol: {protocol}
    environmentVariables: {{PYTHONDONTWRITEBYTECODE: "1", PYTHONUNBUFFERED: "1"}}
    readOnlyMounts: [{{source: {venv}, target: {VENV_IN_SANDBOX}}}]
    lifecycle: {{idleRuntimeSessionTimeout: {idle}, maxLifetime: {max_lifetime}}}
    limits: {{memory: {memory}}}
{extra}"""
