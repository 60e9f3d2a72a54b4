"""Who may call (issue 27): SigV4 against a principals file, IAM-style permissions, sessions bound to the
principal that made them, and per-runtime JWT authorizers checked against an OIDC issuer the test starts on
loopback. Every signature here is botocore's own (boto3, the AWS CLI, or SigV4Auth by hand for the odd cases);
every token is PyJWT's."""
import base64
import datetime
import http.client
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from unittest import mock

import boto3
import botocore.auth
import jwt
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import ARN_PREFIX, PRODUCTS, new_session_id

ALICE = ("AKIAALICE00000000001", "alice-secret-0123456789abcdef")
BOB = ("AKIABOB0000000000001", "bob-secret-0123456789abcdef00")
READER = ("AKIAREADER0000000001", "reader-secret-0123456789abcdef")
TEMPORARY = ("ASIATEMP000000000001", "temp-secret-0123456789abcdef00", "session-token-for-temp")

PRINCIPALS = f"""
principals:
  - name: alice
    accessKeys: [{{accessKeyId: {ALICE[0]}, secretAccessKey: {ALICE[1]}}}]
    allow:
      - actions: ["bedrock-agentcore:*"]
        resources: ["*"]
  - name: bob
    accessKeys:
      - {{accessKeyId: {BOB[0]}, secretAccessKey: {BOB[1]}}}
      - {{accessKeyId: {TEMPORARY[0]}, secretAccessKey: {TEMPORARY[1]}, sessionToken: {TEMPORARY[2]}}}
    allow:
      - actions: ["bedrock-agentcore:InvokeAgentRuntime", "bedrock-agentcore:InvokeAgentRuntimeCommand", "bedrock-agentcore:StopRuntimeSession"]
        resources: ["arn:aws:bedrock-agentcore:*:*:runtime/*"]
  - name: reader
    accessKeys: [{{accessKeyId: {READER[0]}, secretAccessKey: {READER[1]}}}]
    allow:
      - actions: ["bedrock-agentcore:Get*", "bedrock-agentcore:List*"]
        resources: ["*"]
"""


def write_credentials(tmp_path, text=PRINCIPALS, mode=0o600):
    path = tmp_path / "principals.yaml"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def client(d, keys, service="bedrock-agentcore"):
    return boto3.client(service, endpoint_url=d.endpoint, region_name="us-east-1",
                        aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
                        aws_session_token=keys[2] if len(keys) > 2 else None,
                        config=Config(retries={"max_attempts": 1}, read_timeout=60))


def error_of(call):
    try:
        call()
    except Exception as e:  # botocore.exceptions.ClientError
        return e.response["Error"]["Code"], e.response["Error"]["Message"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    raise AssertionError("the call was not refused")


def invoke(c, sid, payload=None, runtime="demo"):
    r = c.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + runtime, runtimeSessionId=sid, payload=json.dumps(payload or {"prompt": "1+1"}))
    return json.loads(r["response"].read())


@pytest.fixture
def signed_daemon(start_daemon, tmp_path):
    return start_daemon(extra_args=["--credentials", write_credentials(tmp_path)])


