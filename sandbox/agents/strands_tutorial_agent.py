"""The agent of AgentCore's runtime-context tutorial, as the tutorial writes it: a Strands agent whose
BedrockModel calls Bedrock with the runtime's role credentials, with the calculator tool and the
tutorial's weather and get_time tools, reading context.session_id. Nothing here knows about Cubicle: it
finds Bedrock through DNS and its credentials through the metadata endpoint, as it would on AgentCore."""
from datetime import datetime, timezone

from bedrock_agentcore.runtime import BedrockAgentCoreApp, RequestContext
from strands import Agent, tool
from strands.models import BedrockModel
from strands_tools import calculator

app = BedrockAgentCoreApp()


@tool
def weather():
    """Get weather"""
    return "sunny"


@tool
def get_time():
    """Get the current time"""
    return datetime.now(timezone.utc).strftime("%H:%M UTC")


model = BedrockModel(model_id="us.anthropic.claude-3-7-sonnet-20250219-v1:0")
agent = Agent(
    model=model,
    tools=[calculator, weather, get_time],
    system_prompt="You're a helpful assistant. You can do simple math calculation, tell the weather and the time.",
    callback_handler=None,
)


@app.entrypoint
def strands_agent_bedrock_handling_context(payload, context: RequestContext):
    user_input = payload.get("prompt")
    print("session:", context.session_id, "user:", payload.get("user_id"), "input:", user_input, flush=True)
    response = agent(user_input)
    return {"session_id": context.session_id, "text": response.message["content"][0]["text"]}


if __name__ == "__main__":
    app.run()
