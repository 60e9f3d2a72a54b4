"""A bedrock-agentcore SDK agent with a WebSocket handler (`@app.websocket`, served on /ws as AgentCore
expects), for the data plane's WebSocket tests. Text frames are commands or echoed; binary frames are echoed.

  "push N SIZE"  N binary frames of SIZE bytes, then the text "pushed N"
  "flood"        binary frames of 60 KiB until the socket stops taking them; the bytes it managed are written
                 to /tmp/flood-sent every 10 frames (the client reads them with a command)
  "close CODE"   closes with CODE
  "big"          one binary frame of 70000 bytes (over the 64 KiB limit)
  "context"      the session id and custom headers the SDK saw, as JSON
  "lastclose"    the close code the previous connection ended with (kept in /tmp/ws-close-code)
  anything else  echoed back as "echo: TEXT"
"""
import json
import os

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload, context):
    return {"pid": os.getpid(), "session_id": context.session_id}


@app.websocket
async def handler(websocket, context):
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            with open("/tmp/ws-close-code", "w") as f:
                f.write(str(message.get("code")))
            return
        if message.get("bytes") is not None:
            await websocket.send_bytes(message["bytes"])
            continue
        text = message.get("text") or ""
        words = text.split()
        if words[:1] == ["push"]:
            n, size = int(words[1]), int(words[2])
            for i in range(n):
                await websocket.send_bytes(bytes([i % 256]) * size)
            await websocket.send_text(f"pushed {n}")
        elif words[:1] == ["flood"]:
            sent = 0
            frame = b"\x5a" * (60 << 10)
            try:
                while sent < (2 << 30):
                    await websocket.send_bytes(frame)
                    sent += len(frame)
                    if sent % (10 * len(frame)) == 0:
                        with open("/tmp/flood-sent", "w") as f:
                            f.write(str(sent))
            except Exception:
                return
        elif words[:1] == ["close"]:
            await websocket.close(code=int(words[1]), reason="agent closes")
            return
        elif words[:1] == ["big"]:
            await websocket.send_bytes(b"\x01" * 70000)
        elif words[:1] == ["lastclose"]:
            try:
                with open("/tmp/ws-close-code") as f:
                    await websocket.send_text(f.read())
            except FileNotFoundError:
                await websocket.send_text("none")
        elif words[:1] == ["context"]:
            headers = {k: v for k, v in (context.request_headers or {}).items()
                       if k.lower().startswith("x-amzn-bedrock-agentcore-runtime-custom-")}
            await websocket.send_text(json.dumps({"session_id": context.session_id, "pid": os.getpid(), "custom": headers}))
        else:
            await websocket.send_text("echo: " + text)


if __name__ == "__main__":
    # PORT: the benchmark runs it outside a sandbox too, as the peer cubicled's relay is measured against.
    app.run(port=int(os.environ.get("PORT", "8080")))
