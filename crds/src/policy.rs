//! AgentPolicy: what an agent may do (layers 2 and 3). Tool calls are checked against `tools`
//! before they execute, runs are bounded by `execution`, the agent's own API writes are guarded
//! by `kubernetes`, and `graduation` says when a tool's track record earns more autonomy.
//!
//! Anything not listed under `tools.allowed` is denied. Names match exactly.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Approvers, LocalObjectReference, OnTimeout};

/// The most tools one policy may allow or block.
pub const MAX_TOOLS: u64 = 512;
/// The longest tool name (the MCP limit).
pub const MAX_TOOL_NAME: u64 = 128;
/// Tool names: ASCII letters, digits, `_`, `-` and `.`, as the MCP specification recommends.
/// Restricting the alphabet in the policy itself means no look-alike or invisible character can
/// ever name an allowed tool.
pub const TOOL_NAME_PATTERN: &str = r"^[A-Za-z0-9_.-]{1,128}$";
/// A non-negative decimal amount of US dollars with at most 6 decimal places, such as `2.00`.
pub const USD_PATTERN: &str = r"^[0-9]{1,9}(\.[0-9]{1,6})?$";
/// A Go-style duration such as `1h`, `90m` or `720h`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// The rules one agent's tool calls, runs and own Kubernetes API writes are held to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    plural = "agentpolicies",
    singular = "agentpolicy",
    namespaced,
    status = "AgentPolicyStatus",
    shortname = "agpol",
    category = "tollgate",
    derive = "PartialEq",
    printcolumn(
        name = "Agent",
        type_ = "string",
        json_path = ".spec.identityRef.name",
        description = "The AgentIdentity this policy governs"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the policy compiled and is enforced"
    ),
    printcolumn(
        name = "Hash",
        type_ = "string",
        json_path = ".status.policyHash",
        priority = 1,
        description = "The policy hash recorded in every audit record"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.tools.allowed) || self.tools.allowed.all(t, !has(t.upstream) || (has(self.upstreams) && self.upstreams.exists(u, u.name == t.upstream)))"
).message("every tools.allowed[].upstream must name an entry of spec.upstreams"))]
pub struct AgentPolicySpec {
    /// The AgentIdentity in this namespace that this policy governs.
    pub identity_ref: LocalObjectReference,
    /// Where tools live. The gateway proxies MCP traffic to them at /mcp/<name>.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::upstreams")]
    pub upstreams: Vec<Upstream>,
    /// Which tools the agent may call, under which constraints. Anything not allowed is denied.
    #[serde(default)]
    pub tools: ToolRules,
    /// Which MCP resources the agent may list and read. Without it, none: resources are not
    /// advertised to the agent, listed as nothing, and every read is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRules>,
    /// Which MCP prompts the agent may list and get. Without it, none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PromptRules>,
    /// Per-run and per-identity ceilings. A breach halts the run; nothing retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<ExecutionLimits>,
    /// Guards on the agent's own Kubernetes API writes, enforced by admission even where the
    /// agent's RBAC would allow the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesGuards>,
    /// The track record that makes a tool eligible for more autonomy. Tollgate only reports
    /// eligibility in status; a person changes the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graduation: Option<Graduation>,
}

/// An upstream: a tool server, or a model provider the gateway meters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.mcp) && has(self.llm))")
    .message("an upstream is either an MCP server (mcp) or a model provider (llm), not both"))]
pub struct Upstream {
    /// Name tools refer to, and the path segment of the gateway's proxy (/mcp/<name> for a
    /// tool server, /llm/<name> for a model provider).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// An MCP server: at a URL (streamable HTTP transport), or a stdio command a standalone
    /// gateway starts. Without it (and without llm) the upstream is reachable only through the
    /// decision API, for orchestrators that call tools themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpUpstream>,
    /// A model provider. The gateway proxies its API at /llm/<name>, meters every call's tokens
    /// and cost itself, and holds the run to its token and cost ceilings mid-stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmUpstream>,
}

/// A model provider reached through the gateway's LLM proxy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmUpstream {
    /// The provider's API style: OpenAI (chat completions, responses, embeddings, models; also
    /// vLLM, Ollama and other OpenAI-compatible servers) or Anthropic (messages, count_tokens,
    /// models).
    pub api: LlmApi,
    /// The provider's base URL as its SDK takes it, such as https://api.openai.com/v1 or
    /// https://api.anthropic.com. The agent's SDK points at /llm/<name> on the gateway instead.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https']")
        .message("must be an absolute http or https URL"))]
    pub url: String,
    /// The models the agent may use, by exact name. A call naming any other is refused before
    /// anything leaves the gateway.
    #[schemars(schema_with = "crate::schema::model_set")]
    pub models: Vec<String>,
    /// The most output tokens one call may ask for; a larger request is lowered to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_output_tokens: Option<i64>,
    /// What the audit trail keeps of prompts and completions: Digest (default: their SHA-256
    /// only) or Full (their text too, with secrets redacted as for tool calls).
    #[serde(default)]
    pub capture: Capture,
}

