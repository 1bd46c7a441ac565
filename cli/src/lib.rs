//! kubectl-tollgate: the kubectl plugin for people: approve, deny, kill, audit replay and
//! verify, drift, doctor, and offline policy checks.
//!
//! The commands arrive with their own issues; this crate currently holds only the contract.
#![forbid(unsafe_code)]
