"""The server the official MCP conformance suite (`@modelcontextprotocol/conformance`, its
`server` scenarios) expects, written with the official MCP Python SDK 2.x (MCPServer): the tools,
resources, prompts, logging and completion its scenarios name, each answering as they check.
Tollgate's tests run the suite against it directly and through Tollgate and expect the same.

Usage: conformance_server.py PORT
"""

import sys

import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer, UserMessage

server = MCPServer("tollgate-conformance-server")

# A 1x1 PNG and a minimal WAV, as the suite expects them.
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
AUDIO = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="


def text(value: str) -> types.TextContent:
    return types.TextContent(type="text", text=value)


def image() -> types.ImageContent:
    return types.ImageContent(type="image", data=IMAGE, mime_type="image/png")


def embedded(uri: str, mime: str, value: str) -> types.EmbeddedResource:
    return types.EmbeddedResource(
        type="resource", resource=types.TextResourceContents(uri=uri, mime_type=mime, text=value)
    )


@server.tool(name="test_simple_text")
def simple_text() -> list:
    """Answers one text block"""
    return [text("This is a simple text response for testing.")]


@server.tool(name="test_image_content")
def image_content() -> list:
    """Answers an image"""
    return [image()]


@server.tool(name="test_audio_content")
def audio_content() -> list:
    """Answers audio"""
    return [types.AudioContent(type="audio", data=AUDIO, mime_type="audio/wav")]


@server.tool(name="test_embedded_resource")
def embedded_resource() -> list:
    """Answers an embedded resource"""
    return [embedded("test://embedded-resource", "text/plain", "This is an embedded resource content.")]


@server.tool(name="test_multiple_content_types")
def multiple_content_types() -> list:
    """Answers text, an image and a resource"""
    return [
        text("Multiple content types test:"),
        image(),
        embedded("test://mixed-content-resource", "application/json", '{"test": "data", "value": 123}'),
    ]


@server.tool(name="test_tool_with_logging")
async def tool_with_logging(ctx: Context) -> str:
    """Logs three messages while it runs"""
    for said in ["Tool execution started", "Tool processing data", "Tool execution completed"]:
        await ctx.info(said)
    return "Tool with logging executed successfully"


@server.tool(name="test_tool_with_progress")
async def tool_with_progress(ctx: Context) -> str:
    """Reports progress three times"""
    for done in [0, 50, 100]:
        await ctx.report_progress(done, 100, f"Completed step {done} of 100")
    return "Progress reported"


@server.tool(name="test_error_handling")
def error_handling() -> str:
    """Always fails"""
    raise RuntimeError("This tool intentionally returns an error for testing")


@server.tool(name="test_sampling")
async def sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's model"""
    result = await ctx.request_context.session.create_message(
        [types.SamplingMessage(role="user", content=text(prompt))],
        max_tokens=100,
        related_request_id=ctx.request_id,
    )
    said = getattr(result.content, "text", None) or "No response"
    return f"LLM response: {said}"


async def ask(ctx: Context, message: str, schema: dict) -> str:
    result = await ctx.request_context.session.elicit_form(
        message, schema, related_request_id=ctx.request_id
    )
    return f"action={result.action}, content={result.content or {}}"


@server.tool(name="test_elicitation")
async def elicitation(message: str, ctx: Context) -> str:
    """Asks the person at the client"""
    schema = {
        "type": "object",
        "properties": {"response": {"type": "string", "description": "User's response"}},
        "required": ["response"],
    }
    return "User response: " + await ask(ctx, message, schema)


@server.tool(name="test_elicitation_sep1034_defaults")
async def elicitation_defaults(ctx: Context) -> str:
    """Asks with a default for every primitive type"""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "User name", "default": "John Doe"},
            "age": {"type": "integer", "description": "User age", "default": 30},
            "score": {"type": "number", "description": "User score", "default": 95.5},
            "status": {
                "type": "string",
                "description": "User status",
                "enum": ["active", "inactive", "pending"],
                "default": "active",
            },
            "verified": {"type": "boolean", "description": "Verification status", "default": True},
        },
        "required": [],
    }
    return "Elicitation completed: " + await ask(ctx, "Please review the form fields", schema)


@server.tool(name="test_elicitation_sep1330_enums")
async def elicitation_enums(ctx: Context) -> str:
    """Asks with every kind of enum"""
    choices = [{"const": f"value{i}", "title": f"Choice {i}"} for i in (1, 2, 3)]
    options = ["option1", "option2", "option3"]
    schema = {
        "type": "object",
        "properties": {
            "untitledSingle": {"type": "string", "description": "Select one", "enum": options},
            "titledSingle": {"type": "string", "description": "Select one", "oneOf": choices},
            "legacyEnum": {
                "type": "string",
                "description": "Select one (legacy)",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            },
            "untitledMulti": {
                "type": "array",
                "description": "Select several",
                "minItems": 1,
                "maxItems": 3,
                "items": {"type": "string", "enum": options},
            },
            "titledMulti": {
                "type": "array",
                "description": "Select several",
                "minItems": 1,
                "maxItems": 3,
                "items": {"anyOf": choices},
            },
        },
        "required": [],
    }
    return "Elicitation completed: " + await ask(ctx, "Please select options", schema)


@server.resource("test://static-text", name="static-text", mime_type="text/plain")
def static_text() -> str:
    return "This is the content of the static text resource."


@server.resource("test://static-binary", name="static-binary", mime_type="image/png")
def static_binary() -> bytes:
    import base64

    return base64.b64decode(IMAGE)


@server.resource("test://template/{id}/data", name="template", mime_type="application/json")
def template(id: str) -> str:
    return f'{{"id": "{id}", "templateTest": true, "data": "Data for ID: {id}"}}'


@server.resource("test://watched-resource", name="watched-resource", mime_type="text/plain")
def watched() -> str:
    return "Watched resource content"


@server.prompt(name="test_simple_prompt")
def simple_prompt() -> str:
    """A prompt without arguments"""
    return "This is a simple prompt for testing."


@server.prompt(name="test_prompt_with_arguments")
def prompt_with_arguments(arg1: str, arg2: str) -> str:
    """A prompt with two arguments"""
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@server.prompt(name="test_prompt_with_embedded_resource")
def prompt_with_embedded_resource(resourceUri: str) -> list:
    """A prompt that embeds a resource"""
    return [
        UserMessage(embedded(resourceUri, "text/plain", "Embedded resource content for testing.")),
        UserMessage("Please process the embedded resource above."),
    ]


@server.prompt(name="test_prompt_with_image")
def prompt_with_image() -> list:
    """A prompt with an image"""
    return [UserMessage(image()), UserMessage("Please analyze the image above.")]


@server.completion()
async def complete(ref, argument, context):
    return types.Completion(values=[], total=0, has_more=False)


async def acknowledged(ctx, params) -> types.EmptyResult:
    return types.EmptyResult()


for method, params in [
    ("resources/subscribe", types.SubscribeRequestParams),
    ("resources/unsubscribe", types.UnsubscribeRequestParams),
    ("logging/setLevel", types.SetLevelRequestParams),
]:
    server._lowlevel_server.add_request_handler(method, params, acknowledged)

server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