/// A model provider's API style.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum LlmApi {
    /// OpenAI's API, and the servers that speak it.
    OpenAI,
    /// Anthropic's API.
    Anthropic,
}

/// What the audit trail keeps of a model call's text.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Capture {
    /// The digests of prompt and completion only.
    #[default]
    Digest,
    /// The text as well, redacted.
    Full,
}

/// An MCP server: reached at a URL over the streamable HTTP transport, or started by the gateway
/// as a process it talks to over stdio.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.stdio)")
    .message("an MCP upstream has either a url or a stdio command, exactly one"))]
#[x_kube(validation = Rule::new("!has(self.transport) || has(self.url)")
    .message("transport is how the server at url speaks: give it with url only"))]
pub struct McpUpstream {
    /// The server's MCP endpoint, an http or https URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https']")
        .message("must be an absolute http or https URL"))]
    pub url: Option<String>,
    /// How the server at `url` speaks MCP: StreamableHttp (the default, MCP 2025-03-26 and
    /// later) or Sse, the HTTP+SSE transport of 2024-11-05 that many hosted servers still serve
    /// alone (`url` is then the stream's, such as https://host/sse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<McpTransport>,
    /// How long one request to this server may take, in seconds (from sending it to the end of
    /// its answer; a wait for approval is not counted). Without it, the gateway's
    /// `--mcp-call-timeout` (10 minutes by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<i64>,
    /// A server the gateway starts itself, one process per MCP session of the agent, and talks
    /// to over its stdin and stdout. Only a standalone gateway starts processes: in a cluster, a
    /// policy must not be able to run commands inside the gateway, which holds every agent's
    /// credentials; run the server behind `tollgate-gateway stdio-bridge` as a Deployment of its
    /// own and name its url instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio: Option<StdioServer>,
    /// The requests this server may make of the agent's MCP client, relayed to it in the
    /// stream of the call they belong to and its answer back, both recorded: Elicitation (it
    /// asks the person at the client, whose answer becomes part of the audit trail), Sampling
    /// (it asks the agent's model, spending its tokens and context on the server's behalf),
    /// Roots (it asks which directories the client exposes). None by default: the client's
    /// capabilities for them are withheld from the server, and a request made anyway is
    /// answered with an error at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y == x))")
        .message("names each kind of server request once"))]
    pub server_requests: Vec<ServerRequest>,
}

/// A kind of request an MCP server makes of its client.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ServerRequest {
    /// `elicitation/create`: the server asks the person at the client for input or a
    /// confirmation.
    Elicitation,
    /// `sampling/createMessage`: the server asks the client's model for a completion.
    Sampling,
    /// `roots/list`: the server asks which filesystem roots the client exposes.
    Roots,
}

impl ServerRequest {
    /// The kind of the request named `method`, if it is one.
    pub fn of_method(method: &str) -> Option<Self> {
        [Self::Elicitation, Self::Sampling, Self::Roots]
            .into_iter()
            .find(|kind| kind.method() == method)
    }

    /// The method of these requests.
    pub fn method(self) -> &'static str {
        match self {
            Self::Elicitation => "elicitation/create",
            Self::Sampling => "sampling/createMessage",
            Self::Roots => "roots/list",
        }
    }

    /// The client capability that tells a server it may make these requests.
    pub fn capability(self) -> &'static str {
        match self {
            Self::Elicitation => "elicitation",
            Self::Sampling => "sampling",
            Self::Roots => "roots",
        }
    }
}

/// The HTTP transport of an MCP server.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum McpTransport {
    /// Streamable HTTP: one endpoint, a POST per message.
    StreamableHttp,
    /// HTTP+SSE (2024-11-05): a GET stream that names where to POST, answers on the stream.
    Sse,
}

/// How the gateway starts a stdio MCP server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StdioServer {
    /// The program: a path, or a name looked up in the gateway's PATH.
    #[schemars(length(min = 1, max = 1024))]
    pub command: String,
    /// Its arguments, passed as they are (no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub args: Vec<String>,
    /// Environment variables it gets besides PATH, HOME and LANG (nothing else of the gateway's
    /// environment reaches it). Not for secrets: they are in the policy for anyone who reads it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The variable that receives the agent's credential for this upstream (the AgentIdentity's
    /// `credentials` entry, formatted as it says), such as GITHUB_TOKEN. The agent never sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"), length(max = 128))]
    pub credential_env: Option<String>,
}

