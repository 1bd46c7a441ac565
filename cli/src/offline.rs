//! Offline commands: they read manifests from files and need no cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tollgate_engine::manifest::{self, Object};
use tollgate_engine::{
    Agent, CompiledPolicy, RunState, ToolCall, WindowState, canonical, children,
};

/// The outcome of `check`: a report for people, and whether everything passed.
#[derive(Debug)]
pub struct CheckReport {
    /// One line per object or problem.
    pub text: String,
    /// Whether every manifest was valid.
    pub ok: bool,
}

/// The YAML files under `paths` (files as given, directories recursively), sorted.
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("read {}", path.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            entries.sort();
            for entry in entries {
                if entry.is_dir() {
                    files.extend(yaml_files(&[entry])?);
                } else if entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    files.push(entry);
                }
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            bail!("{} does not exist", path.display());
        }
    }
    Ok(files)
}

/// Validates every AgentIdentity and AgentPolicy in `paths` as admission will: strict parsing,
/// policy compilation, the escalation check, and that each policy's identity is among them.
pub fn check(paths: &[PathBuf]) -> Result<CheckReport> {
    let mut text = String::new();
    let mut ok = true;
    let mut identities = Vec::new();
    let mut policies = Vec::new();
    for file in yaml_files(paths)? {
        let content =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for object in manifest::parse(&content) {
            match object {
                Err(e) => {
                    ok = false;
                    writeln!(text, "FAIL {}: {e}", file.display())?;
                }
                Ok(Object::Identity(identity)) => {
                    let name = identity.metadata.name.clone().unwrap_or_default();
                    let errors = children::escalation_errors(&identity.spec.kubernetes.rules);
                    if errors.is_empty() {
                        writeln!(
                            text,
                            "ok   AgentIdentity {name}: runs as {}, {} RBAC rule(s)",
                            identity.service_account_name(),
                            identity.spec.kubernetes.rules.len()
                        )?;
                    } else {
                        ok = false;
                        writeln!(text, "FAIL AgentIdentity {name} ({}):", file.display())?;
                        for error in errors {
                            writeln!(text, "       {error}")?;
                        }
                    }
                    identities.push(name);
                }
                Ok(Object::Policy(policy)) => {
                    let name = policy.metadata.name.clone().unwrap_or_default();
                    match CompiledPolicy::compile(&policy) {
                        Ok(compiled) => {
                            writeln!(
                                text,
                                "ok   AgentPolicy {name}: {} allowed tool(s), {}",
                                compiled.allowed_tools().len(),
                                compiled.hash()
                            )?;
                            for warning in result_field_warnings(&policy, &compiled) {
                                writeln!(text, "warn AgentPolicy {name}: {warning}")?;
                            }
                            policies.push((name, compiled.identity().to_owned(), file.clone()));
                        }
                        Err(errors) => {
                            ok = false;
                            writeln!(text, "FAIL AgentPolicy {name} ({}):", file.display())?;
                            for error in errors.0 {
                                writeln!(text, "       {error}")?;
                            }
                        }
                    }
                }
                Ok(Object::Other { .. }) => {}
            }
        }
    }
    for (name, identity, file) in policies {
        if !identities.contains(&identity) {
            ok = false;
            writeln!(
                text,
                "FAIL AgentPolicy {name} ({}): spec.identityRef.name: AgentIdentity {identity:?} is not among the checked manifests",
                file.display()
            )?;
        }
    }
    if text.is_empty() {
        bail!("no AgentIdentity or AgentPolicy found");
    }
    Ok(CheckReport { text, ok })
}

/// The tools whose results are cut to `resultFields` and that an MCP upstream serves: most MCP
/// servers answer text only, and the gateway can cut text only when it is one JSON value; any
/// other result of such a tool is withheld from the agent.
fn result_field_warnings(
    policy: &tollgate_crds::AgentPolicy,
    compiled: &CompiledPolicy,
) -> Vec<String> {
    let mcp = |upstream: Option<&str>| {
        policy
            .spec
            .upstreams
            .iter()
            .any(|u| u.mcp.is_some() && upstream.is_none_or(|name| name == u.name))
    };
    compiled
        .allowed_tools()
        .into_iter()
        .filter(|tool| compiled.result_fields(tool).is_some() && mcp(compiled.upstream_of(tool)))
        .map(|tool| {
            format!(
                "tool {tool} keeps only its resultFields, and its MCP upstream may answer text: \
                 the gateway cuts structuredContent or one JSON text block, and withholds any \
                 other result (prose, several blocks, images) from the agent"
            )
        })
        .collect()
}

/// Every AgentPolicy in the manifests under `paths` (none for no paths).
pub fn policies(paths: &[PathBuf]) -> Result<Vec<tollgate_crds::AgentPolicy>> {
    let mut found = Vec::new();
    if paths.is_empty() {
        return Ok(found);
    }
    for file in yaml_files(paths)? {
        let content =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for object in manifest::parse(&content) {
            if let Object::Policy(policy) = object.with_context(|| file.display().to_string())? {
                found.push(*policy);
            }
        }
    }
    Ok(found)
}

/// Loads the single AgentPolicy of a file.
pub fn load_policy(file: &Path) -> Result<CompiledPolicy> {
    let content =
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let mut found = None;
    for object in manifest::parse(&content) {
        if let Object::Policy(policy) = object.with_context(|| format!("{}", file.display()))? {
            if found.is_some() {
                bail!("{} holds more than one AgentPolicy", file.display());
            }
            found = Some(
                CompiledPolicy::compile(&policy)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
            );
        }
    }
    found.with_context(|| format!("{} holds no AgentPolicy", file.display()))
}

/// What the policy in `file` decides for one call on a fresh run, as JSON.
pub fn decide(
    file: &Path,
    tool: &str,
    arguments: &str,
    run_id: &str,
    now: jiff::Timestamp,
) -> Result<serde_json::Value> {
    let policy = load_policy(file)?;
    let arguments = canonical::parse_strict(arguments.as_bytes()).context("--args")?;
    let agent = Agent {
        name: policy.identity(),
        namespace: "",
        username: "",
        killed: false,
    };
    let call = ToolCall {
        run_id,
        tool,
        arguments: &arguments,
    };
    let decision = policy.evaluate(
        &agent,
        &call,
        &RunState::default(),
        &WindowState::default(),
        now,
    );
    Ok(serde_json::to_value(decision)?)
}
