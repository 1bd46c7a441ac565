"""One MCP session through an official MCP Python SDK (1.x or 2.x, whichever is installed), as an
agent would run it; prints what the SDK handed back as one JSON line.

Usage: mcp_client.py SPEC, where SPEC is JSON:
  {"url": ..., "headers": {...}, "mode": "auto" | "legacy" (2.x only),
   "calls": [{"name": ..., "arguments": {...}, "progress": true (count progress)}, ...],
   "elicit": true (a person who accepts every elicitation, counted),
   "sample": true (a model that answers every sampling request, counted)}
Output: {"sdk": VERSION, "capabilities": [the server's, by name], "tools": [names],
         "calls": [result as on the wire | {"exception": ...}]}
A call the SDK raises on is reported as an exception, not a result: that is the difference a
framework sees (a raised error ends its step; a result with isError goes back to the model).
"""

import asyncio
import json
import sys
from importlib.metadata import version

SPEC = json.loads(sys.argv[1])
SDK = version("mcp")


def wire(result):
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


async def run_calls(session, capabilities):
    listed = await session.list_tools()
    tools = sorted(tool.name for tool in listed.tools)
    calls = []
    for call in SPEC.get("calls", []):
        progress = []
        options = {}
        if call.get("progress"):

            async def on_progress(value, total, message):
                progress.append(value)

            options["progress_callback"] = on_progress
        try:
            result = await session.call_tool(call["name"], call.get("arguments", {}), **options)
            outcome = wire(result)
            if call.get("progress"):
                outcome["tollgate_progress"] = len(progress)
            calls.append(outcome)
        except Exception as e:  # what a framework would see
            calls.append({"exception": type(e).__name__, "message": str(e)})
    return tools, calls, sorted(wire(capabilities).keys())


ELICITED = []


async def on_elicitation(context, params):
    """A person who confirms whatever is asked, counted."""
    ELICITED.append(params.message)
    if SDK.startswith("1."):
        from mcp.types import ElicitResult
    else:
        from mcp_types import ElicitResult
    return ElicitResult(action="accept", content={"confirm": True})


SAMPLED = []


async def on_sampling(context, params):
    """A model that answers whatever it is asked, counted."""
    said = " ".join(getattr(m.content, "text", "") for m in params.messages)
    SAMPLED.append(said)
    if SDK.startswith("1."):
        from mcp.types import CreateMessageResult, TextContent
    else:
        from mcp_types import CreateMessageResult, TextContent
    return CreateMessageResult(role="assistant", model="tollgate-test-model",
                               content=TextContent(type="text", text=f"sampled: {said}"))


async def main():
    headers = SPEC.get("headers", {})
    callbacks = {"elicitation_callback": on_elicitation} if SPEC.get("elicit") else {}
    if SPEC.get("sample"):
        callbacks["sampling_callback"] = on_sampling
    if SDK.startswith("1."):
        from mcp import ClientSession
        from mcp.client.streamable_http import streamablehttp_client

        async with streamablehttp_client(SPEC["url"], headers=headers) as (read, write, _):
            async with ClientSession(read, write, **callbacks) as session:
                initialized = await session.initialize()
                tools, calls, capabilities = await run_calls(session, initialized.capabilities)
    else:
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        http = create_mcp_http_client(headers=headers)
        transport = streamable_http_client(SPEC["url"], http_client=http)
        async with Client(transport, mode=SPEC.get("mode", "auto"), **callbacks) as client:
            tools, calls, capabilities = await run_calls(client, client.server_capabilities)
    print(json.dumps({"sdk": SDK, "capabilities": capabilities, "tools": tools, "calls": calls,
                      "elicited": len(ELICITED), "sampled": len(SAMPLED)}))


asyncio.run(asyncio.wait_for(main(), 60))