/// The MCP resources an agent may read.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRules {
    /// Resources by upstream and URI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed: Vec<ResourceRule>,
}

/// Resources of one upstream the agent may read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRule {
    /// The MCP upstream (an entry of spec.upstreams) that serves them.
    pub upstream: String,
    /// URIs read exactly as written, or, ending in `*`, every URI that starts with what comes
    /// before it (a URI with a `..` segment, plain or percent-encoded, never matches a prefix).
    #[schemars(length(min = 1, max = 64))]
    pub uris: Vec<String>,
}

/// The MCP prompts an agent may get.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptRules {
    /// Prompts by upstream and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed: Vec<PromptRule>,
}

/// Prompts of one upstream the agent may get.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptRule {
    /// The MCP upstream (an entry of spec.upstreams) that serves them.
    pub upstream: String,
    /// Prompt names, exactly.
    #[schemars(length(min = 1, max = 256))]
    pub names: Vec<String>,
}

/// Which tools the agent may call.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.allowed) || !has(self.blocked) || self.allowed.all(t, !(t.name in self.blocked))"
).message("a tool cannot be both allowed and blocked; remove it from one of tools.allowed and tools.blocked"))]
pub struct ToolRules {
    /// The tools the agent may call, each with its constraints. Names are unique.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::allowed_tools")]
    pub allowed: Vec<AllowedTool>,
    /// Tools that are always denied. Listing them documents intent and makes the denial name
    /// this rule; unlisted tools are denied anyway.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::tool_name_set")]
    pub blocked: Vec<String>,
}

/// One tool the agent may call, and the constraints each call must meet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.irreversible) || !self.irreversible || has(self.approval)")
        .message("an irreversible tool needs an approval block: irreversible calls always wait for people"),
    validation = Rule::new("!has(self.autonomy) || has(self.approval)")
        .message("autonomy applies to tools with an approval block; add approval or remove autonomy"),
    validation = Rule::new("!has(self.escalateWhen) || (has(self.autonomy) && self.autonomy == 'ExceptionBased')")
        .message("escalateWhen is only meaningful with autonomy ExceptionBased"),
)]
pub struct AllowedTool {
    /// The tool's exact name. No case folding, normalisation or prefix matching is applied.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_.-]{1,128}$")
    )]
    pub name: String,
    /// The upstream (spec.upstreams[].name) that serves this tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub upstream: Option<String>,
    /// Constraints on the call's arguments.
    #[serde(default)]
    pub arguments: ArgumentRules,
    /// The result fields the agent may see; every other top-level field is redacted. Absent
    /// means the result passes unredacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub result_fields: Option<Vec<String>>,
    /// Per-run limits for this tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ToolLimits>,
    /// A CEL condition over `args`, `run` and `agent` that must be true for the call to proceed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub when: Option<String>,
    /// With autonomy ExceptionBased: a CEL condition over `args`, `run` and `agent` that, when
    /// true, sends the call for approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub escalate_when: Option<String>,
    /// The call cannot be undone (an e-mail sent, a record deleted). Requires an approval block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub irreversible: bool,
    /// Who must approve calls, how many, and how long they may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRule>,
    /// How much the tool may do without a person: Gated (approval for every call, the default
    /// with an approval block), ExceptionBased (approval at a constraint boundary or when
    /// escalateWhen holds) or AuditBased (allowed, queued for scheduled review).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autonomy: Option<Autonomy>,
}

/// How much a tool may do without a person.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum Autonomy {
    /// Every call waits for approval.
    #[default]
    Gated,
    /// Calls proceed; approval is asked only at a constraint boundary or when escalateWhen holds.
    ExceptionBased,
    /// Calls proceed and are queued for scheduled review.
    AuditBased,
}

/// Constraints on a call's arguments.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArgumentRules {
    /// Whether argument fields not listed in `fields` are refused (Deny, the default) or passed.
    #[serde(default)]
    pub additional_fields: AdditionalFields,
    /// Constraints per top-level argument field. A listed field may be absent unless `required`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 128))]
    pub fields: BTreeMap<String, FieldConstraint>,
}

/// What to do with argument fields that are not listed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AdditionalFields {
    /// Unlisted fields are refused.
    #[default]
    Deny,
    /// Unlisted fields pass without checks.
    Allow,
}

