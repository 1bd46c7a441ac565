"""An MCP server written with the official MCP Python SDK 2.x (MCPServer), with the tools of the
reference "everything" server that Tollgate's MCP tests call, so one policy serves both. It speaks
every protocol version the SDK does, 2026-07-28 included.

Usage: mcp_server.py http PORT | mcp_server.py stdio
"""

import os
import sys
from typing import Annotated

from mcp.server.mcpserver import Context, Elicit, ElicitationResult, MCPServer, Resolve
from pydantic import BaseModel

server = MCPServer("tollgate-test-python-server")


@server.tool(name="echo")
def echo(message: str) -> str:
    """Echoes back the input string"""
    return f"Echo: {message}"


@server.tool(name="get-sum")
def get_sum(a: float, b: float) -> str:
    """Returns the sum of two numbers"""
    total = a + b
    return f"The sum of {a:g} and {b:g} is {total:g}."


class Weather(BaseModel):
    temperature: float
    conditions: str
    humidity: float


@server.tool(name="get-structured-content")
def get_structured_content(location: str) -> Weather:
    """Returns structured content along with an output schema"""
    return Weather(temperature=22.5, conditions="Partly cloudy", humidity=65)


@server.tool(name="trigger-long-running-operation")
async def long_running(ctx: Context, duration: float = 10, steps: int = 5) -> str:
    """Demonstrates a long running operation with progress updates"""
    import anyio

    for step in range(1, steps + 1):
        await anyio.sleep(duration / steps)
        await ctx.report_progress(step, steps)
    return f"Long running operation completed. Duration: {duration:g} seconds, Steps: {steps}."


class Confirmation(BaseModel):
    confirm: bool


def ask_to_confirm():
    return Elicit("Delete the record?", Confirmation)


@server.tool(name="trigger-elicitation-request")
async def elicitation(answer: Annotated[ElicitationResult[Confirmation], Resolve(ask_to_confirm)]) -> str:
    """Asks the person at the client to confirm, through an elicitation: a request in the call's
    stream to 2025-11-25, an input-required result the client answers on retry from 2026-07-28"""
    return f"elicitation {answer.action}"


@server.tool(name="get-env")
def get_env() -> str:
    """Returns the server's environment (a tool no agent should reach)"""
    return repr(dict(os.environ))


if sys.argv[1] == "http":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
else:
    server.run("stdio")