def test_boto3_signed_calls_work_and_each_refusal_is_the_403_aws_sends(signed_daemon):
    d = signed_daemon
    alice, bob, reader = client(d, ALICE), client(d, BOB), client(d, READER)
    sid = new_session_id()
    assert invoke(alice, sid)["turn"] == 1 and invoke(alice, sid)["turn"] == 2, "signed invocations reach one session"
    events = [e["chunk"] for e in alice.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid,
                                                                     body={"command": "echo hi", "timeout": 10})["stream"]]
    assert events[-1] == {"contentStop": {"exitCode": 0, "status": "COMPLETED"}}
    alice.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    # The control plane, signed, on the same listener.
    names = [r["agentRuntimeName"] for r in client(d, ALICE, "bedrock-agentcore-control").list_agent_runtimes()["agentRuntimes"]]
    assert names == ["demo"]
    assert client(d, READER, "bedrock-agentcore-control").get_agent_runtime(agentRuntimeId="demo")["status"] == "READY"

    # A missing permission: the modelled AccessDeniedException, in IAM's words.
    with pytest.raises(reader.exceptions.AccessDeniedException) as info:
        invoke(reader, new_session_id())
    assert info.value.response["Error"]["Message"] == (
        "User: arn:aws:iam::000000000000:user/reader is not authorized to perform: bedrock-agentcore:InvokeAgentRuntime on resource: "
        "arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/demo because no identity-based policy allows the bedrock-agentcore:InvokeAgentRuntime action")
    code, message, status = error_of(lambda: client(d, BOB, "bedrock-agentcore-control").list_agent_runtimes())
    assert (code, status) == ("AccessDeniedException", 403) and "ListAgentRuntimes" in message
    code, _, _ = error_of(lambda: client(d, READER, "bedrock-agentcore-control").delete_agent_runtime(agentRuntimeId="demo"))
    assert code == "AccessDeniedException"

    # A wrong secret, an unknown key, a forged session token.
    assert error_of(lambda: invoke(client(d, (ALICE[0], "not-alices-secret-000000")), new_session_id()))[:1] == ("InvalidSignatureException",)
    code, message, status = error_of(lambda: invoke(client(d, ("AKIAMALLORY000000001", ALICE[1])), new_session_id()))
    assert (code, message, status) == ("UnrecognizedClientException", "The security token included in the request is invalid.", 403)
    assert invoke(client(d, TEMPORARY), new_session_id())["turn"] == 1, "temporary credentials with their session token"
    assert error_of(lambda: invoke(client(d, (*TEMPORARY[:2], "forged-token")), new_session_id()))[0] == "UnrecognizedClientException"
    assert error_of(lambda: invoke(client(d, TEMPORARY[:2]), new_session_id()))[0] == "UnrecognizedClientException"
    assert d.cubicle_json("ps")["sessions"].__len__() == 1, "no refused call made a session"


def send(d, method, path, body, headers):
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("x-amzn-ErrorType"), data


def signed(d, path, body, keys=ALICE, headers=None, at=None, query=""):
    """A request signed by botocore's own SigV4Auth, as boto3 signs it; `at` signs it at another time."""
    url = d.endpoint + path + (("?" + query) if query else "")
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    when = at or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
        SigV4Auth(Credentials(*keys), "bedrock-agentcore", "us-east-1").add_auth(request)
    return dict(request.headers.items())


INVOKE = "/runtimes/" + urllib.parse.quote(ARN_PREFIX + "demo", safe="") + "/invocations"
STOP = "/runtimes/" + urllib.parse.quote(ARN_PREFIX + "demo", safe="") + "/stopruntimesession"


def test_hand_signed_requests_replayed_or_changed_are_refused(signed_daemon):
    d = signed_daemon
    sid = new_session_id()
    body = json.dumps({"prompt": "2+5"}).encode()
    h = signed(d, INVOKE, body, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid})
    status, _, data = send(d, "POST", INVOKE, body, h)
    assert status == 200 and json.loads(data)["answer"] == 7

    # The same signature on another path, with another body, a date six minutes off either way.
    assert send(d, "POST", STOP, body, h)[:2] == (403, "InvalidSignatureException")
    assert send(d, "POST", INVOKE, json.dumps({"prompt": "2+6"}).encode(), h)[:2] == (403, "InvalidSignatureException")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    for skew in (-6, 6):
        old = signed(d, INVOKE, body, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid}, at=now + datetime.timedelta(minutes=skew))
        status, kind, data = send(d, "POST", INVOKE, body, old)
        assert (status, kind) == (403, "InvalidSignatureException")
        assert json.loads(data)["message"].startswith("Signature expired" if skew < 0 else "Signature not yet current")
    # Unsigned: the Missing Authentication Token AWS sends.
    assert send(d, "POST", INVOKE, body, {"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid})[:2] == (403, "MissingAuthenticationTokenException")

    # A header added after signing is not covered and changes nothing; a second value of a signed header is refused.
    assert send(d, "POST", INVOKE, body, {**h, "X-Forwarded-For": "192.0.2.7"})[0] == 200
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    c.putrequest("POST", INVOKE, skip_accept_encoding=True)
    for k, v in h.items():
        c.putheader(k, v)
    c.putheader("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id", new_session_id())
    c.putheader("Content-Length", str(len(body)))
    c.endheaders(body)
    r = c.getresponse()
    r.read()
    assert (r.status, r.getheader("x-amzn-ErrorType")) == (403, "InvalidSignatureException")
    # A query string in another order is the same canonical request; another value is not.
    q = signed(d, INVOKE, body, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid}, query="qualifier=DEFAULT&accountId=000000000000")
    assert send(d, "POST", INVOKE + "?accountId=000000000000&qualifier=DEFAULT", body, q)[0] == 200
    assert send(d, "POST", INVOKE + "?accountId=000000000000&qualifier=1", body, q)[:2] == (403, "InvalidSignatureException")
    # A body over a megabyte is spooled, hashed whole and refused if changed, before the agent sees any byte.
    big = json.dumps({"prompt": "1+1", "pad": "x" * (3 << 20)}).encode()
    hb = signed(d, INVOKE, big, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid})
    assert send(d, "POST", INVOKE, big, hb)[0] == 200
    tampered = big[:-3] + b'y"}'
    turn = json.loads(send(d, "POST", INVOKE, body, signed(d, INVOKE, body, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid}))[2])["turn"]
    assert send(d, "POST", INVOKE, tampered, hb)[:2] == (403, "InvalidSignatureException")
    after = json.loads(send(d, "POST", INVOKE, body, signed(d, INVOKE, body, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid}))[2])["turn"]
    assert after == turn + 1, "the refused request never reached the agent"
    assert os.listdir(os.path.join(d.data_dir, "spool")) == [], "spooled bodies leave no file"


