"""The streaming tutorial's shape: a generator entrypoint, which the SDK turns into Server-Sent Events.
`fail_after` raises mid-stream (the SDK sends its error event); {"action": "report"} tells how earlier
streams ended, so a test can see that a client's disconnect ended the agent's request."""
import asyncio

from bedrock_agentcore.runtime import BedrockAgentCoreApp, BedrockAgentCoreContext

app = BedrockAgentCoreApp()
streams = {}   # request id -> how the stream ended


@app.entrypoint
async def invoke(payload):
    if payload.get("action") == "report":
        yield {"streams": streams}
        return
    count, interval = int(payload.get("events", 5)), float(payload.get("interval_ms", 100)) / 1000
    fail_after = payload.get("fail_after")
    sent = 0
    request_id = BedrockAgentCoreContext.get_request_id()
    streams[request_id] = "running"
    try:
        for index in range(count):
            if fail_after is not None and index == fail_after:
                raise RuntimeError(f"failed after {index} events")
            yield {"index": index, "text": f"event {index} of {count}"}
            sent += 1
            await asyncio.sleep(interval)
        yield {"done": True, "events": count}
        streams[request_id] = "completed"
    except (asyncio.CancelledError, GeneratorExit):
        streams[request_id] = f"cancelled after {sent}"
        raise
    except RuntimeError:
        streams[request_id] = f"failed after {sent}"
        raise


if __name__ == "__main__":
    app.run()
