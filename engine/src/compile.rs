//! Compiling an AgentPolicy into an immutable [`CompiledPolicy`]: tools indexed by exact name,
//! patterns and CEL programs compiled once, costs as decimals, durations parsed, selectors
//! compiled, and a policy hash over the canonical spec.
//!
//! Compilation re-checks everything the CRD schema checks (standalone mode reads YAML that no
//! apiserver has seen) and what the schema cannot (regular expressions, CEL programs, selector
//! operators). It reports every problem at once, each with its field path and a hint.

/// The maps a decision reads: foldhash with its fixed seed, a fraction of SipHash's cost per
/// lookup. Their keys are the policy's own (tool and field names); what an agent sends is only
/// ever looked up, never inserted, so a known seed lets nobody crowd a bucket, and it keeps the
/// instruction counts of `perf/` the same from run to run.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::FixedState>;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use regex::Regex;
use rust_decimal::Decimal;
use tollgate_crds::AgentPolicy;
use tollgate_crds::common::Approvers;
use tollgate_crds::policy::{
    AdditionalFields, AllowedTool, Autonomy, FieldConstraint, JsonType, MAX_TOOL_NAME, Operation,
    ServerRequest,
};

use crate::canonical;
use crate::cel::Condition;
use crate::decision::{Decision, DenyCode, RuleRef};
use crate::duration;
use crate::selector::Selector;

/// One problem in a policy: where, what, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    /// The field path, such as `spec.tools.allowed[2].arguments.fields.customer_id.pattern`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.path, self.message, self.hint)
    }
}

/// Every problem found in one policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CompileErrors(pub Vec<CompileError>);

impl fmt::Display for CompileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the policy has {} problem(s):", self.0.len())?;
        for error in &self.0 {
            write!(f, "\n- {error}")?;
        }
        Ok(())
    }
}

/// Whether a name uses only the tool-name alphabet: ASCII letters, digits, `_`, `-` and `.`.
pub fn is_valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOOL_NAME as usize
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// An AgentPolicy, compiled. Immutable; share it behind an `Arc`.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub(crate) id: Arc<str>,
    pub(crate) generation: Option<i64>,
    pub(crate) hash: Arc<str>,
    pub(crate) identity: String,
    pub(crate) tools: HashMap<String, CompiledTool>,
    pub(crate) blocked: HashSet<String>,
    pub(crate) budget: Budget,
    pub(crate) protected: Vec<ProtectedRule>,
    pub(crate) freezes: Vec<Freeze>,
    pub(crate) graduation: Option<GraduationRule>,
    pub(crate) llm: std::collections::BTreeMap<String, crate::llm::LlmRoute>,
    /// MCP resources the agent may read, by upstream.
    pub(crate) resources: std::collections::BTreeMap<String, Vec<UriRule>>,
    /// MCP prompts the agent may get, by upstream.
    pub(crate) prompts: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The requests each MCP upstream may make of the agent's client (`mcp.serverRequests`).
    pub(crate) server_requests: std::collections::BTreeMap<String, Vec<ServerRequest>>,
}

/// One entry of `spec.resources.allowed[].uris`.
#[derive(Debug, Clone)]
pub(crate) struct UriRule {
    /// `spec.resources.allowed[i].uris[j]`, for the record.
    clause: String,
    /// The URI, or the prefix before a trailing `*`.
    text: String,
    prefix: bool,
}

impl UriRule {
    fn matches(&self, uri: &str) -> bool {
        if self.prefix {
            uri.starts_with(&self.text) && !has_dot_segment(uri)
        } else {
            uri == self.text
        }
    }
}

/// Whether `uri` has a `..` segment, plain or percent-encoded, which could climb out of a
/// prefix once the server resolves it.
fn has_dot_segment(uri: &str) -> bool {
    let lower = uri.to_ascii_lowercase().replace("%2e", ".");
    lower.split(['/', '\\']).any(|segment| {
        segment == ".." || segment.starts_with("..%2f") || segment.starts_with("..%5c")
    }) || lower.contains("%2f..")
        || lower.contains("%5c..")
}

#[derive(Debug)]
pub(crate) struct CompiledTool {
    pub(crate) name: Arc<str>,
    pub(crate) upstream: Option<String>,
    pub(crate) additional: AdditionalFields,
    pub(crate) fields: HashMap<String, FieldCheck>,
    pub(crate) required: Vec<String>,
    pub(crate) result_fields: Option<Vec<String>>,
    pub(crate) max_calls: Option<u64>,
    pub(crate) max_items: Option<(String, u64)>,
    pub(crate) when: Option<Condition>,
    pub(crate) escalate_when: Option<Condition>,
    pub(crate) irreversible: bool,
    pub(crate) approval: Option<Approval>,
    pub(crate) autonomy: Option<Autonomy>,
}

