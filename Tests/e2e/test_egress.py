"""PUBLIC sessions: policed egress, the session DNS, and role credentials from the metadata endpoint.

Every address these tests send to is loopback, a session's, the host's end of the test's own link, or a test
host inside the test's own network namespace (fake_internet.py); cubicled's --egress-interface is the host's
end of that link, so even a wrong policy could not send a packet off this machine."""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import ARN_PREFIX, PRODUCTS, demo_config, new_session_id
from fake_internet import FakeInternet, session_network

NAMES = {"api.example.test": "a", "x.wild.test": "b", "y.wild.test": "c", "denied.wild.test": "d", "other.test": "e",
         "private.test": "private"}


@pytest.fixture
def internet():
    fi = FakeInternet(NAMES)
    yield fi
    fi.close()


def public_config(internet, allow=None, deny=None, extra="", top="", more_runtimes=""):
    egress = ""
    if allow is not None or deny is not None:
        egress = "    egress:\n"
        if allow is not None:
            egress += f"      allow: {json.dumps(allow)}\n"
        if deny is not None:
            egress += f"      deny: {json.dumps(deny)}\n"
    return f"""lifecycleMinimumSeconds: 1
healthPollSeconds: 0.2
{top}
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
  - name: web
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
    networkConfiguration: {{networkMode: PUBLIC}}
{egress}{extra}{more_runtimes}"""


def start_public(start_daemon, internet, **kw):
    net = session_network()
    d = start_daemon(public_config(internet, **kw), extra_args=["--egress-interface", internet.link, "--dns-upstream", internet.dns,
                                                                "--session-network", net])
    d.session_network = net
    return d


def new_session(d, runtime="web"):
    sid = new_session_id()
    d.invoke({"prompt": "hi"}, sid, runtime=runtime)
    return sid


def run_in(d, sid, script, timeout=30):
    """Runs a Python script inside the session (the host's /usr is its userland); returns (rc, stdout, stderr)."""
    r = d.cubicle("exec", "--timeout", str(timeout), sid, "--", "/usr/bin/python3", "-c", script, check=False, timeout=timeout + 10)
    return r.returncode, r.stdout, r.stderr


CONNECT = r'''
import socket, sys, time, json
out = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    t = time.monotonic()
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = s.recv(200).decode(errors="replace")
        out.append([target, "ok", data.split("\r\n")[0], round(time.monotonic() - t, 3)])
    except OSError as e:
        out.append([target, type(e).__name__ + ":" + str(e.errno), "", round(time.monotonic() - t, 3)])
print(json.dumps(out))
'''


def connect_from(d, sid, *targets):
    rc, out, err = run_in(d, sid, CONNECT.replace("sys.argv[1:]", repr(list(targets))))
    assert rc == 0, err
    return {t: (result, line, seconds) for t, result, line, seconds in json.loads(out)}


def test_public_session_reaches_allowed_cidr_and_nothing_else(start_daemon, internet):
    a, b = internet.hosts["a"], internet.hosts["b"]
    d = start_public(start_daemon, internet, allow=[a + "/32"])
    sid = new_session(d)
    got = connect_from(d, sid, f"{a}:80", f"{b}:80")
    assert got[f"{a}:80"][0] == "ok" and "200" in got[f"{a}:80"][1], got
    assert got[f"{b}:80"][0] != "ok", got
    # Refused at once (a reset or an ICMP error), not after a timeout.
    assert got[f"{b}:80"][2] < 1.0, got


RESOLVE = r'''
import socket, json, sys
out = {}
for name in NAMES:
    try:
        out[name] = socket.gethostbyname(name)
    except OSError as e:
        out[name] = "error:" + type(e).__name__
print(json.dumps(out))
'''


def resolve_in(d, sid, *names):
    rc, out, err = run_in(d, sid, RESOLVE.replace("NAMES", repr(list(names))))
    assert rc == 0, err
    return json.loads(out)


