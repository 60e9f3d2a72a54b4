"""An A2A agent as AgentCore runs one: port 9000, JSON-RPC 2.0 on `/` (message/send), and its agent card at
/.well-known/agent-card.json. Starlette and uvicorn come with the bedrock-agentcore SDK."""
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stand_in_model import StandInModel

CARD = {
    "name": "cubicle-a2a-tutor",
    "description": "Answers the weather and arithmetic deterministically (a stand-in for a model).",
    "url": "http://127.0.0.1:9000/",
    "version": "1.0.0",
    "protocolVersion": "0.3.0",
    "capabilities": {"streaming": False},
    "defaultInputModes": ["text"],
    "defaultOutputModes": ["text"],
    "skills": [{"id": "tutor", "name": "tutor", "description": "weather and arithmetic", "tags": ["demo"]}],
}
contexts = {}   # A2A contextId -> StandInModel


async def card(request: Request):
    return JSONResponse(CARD)


async def rpc(request: Request):
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}})
    rid = body.get("id")
    if body.get("method") != "message/send":
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})
    message = body.get("params", {}).get("message", {})
    text = " ".join(p.get("text", "") for p in message.get("parts", []) if p.get("kind") == "text")
    context_id = message.get("contextId") or str(uuid.uuid4())
    answer, said = contexts.setdefault(context_id, StandInModel()).answer(text)
    return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {
        "kind": "message", "role": "agent", "messageId": str(uuid.uuid4()), "contextId": context_id,
        "parts": [{"kind": "text", "text": said}], "metadata": {"answer": answer},
    }})


app = Starlette(routes=[Route("/.well-known/agent-card.json", card), Route("/", rpc, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="0.0.0.0", port=9000, log_level="warning")
