"""A fake Amazon Bedrock Runtime for the tutorial's agent: Converse and ConverseStream over HTTPS, as
botocore parses them (JSON, and the binary event stream), answering deterministically from the
conversation it is sent: the weather and arithmetic as tool calls (weather, calculator), and their results
as text. It runs in the tests' fake internet; `python3 fake_bedrock.py ADDR:PORT CERT KEY LOG` serves until
killed, appending the access key id of each request's SigV4 Authorization header to LOG."""
import binascii
import json
import re
import socketserver
import ssl
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

ADD = re.compile(r"(?:\badd\s+(-?\d+)|(-?\d+)\s*を?\s*足)", re.IGNORECASE)
EXPRESSION = re.compile(r"(-?\d+)\s*([+\-*/])\s*(-?\d+)")
ANSWER = re.compile(r"The answer is (-?\d+(?:\.\d+)?)")


def _texts(message):
    return " ".join(c["text"] for c in message.get("content", []) if "text" in c)


def decide(messages):
    """The assistant's next message: ("text", str) or ("tool", name, input)."""
    last = messages[-1]
    results = [c["toolResult"] for c in last.get("content", []) if "toolResult" in c]
    if results:
        calls = {c["toolUse"]["toolUseId"]: c["toolUse"]["name"] for m in messages if m["role"] == "assistant"
                 for c in m.get("content", []) if "toolUse" in c}
        r = results[0]
        text = " ".join(c.get("text", "") or json.dumps(c.get("json", "")) for c in r.get("content", []))
        if calls.get(r["toolUseId"]) == "weather":
            return ("text", f"The weather is {text.strip()}.")
        if calls.get(r["toolUseId"]) == "get_time":
            return ("text", f"It is {text.strip()}.")
        number = re.search(r"-?\d+(?:\.\d+)?", text)
        value = number.group(0) if number else "unknown"
        if value.endswith(".0"):
            value = value[:-2]
        return ("text", f"The answer is {value}.")
    prompt = _texts(last)
    if re.search(r"weather|天気", prompt, re.IGNORECASE):
        return ("tool", "weather", {})
    if re.search(r"\btime\b|時間|何時", prompt, re.IGNORECASE):
        return ("tool", "get_time", {})
    expression = EXPRESSION.search(prompt)
    addition = ADD.search(prompt)
    if addition and not expression:
        n = addition.group(1) or addition.group(2)
        earlier = [ANSWER.search(_texts(m)) for m in messages[:-1] if m["role"] == "assistant"]
        earlier = [e.group(1) for e in earlier if e]
        if not earlier:
            return ("text", "I don't know what that refers to: there is no earlier result in this conversation.")
        return ("tool", "calculator", {"expression": f"{earlier[-1]}+{n}"})
    if expression:
        return ("tool", "calculator", {"expression": "".join(expression.groups())})
    return ("text", "Hello.")


def _header(name, value):
    n, v = name.encode(), value.encode()
    return struct.pack("B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v


def event(kind, payload):
    """One message of AWS's event-stream encoding (application/vnd.amazon.eventstream)."""
    headers = _header(":event-type", kind) + _header(":content-type", "application/json") + _header(":message-type", "event")
    body = json.dumps(payload).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + headers + body
    return message + struct.pack(">I", binascii.crc32(message) & 0xFFFFFFFF)


class Model:
    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def content(self, messages):
        d = decide(messages)
        if d[0] == "text":
            return [{"text": d[1]}], "end_turn"
        with self.lock:
            self.count += 1
            tool_id = f"tooluse_{self.count:06d}"
        return [{"toolUse": {"toolUseId": tool_id, "name": d[1], "input": d[2]}}], "tool_use"


MODEL = Model()
USAGE = {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        auth = self.headers.get("Authorization", "")
        key = re.search(r"Credential=([^/]+)/", auth)
        with open(self.server.log_path, "a") as log:
            log.write((key.group(1) if key else "(unsigned)") + " " + self.path + "\n")
        content, stop = MODEL.content(body.get("messages", []))
        if self.path.endswith("/converse-stream"):
            events = [event("messageStart", {"role": "assistant"})]
            for i, block in enumerate(content):
                if "text" in block:
                    events.append(event("contentBlockDelta", {"contentBlockIndex": i, "delta": {"text": block["text"]}}))
                else:
                    use = block["toolUse"]
                    events.append(event("contentBlockStart", {"contentBlockIndex": i, "start": {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}}))
                    events.append(event("contentBlockDelta", {"contentBlockIndex": i, "delta": {"toolUse": {"input": json.dumps(use["input"])}}}))
                events.append(event("contentBlockStop", {"contentBlockIndex": i}))
            events.append(event("messageStop", {"stopReason": stop}))
            events.append(event("metadata", {"usage": USAGE, "metrics": {"latencyMs": 1}}))
            payload, kind = b"".join(events), "application/vnd.amazon.eventstream"
        elif self.path.endswith("/converse"):
            payload = json.dumps({"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
                                  "usage": USAGE, "metrics": {"latencyMs": 1}}).encode()
            kind = "application/json"
        else:
            payload, kind = b'{"message":"unknown operation"}', "application/json"
            self.send_response(404)
        if kind != "application/json" or self.path.endswith("/converse"):
            self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
        self.end_headers()
        self.wfile.write(payload)


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):  # not HTTPServer's: its getfqdn would wait on a resolver the namespace cannot reach
        socketserver.TCPServer.server_bind(self)


if __name__ == "__main__":
    address, cert, key, log_path = sys.argv[1:5]
    host, port = address.rsplit(":", 1)
    server = Server((host, int(port)), Handler)
    server.log_path = log_path
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("serving", flush=True)
    server.serve_forever()
