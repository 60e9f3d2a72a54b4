"""The runtime-context tutorial's own agent, end to end: Strands with BedrockModel, the calculator, weather
and get_time tools, on the AgentCore SDK, installed from PyPI, in a PUBLIC session whose only allowed name
is Bedrock's. The test's DNS sends that name to a fake Bedrock (fake_bedrock.py) in the test's own fake
internet, over TLS with a test CA the runtime trusts; the agent's only credentials are the role's, from the
metadata endpoint. Nothing leaves this machine."""
import json
import os
import subprocess
import sys
import time

import botocore.exceptions
import pytest

from agent_venv import TUTORIAL_REQUIREMENTS, VENV_IN_SANDBOX, VenvUnavailable, ensure_agent_venv
from conftest import demo_config, new_session_id
from test_images import registry  # noqa: F401 (the fixture)
from fake_internet import FakeInternet, session_network

AGENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "sandbox", "agents")
BEDROCK = "bedrock-runtime.us-east-1.amazonaws.com"
ROLE = "arn:aws:iam::123456789012:role/tutor"
KEY_ID = "AKIATESTTUTOR0000001"


@pytest.fixture(scope="module")
def tutorial_venv():
    try:
        return ensure_agent_venv(TUTORIAL_REQUIREMENTS)
    except VenvUnavailable as e:
        pytest.skip(str(e))


