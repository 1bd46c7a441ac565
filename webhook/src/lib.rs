//! tollgate-webhook: one axum + rustls server with two faces, admission (called by the
//! kube-apiserver) and egress (called by agents: decision API, MCP proxy).
//!
//! Contract: only I/O and wiring; every decision comes from tollgate-engine and every record goes
//! through tollgate-audit.
//!
//! The faces arrive with their own issues; this crate currently holds only the contract.
#![forbid(unsafe_code)]
