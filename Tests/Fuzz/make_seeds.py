"""Writes the seed corpus of each fuzz target (Tests/Fuzz/corpus/<target>/), from real messages of each format."""
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(obj):
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(payload)) + payload


rpc = [
    {"jsonrpc": "2.0", "method": "sandbox.configure", "params": {"hostname": "cubicle", "mounts": [], "rootBytes": 16777216}},
    {"jsonrpc": "2.0", "method": "ready", "params": {"timings": [1, 2, 3]}},
    {"jsonrpc": "2.0", "id": 7, "method": "agent.connect", "params": {"port": 8080}},
    {"jsonrpc": "2.0", "id": 7, "result": {"fds": 1}},
    {"jsonrpc": "2.0", "id": 8, "error": {"code": -32000, "message": "connect: ECONNREFUSED", "data": {"step": "connect", "errno": 111}}},
    {"jsonrpc": "2.0", "method": "agent.exited", "params": {"pid": 2, "code": 0, "signal": None}},
]
for i, m in enumerate(rpc):
    write("rpc-frames", f"message-{i}", bytes([3]) + frame(m))
write("rpc-frames", "all-in-one-read", bytes([255]) + b"".join(frame(m) for m in rpc))
write("rpc-frames", "oversized", bytes([0]) + struct.pack(">I", 1 << 30))


def event(headers, payload):
    h = b""
    for name, value in headers:
        h += bytes([len(name)]) + name.encode() + bytes([7]) + struct.pack(">H", len(value)) + value.encode()
    total = 12 + len(h) + len(payload) + 4
    prelude = struct.pack(">II", total, len(h))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + h + payload
    return body + struct.pack(">I", zlib.crc32(body))


chunk = event([(":message-type", "event"), (":event-type", "chunk"), (":content-type", "application/json")],
              json.dumps({"contentStart": {}}).encode())
stop = event([(":message-type", "event"), (":event-type", "chunk"), (":content-type", "application/json")],
             json.dumps({"contentStop": {"exitCode": 0, "status": "COMPLETED"}}).encode())
err = event([(":message-type", "exception"), (":exception-type", "ValidationException")], b'{"message":"bad"}')
write("event-stream", "chunk", chunk)
write("event-stream", "two-messages", chunk + stop)
write("event-stream", "exception", err)
write("event-stream", "partial", (chunk + stop)[:-7])
write("event-stream", "split-fields", b":event-type\x01chunk\x01:message-type\x01event\x01{\"contentDelta\":{\"stdout\":\"hi\\n\"}}")

arn = "arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fdemo"
sid = "e2e-" + "0123456789abcdef" * 2 + "01"
write("validators", "invoke", f"POST\n/runtimes/{arn}/invocations\nqualifier=DEFAULT\n{sid}\n{{}}".encode())
write("validators", "command", f"POST\n/runtimes/{arn}/commands\n\n{sid}\n{{\"command\": \"ls -l\", \"timeout\": 5}}".encode())
write("validators", "stop", f"POST\n/runtimes/demo/stopruntimesession\naccountId=123456789012\n{sid}\n{{}}".encode())
write("validators", "ping", b"GET\n/ping\n\n\n")
write("validators", "json", json.dumps({"a": [1, 2.5, -0.0, True, None, "\u00e9\\n"], "b": {"c": 1e300}}).encode())

# SigV4: Authorization header, X-Amz-Date, path, query, header values (\r-separated), as botocore signs them.
auth = ("AWS4-HMAC-SHA256 Credential=AKIAALICE00000000001/20261205/us-east-1/bedrock-agentcore/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amzn-bedrock-agentcore-runtime-session-id, "
        "Signature=58bd8c5bfa0588422cbc4f28db3843a04e6989344a8a4729ff6e670b4f7bb566")
write("sigv4", "botocore-invoke", f"{auth}\n20261205T120000Z\n/runtimes/{arn}/invocations\nqualifier=DEFAULT&accountId=000000000000\napplication/json\r 127.0.0.1:8080 ".encode())
write("sigv4", "dot-segments", f"{auth}\n20260229T235959Z\n/a/./b/../c//d/%2E%2E/\nb=2&a=1&a=&=x&%zz=%41\n  spaced   value  ".encode())
presigned = ("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id=" + "s" * 40 + "&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
             "AKIAALICE00000000001%2F20261205%2Fus-east-1%2Fbedrock-agentcore%2Faws4_request&X-Amz-Date=20261205T152823Z&X-Amz-Expires=300"
             "&X-Amz-SignedHeaders=host&X-Amz-Signature=d04b79974ec4a96ccc8ec935a1bbd1c721cc528c5e6501845e2a885d1fb31d71")
write("sigv4", "botocore-presigned", f"\n20261205T152823Z\n/runtimes/{arn}/ws\n{presigned}\n127.0.0.1:8080".encode())
write("validators", "shell-resize", b"\x04" + json.dumps({"width": 120, "height": 40}).encode())
write("validators", "shell-status", b"\x03" + json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                                          "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}).encode())
write("validators", "shell-route", f"GET\n/runtimes/{arn}/ws/shells\nshellId=build-1\n{sid}\n".encode())
write("sigv4", "presigned-like", b"AWS4-HMAC-SHA256 Credential=A/2/r/s/t, SignedHeaders=host, Signature=00\n19700101T000000Z\n/\nX-Amz-Signature=abc&X-Amz-Date=20261205T120000Z\n")
