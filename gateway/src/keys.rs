//! Standalone authentication: static API keys, stored as SHA-256 hashes. A key is an agent's
//! (one or more per agent) or a person's who decides approvals, never both.
//!
//! ```yaml
//! keys:
//!   - name: support-demo                  # who holds the key, for the audit trail
//!     agent: default/support-agent-v2     # the AgentIdentity it acts as
//!     sha256: 5e88…                       # printf %s "$KEY" | sha256sum
//!   - name: dana                          # an approver: the user stamped on her decisions
//!     role: approver
//!     groups: [support-leads]             # matched against a policy's approvers.groups
//!     sha256: 9f2c…
//! ```
//!
//! The agent a request acts for comes from its key and nothing else: no header, body field or
//! MCP metadata can name another agent. An approver's key cannot make an agent's calls, and an
//! agent's key cannot decide approvals.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    #[serde(default)]
    role: Role,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    sha256: String,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Act as one agent: decisions, reports, the MCP and LLM proxies.
    #[default]
    Agent,
    /// Decide ApprovalRequests (standalone's approval endpoint), as the user named by the key.
    Approver,
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The key's name (for an approver, the user stamped on decisions).
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// `namespace/name` of the AgentIdentity it acts as (empty for an approver).
    pub agent: String,
    /// An approver's groups.
    pub groups: Vec<String>,
    /// The first 16 hex digits of the key's hash: names the key in the audit trail without
    /// revealing it.
    pub key_id: String,
}

impl From<Keys> for super::Auth {
    fn from(keys: Keys) -> Self {
        super::Auth::Keys(keys)
    }
}

/// The keys, by hash.
#[derive(Debug, Default, Clone)]
pub struct Keys {
    by_hash: HashMap<[u8; 32], KeyHolder>,
}

impl Keys {
    /// Reads a key file; the error names the entry and field that is wrong.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("read key file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("key file {}: {e}", path.display()))
    }

    /// Parses a key file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeyFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_hash = HashMap::new();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(entry.sha256.trim(), &mut hash).map_err(|_| {
                format!("keys[{i}].sha256: expected 64 hex digits (printf %s \"$KEY\" | sha256sum)")
            })?;
            if entry.name.trim().is_empty() {
                return Err(format!("keys[{i}].name: must not be empty"));
            }
            let agent = match (entry.role, entry.agent) {
                (Role::Agent, Some(agent)) => {
                    if agent
                        .split_once('/')
                        .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty() || n.contains('/'))
                    {
                        return Err(format!(
                            "keys[{i}].agent: {agent:?} must be namespace/name of an AgentIdentity"
                        ));
                    }
                    if !entry.groups.is_empty() {
                        return Err(format!(
                            "keys[{i}].groups: only an approver's key (role: approver) has groups"
                        ));
                    }
                    agent
                }
                (Role::Agent, None) => {
                    return Err(format!(
                        "keys[{i}].agent: an agent's key names the AgentIdentity it acts as \
                         (namespace/name); a person's key that decides approvals says role: approver"
                    ));
                }
                (Role::Approver, Some(_)) => {
                    return Err(format!(
                        "keys[{i}].agent: an approver's key acts as no agent; remove agent or role"
                    ));
                }
                (Role::Approver, None) => {
                    if entry.name.starts_with("system:") || entry.name.starts_with("apikey:") {
                        return Err(format!(
                            "keys[{i}].name: {:?} is reserved for agents; name the person",
                            entry.name
                        ));
                    }
                    String::new()
                }
            };
            let holder = KeyHolder {
                key_id: hex::encode(&hash[..8]),
                name: entry.name,
                role: entry.role,
                agent,
                groups: entry.groups,
            };
            if by_hash.insert(hash, holder).is_some() {
                return Err(format!("keys[{i}].sha256: the same key is listed twice"));
            }
        }
        Ok(Self { by_hash })
    }

    /// The holder of `key`, if it is known.
    pub fn holder(&self, key: &str) -> Option<&KeyHolder> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash.get(&hash)
    }
}
