//! kubectl-tollgate: the kubectl plugin for people: approve, deny, kill, audit replay and
//! verify, drift, doctor, and offline policy checks.
//!
//! Contract: only I/O and wiring; every decision comes from tollgate-engine. Today it has the
//! offline commands `check` (are these manifests valid, and what would be enforced) and
//! `decide` (what would the policy answer to this call), and `audit replay|verify|export|what-if`
//! reading the audit store directly (or through the gateway's read API), and the cluster
//! commands `approve`, `deny`, `kill` and `unkill`, each one write as the kubeconfig's user, and
//! `doctor`, which reads the installation and says what does not hold (with `--checklist`, the
//! ten pre-production items per agent).
#![forbid(unsafe_code)]

pub mod audit;
pub mod checklist;
pub mod doctor;
pub mod drill;
pub mod offline;
pub mod people;
pub mod top;
