"""An MCP server as AgentCore runs one: streamable HTTP on port 8000, path /mcp (FastMCP's defaults).
Stateful, so the Mcp-Session-Id it hands out must come back on later calls through cubicled."""
from mcp.server.fastmcp import FastMCP

mcp = FastMCP(name="cubicle-test-tools", host="0.0.0.0", port=8000)


@mcp.tool()
def add_numbers(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@mcp.tool()
def weather(city: str) -> str:
    """The weather in a city (always sunny: a deterministic stand-in)."""
    return f"sunny in {city}"


if __name__ == "__main__":
    mcp.run(transport="streamable-http")