/// The JSON type an argument must have (JSON Schema names, as tools declare them in MCP).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JsonType {
    /// A JSON string.
    String,
    /// A JSON number without a fractional part.
    Integer,
    /// Any JSON number.
    Number,
    /// true or false.
    Boolean,
    /// A JSON array.
    Array,
    /// A JSON object.
    Object,
}

/// Constraints on one argument field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.minimum) || !has(self.maximum) || self.minimum <= self.maximum")
        .message("minimum must not exceed maximum"),
    validation = Rule::new("!has(self.maxItems) || !has(self.type) || self.type == 'array'")
        .message("maxItems applies to arrays only"),
    validation = Rule::new("!has(self.pattern) || !has(self.type) || self.type == 'string'")
        .message("pattern applies to strings only"),
    validation = Rule::new("!has(self.items) || !has(self.type) || self.type == 'array'")
        .message("items applies to arrays only"),
)]
pub struct FieldConstraint {
    /// The JSON type the value must have.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<JsonType>,
    /// The call is refused when this field is missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// The only string values allowed.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(length(max = 1024)))]
    pub enum_: Option<Vec<String>>,
    /// A regular expression (RE2 syntax) the whole string must match; Tollgate anchors it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
    /// The smallest number allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    /// The largest number allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// The longest string allowed, in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_length: Option<i64>,
    /// The most items an array may hold. Items of nested arrays count one by one, so
    /// `[[a, b, c]]` holds three items, not one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_items: Option<i64>,
    /// What each item of an array must be. Without it an item may be anything, nested arrays
    /// included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemConstraint>,
}

/// Constraints on each item of an array argument.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.minimum) || !has(self.maximum) || self.minimum <= self.maximum")
        .message("minimum must not exceed maximum"),
    validation = Rule::new("!has(self.pattern) || !has(self.type) || self.type == 'string'")
        .message("pattern applies to strings only"),
)]
pub struct ItemConstraint {
    /// The JSON type each item must have.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<JsonType>,
    /// The only string values an item may take.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(length(max = 1024)))]
    pub enum_: Option<Vec<String>>,
    /// A regular expression (RE2 syntax) each string item must match whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
    /// The smallest number an item may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    /// The largest number an item may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// The longest string an item may be, in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_length: Option<i64>,
}

impl From<&ItemConstraint> for FieldConstraint {
    fn from(item: &ItemConstraint) -> Self {
        FieldConstraint {
            type_: item.type_,
            enum_: item.enum_.clone(),
            pattern: item.pattern.clone(),
            minimum: item.minimum,
            maximum: item.maximum,
            max_length: item.max_length,
            ..FieldConstraint::default()
        }
    }
}

/// Per-run limits for one tool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolLimits {
    /// The most calls of this tool in one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_calls_per_run: Option<i64>,
    /// The most items (entries of an array argument) touched in one run, summed over its calls,
    /// so one large call cannot be split into many small ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items_per_run: Option<ItemLimit>,
}

/// A ceiling on the items of one array argument, summed over a run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemLimit {
    /// The array argument whose items are counted.
    #[schemars(length(min = 1, max = 253))]
    pub field: String,
    /// The most items per run.
    #[schemars(range(min = 1))]
    pub max: i64,
}

/// Who approves a tool's calls.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRule {
    /// The people who may decide.
    pub approvers: Approvers,
    /// Distinct approvers needed (1 to 10). Any single Deny denies.
    #[serde(default = "default_min_approvals")]
    #[schemars(range(min = 1, max = 10))]
    pub min_approvals: i32,
    /// How long a call may wait for a decision, in seconds (10 to 604800).
    #[serde(default = "default_approval_timeout")]
    #[schemars(range(min = 10, max = 604800))]
    pub timeout_seconds: i64,
    /// What happens at timeout: the call is denied.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Who to tell when a call waits: names of notification targets configured for the gateway
    /// (the Secret `tollgate-notify`, or `--notify` standalone). Each gets the request when it
    /// is created, a reminder before it expires, and its outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::name_set")]
    pub notify: Vec<String>,
    /// The people to reach when a request waits too long or nobody can decide it (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub contacts: Vec<crate::common::Contact>,
}

fn default_min_approvals() -> i32 {
    1
}

fn default_approval_timeout() -> i64 {
    300
}