def make_certificates(tmp_path, days=2):
    """A test CA (its certificate alone in ca/, which the sandbox sees) and Bedrock's name signed by it."""
    ca_dir, keys = tmp_path / "ca", tmp_path / "keys"
    ca_dir.mkdir()
    keys.mkdir()
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days), "-subj", "/CN=cubicle test CA",
            "-keyout", str(keys / "ca.key"), "-out", str(ca_dir / "ca.pem"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={BEDROCK}", "-keyout", str(keys / "server.key"), "-out", str(keys / "server.csr"))
    (keys / "ext").write_text(f"subjectAltName=DNS:{BEDROCK}\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(keys / "server.csr"), "-CA", str(ca_dir / "ca.pem"), "-CAkey", str(keys / "ca.key"),
            "-CAcreateserial", "-days", str(days), "-extfile", str(keys / "ext"), "-out", str(keys / "server.pem"))
    os.chmod(tmp_path, 0o755)
    os.chmod(ca_dir, 0o755)
    os.chmod(ca_dir / "ca.pem", 0o644)
    return ca_dir, keys / "server.pem", keys / "server.key"


def test_the_tutorials_strands_agent_reaches_bedrock_with_role_credentials(start_daemon, tutorial_venv, tmp_path):
    internet = FakeInternet({BEDROCK: "a"})
    try:
        ca_dir, cert, key = make_certificates(tmp_path)
        requests_log = tmp_path / "bedrock-requests.log"
        internet.serve(sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_bedrock.py"),
                       f"{internet.hosts['a']}:443", str(cert), str(key), str(requests_log))
        creds = tmp_path / "aws-credentials"
        creds.write_text(f"[tutor]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = tutor-secret\n")
        os.chmod(creds, 0o600)
        config = f"""lifecycleMinimumSeconds: 1
healthPollSeconds: 0.5
roleCredentials:
  - {{roleArn: "{ROLE}", profile: tutor, sharedCredentialsFile: {creds}}}
runtimes:
  - name: tutor
    command: [{VENV_IN_SANDBOX}/bin/python, /app/strands_tutorial_agent.py]
    codeDirectory: {AGENTS}
    environmentVariables: {{PYTHONDONTWRITEBYTECODE: "1", PYTHONUNBUFFERED: "1", AWS_CA_BUNDLE: /opt/test-ca/ca.pem}}
    readOnlyMounts: [{{source: {tutorial_venv}, target: {VENV_IN_SANDBOX}}}, {{source: {ca_dir}, target: /opt/test-ca}}]
    limits: {{memory: 1GiB}}
    networkConfiguration: {{networkMode: PUBLIC}}
    egress: {{allow: [{BEDROCK}]}}
    roleArn: "{ROLE}"
"""
        d = start_daemon(config, extra_args=["--egress-interface", internet.link, "--dns-upstream", internet.dns,
                                             "--session-network", session_network()])

        def ask(session, prompt, user):
            return d.invoke_json({"prompt": prompt, "user_id": user}, session, runtime="tutor")

        s1 = the_tutorials_five_invocations(ask, requests_log)
        env = d.cubicle("exec", s1, "--", "env").stdout
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_REGION=us-east-1" in env
    finally:
        internet.close()


def the_tutorials_five_invocations(ask, requests_log):
    """The tutorial's five invocations, in its words, and what they must answer; returns the first session."""
    s1, s2, s3 = new_session_id(), new_session_id(), new_session_id()
    # The tutorial's five invocations, in its words.
    r1 = ask(s1, "What is the weather now?", "1")
    r2 = ask(s1, "What is 2+5?", "1")
    r3 = ask(s1, "And if you add 34 to that?", "1")
    r4 = ask(s2, "And if you add 10 to that?", "1")
    r5 = ask(s3, "What is the weather?", "2")
    assert r1 == {"session_id": s1, "text": "The weather is sunny."}, r1
    assert r2["text"] == "The answer is 7.", r2
    assert r3["text"] == "The answer is 41.", "the session's agent remembered 7 across invocations"
    assert r4["session_id"] == s2 and "don't know" in r4["text"], "a new session starts with nothing of the first"
    assert r5 == {"session_id": s3, "text": "The weather is sunny."}, r5
    # Every model call was signed with the role's key, which only the metadata endpoint gave the agent.
    calls = requests_log.read_text().split("\n")[:-1]
    assert len(calls) >= 8, calls
    assert all(line.startswith(KEY_ID + " /model/") and line.endswith("/converse-stream") for line in calls), calls
    return s1


def strands_image(tutorial_venv):
    """The tutorial's Strands agent as an image (Tests/images/make_python_image.py: Python, the tutorial's
    virtualenv, sandbox/agents and a test CA at /app/test-ca.pem), with Bedrock's certificate signed by that
    CA; built once (test_images.python_image_cached)."""
    import shutil
    from pathlib import Path
    from test_images import MAKE_PYTHON_IMAGE, python_image_cached

    def build(base):
        ca_dir, _, _ = make_certificates(Path(base), days=3650)
        agents = os.path.join(base, "agents")
        shutil.copytree(AGENTS, agents, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ca_dir / "ca.pem", os.path.join(agents, "test-ca.pem"))
        subprocess.run(["python3", MAKE_PYTHON_IMAGE, os.path.join(base, "layout"), tutorial_venv, agents, "v1"], check=True)
    base = python_image_cached("strands-image", tutorial_venv, build)
    return os.path.join(base, "layout"), os.path.join(base, "keys", "server.pem"), os.path.join(base, "keys", "server.key")


def test_the_tutorials_strands_agent_deployed_invoked_and_cleaned_up_through_the_control_plane(start_daemon, tutorial_venv, registry, tmp_path):
    """The tutorial end to end as a developer runs it against AgentCore, every step through boto3: the
    agent's image pushed to a registry, create_agent_runtime (PUBLIC, the role, Bedrock's name allowed by a
    cubicle: tag), get_agent_runtime until READY, the five invocations through the new ARN with qualifier
    DEFAULT (the model reached with the role's credentials from the metadata endpoint), and the clean-up
    cell's delete_agent_runtime."""
    from test_images import push
    layout, cert, key = strands_image(tutorial_venv)
    push(registry, tmp_path, "agents/strands", layout=layout)
    internet = FakeInternet({BEDROCK: "a"})
    try:
        requests_log = tmp_path / "bedrock-requests.log"
        internet.serve(sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_bedrock.py"),
                       f"{internet.hosts['a']}:443", cert, key, str(requests_log))
        creds = tmp_path / "aws-credentials"
        creds.write_text(f"[tutor]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = tutor-secret\n")
        os.chmod(creds, 0o600)
        d = start_daemon(demo_config(f"""healthPollSeconds: 0.5
registries: [{{host: "{registry}", insecure: true}}]
roleCredentials: [{{roleArn: "{ROLE}", profile: tutor, sharedCredentialsFile: {creds}}}]
"""), extra_args=["--egress-interface", internet.link, "--dns-upstream", internet.dns, "--session-network", session_network()])
        control = d.control()
        created = control.create_agent_runtime(
            agentRuntimeName="strands_tutorial", roleArn=ROLE,
            agentRuntimeArtifact={"containerConfiguration": {"containerUri": f"{registry}/agents/strands:v1"}},
            networkConfiguration={"networkMode": "PUBLIC"}, protocolConfiguration={"serverProtocol": "HTTP"},
            environmentVariables={"AWS_CA_BUNDLE": "/app/test-ca.pem"},
            tags={"cubicle:command": "/opt/agent-venv/bin/python /app/strands_tutorial_agent.py", "cubicle:memory": "1GiB",
                  "cubicle:egress.allow": BEDROCK})
        rid = created["agentRuntimeId"]
        deadline = time.time() + 120
        while (status := control.get_agent_runtime(agentRuntimeId=rid)["status"]) == "CREATING":
            assert time.time() < deadline
            time.sleep(0.5)
        assert status == "READY", control.get_agent_runtime(agentRuntimeId=rid)
        client = d.client()

        def ask(session, prompt, user):
            r = client.invoke_agent_runtime(agentRuntimeArn=created["agentRuntimeArn"], qualifier="DEFAULT", runtimeSessionId=session,
                                            payload=json.dumps({"prompt": prompt, "user_id": user}))
            return json.loads(r["response"].read())

        s1 = the_tutorials_five_invocations(ask, requests_log)
        assert d.cubicle_json("inspect", s1)["runtime"] == rid
        # The clean-up cell.
        assert control.delete_agent_runtime(agentRuntimeId=rid)["status"] == "DELETING"
        with pytest.raises(botocore.exceptions.ClientError) as e:
            ask(new_session_id(), "What is 2+5?", "1")
        assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    finally:
        internet.close()
