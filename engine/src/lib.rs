//! tollgate-engine: every Tollgate decision, as pure functions.
//!
//! Contract: no Kubernetes client, no network, no clock (time is an argument), no global state.
//! Compiles an AgentPolicy, evaluates tool calls against it and a run's state, computes budgets,
//! autonomy and graduation, decides admission for agent identities, and builds the desired child
//! objects of an AgentIdentity. Every other crate asks this one; none decides on its own.
//!
//! The policy engine arrives with its own issue; this crate currently holds only the contract.
#![forbid(unsafe_code)]