def test_names_allowed_exact_and_wildcard_are_resolved_and_reachable_others_are_not(start_daemon, internet):
    h = internet.hosts
    d = start_public(start_daemon, internet, allow=["api.example.test", "*.wild.test"], deny=["denied.wild.test"])
    sid = new_session(d)
    rc, out, _ = run_in(d, sid, "print(open('/etc/resolv.conf').read())")
    assert f"nameserver {d.session_network.rsplit('.', 1)[0]}.1" in out, out
    # Nothing resolved yet: even an allowed name's address is not reachable by number.
    before = connect_from(d, sid, f"{h['a']}:80")
    assert before[f"{h['a']}:80"][0] != "ok", before
    names = resolve_in(d, sid, "api.example.test", "x.wild.test", "denied.wild.test", "other.test", "private.test", "wild.test")
    assert names["api.example.test"] == h["a"] and names["x.wild.test"] == h["b"], names
    # Denied, unlisted, and the wildcard's own apex: NXDOMAIN (gaierror), not an address.
    for n in ("denied.wild.test", "other.test", "private.test", "wild.test"):
        assert names[n].startswith("error:"), (n, names)
    got = connect_from(d, sid, f"{h['a']}:80", f"{h['b']}:8080", f"{h['c']}:80", f"{h['d']}:80", f"{h['e']}:80")
    assert got[f"{h['a']}:80"][0] == "ok" and got[f"{h['b']}:8080"][0] == "ok", got
    # y.wild.test is allowed but was never resolved; d and e are the denied and the unlisted names' addresses.
    for t in (f"{h['c']}:80", f"{h['d']}:80", f"{h['e']}:80"):
        assert got[t][0] != "ok" and got[t][2] < 1.0, (t, got)
    resolve_in(d, sid, "y.wild.test")
    assert connect_from(d, sid, f"{h['c']}:80")[f"{h['c']}:80"][0] == "ok"
    # What one session resolved is its own: another session of the same runtime has not.
    other = new_session(d)
    assert connect_from(d, other, f"{h['a']}:80")[f"{h['a']}:80"][0] != "ok"


def test_always_refused_whatever_the_lists_say(start_daemon, internet):
    h = internet.hosts
    d = start_public(start_daemon, internet)  # PUBLIC with no allow list: any public address
    sid, other = new_session(d), new_session(d)
    other_address = d.cubicle_json("inspect", other)["network"]["address"]
    gateway = d.session_network.rsplit(".", 1)[0] + ".1"
    targets = [f"{h['a']}:80", f"{h['private']}:80", f"{h['linklocal']}:80", f"{internet.host_address}:80", f"{gateway}:22",
               f"{gateway}:{d.port}", f"{other_address}:8080", f"224.0.0.1:80", f"255.255.255.255:80",
               "169.254.169.254:8080", "[2001:db8::1]:80", "[fe80::1%eth0]:80"]
    got = connect_from(d, sid, *targets)
    assert got[f"{h['a']}:80"][0] == "ok", got
    for t in targets[1:]:
        assert got[t][0] != "ok", (t, got)
        assert got[t][2] < 1.0, (t, got)


def test_private_range_only_through_an_allow_entry_inside_it(start_daemon, internet):
    h = internet.hosts
    d = start_public(start_daemon, internet, allow=[h["private"] + "/32", "0.0.0.0/0"], deny=[h["b"] + "/32"])
    sid = new_session(d)
    got = connect_from(d, sid, f"{h['private']}:80", f"{h['a']}:80", f"{h['b']}:80")
    assert got[f"{h['private']}:80"][0] == "ok", got
    assert got[f"{h['a']}:80"][0] == "ok", got
    assert got[f"{h['b']}:80"][0] != "ok", got  # deny wins over allow