def test_the_aws_cli_unmodified(signed_daemon, tmp_path):
    d = signed_daemon
    out = tmp_path / "out.json"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ALICE[0], "AWS_SECRET_ACCESS_KEY": ALICE[1], "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("AWS_SESSION_TOKEN", None)
    cmd = ["aws", "bedrock-agentcore", "invoke-agent-runtime", "--endpoint-url", d.endpoint, "--agent-runtime-arn", ARN_PREFIX + "demo",
           "--runtime-session-id", new_session_id(), "--payload", json.dumps({"prompt": "3+4"}), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["answer"] == 7
    r = subprocess.run(cmd, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-0000000000"}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "InvalidSignatureException" in r.stderr, r.stderr


def test_a_session_answers_only_the_principal_that_made_it(signed_daemon):
    """Bob sending Alice's session id reaches a sandbox of his own; his stop and command for an id under
    which he has no session are ResourceNotFoundException whether or not Alice has one, in the same words."""
    d = signed_daemon
    alice, bob = client(d, ALICE), client(d, BOB)
    sid = new_session_id()
    first = invoke(alice, sid)
    assert first["turn"] == 1
    theirs = invoke(bob, sid)
    assert theirs["turn"] == 1, "bob's call reaches a session of his own"
    rows = {r["owner"]: r for r in d.cubicle_json("ps")["sessions"] if r["id"] == sid}
    assert set(rows) == {"alice", "bob"} and rows["alice"]["sandbox"] != rows["bob"]["sandbox"]
    bob.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=sid)
    assert invoke(alice, sid)["turn"] == 2, "alice's session is untouched by bob's stop of his own"

    # Now bob has no session under sid, alice has: bob cannot tell that from an id no one has used.
    never = new_session_id()
    for target in (sid, never):
        code, message, status = error_of(lambda: bob.stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=target))
        assert (code, status, message.replace(target, "ID")) == ("ResourceNotFoundException", 404, "Session ID not found or already ended")
        code, message, status = error_of(lambda: bob.invoke_agent_runtime_command(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=target,
                                                                                  body={"command": "id", "timeout": 5}))
        assert (code, status, message.replace(target, "ID")) == ("ResourceNotFoundException", 404, "Session ID not found or already ended")
    assert invoke(alice, sid)["turn"] == 3
    assert [r["owner"] for r in d.cubicle_json("ps")["sessions"]] == ["alice"]
    inspect = d.cubicle_json("inspect", rows["alice"]["sandbox"])
    assert inspect["owner"] == "alice"
    with urllib.request.urlopen(d.endpoint + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert sid not in text and "alice" not in text, "metrics carry neither session ids nor owners"


def test_user_id_needs_invoke_for_user(signed_daemon):
    d = signed_daemon
    bob, alice = client(d, BOB), client(d, ALICE)
    with pytest.raises(bob.exceptions.AccessDeniedException) as info:
        bob.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=new_session_id(), runtimeUserId="u1", payload=b"{}")
    assert "InvokeAgentRuntimeForUser" in info.value.response["Error"]["Message"]
    r = alice.invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "demo", runtimeSessionId=new_session_id(), runtimeUserId="u1", payload=b"{}")
    assert r["statusCode"] == 200


