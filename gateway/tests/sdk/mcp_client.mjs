// One MCP session through the official MCP TypeScript SDK, as an agent would run it; prints what
// the SDK handed back as one JSON line. The same SPEC and output as mcp_client.py:
//   node mcp_client.mjs SPEC   (SDK_NODE: the directory holding node_modules)
// A call the SDK raises on is reported as an exception, not a result.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const spec = JSON.parse(process.argv[2]);
const sdk = join(process.env.SDK_NODE, "node_modules/@modelcontextprotocol/sdk");
const load = (path) => import(pathToFileURL(join(sdk, "dist/esm", path)).href);
const { Client } = await load("client/index.js");
const { StreamableHTTPClientTransport } = await load("client/streamableHttp.js");
const { version } = JSON.parse(
  await (await import("node:fs/promises")).readFile(join(sdk, "package.json"), "utf8"),
);

// With "elicit": a person who accepts every elicitation; with "sample": a model that answers
// every sampling request; each counted.
const capabilities = {};
if (spec.elicit) capabilities.elicitation = {};
if (spec.sample) capabilities.sampling = {};
// With "roots": the client's roots, given to a server that asks (counted).
if (spec.roots) capabilities.roots = {};
const client = new Client({ name: "tollgate-test", version: "1" }, { capabilities });
const asked = { elicited: 0, sampled: 0, rooted: 0 };
if (spec.elicit || spec.sample || spec.roots) {
  const { ElicitRequestSchema, CreateMessageRequestSchema, ListRootsRequestSchema } = await load("types.js");
  if (spec.roots) {
    client.setRequestHandler(ListRootsRequestSchema, async () => {
      asked.rooted += 1;
      return { roots: spec.roots };
    });
  }
  if (spec.elicit) {
    client.setRequestHandler(ElicitRequestSchema, async () => {
      asked.elicited += 1;
      return { action: "accept", content: { confirm: true } };
    });
  }
  if (spec.sample) {
    client.setRequestHandler(CreateMessageRequestSchema, async (request) => {
      asked.sampled += 1;
      const said = request.params.messages.map((m) => m.content.text ?? "").join(" ");
      return { model: "tollgate-test-model", role: "assistant", content: { type: "text", text: `sampled: ${said}` } };
    });
  }
}
const transport = new StreamableHTTPClientTransport(new URL(spec.url), {
  requestInit: { headers: spec.headers ?? {} },
});
await client.connect(transport);
const listed = await client.listTools();
const tools = listed.tools.map((t) => t.name).sort();
const calls = [];
for (const call of spec.calls ?? []) {
  // With "progress": count progress notifications, and give the call only "timeout_ms" unless
  // progress keeps it alive (the SDK's resetTimeoutOnProgress), as agents with long tools do.
  let progress = 0;
  const options = call.progress
    ? { onprogress: () => (progress += 1), timeout: call.timeout_ms ?? 60000, resetTimeoutOnProgress: true }
    : undefined;
  try {
    const result = await client.callTool({ name: call.name, arguments: call.arguments ?? {} }, undefined, options);
    if (call.progress) result.tollgate_progress = progress;
    calls.push(result);
  } catch (e) {
    calls.push({ exception: e.constructor.name, message: String(e.message ?? e) });
  }
}
// With "content": list resources, templates and prompts, read and get those named.
let content;
if (spec.content) {
  const attempt = async (f) => {
    try {
      return await f();
    } catch (e) {
      return { exception: e.constructor.name, message: String(e.message ?? e), code: e.code, data: e.data };
    }
  };
  content = {
    resources: (await client.listResources()).resources.map((r) => r.uri).sort(),
    templates: (await client.listResourceTemplates()).resourceTemplates.map((t) => t.uriTemplate).sort(),
    prompts: (await client.listPrompts()).prompts.map((p) => p.name).sort(),
    reads: [],
    gets: [],
  };
  for (const uri of spec.content.reads ?? []) content.reads.push(await attempt(() => client.readResource({ uri })));
  for (const name of spec.content.gets ?? []) content.gets.push(await attempt(() => client.getPrompt({ name })));
  content.completions = [];
  for (const request of spec.content.complete ?? []) content.completions.push(await attempt(() => client.complete(request)));
  if (spec.content.logLevel) content.logLevel = await attempt(() => client.setLoggingLevel(spec.content.logLevel));
}
// With "subscribe": {"uris": [...], "toggle": tool, "wait_ms": n}: subscribe to each URI (each
// outcome kept), call the tool that starts the server's updates, and count the updates that
// arrive within wait_ms, by URI.
let subscribed;
if (spec.subscribe) {
  const { ResourceUpdatedNotificationSchema } = await load("types.js");
  const updates = {};
  client.setNotificationHandler(ResourceUpdatedNotificationSchema, (n) => {
    updates[n.params.uri] = (updates[n.params.uri] ?? 0) + 1;
  });
  const outcomes = [];
  for (const uri of spec.subscribe.uris) {
    try {
      outcomes.push(await client.subscribeResource({ uri }));
    } catch (e) {
      outcomes.push({ exception: e.constructor.name, message: String(e.message ?? e), code: e.code });
    }
  }
  if (spec.subscribe.toggle) await client.callTool({ name: spec.subscribe.toggle, arguments: {} });
  const deadline = Date.now() + (spec.subscribe.wait_ms ?? 0);
  while (Date.now() < deadline && Object.keys(updates).length === 0) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  subscribed = { outcomes, updates };
}
await transport.terminateSession().catch(() => {});
await client.close();
const served = Object.keys(client.getServerCapabilities() ?? {}).sort();
const resources = client.getServerCapabilities()?.resources;
console.log(JSON.stringify({ sdk: version, capabilities: served, resources, tools, calls, content, subscribed, ...asked }));
