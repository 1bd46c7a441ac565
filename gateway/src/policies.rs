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
    pub policy: Result<Arc<CompiledPolicy>, PolicyProblem>,
    /// The policy's MCP upstreams, by name: a URL, or a stdio command.
    pub upstreams: BTreeMap<String, tollgate_crds::policy::McpUpstream>,
    /// Per-upstream credentials the gateway adds when it forwards (the agent never holds them).
    pub credentials: Vec<ToolCredential>,
}

/// Why an agent has no policy in force: every call it makes is denied with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyProblem {
    /// No AgentPolicy names the identity (code NoPolicy).
    Missing(String),
    /// A policy names the identity but cannot be used: it does not parse or compile, or more than
    /// one names the identity (code PolicyInvalid, with the error).
    Invalid(String),
}

impl PolicyProblem {
    /// The reason, in words.
    pub fn message(&self) -> &str {
        match self {
            PolicyProblem::Missing(m) | PolicyProblem::Invalid(m) => m,
        }
    }

    /// The decision every call of the agent gets.
    pub fn deny(&self, reason: &str) -> tollgate_engine::Decision {
        match self {
            PolicyProblem::Missing(_) => tollgate_engine::deny_without_policy(reason),
            PolicyProblem::Invalid(_) => tollgate_engine::deny_invalid_policy(reason),
        }
    }
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
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
        type Upstreams = BTreeMap<String, tollgate_crds::policy::McpUpstream>;
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
                            .filter_map(|u| Some((u.name.clone(), u.mcp.clone()?)))
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
                (Err(PolicyProblem::Missing(_)), Ok(policy)) => {
                    agent.upstreams = upstreams;
                    Ok(Arc::new(policy))
                }
                (_, Err(reason)) => Err(PolicyProblem::Invalid(reason)),
                (_, Ok(_)) => Err(PolicyProblem::Invalid(format!(
                    "more than one AgentPolicy names AgentIdentity {target}; exactly one must"
                ))),
            };
        }
        // A file that did not parse may have held the policy of an agent that now has none: such
        // an agent's calls say so, with the file's error, instead of only "no AgentPolicy".
        if !set.problems.is_empty() {
            let problems = set.problems.join("; ");
            for agent in set.agents.values_mut() {
                if let Err(PolicyProblem::Missing(reason)) = &agent.policy {
                    agent.policy = Err(PolicyProblem::Invalid(format!(
                        "{reason}, and the policy directory has files that do not load: {problems}"
                    )));
                }
            }
        }
        set
    }

    /// Whether every file loaded and every policy compiled; otherwise what is wrong, one line
    /// per problem (what `/readyz` answers). An identity no policy names is not a load failure.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut problems = self.problems.clone();
        problems.extend(
            self.agents
                .values()
                .filter_map(|agent| match &agent.policy {
                    Err(PolicyProblem::Invalid(reason)) => {
                        Some(format!("agent {}: {reason}", agent.id))
                    }
                    _ => None,
                }),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
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
                policy: Err(PolicyProblem::Missing(format!(
                    "no AgentPolicy names AgentIdentity {id}"
                ))),
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
///
/// On Linux every read ([`WatchedDir::current`]) first drains the directory's inotify queue
/// (one non-blocking read) and reloads if anything changed, so a change is in force for the
/// next call that arrives after the write returned: the kernel queues the event inside the
/// write itself. (A watcher thread, as the `notify` crate runs, leaves a window in which a call
/// is decided before the thread saw the event.) Elsewhere, or when inotify cannot be had, the
/// directory is polled every `interval`.
#[derive(Debug, Clone)]
pub struct WatchedDir {
    current: Arc<RwLock<Arc<PolicySet>>>,
    events: Option<Arc<std::sync::Mutex<Events>>>,
}

/// The directory's change events, and what to reload when they come.
#[derive(Debug)]
struct Events {
    dir: PathBuf,
    #[cfg(target_os = "linux")]
    inotify: inotify::Inotify,
}

impl Events {
    #[cfg(target_os = "linux")]
    fn open(dir: &Path) -> std::io::Result<Self> {
        let inotify = inotify::Inotify::init()?;
        let events = Self {
            dir: dir.to_owned(),
            inotify,
        };
        events.watch_all()?;
        Ok(events)
    }

    #[cfg(not(target_os = "linux"))]
    fn open(_dir: &Path) -> std::io::Result<Self> {
        Err(std::io::Error::other(
            "file-system events are read on Linux only",
        ))
    }

    /// Watches the directory and every directory under it (new ones are added on each reload).
    #[cfg(target_os = "linux")]
    fn watch_all(&self) -> std::io::Result<()> {
        use inotify::WatchMask;
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MODIFY
            | WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::ATTRIB
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            self.inotify.watches().add(&dir, mask)?;
            if let Ok(entries) = std::fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_dir()),
                );
            }
        }
        Ok(())
    }

    /// Whether anything changed since the last look (never blocks).
    #[cfg(target_os = "linux")]
    fn changed(&mut self) -> bool {
        let mut buffer = [0u8; 4096];
        let mut changed = false;
        loop {
            match self.inotify.read_events(&mut buffer) {
                Ok(mut events) => {
                    if events.next().is_none() {
                        return changed;
                    }
                    changed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return changed,
                Err(e) => {
                    tracing::warn!(error = %e, dir = %self.dir.display(),
                        "policy directory events unreadable; reloading");
                    return true;
                }
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn changed(&mut self) -> bool {
        false
    }
}

impl WatchedDir {
    /// Loads `dir` and follows it: by file-system events where the platform has them (a change
    /// is in force for the very next call), else by polling every `interval`.
    pub fn start(dir: PathBuf, interval: Duration) -> Self {
        let events = match Events::open(&dir) {
            Ok(events) => Some(Arc::new(std::sync::Mutex::new(events))),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(),
                    interval_ms = interval.as_millis() as u64,
                    "no file-system events for the policy directory; polling it");
                None
            }
        };
        let set = PolicySet::load(&dir);
        log_problems(&set);
        let current = Arc::new(RwLock::new(Arc::new(set)));
        if events.is_none() {
            Self::poll(dir, interval, Arc::downgrade(&current));
        }
        Self { current, events }
    }

    fn poll(dir: PathBuf, interval: Duration, writer: std::sync::Weak<RwLock<Arc<PolicySet>>>) {
        let mut seen = fingerprint(&dir);
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
    }

    /// A policy set fixed in memory (tests).
    pub fn fixed(set: PolicySet) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(set))),
            events: None,
        }
    }

    /// The policies in force now: with file-system events, every change written before this
    /// call is loaded first.
    pub fn current(&self) -> Arc<PolicySet> {
        if let Some(events) = &self.events {
            let mut events = events.lock().unwrap_or_else(|e| e.into_inner());
            if events.changed() {
                #[cfg(target_os = "linux")]
                if let Err(e) = events.watch_all() {
                    tracing::warn!(error = %e, "policy directory: a new subdirectory is not watched");
                }
                let set = PolicySet::load(&events.dir);
                log_problems(&set);
                tracing::info!(dir = %events.dir.display(), agents = set.agents.len(), "policies reloaded");
                let set = Arc::new(set);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = set.clone();
                return set;
            }
        }
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