def test_sandbox_mode_stays_loopback_only(start_daemon, internet):
    d = start_public(start_daemon, internet)
    sid = new_session(d, runtime="demo")
    rc, out, _ = run_in(d, sid, "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
    assert out.strip() == "['lo']", out
    assert d.cubicle_json("inspect", sid)["network"] == {"mode": "SANDBOX"}


def test_a_session_cannot_change_its_routes_addresses_dns_or_rules(start_daemon, internet):
    d = start_public(start_daemon, internet)
    sid = new_session(d)
    for cmd in (["/usr/sbin/ip", "route", "add", "10.0.0.0/8", "dev", "eth0"], ["/usr/sbin/ip", "addr", "add", "10.9.9.9/32", "dev", "eth0"],
                ["/usr/sbin/ip", "link", "set", "eth0", "down"], ["/usr/sbin/nft", "flush", "ruleset"],
                ["sh", "-c", "echo nameserver 1.1.1.1 > /etc/resolv.conf"]):
        if not os.path.exists(cmd[0]) and cmd[0].startswith("/"):
            print(f"skipped {cmd[0]}: not installed on this host")
            continue
        r = d.cubicle("exec", sid, "--", *cmd, check=False)
        assert r.returncode != 0, (cmd, r.stdout, r.stderr)
    # The rules live in the host's namespace: the session's own has no table of cubicled's (nor may it read one).
    if os.path.exists("/usr/sbin/nft"):
        r = d.cubicle("exec", sid, "--", "/usr/sbin/nft", "list", "tables", check=False)
        assert "cubicle_" not in r.stdout and r.returncode != 0, (r.stdout, r.stderr)


def metadata_script(token_ttl="21600", forwarded=False, token=None):
    return rf'''
import urllib.request, json
def call(method, path, headers):
    req = urllib.request.Request("http://169.254.169.254" + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
out = {{}}
headers = {{"X-aws-ec2-metadata-token-ttl-seconds": "{token_ttl}"}}
if {forwarded!r}:
    headers["X-Forwarded-For"] = "1.2.3.4"
out["token"] = call("PUT", "/latest/api/token", headers)
token = {token!r} or out["token"][1]
out["no_token"] = call("GET", "/latest/meta-data/iam/security-credentials/", {{}})
out["role"] = call("GET", "/latest/meta-data/iam/security-credentials/", {{"X-aws-ec2-metadata-token": token}})
if out["role"][0] == 200:
    out["creds"] = call("GET", "/latest/meta-data/iam/security-credentials/" + out["role"][1], {{"X-aws-ec2-metadata-token": token}})
print(json.dumps(out))
'''


def write_credentials(tmp_path):
    path = tmp_path / "aws-credentials"
    path.write_text("[tutor]\naws_access_key_id = AKIATESTTUTOR0000001\naws_secret_access_key = tutor/secret+key\n"
                    "aws_session_token = tok-tutor\n[other]\naws_access_key_id = AKIAOTHER\naws_secret_access_key = other\n")
    os.chmod(path, 0o600)
    return path


ROLE = "arn:aws:iam::123456789012:role/tutor"


def test_metadata_endpoint_serves_the_runtimes_role_with_a_token_only(start_daemon, internet, tmp_path):
    creds = write_credentials(tmp_path)
    other_role = "arn:aws:iam::123456789012:role/other"
    top = (f"roleCredentials:\n  - {{roleArn: \"{ROLE}\", profile: tutor, sharedCredentialsFile: {creds}}}\n"
           f"  - {{roleArn: \"{other_role}\", profile: other, sharedCredentialsFile: {creds}}}\n")
    more = f"""  - name: web2
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB}}
    networkConfiguration: {{networkMode: PUBLIC}}
    roleArn: "{other_role}"
"""
    d = start_public(start_daemon, internet, extra=f"    roleArn: \"{ROLE}\"\n", top=top, allow=[internet.hosts["a"] + "/32"], more_runtimes=more)
    sid, other = new_session(d), new_session(d)
    # A session of another runtime gets its own runtime's role, never this one's.
    rc, out, err = run_in(d, new_session(d, runtime="web2"), metadata_script())
    assert rc == 0, err
    theirs = json.loads(out)
    assert theirs["role"] == [200, "other"] and json.loads(theirs["creds"][1])["AccessKeyId"] == "AKIAOTHER", theirs
    rc, out, err = run_in(d, sid, metadata_script())
    assert rc == 0, err
    got = json.loads(out)
    assert got["token"][0] == 200 and len(got["token"][1]) >= 32, got
    assert got["no_token"][0] == 401, got
    assert got["role"] == [200, "tutor"], got
    c = json.loads(got["creds"][1])
    assert (c["Code"], c["AccessKeyId"], c["SecretAccessKey"], c["Token"]) == ("Success", "AKIATESTTUTOR0000001", "tutor/secret+key", "tok-tutor")
    # Another session cannot use the first one's token: it is good only from the address it was issued to.
    rc, out, _ = run_in(d, other, metadata_script(token=got["token"][1]).replace('out["token"] = call("PUT", "/latest/api/token", headers)', 'out["token"] = [0, ""]'))
    assert json.loads(out)["role"][0] == 401, out
    # IMDSv2's own refusals: a forwarded token request, a TTL out of range.
    rc, out, _ = run_in(d, sid, metadata_script(forwarded=True))
    assert json.loads(out)["token"][0] == 403
    rc, out, _ = run_in(d, sid, metadata_script(token_ttl="0"))
    assert json.loads(out)["token"][0] == 400
    # The region, as AgentCore's runtime gives it.
    env = d.cubicle("exec", sid, "--", "env").stdout
    assert "AWS_REGION=us-east-1" in env and "AWS_DEFAULT_REGION=us-east-1" in env and "AWS_ACCESS_KEY_ID" not in env


def test_credentials_file_readable_by_others_is_refused(start_daemon, internet, tmp_path):
    creds = write_credentials(tmp_path)
    os.chmod(creds, 0o644)
    top = f"roleCredentials:\n  - {{roleArn: \"{ROLE}\", profile: tutor, sharedCredentialsFile: {creds}}}\n"
    with pytest.raises(RuntimeError, match="can be read by users other than root"):
        start_public(start_daemon, internet, extra=f"    roleArn: \"{ROLE}\"\n", top=top)


def test_refused_connections_are_events_and_metrics(start_daemon, internet):
    h = internet.hosts
    d = start_public(start_daemon, internet, allow=[h["a"] + "/32"])
    sid = new_session(d)
    feed = subprocess.Popen(d.cubicle_args("events", "--json"), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        connect_from(d, sid, f"{h['b']}:8080")
        deadline = time.time() + 10
        denied = None
        while time.time() < deadline and denied is None:
            e = json.loads(feed.stdout.readline())
            if e["type"] == "egress_denied":
                denied = e
    finally:
        feed.kill()
        feed.wait()
    assert denied is not None
    assert (denied["session"], denied["runtime"], denied["destination"], denied["port"], denied["transport"]) == (sid, "web", h["b"], 8080, "tcp")
    import urllib.request
    with urllib.request.urlopen(d.endpoint + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert any(l.startswith('cubicle_egress_denied_total{runtime="web"}') for l in metrics.splitlines()), metrics


def test_inspect_shows_address_mode_policy_and_bytes(start_daemon, internet):
    a = internet.hosts["a"]
    d = start_public(start_daemon, internet, allow=[a + "/32", "api.example.test"])
    sid = new_session(d)
    connect_from(d, sid, f"{a}:80")
    n = d.cubicle_json("inspect", sid)["network"]
    assert n["mode"] == "PUBLIC" and n["egress"] == {"allow": [a + "/32", "api.example.test"], "deny": []}, n
    assert n["address"].startswith(d.session_network.rsplit(".", 1)[0] + "."), n
    assert n["bytesIn"] > 0 and n["bytesOut"] > 0, n


def nft_table_text():
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


def test_ended_sessions_and_the_daemon_leave_no_link_rule_or_element(start_daemon, internet):
    d = start_public(start_daemon, internet, allow=["api.example.test"])
    table = None
    for _ in range(5):
        sid = new_session(d)
        n = d.cubicle_json("inspect", sid)["network"]
        resolve_in(d, sid, "api.example.test")
        table = table or next(l.split()[2] for l in nft_table_text().splitlines() if l.startswith("table inet cubicle_") and n["link"][1:6] in l)
        d.client().stop_runtime_session(agentRuntimeArn=ARN_PREFIX + "web", runtimeSessionId=sid)
        deadline = time.time() + 10
        while subprocess.run(["ip", "link", "show", n["link"]], capture_output=True).returncode == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert subprocess.run(["ip", "link", "show", n["link"]], capture_output=True).returncode != 0, "link left behind"
        sets = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True).stdout
        assert n["address"] + " " not in sets and n["address"] + "\n" not in sets and n["address"] + "," not in sets, sets
    prefix = n["link"][:6]
    d.stop()
    assert table not in nft_table_text()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {prefix}" not in links, links


def test_restarted_daemon_takes_over_public_sessions_with_their_networking(start_daemon, internet):
    h = internet.hosts
    d = start_public(start_daemon, internet, allow=[h["a"] + "/32", "*.wild.test"])
    sid = new_session(d)
    assert resolve_in(d, sid, "x.wild.test")["x.wild.test"] == h["b"]
    d.process.kill()
    d.process.wait()
    d.restart()
    # Its link, its policy and what its DNS had granted (x.wild.test's address) are all still there.
    got = connect_from(d, sid, f"{h['a']}:80", f"{h['b']}:80", f"{h['c']}:80", f"{h['e']}:80")
    assert got[f"{h['a']}:80"][0] == "ok" and got[f"{h['b']}:80"][0] == "ok", got
    assert got[f"{h['c']}:80"][0] != "ok" and got[f"{h['e']}:80"][0] != "ok", got
    assert d.cubicle_json("inspect", sid)["network"]["mode"] == "PUBLIC"


def test_a_session_holds_at_most_16_connections_to_the_metadata_endpoint(start_daemon, internet):
    d = start_public(start_daemon, internet)
    sid = new_session(d)
    rc, out, err = run_in(d, sid, r'''
import socket, json
held, refused = [], 0
for i in range(24):
    try:
        held.append(socket.create_connection(("169.254.169.254", 80), timeout=3))
    except OSError:
        refused += 1
print(json.dumps([len(held), refused]))
''')
    assert rc == 0, err
    assert json.loads(out) == [16, 8], out


def test_a_public_runtime_made_through_the_control_plane(start_daemon, internet, tmp_path):
    """networkConfiguration PUBLIC, roleArn and the egress lists (cubicle: tags) through boto3: a daemon that
    started with no PUBLIC runtime starts its networking in the runtime's CREATING work, and its sessions get
    the policy and the role's credentials as a declared runtime's do."""
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(os.path.join(PRODUCTS, "cubicle-demo-agent"), code / "cubicle-demo-agent")
    os.chmod(tmp_path, 0o755)
    creds = write_credentials(tmp_path)
    net = session_network()
    d = start_daemon(demo_config(f"roleCredentials: [{{roleArn: \"{ROLE}\", profile: tutor, sharedCredentialsFile: {creds}}}]\n"), extra_args=["--egress-interface", internet.link, "--dns-upstream", internet.dns, "--session-network", net, "--code-root", str(code)])
    assert "PUBLIC networking ready" not in d.log_text(), "a SANDBOX-only daemon touches no host networking"
    cp = d.control()
    a, b = internet.hosts["a"], internet.hosts["b"]
    r = cp.create_agent_runtime(agentRuntimeName="web_cp", agentRuntimeArtifact={"containerConfiguration": {"containerUri": f"host:{code}"}},
                                roleArn=ROLE, networkConfiguration={"networkMode": "PUBLIC"},
                                tags={"cubicle:command": "/app/cubicle-demo-agent", "cubicle:egress.allow": f"{a}/32 api.example.test"})
    deadline = time.time() + 30
    while cp.get_agent_runtime(agentRuntimeId=r["agentRuntimeId"])["status"] == "CREATING":
        assert time.time() < deadline
        time.sleep(0.1)
    assert cp.get_agent_runtime(agentRuntimeId=r["agentRuntimeId"])["status"] == "READY"
    assert "PUBLIC networking ready" in d.log_text()
    sid = new_session_id()
    d.invoke({"prompt": "hi"}, sid, runtime=r["agentRuntimeId"])
    got = connect_from(d, sid, f"{a}:80", f"{b}:80")
    assert got[f"{a}:80"][0] == "ok" and got[f"{b}:80"][0] != "ok", got
    names = resolve_in(d, sid, "api.example.test", "other.test")
    assert names["api.example.test"] == a and names["other.test"].startswith("error:"), names
    rc, out, err = run_in(d, sid, metadata_script())
    assert rc == 0, err
    got = json.loads(out)
    assert got["role"] == [200, "tutor"] and json.loads(got["creds"][1])["AccessKeyId"] == "AKIATESTTUTOR0000001", got
