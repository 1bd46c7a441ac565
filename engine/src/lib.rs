//! tollgate-engine: every Tollgate decision, as pure functions.
//!
//! Contract: no Kubernetes client, no network, no clock (time is an argument), no global state.
//! It compiles an AgentPolicy ([`CompiledPolicy::compile`]), evaluates tool calls against it and
//! a run's state ([`CompiledPolicy::evaluate`], [`CompiledPolicy::record`],
//! [`CompiledPolicy::report`]), redacts results ([`redact`]), computes graduation
//! ([`CompiledPolicy::eligible_for`]), decides admission for agents' own API writes
//! ([`admission::admit`]), and builds the desired child objects of an AgentIdentity
//! ([`children::desired_children`]), and computes the status
//! the operator writes ([`status`]). Every other crate asks this one; none decides on its own.
//!
//! Untrusted JSON is parsed with [`canonical::parse_strict`]; approvals bind to
//! [`canonical::digest`] of the arguments.
#![forbid(unsafe_code)]

pub mod admission;
pub mod approval;
pub mod budget;
pub mod canonical;
mod cel;
pub mod checklist;
pub mod children;
pub mod compile;
pub mod decision;
pub mod doctor;
pub mod duration;
mod evaluate;
pub mod graduation;
pub mod llm;
pub mod manifest;
pub mod selector;
pub mod status;

pub use budget::{Ceiling, RunState, Usage, WindowState};
pub use compile::{CompileError, CompileErrors, CompiledPolicy};
pub use decision::{ApprovalRequirement, Decision, DenyCode, RuleRef};
pub use evaluate::{Agent, ToolCall, deny_invalid_policy, deny_without_policy, redact};
pub use graduation::TrackRecord;

#[cfg(test)]
mod tests;
