//! kubectl-tollgate: the kubectl plugin for people: approve, deny, kill, audit replay and
//! verify, drift, doctor, and offline policy checks.
//!
//! Contract: only I/O and wiring; every decision comes from tollgate-engine. Today it has the
//! offline commands `check` (are these manifests valid, and what would be enforced) and
//! `decide` (what would the policy answer to this call), and `audit replay|verify|export|what-if`
//! reading the audit store directly. The cluster commands arrive with the operator and gateway
//! issues.
#![forbid(unsafe_code)]

pub mod audit;
pub mod offline;
