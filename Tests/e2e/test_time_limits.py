"""AgentCore's request time limits (issue 29, first part), on short configured values: a synchronous request
not answered in time gets RuntimeClientError before its response starts; a response is cut at the limit for
its kind (text/event-stream: the stream limit, which replaces the synchronous one once the stream begins).
Both roads: a new session's first call (the task road) and a warm session's (forwarded on the event loop)."""
import http.client
import json
import urllib.parse

import pytest

from conftest import ARN_PREFIX, PRODUCTS, new_session_id

PATH = "/runtimes/" + urllib.parse.quote(ARN_PREFIX + "demo", safe="") + "/invocations"


def limits_config():
    return f"""lifecycleMinimumSeconds: 1
runtimes:
  - name: demo
    command: [/app/cubicle-demo-agent]
    codeDirectory: {PRODUCTS}
    limits: {{memory: 256MiB, requestSeconds: 2, streamSeconds: 4}}
"""


def post(d, sid, payload, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    body = json.dumps(payload).encode()
    c.request("POST", PATH, body=body, headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid, "Content-Type": "application/json"})
    return c, c.getresponse()


def on_road(d, road):
    """A new session id and the connection to use: none for the task road (the session starts with the
    call); for the warm road, one whose session has answered twice, so its link is warm on this loop."""
    sid, conn = new_session_id(), None
    if road == "warm":
        for prompt in ("1+1", "1+2"):
            conn, r = post(d, sid, {"prompt": prompt}, conn)
            assert r.status == 200, r.read()
            r.read()
    return sid, conn


@pytest.mark.parametrize("road", ["task", "warm"])
def test_a_synchronous_request_past_its_limit_gets_runtime_client_error(start_daemon, road):
    d = start_daemon(limits_config())
    sid, conn = on_road(d, road)
    conn, r = post(d, sid, {"prompt": "2+2", "delay_seconds": 5}, conn)
    data = r.read()
    assert r.status == 424 and r.getheader("x-amzn-ErrorType") == "RuntimeClientError", (r.status, data)
    assert "2 s limit for a synchronous request" in json.loads(data)["message"]
    # The session lives on and answers the next call.
    _, r = post(d, sid, {"prompt": "3+3"})
    assert r.status == 200 and json.loads(r.read())["answer"] == 6
    if road == "warm":
        import urllib.request
        with urllib.request.urlopen(d.endpoint + "/metrics", timeout=10) as m:
            assert "cubicle_invocations_forwarded_on_event_loop_total" in m.read().decode()


@pytest.mark.parametrize("road", ["task", "warm"])
def test_streams_run_past_the_synchronous_limit_and_are_cut_at_theirs(start_daemon, road):
    d = start_daemon(limits_config())
    sid, conn = on_road(d, road)
    # 3 s of events: past the 2 s synchronous limit, within the 4 s stream limit.
    conn, r = post(d, sid, {"stream": True, "stream_events": 30, "stream_interval_ms": 100}, conn)
    events = [line for line in r.read().split(b"\n") if b'"event":"progress"' in line]
    assert r.status == 200 and len(events) == 30, "a stream longer than the synchronous limit completes"
    # 10 s of events: cut at 4 s, the connection closed mid-stream.
    conn, r = post(d, sid, {"stream": True, "stream_events": 100, "stream_interval_ms": 100}, conn)
    got = b""
    try:
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
            if not chunk:
                break
            got += chunk
    except (http.client.IncompleteRead, ConnectionError) as e:
        got += getattr(e, "partial", b"") or b""
    cut = got.count(b'"event":"progress"')
    assert 0 < cut < 100, f"the stream was cut at its limit ({cut} of 100 events)"
