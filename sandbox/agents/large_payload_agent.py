"""The large-payload tutorial's shape: a JSON payload carrying a big string (100 MB in the tests) is read,
checked and returned whole, so the round trip through cubicled can be compared byte for byte."""
import hashlib

from bedrock_agentcore.runtime import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload):
    data = payload.get("data", "")
    return {"bytes": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest(), "data": data}


if __name__ == "__main__":
    app.run()
