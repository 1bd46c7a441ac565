//! tollgate-operator: controllers that reconcile Tollgate's kinds into cluster objects.
//!
//! Contract: only I/O and wiring. Each reconciler fetches what it needs, asks tollgate-engine for
//! the desired objects, applies them with server-side apply under one field manager and writes
//! status, conditions, events and metrics.
//!
//! The controllers arrive with their own issue; this crate currently holds only the contract.
#![forbid(unsafe_code)]