def test_secure_by_default(start_daemon, tmp_path):
    """Reachable from other hosts only with --credentials (or --insecure-no-auth); a credentials file anyone
    else can read is refused; with credentials, the control plane serves signed callers on any listener."""
    loose = write_credentials(tmp_path, mode=0o644)
    r = subprocess.run([os.path.join(PRODUCTS, "cubicled"), "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
                        "--admin-socket", str(tmp_path / "a.sock"), "--credentials", loose, "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "chmod 600" in r.stderr, r.stderr
    d = start_daemon(listen_host="0.0.0.0", extra_args=["--credentials", write_credentials(tmp_path)])
    assert "callers are checked" in d.log_text()
    status, kind, _ = send(d, "POST", INVOKE, b"{}", {"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": new_session_id()})
    assert (status, kind) == (403, "MissingAuthenticationTokenException")
    assert [r["agentRuntimeName"] for r in client(d, ALICE, "bedrock-agentcore-control").list_agent_runtimes()["agentRuntimes"]] == ["demo"]
    assert invoke(client(d, ALICE), new_session_id())["answer"] == 2


# --- JWT authorizers, against an OIDC issuer on loopback ---------------------------------------------------

def b64(n):
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Issuer:
    """Discovery and JWKS over HTTP on 127.0.0.1; `rotate()` replaces the signing key."""

    def __init__(self):
        self.keys = []
        self.rotate()
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks.json"}
                elif self.path == "/jwks.json":
                    body = {"keys": [k["jwk"] for k in issuer.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def rotate(self):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = f"k{len(self.keys)}"
        pub = key.public_key().public_numbers()
        self.keys = [{"kid": kid, "key": key, "jwk": {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(pub.n), "e": b64(pub.e)}}]

    def token(self, key=None, kid=None, alg="RS256", **claims):
        now = int(time.time())
        payload = {"iss": self.url, "sub": "user-1", "aud": "cubicle-test", "client_id": "app-1", "scope": "agent:invoke openid",
                   "team": "blue", "groups": ["a", "b"], "iat": now, "exp": now + 300, **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        k = self.keys[0]
        return jwt.encode(payload, key or k["key"], algorithm=alg, headers={"kid": kid or k["kid"]})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer():
    i = Issuer()
    yield i
    i.close()


def jwt_config(issuer):
    return f"""
lifecycleMinimumSeconds: 1
runtimes:
  - name: demo
    command: ["/app/cubicle-demo-agent"]
    codeDirectory: {PRODUCTS}
  - name: guarded
    command: ["/app/cubicle-demo-agent"]
    codeDirectory: {PRODUCTS}
    authorizerConfiguration:
      customJWTAuthorizer:
        discoveryUrl: {issuer.url}/.well-known/openid-configuration
        allowedAudience: [cubicle-test]
        allowedClients: [app-1]
        allowedScopes: [agent:invoke]
        customClaims:
          - inboundTokenClaimName: team
            inboundTokenClaimValueType: STRING
            authorizingClaimMatchValue: {{claimMatchValue: {{matchValueString: blue}}, claimMatchOperator: EQUALS}}
          - inboundTokenClaimName: groups
            inboundTokenClaimValueType: STRING_ARRAY
            authorizingClaimMatchValue: {{claimMatchValue: {{matchValueStringList: [b, c]}}, claimMatchOperator: CONTAINS_ANY}}
"""


GUARDED = "/runtimes/" + urllib.parse.quote(ARN_PREFIX + "guarded", safe="") + "/invocations"


def bearer(d, token, sid, path=GUARDED, body=b'{"prompt": "2+2"}'):
    return send(d, "POST", path, body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                        "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid})


def test_a_jwt_runtime_takes_valid_tokens_and_refuses_every_bad_one(start_daemon, issuer):
    d = start_daemon(jwt_config(issuer))
    sid = new_session_id()
    token = issuer.token()
    status, _, data = bearer(d, token, sid)
    assert status == 200, data
    answer = json.loads(data)
    assert answer["answer"] == 4 and answer["authorization"] == f"Bearer {token}", "the token reaches the agent"
    assert json.loads(bearer(d, issuer.token(), sid)[2])["turn"] == 2
    # The SigV4 demo runtime never passes Authorization on; a signed call to the JWT runtime is a mismatch.
    assert "authorization" not in d.invoke_json({"prompt": "1+1"}, new_session_id())
    code, message, _ = error_of(lambda: d.client().invoke_agent_runtime(agentRuntimeArn=ARN_PREFIX + "guarded", runtimeSessionId=sid, payload=b"{}"))
    assert code == "AccessDeniedException" and "Authorization method mismatch" in message
    assert bearer(d, token, new_session_id(), path=INVOKE)[:2] == (403, "AccessDeniedException")

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = issuer.keys[0]["key"].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    unsigned = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": issuer.keys[0]["kid"]}).encode()).rstrip(b"=").decode() + "." + \
        base64.urlsafe_b64encode(json.dumps({"iss": issuer.url, "sub": "x", "aud": "cubicle-test", "exp": int(time.time()) + 300}).encode()).rstrip(b"=").decode() + "."
    bad = {
        "wrong audience": issuer.token(aud="someone-else"),
        "wrong client": issuer.token(client_id="app-2"),
        "no allowed scope": issuer.token(scope="openid"),
        "custom claim": issuer.token(team="red"),
        "array claim": issuer.token(groups=["a"]),
        "expired": issuer.token(exp=int(time.time()) - 120),
        "not yet valid": issuer.token(nbf=int(time.time()) + 600),
        "other issuer": issuer.token(iss="http://127.0.0.1:1"),
        "another key": issuer.token(key=other),
        "alg none": unsigned,
        "garbage": "not.a.jwt",
    }
    for why, t in bad.items():
        status, kind, data = bearer(d, t, new_session_id())
        assert (status, kind) == (403, "AccessDeniedException"), (why, status, data)
    # HMAC keyed with the issuer's public key: the classic confusion. PyJWT refuses to make one from a PEM
    # public key, so it is made by hand.
    import hmac, hashlib
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": issuer.keys[0]["kid"]}).encode()).rstrip(b"=")
    claims = base64.urlsafe_b64encode(json.dumps({"iss": issuer.url, "sub": "user-1", "aud": "cubicle-test", "client_id": "app-1",
                                                  "scope": "agent:invoke", "team": "blue", "groups": ["b"], "exp": int(time.time()) + 300}).encode()).rstrip(b"=")
    mac = base64.urlsafe_b64encode(hmac.new(public_pem, header + b"." + claims, hashlib.sha256).digest()).rstrip(b"=")
    assert bearer(d, (header + b"." + claims + b"." + mac).decode(), new_session_id())[:2] == (403, "AccessDeniedException")
    assert d.cubicle_json("ps")["sessions"].__len__() == 2, "no refused token made a session"

    # A rotated key is fetched when a token names it; the old key's tokens stop working.
    old = issuer.token()
    issuer.rotate()
    time.sleep(1.1)
    status, _, data = bearer(d, issuer.token(), sid)
    assert status == 200, data
    assert json.loads(data)["turn"] == 3, "the same subject's session"
    assert bearer(d, old, new_session_id())[:2] == (403, "AccessDeniedException")
    owners = {r["owner"] for r in d.cubicle_json("ps")["sessions"]}
    assert f"jwt:{issuer.url}#user-1" in owners


def test_websocket_upgrades_take_bearer_tokens_on_a_jwt_runtime(start_daemon, issuer):
    websockets = pytest.importorskip("websockets", reason="the WebSocket client (pip install websockets)")
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect
    d = start_daemon(jwt_config(issuer))
    sid = new_session_id()
    base = f"ws://127.0.0.1:{d.port}/runtimes/" + urllib.parse.quote(ARN_PREFIX + "guarded", safe="")
    headers = {"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid}
    with connect(base + "/ws/shells?shellId=jwt-1", additional_headers={**headers, "Authorization": f"Bearer {issuer.token()}"}, open_timeout=60) as ws:
        status = ws.recv(timeout=10)
        assert status[0] == 3 and json.loads(status[1:])["metadata"]["shellId"] == "jwt-1", "a valid token opens a shell"
    for why, extra in {"no token": {}, "a bad token": {"Authorization": f"Bearer {issuer.token(aud='someone-else')}"},
                       "an expired token": {"Authorization": f"Bearer {issuer.token(exp=int(time.time()) - 120)}"}}.items():
        with pytest.raises(InvalidStatus) as info:
            connect(base + "/ws/shells?shellId=jwt-1", additional_headers={**headers, **extra}, open_timeout=30)
        assert info.value.response.status_code == 403, why
    # A browser's way (the SDK's connect_shell_oauth): the token as a subprotocol, answered with the sentinel.
    encoded = base64.urlsafe_b64encode(issuer.token().encode()).decode().rstrip("=")
    with connect(base + "/ws/shells?shellId=jwt-1", additional_headers=headers, open_timeout=60,
                 subprotocols=[f"base64UrlBearerAuthorization.{encoded}", "base64UrlBearerAuthorization"]) as ws:
        assert ws.subprotocol == "base64UrlBearerAuthorization"
        status = json.loads(ws.recv(timeout=10)[1:])
        assert status["metadata"] == {"shellId": "jwt-1", "reconnected": True}, "the same caller: the same shell"
    bad = base64.urlsafe_b64encode(issuer.token(aud="someone-else").encode()).decode().rstrip("=")
    with pytest.raises(InvalidStatus) as info:
        connect(base + "/ws/shells?shellId=jwt-1", additional_headers=headers, open_timeout=30,
                subprotocols=[f"base64UrlBearerAuthorization.{bad}", "base64UrlBearerAuthorization"])
    assert info.value.response.status_code == 403
    # /ws on the same runtime: admitted by the token, then the demo agent (which serves no WebSocket) refuses.
    with pytest.raises(InvalidStatus) as info:
        connect(base + "/ws", additional_headers={**headers, "Authorization": f"Bearer {issuer.token()}"}, open_timeout=30)
    assert info.value.response.status_code == 424


def test_a_jwt_authorizer_made_through_the_control_plane(start_daemon, issuer, tmp_path):
    """CreateAgentRuntime with authorizerConfiguration: GetAgentRuntime returns it as given, bearer tokens are
    checked against it, and an update that drops it makes the runtime a SigV4 one again for new calls."""
    from test_control_plane import host_runtime, wait_status
    import shutil
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(os.path.join(PRODUCTS, "cubicle-demo-agent"), code / "cubicle-demo-agent")
    os.chmod(tmp_path, 0o755)
    d = start_daemon(extra_args=["--code-root", str(code)])
    cp = d.control()
    authorizer = {"customJWTAuthorizer": {"discoveryUrl": issuer.url + "/.well-known/openid-configuration", "allowedAudience": ["cubicle-test"]}}
    tags = {"cubicle:command": "/app/cubicle-demo-agent"}
    rid = cp.create_agent_runtime(agentRuntimeName="oidc", authorizerConfiguration=authorizer, tags=tags, **host_runtime(code))["agentRuntimeId"]
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert cp.get_agent_runtime(agentRuntimeId=rid)["authorizerConfiguration"] == authorizer
    path = "/runtimes/" + urllib.parse.quote(ARN_PREFIX + rid, safe="") + "/invocations"
    status, _, data = bearer(d, issuer.token(), new_session_id(), path=path)
    assert status == 200 and json.loads(data)["answer"] == 4, data
    assert bearer(d, issuer.token(aud="other"), new_session_id(), path=path)[:2] == (403, "AccessDeniedException")
    assert error_of(lambda: invoke(d.client(), new_session_id(), runtime=rid))[0] == "AccessDeniedException"
    cp.update_agent_runtime(agentRuntimeId=rid, **host_runtime(code))
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert invoke(d.client(), new_session_id(), runtime=rid)["answer"] == 2
    assert bearer(d, issuer.token(), new_session_id(), path=path)[:2] == (403, "AccessDeniedException")


def test_owners_survive_a_restart(signed_daemon):
    """A cubicled killed and started again takes each session over with its owner: alice's session answers
    alice, and bob's same id is still a session of bob's own."""
    d = signed_daemon
    alice, bob = client(d, ALICE), client(d, BOB)
    sid = new_session_id()
    assert invoke(alice, sid)["turn"] == 1
    assert invoke(bob, sid)["turn"] == 1
    d.process.send_signal(9)
    d.process.wait()
    d.restart()
    alice, bob = client(d, ALICE), client(d, BOB)
    assert invoke(alice, sid)["turn"] == 2 and invoke(bob, sid)["turn"] == 2, "both sessions were taken over, each with its owner"
    assert sorted(r["owner"] for r in d.cubicle_json("ps")["sessions"]) == ["alice", "bob"]


def test_every_control_plane_operation_signed_and_checked_per_operation(start_daemon, tmp_path):
    """With a principal's keys every operation of bedrock-agentcore-control works through boto3, and each is
    checked as its own IAM action: a principal allowed all but DeleteAgentRuntimeEndpoint is refused exactly that."""
    from test_control_plane import host_runtime, wait_status
    import shutil
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(os.path.join(PRODUCTS, "cubicle-demo-agent"), code / "cubicle-demo-agent")
    os.chmod(tmp_path, 0o755)
    principals = PRINCIPALS + f"""  - name: builder
    accessKeys: [{{accessKeyId: AKIABUILDER000000001, secretAccessKey: builder-secret-0123456789abcdef}}]
    allow: [{{actions: ["bedrock-agentcore:*"], resources: ["*"]}}]
    deny: [{{actions: ["bedrock-agentcore:DeleteAgentRuntimeEndpoint"], resources: ["arn:aws:bedrock-agentcore:*:*:runtime/*/runtime-endpoint/*"]}}]
"""
    d = start_daemon(extra_args=["--credentials", write_credentials(tmp_path, principals), "--code-root", str(code)])
    cp = client(d, ("AKIABUILDER000000001", "builder-secret-0123456789abcdef"), "bedrock-agentcore-control")
    rid = cp.create_agent_runtime(agentRuntimeName="signed", tags={"cubicle:command": "/app/cubicle-demo-agent"}, **host_runtime(code))["agentRuntimeId"]
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    cp.update_agent_runtime(agentRuntimeId=rid, description="two", **host_runtime(code))
    wait_status(lambda: cp.get_agent_runtime(agentRuntimeId=rid))
    assert [v["agentRuntimeVersion"] for v in cp.list_agent_runtime_versions(agentRuntimeId=rid)["agentRuntimes"]] == ["2", "1"]
    cp.create_agent_runtime_endpoint(agentRuntimeId=rid, name="pinned", agentRuntimeVersion="1")
    wait_status(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned"))
    cp.update_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned", agentRuntimeVersion="2")
    wait_status(lambda: cp.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned"))
    assert {e["name"] for e in cp.list_agent_runtime_endpoints(agentRuntimeId=rid)["runtimeEndpoints"]} == {"DEFAULT", "pinned"}
    arn = cp.get_agent_runtime(agentRuntimeId=rid)["agentRuntimeArn"]
    cp.tag_resource(resourceArn=arn, tags={"team": "blue"})
    assert cp.list_tags_for_resource(resourceArn=arn)["tags"]["team"] == "blue"
    cp.untag_resource(resourceArn=arn, tagKeys=["team"])
    assert "team" not in cp.list_tags_for_resource(resourceArn=arn)["tags"]
    assert invoke(client(d, ("AKIABUILDER000000001", "builder-secret-0123456789abcdef")), new_session_id(), runtime=rid)["answer"] == 2
    code_, message, status = error_of(lambda: cp.delete_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned"))
    assert (code_, status) == ("AccessDeniedException", 403) and "explicit deny" in message and f"runtime/{rid}/runtime-endpoint/pinned" in message
    client(d, ALICE, "bedrock-agentcore-control").delete_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="pinned")
    cp.delete_agent_runtime(agentRuntimeId=rid)
    deadline = time.time() + 30
    while any(r["agentRuntimeId"] == rid for r in cp.list_agent_runtimes()["agentRuntimes"]) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(r["agentRuntimeId"] == rid for r in cp.list_agent_runtimes()["agentRuntimes"])
