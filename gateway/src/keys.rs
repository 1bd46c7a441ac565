//! Standalone authentication: static API keys, one or more per agent, stored as SHA-256 hashes.
//!
//! ```yaml
//! keys:
//!   - name: support-demo                  # who holds the key, for the audit trail
//!     agent: default/support-agent-v2     # the AgentIdentity it acts as
//!     sha256: 5e88…                       # printf %s "$KEY" | sha256sum
//! ```
//!
//! The agent a request acts for comes from its key and nothing else: no header, body field or
//! MCP metadata can name another agent.

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
    agent: String,
    sha256: String,
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The key's name.
    pub name: String,
    /// `namespace/name` of the AgentIdentity it acts as.
    pub agent: String,
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
            if entry
                .agent
                .split_once('/')
                .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
            {
                return Err(format!(
                    "keys[{i}].agent: {:?} must be namespace/name of an AgentIdentity",
                    entry.agent
                ));
            }
            let holder = KeyHolder {
                key_id: hex::encode(&hash[..8]),
                name: entry.name,
                agent: entry.agent,
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