/// Ceilings on one run and on one identity over a window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionLimits {
    /// The most tool calls in one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,
    /// The most model tokens one run may use: metered by the gateway when the policy has an llm
    /// upstream (the agent's own reports are then recorded, not charged), else as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens_per_run: Option<i64>,
    /// The longest a run may last, from its first call, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_wall_clock_seconds: Option<i64>,
    /// The most one run may cost, in US dollars, as a decimal string such as "2.00": metered by
    /// the gateway from its price table when the policy has an llm upstream, else as reported.
    #[serde(
        default,
        rename = "maxCostUSD",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,6})?$"))]
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("maxCostUSD must be greater than zero"))]
    pub max_cost_usd: Option<String>,
    /// Ceilings over all runs of the identity in a sliding window, so rotating run ids resets
    /// nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<IdentityWindow>,
    /// What a breach does.
    #[serde(default)]
    pub on_budget_exceeded: BudgetBreach,
}

/// Ceilings over all runs of one identity in a window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityWindow {
    /// The window, as a duration such as 1h or 24h.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("window must be at least 1s"))]
    pub window: String,
    /// The most runs started in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_runs: Option<i64>,
    /// The most all runs in the window may cost, in US dollars, as a decimal string.
    #[serde(
        default,
        rename = "maxCostUSD",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,6})?$"))]
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("maxCostUSD must be greater than zero"))]
    pub max_cost_usd: Option<String>,
}

/// What a budget breach does. The run is always halted and never retried.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetBreach {
    /// The action: HaltAndEscalate (the only one; a breach is never retried).
    #[serde(default)]
    pub action: BreachAction,
    /// Who to tell: names of notification targets configured for the gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::name_set")]
    pub notify: Vec<String>,
    /// Also engage the agent's kill switch.
    #[serde(default)]
    pub engage_kill_switch: bool,
    /// The people who answer a breach, by name with how to reach them (at most 16): a channel
    /// alone is not an escalation path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub contacts: Vec<crate::common::Contact>,
}

/// What a budget breach does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BreachAction {
    /// Halt the run (every further call of it is denied) and escalate to people.
    #[default]
    HaltAndEscalate,
}

/// Guards on the agent's own Kubernetes API writes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesGuards {
    /// Objects the agent may not write, whatever its RBAC says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub protected_resources: Vec<ProtectedResource>,
    /// Periods in which the agent may not write at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub freeze_windows: Vec<FreezeWindow>,
}

/// Objects the agent may not write. On DELETE the existing object's labels are judged.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedResource {
    /// The operations refused.
    #[schemars(length(min = 1, max = 4))]
    pub operations: Vec<Operation>,
    /// API groups of the protected objects; empty means every group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub api_groups: Vec<String>,
    /// Resources (plural names) of the protected objects; empty means every resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub resources: Vec<String>,
    /// Labels of the protected objects.
    pub selector: LabelSelector,
}

/// An admission operation, named as in AdmissionReview.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// Creating an object.
    Create,
    /// Updating or patching an object.
    Update,
    /// Deleting an object.
    Delete,
    /// Connecting to an object (exec, attach, port-forward, proxy).
    Connect,
}

/// A period in which the agent may not write.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("timestamp(self.end) > timestamp(self.start)").message("end must be after start"))]
pub struct FreezeWindow {
    /// When the freeze begins (RFC 3339).
    pub start: Time,
    /// When the freeze ends (RFC 3339).
    pub end: Time,
    /// Why, shown in every denial.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub reason: String,
}

/// The track record that makes a tool eligible for more autonomy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Graduation {
    /// Clean completions needed in the window.
    #[schemars(range(min = 1))]
    pub clean_completions: i64,
    /// The most incidents allowed in the window.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_incidents: i64,
    /// The window, as a duration such as 720h.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1h')").message("window must be at least 1h"))]
    pub window: String,
}

/// What is in force for this policy, as observed by Tollgate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// sha256 of the canonical spec, recorded in every audit record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// Ready and IdentityBound, with reasons and messages that say what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
    /// The track record per tool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::tool_statuses")]
    pub tools: Vec<ToolStatus>,
    /// Permission drift: what is granted but unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftStatus>,
}

/// The track record of one tool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolStatus {
    /// The tool's name.
    pub name: String,
    /// The autonomy in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autonomy: Option<Autonomy>,
    /// Calls completed without incident in the graduation window.
    #[serde(default)]
    pub clean_completions: i64,
    /// Incidents in the graduation window.
    #[serde(default)]
    pub incidents: i64,
    /// When the tool was last called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Time>,
    /// The autonomy the track record would justify. A person decides whether to grant it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eligible_for: Option<Autonomy>,
}

/// Granted but unused rights over a window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriftStatus {
    /// The window evaluated, such as 720h.
    #[serde(default)]
    pub window: String,
    /// When drift was last evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_at: Option<Time>,
    /// Allowed tools not called in the window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unused_tools: Vec<String>,
}
