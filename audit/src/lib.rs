//! tollgate-audit: the tamper-evident audit trail.
//!
//! Contract: the audit record and its hash chain, the stores behind one trait (embedded SQLite by
//! default, PostgreSQL for several gateway replicas), queries, verification and replay. An append
//! is acknowledged only once it is durable.
//!
//! The store arrives with its own issue; this crate currently holds only the contract.
#![forbid(unsafe_code)]