#[derive(Debug, Clone)]
pub(crate) struct Approval {
    pub(crate) approvers: Approvers,
    pub(crate) min_approvals: u32,
    pub(crate) timeout: Duration,
    pub(crate) notify: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct FieldCheck {
    pub(crate) type_: Option<JsonType>,
    pub(crate) enum_: Option<Vec<String>>,
    pub(crate) pattern: Option<(Regex, String)>,
    pub(crate) minimum: Option<f64>,
    pub(crate) maximum: Option<f64>,
    pub(crate) max_length: Option<u64>,
    pub(crate) max_items: Option<u64>,
    /// What each item of an array must be.
    pub(crate) items: Option<Box<FieldCheck>>,
}

/// Per-run and per-identity ceilings.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Budget {
    pub(crate) max_steps: Option<u64>,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) max_wall_clock: Option<Duration>,
    pub(crate) max_cost: Option<Decimal>,
    pub(crate) window: Option<Duration>,
    pub(crate) window_max_runs: Option<u64>,
    pub(crate) window_max_cost: Option<Decimal>,
    pub(crate) engage_kill_switch: bool,
    pub(crate) notify: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct ProtectedRule {
    pub(crate) index: usize,
    pub(crate) operations: Vec<Operation>,
    pub(crate) api_groups: Vec<String>,
    pub(crate) resources: Vec<String>,
    pub(crate) selector: Selector,
}

#[derive(Debug)]
pub(crate) struct Freeze {
    pub(crate) index: usize,
    pub(crate) start: Timestamp,
    pub(crate) end: Timestamp,
    pub(crate) reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GraduationRule {
    pub(crate) clean_completions: u64,
    pub(crate) max_incidents: u64,
    pub(crate) window: Duration,
}

impl CompiledPolicy {
    /// `namespace/name` of the policy.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `sha256:<hex>` over the canonical spec; recorded in every audit record.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The metadata.generation compiled.
    pub fn generation(&self) -> Option<i64> {
        self.generation
    }

    /// The per-identity budget window (`spec.execution.perIdentity.window`), if the policy sets
    /// one.
    pub fn budget_window(&self) -> Option<std::time::Duration> {
        self.budget.window
    }

