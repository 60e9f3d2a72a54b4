"""The runtime-context tutorial's agent on the bedrock-agentcore SDK, unmodified in shape: it reads
context.session_id and payload["user_id"] and keeps each session's conversation in process memory.
The model is a deterministic stand-in (stand_in_model.py), so it runs without network or LLM."""
import os

from bedrock_agentcore.runtime import BedrockAgentCoreApp, RequestContext

from stand_in_model import USERS, StandInModel

app = BedrockAgentCoreApp()
conversations = {}   # session id -> StandInModel: lives as long as this process, i.e. the session
turns = {}


@app.entrypoint
def invoke(payload, context: RequestContext):
    session_id = context.session_id
    user = USERS.get(str(payload.get("user_id", "")))
    model = conversations.setdefault(session_id, StandInModel())
    turns[session_id] = turns.get(session_id, 0) + 1
    answer, message = model.answer(payload.get("prompt", ""), user)
    return {"session_id": session_id, "user": user, "answer": answer, "message": message,
            "turn": turns[session_id], "pid": os.getpid(),
            "custom_headers": {k: v for k, v in (context.request_headers or {}).items() if "custom" in k.lower()}}


if __name__ == "__main__":
    app.run()
