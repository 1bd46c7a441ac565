//! The standalone policy source: a directory of AgentIdentity and AgentPolicy YAML, compiled
//! with the engine and reloaded when a file changes.
//!
//! An agent whose policy fails to compile, or that has none, stays known with the reason, so
//! every call it makes is denied with that reason; it never silently keeps an older version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tollgate_crds::identity::{AgentIdentity, ToolCredential};
use tollgate_engine::CompiledPolicy;
use tollgate_engine::manifest::{self, Object};

/// Namespace of manifests that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One agent as the gateway knows it.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    /// `namespace/name` of the AgentIdentity.
    pub id: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Whether its kill switch is engaged.
    pub killed: bool,
    /// Its compiled policy, or why there is none.
    pub policy: Result<Arc<CompiledPolicy>, String>,
    /// MCP endpoints of the policy's upstreams, by name.
    pub upstreams: BTreeMap<String, String>,
    /// Per-upstream credentials the gateway adds when it forwards (the agent never holds them).
    pub credentials: Vec<ToolCredential>,
}

/// Every agent, by `namespace/name`.
#[derive(Debug, Default)]
pub struct PolicySet {
    /// The agents.
    pub agents: BTreeMap<String, AgentEntry>,
    /// Files that could not be read or parsed, with the reason.
    pub problems: Vec<String>,
}

fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or(DEFAULT_NAMESPACE))
}

impl PolicySet {
    /// Loads every *.yaml / *.yml file under `dir` (recursively).
    pub fn load(dir: &Path) -> Self {
        let mut set = Self::default();
        type Upstreams = BTreeMap<String, String>;
        let mut policies: Vec<(String, Result<CompiledPolicy, String>, Upstreams)> = Vec::new();
        for file in yaml_files(dir) {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    set.problems.push(format!("{}: {e}", file.display()));
                    continue;
                }
            };
            for object in manifest::parse(&text) {
                match object {
                    Err(e) => set.problems.push(format!("{}: {e}", file.display())),
                    Ok(Object::Identity(identity)) => set.add_identity(&identity),
                    Ok(Object::Policy(policy)) => {
                        let target = key(
                            policy.metadata.namespace.as_deref(),
                            &policy.spec.identity_ref.name,
                        );
                        let name = key(
                            policy.metadata.namespace.as_deref(),
                            policy.metadata.name.as_deref().unwrap_or_default(),
                        );
                        let compiled = CompiledPolicy::compile(&policy).map_err(|e| {
                            format!(
                                "AgentPolicy {name} ({}) does not compile: {e}",
                                file.display()
                            )
                        });
                        let upstreams = policy
                            .spec
                            .upstreams
                            .iter()
                            .filter_map(|u| Some((u.name.clone(), u.mcp.as_ref()?.url.clone())))
                            .collect();
                        policies.push((target, compiled, upstreams));
                    }
                    Ok(Object::Other { .. }) => {}
                }
            }
        }
        for (target, compiled, upstreams) in policies {
            let Some(agent) = set.agents.get_mut(&target) else {
                set.problems.push(format!(
                    "an AgentPolicy names AgentIdentity {target}, which is not in the directory"
                ));
                continue;
            };
            agent.policy = match (&agent.policy, compiled) {
                (Err(reason), Ok(policy)) if reason.starts_with("no AgentPolicy") => {
                    agent.upstreams = upstreams;
                    Ok(Arc::new(policy))
                }
                (_, Err(reason)) => Err(reason),
                (_, Ok(_)) => Err(format!(
                    "more than one AgentPolicy names AgentIdentity {target}; exactly one must"
                )),
            };
        }
        set
    }

    fn add_identity(&mut self, identity: &AgentIdentity) {
        let name = identity.metadata.name.clone().unwrap_or_default();
        let namespace = identity
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let id = format!("{namespace}/{name}");
        self.agents.insert(
            id.clone(),
            AgentEntry {
                id: id.clone(),
                namespace,
                name,
                killed: identity.spec.kill_switch.engaged,
                policy: Err(format!("no AgentPolicy names AgentIdentity {id}")),
                upstreams: BTreeMap::new(),
                credentials: identity.spec.credentials.clone(),
            },
        );
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files
}

/// What identifies the directory's content: every file's path, length and modification time.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    yaml_files(dir)
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (path, len, modified)
        })
        .collect()
}

/// A policy set that follows a directory.
#[derive(Debug, Clone)]
pub struct WatchedDir {
    current: Arc<RwLock<Arc<PolicySet>>>,
}

impl WatchedDir {
    /// Loads `dir` and reloads it whenever a file changes (checked every `interval`).
    pub fn start(dir: PathBuf, interval: Duration) -> Self {
        let mut seen = fingerprint(&dir);
        let set = PolicySet::load(&dir);
        log_problems(&set);
        let current = Arc::new(RwLock::new(Arc::new(set)));
        let writer = Arc::downgrade(&current);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(current) = writer.upgrade() else {
                    return;
                };
                let now = fingerprint(&dir);
                if now != seen {
                    seen = now;
                    let set = PolicySet::load(&dir);
                    log_problems(&set);
                    tracing::info!(dir = %dir.display(), agents = set.agents.len(), "policies reloaded");
                    *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                }
            }
        });
        Self { current }
    }

    /// A policy set fixed in memory (tests).
    pub fn fixed(set: PolicySet) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(set))),
        }
    }

    /// The policies in force now.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn log_problems(set: &PolicySet) {
    for problem in &set.problems {
        tracing::warn!(%problem, "policy directory");
    }
    for agent in set.agents.values() {
        if let Err(reason) = &agent.policy {
            tracing::warn!(agent = %agent.id, %reason, "agent has no usable policy; its calls are denied");
        }
    }
}