    /// The ceilings the policy sets, for dashboards: `maxSteps`, `maxTokensPerRun`,
    /// `maxCostUSDPerRun`, `maxRunsPerWindow` and `maxCostUSDPerWindow`, those it sets.
    pub fn ceilings(&self) -> Vec<(&'static str, f64)> {
        use rust_decimal::prelude::ToPrimitive as _;
        let b = &self.budget;
        [
            ("maxSteps", b.max_steps.map(|v| v as f64)),
            ("maxTokensPerRun", b.max_tokens.map(|v| v as f64)),
            ("maxCostUSDPerRun", b.max_cost.and_then(|v| v.to_f64())),
            ("maxRunsPerWindow", b.window_max_runs.map(|v| v as f64)),
            (
                "maxCostUSDPerWindow",
                b.window_max_cost.and_then(|v| v.to_f64()),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect()
    }

    /// The AgentIdentity (in the policy's namespace) this policy governs.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether `agent` (`namespace/name`, as the gateway records it) is the identity this policy
    /// governs. A policy read from a file without a namespace governs that name in any namespace.
    pub fn governs(&self, agent: &str) -> bool {
        match self.id.split_once('/') {
            Some((namespace, _)) if !namespace.is_empty() => agent
                .split_once('/')
                .is_some_and(|(ns, name)| ns == namespace && name == self.identity),
            _ => agent.rsplit('/').next() == Some(self.identity.as_str()),
        }
    }

    /// The agent this policy governs as the gateway records it (`namespace/name`), when the
    /// policy has a namespace.
    pub fn agent(&self) -> Option<String> {
        match self.id.split_once('/') {
            Some((namespace, _)) if !namespace.is_empty() => {
                Some(format!("{namespace}/{}", self.identity))
            }
            _ => None,
        }
    }

    /// The names of the allowed tools, sorted.
    pub fn allowed_tools(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tools.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether `name` is an allowed tool (exact match).
    pub fn allows_tool(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// The upstream that serves an allowed tool.
    pub fn upstream_of(&self, tool: &str) -> Option<&str> {
        self.tools.get(tool)?.upstream.as_deref()
    }

    /// Whether `upstream`'s MCP proxy may offer and forward `tool`: the tool is allowed, and
    /// served by that upstream (or names none).
    pub fn serves_through(&self, tool: &str, upstream: &str) -> bool {
        self.tools
            .get(tool)
            .is_some_and(|t| t.upstream.as_deref().is_none_or(|u| u == upstream))
    }

    /// The clause of the rule that lets the agent read resource `uri` of `upstream`, if one does.
    pub fn reads_resource(&self, upstream: &str, uri: &str) -> Option<&str> {
        self.resources
            .get(upstream)?
            .iter()
            .find(|rule| rule.matches(uri))
            .map(|rule| rule.clause.as_str())
    }

    /// Whether `agent` may read resource `uri` of `upstream` (`resources/read`), and by which
    /// rule: its kill switch first, then `spec.resources`.
    pub fn decide_resource(&self, killed: bool, upstream: &str, uri: &str) -> Decision {
        self.decide_content(
            killed,
            "resources/read",
            || {
                self.reads_resource(upstream, uri).map(str::to_owned).ok_or_else(|| {
                format!("resource {uri:?} of upstream {upstream:?} is not listed in spec.resources")
            })
            },
            "spec.resources",
        )
    }

    /// Whether `agent` may get prompt `name` of `upstream` (`prompts/get`), and by which rule.
    pub fn decide_prompt(&self, killed: bool, upstream: &str, name: &str) -> Decision {
        self.decide_content(
            killed,
            "prompts/get",
            || {
                if self.gets_prompt(upstream, name) {
                    Ok("spec.prompts".to_owned())
                } else {
                    Err(format!(
                        "prompt {name:?} of upstream {upstream:?} is not listed in spec.prompts"
                    ))
                }
            },
            "spec.prompts",
        )
    }

    fn decide_content(
        &self,
        killed: bool,
        method: &'static str,
        rule: impl FnOnce() -> Result<String, String>,
        section: &'static str,
    ) -> Decision {
        let at = |clause: String| RuleRef {
            policy: self.id.clone(),
            generation: self.generation,
            policy_hash: self.hash.clone(),
            tool: Some(method.into()),
            clause: clause.into(),
        };
        if killed {
            return Decision::Deny {
                code: DenyCode::KillSwitch,
                rule: at("spec.killSwitch".to_owned()),
                message: "the agent's kill switch is engaged".to_owned(),
            };
        }
        match rule() {
            Ok(clause) => Decision::Allow {
                rule: at(clause),
                review: false,
            },
            Err(message) => Decision::Deny {
                code: DenyCode::ContentNotAllowed,
                rule: at(section.to_owned()),
                message,
            },
        }
    }

    /// Whether the agent may read any resource of `upstream`.
    pub fn offers_resources(&self, upstream: &str) -> bool {
        self.resources.contains_key(upstream)
    }

    /// Whether a resource template of `upstream` can only name resources the agent may read:
    /// its literal part before the first `{` lies within a prefix rule.
    pub fn serves_template(&self, upstream: &str, template: &str) -> bool {
        let literal = template.split('{').next().unwrap_or_default();
        self.resources.get(upstream).is_some_and(|rules| {
            rules.iter().any(|rule| {
                rule.prefix && literal.starts_with(&rule.text) && !has_dot_segment(literal)
            })
        })
    }

    /// Whether the agent may get prompt `name` of `upstream`.
    pub fn gets_prompt(&self, upstream: &str, name: &str) -> bool {
        self.prompts
            .get(upstream)
            .is_some_and(|names| names.contains(name))
    }

    /// Whether the agent may get any prompt of `upstream`.
    pub fn offers_prompts(&self, upstream: &str) -> bool {
        self.prompts.contains_key(upstream)
    }

    /// Whether MCP upstream `upstream` may make the request `method` of the agent's client
    /// (`elicitation/create`, `sampling/createMessage`, `roots/list`): only what its
    /// `mcp.serverRequests` names.
    pub fn lets_server_ask(&self, upstream: &str, method: &str) -> bool {
        ServerRequest::of_method(method).is_some_and(|kind| {
            self.server_requests
                .get(upstream)
                .is_some_and(|kinds| kinds.contains(&kind))
        })
    }

    /// The kinds of request `upstream` may make of the agent's client, for the client
    /// capabilities the server may learn of.
    pub fn server_requests(&self, upstream: &str) -> &[ServerRequest] {
        self.server_requests
            .get(upstream)
            .map_or(&[], Vec::as_slice)
    }

    /// The result fields an allowed tool may return, if it restricts them.
    pub fn result_fields(&self, tool: &str) -> Option<&[String]> {
        self.tools.get(tool)?.result_fields.as_deref()
    }

    /// Compiles a policy, reporting every problem found.
    pub fn compile(policy: &AgentPolicy) -> Result<Self, CompileErrors> {
        let mut errors = Errors::default();
        let spec = &policy.spec;
        let name = policy.metadata.name.clone().unwrap_or_default();
        let namespace = policy.metadata.namespace.clone().unwrap_or_default();
        if name.is_empty() {
            errors.push(
                "metadata.name",
                "the policy has no name",
                "set metadata.name",
            );
        }
        if spec.identity_ref.name.is_empty() {
            errors.push(
                "spec.identityRef.name",
                "no AgentIdentity is named",
                "name the AgentIdentity this policy governs",
            );
        }

        let mut upstreams = HashSet::default();
        let mut llm_routes = std::collections::BTreeMap::new();
        let mut server_requests = std::collections::BTreeMap::new();
        for (i, upstream) in spec.upstreams.iter().enumerate() {
            if !upstreams.insert(upstream.name.as_str()) {
                errors.push(
                    format!("spec.upstreams[{i}].name"),
                    format!("upstream {:?} is declared twice", upstream.name),
                    "give each upstream a unique name",
                );
            }
            if let Some(mcp) = &upstream.mcp {
                check_mcp_upstream(i, mcp, &mut errors);
                if !mcp.server_requests.is_empty() {
                    let mut kinds = mcp.server_requests.clone();
                    kinds.sort_by_key(|kind| kind.method());
                    kinds.dedup();
                    server_requests.insert(upstream.name.clone(), kinds);
                }
            }
            if let Some(llm) = &upstream.llm {
                if upstream.mcp.is_some() {
                    errors.push(
                        format!("spec.upstreams[{i}]"),
                        "an upstream cannot be both an MCP server and a model provider",
                        "declare two upstreams, one with mcp and one with llm",
                    );
                }
                match crate::llm::compile_route(llm) {
                    Ok(route) => {
                        llm_routes.insert(upstream.name.clone(), route);
                    }
                    Err(e) => errors.push(
                        format!("spec.upstreams[{i}].llm"),
                        e,
                        "give the provider's base URL and the models the agent may use",
                    ),
                }
            }
        }

        let mut blocked = HashSet::default();
        for (i, tool) in spec.tools.blocked.iter().enumerate() {
            if !is_valid_tool_name(tool) {
                errors.push(format!("spec.tools.blocked[{i}]"), format!("{tool:?} is not a valid tool name"), "tool names use ASCII letters, digits, '_', '-' and '.', at most 128 characters");
            }
            blocked.insert(tool.clone());
        }

        let mut tools = HashMap::default();
        for (i, tool) in spec.tools.allowed.iter().enumerate() {
            let path = format!("spec.tools.allowed[{i}]");
            if blocked.contains(&tool.name) {
                errors.push(
                    format!("{path}.name"),
                    format!("tool {:?} is both allowed and blocked", tool.name),
                    "remove it from tools.allowed or from tools.blocked",
                );
            }
            if tools.contains_key(&tool.name) {
                errors.push(
                    format!("{path}.name"),
                    format!("tool {:?} is allowed twice", tool.name),
                    "merge the two entries",
                );
                continue;
            }
            if let Some(upstream) = &tool.upstream
                && !upstreams.contains(upstream.as_str())
            {
                errors.push(
                    format!("{path}.upstream"),
                    format!("upstream {upstream:?} is not declared in spec.upstreams"),
                    "declare it in spec.upstreams or fix the name",
                );
            }
            if let Some(compiled) = compile_tool(&path, tool, &mut errors) {
                tools.insert(tool.name.clone(), compiled);
            }
        }

        let budget = compile_budget(spec.execution.as_ref(), &mut errors);
        let mcp_upstreams: HashSet<&str> = spec
            .upstreams
            .iter()
            .filter(|u| u.mcp.is_some())
            .map(|u| u.name.as_str())
            .collect();
        let (resources, prompts) = compile_content(spec, &mcp_upstreams, &mut errors);

        let mut protected = Vec::new();
        let mut freezes = Vec::new();
        if let Some(guards) = &spec.kubernetes {
            for (i, rule) in guards.protected_resources.iter().enumerate() {
                let path = format!("spec.kubernetes.protectedResources[{i}]");
                if rule.operations.is_empty() {
                    errors.push(
                        format!("{path}.operations"),
                        "no operation is listed",
                        "list CREATE, UPDATE, DELETE or CONNECT",
                    );
                }
                match Selector::compile(&rule.selector) {
                    Ok(selector) => protected.push(ProtectedRule {
                        index: i,
                        operations: rule.operations.clone(),
                        api_groups: rule.api_groups.clone(),
                        resources: rule.resources.clone(),
                        selector,
                    }),
                    Err(e) => errors.push(format!("{path}.selector"), e, "fix the label selector"),
                }
            }
            for (i, window) in guards.freeze_windows.iter().enumerate() {
                if window.end.0 <= window.start.0 {
                    errors.push(
                        format!("spec.kubernetes.freezeWindows[{i}].end"),
                        "the window ends before it starts",
                        "make end later than start",
                    );
                }
                freezes.push(Freeze {
                    index: i,
                    start: window.start.0,
                    end: window.end.0,
                    reason: window.reason.clone(),
                });
            }
        }

        let graduation = spec.graduation.as_ref().and_then(|g| {
            let window = parse_duration("spec.graduation.window", &g.window, &mut errors)?;
            if g.clean_completions < 1 {
                errors.push(
                    "spec.graduation.cleanCompletions",
                    "must be at least 1",
                    "set how many clean completions earn more autonomy",
                );
            }
            Some(GraduationRule {
                clean_completions: g.clean_completions.max(1) as u64,
                max_incidents: g.max_incidents.max(0) as u64,
                window,
            })
        });

        if !errors.0.is_empty() {
            return Err(CompileErrors(errors.0));
        }
        let spec_value = serde_json::to_value(spec).expect("a policy spec serialises to JSON");
        Ok(CompiledPolicy {
            id: if namespace.is_empty() {
                name.into()
            } else {
                format!("{namespace}/{name}").into()
            },
            generation: policy.metadata.generation,
            hash: canonical::digest(&spec_value).into(),
            identity: spec.identity_ref.name.clone(),
            tools,
            blocked,
            budget,
            protected,
            freezes,
            graduation,
            llm: llm_routes,
            resources,
            prompts,
            server_requests,
        })
    }
}

#[derive(Default)]
struct Errors(Vec<CompileError>);

impl Errors {
    fn push(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.0.push(CompileError {
            path: path.into(),
            message: message.into(),
            hint: hint.into(),
        });
    }
}

fn positive(path: &str, value: Option<i64>, errors: &mut Errors) -> Option<u64> {
    match value {
        Some(v) if v < 1 => {
            errors.push(
                path,
                format!("{v} is not a positive number"),
                "use a ceiling of at least 1, or remove it",
            );
            None
        }
        other => other.map(|v| v as u64),
    }
}

fn parse_duration(path: &str, text: &str, errors: &mut Errors) -> Option<Duration> {
    match duration::parse(text) {
        Ok(d) if d.is_zero() => {
            errors.push(
                path,
                "the duration is zero",
                "use a positive duration such as 1h",
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(path, e, "write a duration such as 90s, 15m, 1h or 720h");
            None
        }
    }
}

fn parse_usd(path: &str, text: &str, errors: &mut Errors) -> Option<Decimal> {
    let valid_shape = text.split_once('.').map_or(
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()),
        |(whole, fraction)| {
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && (1..=6).contains(&fraction.len())
                && fraction.bytes().all(|b| b.is_ascii_digit())
        },
    );
    match text.parse::<Decimal>() {
        Ok(d) if valid_shape && d > Decimal::ZERO => Some(d),
        _ => {
            errors.push(
                path,
                format!("{text:?} is not a positive amount of US dollars"),
                "write a decimal string such as \"2.00\"",
            );
            None
        }
    }
}

fn compile_budget(
    execution: Option<&tollgate_crds::policy::ExecutionLimits>,
    errors: &mut Errors,
) -> Budget {
    let Some(execution) = execution else {
        return Budget::default();
    };
    let mut budget = Budget {
        max_steps: positive("spec.execution.maxSteps", execution.max_steps, errors),
        max_tokens: positive(
            "spec.execution.maxTokensPerRun",
            execution.max_tokens_per_run,
            errors,
        ),
        max_wall_clock: positive(
            "spec.execution.maxWallClockSeconds",
            execution.max_wall_clock_seconds,
            errors,
        )
        .map(Duration::from_secs),
        max_cost: execution
            .max_cost_usd
            .as_deref()
            .and_then(|c| parse_usd("spec.execution.maxCostUSD", c, errors)),
        engage_kill_switch: execution.on_budget_exceeded.engage_kill_switch,
        notify: execution.on_budget_exceeded.notify.clone(),
        ..Budget::default()
    };
    if let Some(window) = &execution.per_identity {
        budget.window = parse_duration("spec.execution.perIdentity.window", &window.window, errors);
        budget.window_max_runs = positive(
            "spec.execution.perIdentity.maxRuns",
            window.max_runs,
            errors,
        );
        budget.window_max_cost = window
            .max_cost_usd
            .as_deref()
            .and_then(|c| parse_usd("spec.execution.perIdentity.maxCostUSD", c, errors));
    }
    budget
}

fn compile_tool(path: &str, tool: &AllowedTool, errors: &mut Errors) -> Option<CompiledTool> {
    let before = errors.0.len();
    if !is_valid_tool_name(&tool.name) {
        errors.push(
            format!("{path}.name"),
            format!("{:?} is not a valid tool name", tool.name),
            "tool names use ASCII letters, digits, '_', '-' and '.', at most 128 characters",
        );
    }
    if tool.irreversible && tool.approval.is_none() {
        errors.push(
            format!("{path}.approval"),
            format!(
                "tool {:?} is irreversible but has no approval block",
                tool.name
            ),
            "add approval with its approvers: irreversible calls always wait for people",
        );
    }
    if tool.autonomy.is_some() && tool.approval.is_none() {
        errors.push(
            format!("{path}.autonomy"),
            "autonomy is set but the tool has no approval block",
            "add an approval block or remove autonomy",
        );
    }
    if tool.escalate_when.is_some() && tool.autonomy != Some(Autonomy::ExceptionBased) {
        errors.push(
            format!("{path}.escalateWhen"),
            "escalateWhen is only used with autonomy ExceptionBased",
            "set autonomy: ExceptionBased or remove escalateWhen",
        );
    }

    let mut fields = HashMap::default();
    let mut required = Vec::new();
    for (field, constraint) in &tool.arguments.fields {
        let field_path = format!("{path}.arguments.fields.{field}");
        if let Some(check) = compile_field(&field_path, constraint, errors) {
            if constraint.required {
                required.push(field.clone());
            }
            fields.insert(field.clone(), check);
        }
    }
    required.sort_unstable();

    let approval = tool.approval.as_ref().map(|a| {
        if a.approvers.groups.is_empty() && a.approvers.users.is_empty() {
            errors.push(
                format!("{path}.approval.approvers"),
                "nobody can approve",
                "name at least one approver group or user",
            );
        }
        if !(1..=10).contains(&a.min_approvals) {
            errors.push(
                format!("{path}.approval.minApprovals"),
                format!("{} is outside 1 to 10", a.min_approvals),
                "ask for between 1 and 10 distinct approvers",
            );
        }
        if a.timeout_seconds < 10 {
            errors.push(
                format!("{path}.approval.timeoutSeconds"),
                format!("{} seconds is too short for a person", a.timeout_seconds),
                "allow at least 10 seconds",
            );
        }
        Approval {
            approvers: a.approvers.clone(),
            min_approvals: a.min_approvals.clamp(1, 10) as u32,
            timeout: Duration::from_secs(a.timeout_seconds.max(10) as u64),
            notify: a.notify.clone(),
        }
    });

    let limits = tool.limits.clone().unwrap_or_default();
    let max_calls = positive(
        &format!("{path}.limits.maxCallsPerRun"),
        limits.max_calls_per_run,
        errors,
    );
    let max_items = limits.max_items_per_run.as_ref().and_then(|limit| {
        let limit_path = format!("{path}.limits.maxItemsPerRun");
        let declared = fields.get(&limit.field);
        if declared.is_none() && tool.arguments.additional_fields == AdditionalFields::Deny {
            errors.push(
                format!("{limit_path}.field"),
                format!(
                    "{:?} is not an allowed argument, so the limit could never count",
                    limit.field
                ),
                "declare the field under arguments.fields",
            );
        }
        if let Some(check) = declared
            && check.type_.is_some_and(|t| t != JsonType::Array)
        {
            errors.push(
                format!("{limit_path}.field"),
                format!("{:?} is not declared as an array", limit.field),
                "count items of an argument with type: array",
            );
        }
        positive(&format!("{limit_path}.max"), Some(limit.max), errors)
            .map(|max| (limit.field.clone(), max))
    });

    let when = tool
        .when
        .as_deref()
        .and_then(|source| compile_condition(&format!("{path}.when"), source, errors));
    let escalate_when = tool
        .escalate_when
        .as_deref()
        .and_then(|source| compile_condition(&format!("{path}.escalateWhen"), source, errors));

    (errors.0.len() == before).then(|| CompiledTool {
        name: tool.name.as_str().into(),
        upstream: tool.upstream.clone(),
        additional: tool.arguments.additional_fields,
        fields,
        required,
        result_fields: tool.result_fields.clone(),
        max_calls,
        max_items,
        when,
        escalate_when,
        irreversible: tool.irreversible,
        autonomy: approval.as_ref().map(|_| tool.autonomy.unwrap_or_default()),
        approval,
    })
}

fn compile_condition(path: &str, source: &str, errors: &mut Errors) -> Option<Condition> {
    match Condition::compile(source) {
        Ok(condition) => Some(condition),
        Err(e) => {
            errors.push(
                path,
                e,
                "write a CEL expression over args, run and agent that returns a bool",
            );
            None
        }
    }
}

fn compile_field(
    path: &str,
    constraint: &FieldConstraint,
    errors: &mut Errors,
) -> Option<FieldCheck> {
    let before = errors.0.len();
    let pattern =
        constraint
            .pattern
            .as_ref()
            .and_then(|p| match Regex::new(&format!("^(?:{p})$")) {
                Ok(regex) => Some((regex, p.clone())),
                Err(e) => {
                    errors.push(
                        format!("{path}.pattern"),
                        format!("invalid regular expression: {e}"),
                        "use RE2 syntax; Tollgate anchors the pattern",
                    );
                    None
                }
            });
    let is = |t: JsonType| constraint.type_.is_none_or(|declared| declared == t);
    if constraint.pattern.is_some() && !is(JsonType::String) {
        errors.push(
            format!("{path}.pattern"),
            "pattern applies to strings only",
            "set type: string or remove pattern",
        );
    }
    if constraint.enum_.is_some() && !is(JsonType::String) {
        errors.push(
            format!("{path}.enum"),
            "enum lists string values",
            "set type: string or remove enum",
        );
    }
    if constraint.max_length.is_some() && !is(JsonType::String) {
        errors.push(
            format!("{path}.maxLength"),
            "maxLength applies to strings only",
            "set type: string or remove maxLength",
        );
    }
    let items = constraint.items.as_ref().and_then(|item| {
        if !is(JsonType::Array) {
            errors.push(
                format!("{path}.items"),
                "items applies to arrays only",
                "set type: array or remove items",
            );
        }
        compile_field(&format!("{path}.items"), &item.into(), errors).map(Box::new)
    });
    if constraint.max_items.is_some() && !is(JsonType::Array) {
        errors.push(
            format!("{path}.maxItems"),
            "maxItems applies to arrays only",
            "set type: array or remove maxItems",
        );
    }
    if (constraint.minimum.is_some() || constraint.maximum.is_some())
        && !(is(JsonType::Number) || is(JsonType::Integer))
    {
        errors.push(
            format!("{path}.minimum"),
            "minimum and maximum apply to numbers only",
            "set type: number or integer",
        );
    }
    if let (Some(min), Some(max)) = (constraint.minimum, constraint.maximum)
        && min > max
    {
        errors.push(
            format!("{path}.minimum"),
            format!("minimum {min} exceeds maximum {max}"),
            "swap or fix the bounds",
        );
    }
    for (name, value) in [
        ("minimum", constraint.minimum),
        ("maximum", constraint.maximum),
    ] {
        if value.is_some_and(|v| !v.is_finite()) {
            errors.push(
                format!("{path}.{name}"),
                "the bound is not a finite number",
                "use a finite number",
            );
        }
    }
    for (name, value) in [
        ("maxLength", constraint.max_length),
        ("maxItems", constraint.max_items),
    ] {
        if value.is_some_and(|v| v < 0) {
            errors.push(
                format!("{path}.{name}"),
                "the bound is negative",
                "use zero or more",
            );
        }
    }
    (errors.0.len() == before).then(|| FieldCheck {
        type_: constraint.type_,
        enum_: constraint.enum_.clone(),
        pattern,
        minimum: constraint.minimum,
        maximum: constraint.maximum,
        max_length: constraint.max_length.map(|v| v as u64),
        max_items: constraint.max_items.map(|v| v as u64),
        items,
    })
}

/// An MCP upstream is a URL or a stdio command, exactly one, each well formed.
fn check_mcp_upstream(i: usize, mcp: &tollgate_crds::policy::McpUpstream, errors: &mut Errors) {
    let at = |field: &str| format!("spec.upstreams[{i}].mcp{field}");
    if mcp
        .timeout_seconds
        .is_some_and(|t| !(1..=86_400).contains(&t))
    {
        errors.push(
            at(".timeoutSeconds"),
            "must be 1 to 86400 seconds",
            "give the longest one request to this server may take",
        );
    }
    match (&mcp.url, &mcp.stdio) {
        (Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                errors.push(
                    at(".url"),
                    format!("{url:?} is not an http or https URL"),
                    "use the MCP server's full URL, such as http://tools.ns.svc:8080/mcp",
                );
            }
        }
        (None, Some(stdio)) => {
            if mcp.transport.is_some() {
                errors.push(
                    at(".transport"),
                    "transport is how the server at url speaks; a stdio server has no url",
                    "remove transport",
                );
            }
            if stdio.command.trim().is_empty() || stdio.command.contains('\0') {
                errors.push(
                    at(".stdio.command"),
                    "the command is empty or holds a NUL byte",
                    "name the program, such as npx or /usr/local/bin/server",
                );
            }
            if stdio.args.len() > 64 || stdio.args.iter().any(|a| a.contains('\0')) {
                errors.push(
                    at(".stdio.args"),
                    "more than 64 arguments, or one holding a NUL byte",
                    "pass at most 64 arguments of text",
                );
            }
            let name_ok = |name: &str| {
                !name.is_empty()
                    && name.len() <= 128
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            for (name, value) in &stdio.env {
                if !name_ok(name) || value.contains('\0') {
                    errors.push(
                        at(&format!(".stdio.env[{name}]")),
                        "not a variable name (letters, digits and _, not starting with a digit), or a value holding a NUL byte",
                        "name variables as a shell would",
                    );
                }
            }
            if stdio.env.len() > 64 {
                errors.push(
                    at(".stdio.env"),
                    "more than 64 variables",
                    "pass at most 64",
                );
            }
            if let Some(name) = &stdio.credential_env
                && (!name_ok(name) || stdio.env.contains_key(name))
            {
                errors.push(
                    at(".stdio.credentialEnv"),
                    format!("{name:?} is not a variable name, or env sets it too"),
                    "name one variable env does not set",
                );
            }
        }
        _ => errors.push(
            at(""),
            "an MCP upstream has either a url or a stdio command, exactly one",
            "give it url for a server over HTTP, or stdio for one the gateway starts",
        ),
    }
}

type Resources = std::collections::BTreeMap<String, Vec<UriRule>>;
type Prompts = std::collections::BTreeMap<String, std::collections::BTreeSet<String>>;

/// `spec.resources` and `spec.prompts`: each names an MCP upstream; URIs and names are text, a
/// `*` only at a URI's end, and a prefix never holds a `..` segment.
fn compile_content(
    spec: &tollgate_crds::policy::AgentPolicySpec,
    mcp_upstreams: &HashSet<&str>,
    errors: &mut Errors,
) -> (Resources, Prompts) {
    let mut resources = Resources::new();
    let upstream_ok = |path: String, upstream: &str, errors: &mut Errors| {
        let ok = mcp_upstreams.contains(upstream);
        if !ok {
            errors.push(
                path,
                format!("upstream {upstream:?} is not an MCP upstream in spec.upstreams"),
                "declare it with mcp in spec.upstreams or fix the name",
            );
        }
        ok
    };
    for (i, rule) in spec.resources.iter().flat_map(|r| &r.allowed).enumerate() {
        let path = format!("spec.resources.allowed[{i}]");
        if !upstream_ok(format!("{path}.upstream"), &rule.upstream, errors) {
            continue;
        }
        if rule.uris.is_empty() {
            errors.push(
                format!("{path}.uris"),
                "no URI is listed",
                "list the URIs, or a prefix ending in *",
            );
        }
        for (j, uri) in rule.uris.iter().enumerate() {
            let clause = format!("{path}.uris[{j}]");
            let (text, prefix) = match uri.strip_suffix('*') {
                Some(text) => (text, true),
                None => (uri.as_str(), false),
            };
            if text.is_empty() || text.contains('*') || text.len() > 2048 || has_dot_segment(text) {
                errors.push(
                    clause,
                    format!("{uri:?} is empty, has a * before its end, is over 2048 bytes or has a .. segment"),
                    "write a URI, or a prefix followed by one *",
                );
                continue;
            }
            resources
                .entry(rule.upstream.clone())
                .or_default()
                .push(UriRule {
                    clause,
                    text: text.to_owned(),
                    prefix,
                });
        }
    }
    let mut prompts = Prompts::new();
    for (i, rule) in spec.prompts.iter().flat_map(|r| &r.allowed).enumerate() {
        let path = format!("spec.prompts.allowed[{i}]");
        if !upstream_ok(format!("{path}.upstream"), &rule.upstream, errors) {
            continue;
        }
        if rule.names.is_empty() || rule.names.iter().any(|n| n.is_empty() || n.len() > 256) {
            errors.push(
                format!("{path}.names"),
                "a name is empty or over 256 bytes, or none is listed",
                "list the prompts by name",
            );
            continue;
        }
        prompts
            .entry(rule.upstream.clone())
            .or_default()
            .extend(rule.names.iter().cloned());
    }
    (resources, prompts)
}
