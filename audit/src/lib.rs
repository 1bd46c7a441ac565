//! tollgate-audit: the tamper-evident audit trail.
//!
//! - [`Entry`] and [`Record`]: what happened, to whom, under which rule and policy hash, with
//!   arguments and results redacted by configurable [`Redactor`] rules and digested whole.
//! - The hash chain: every record is sealed with the SHA-256 of its body, its position and its
//!   predecessor's hash. [`verify()`] names the first record that breaks it. Retention prunes old
//!   records behind a checkpoint record, so what remains still verifies.
//! - [`Store`]: [`SqliteStore`] (embedded, the default) and [`PostgresStore`] (several gateway
//!   replicas, one chain each). [`AuditLog`] is a chain's writer: group commit, and an append is
//!   acknowledged only once it is durable.
//! - [`replay`]: a run as a timeline; what-if re-evaluation of recorded calls against a
//!   candidate policy.
#![forbid(unsafe_code)]

pub mod log;
pub mod record;
pub mod redact;
pub mod replay;
mod sql;
pub mod standing;
pub mod store;
pub mod verify;

pub use log::{AppendError, Appended, AuditLog, Batch, Observer, WriterConfig};
pub use record::{
    ApprovalPhase, ApprovalRef, Checkpoint, Counters, Cut, Entry, Event, Identity, Metered,
    ModelCallRecord, PolicyRef, Record, SCHEMA,
};
pub use redact::{RedactionRules, Redactor};
pub use store::{
    Census, Cursor, Head, PostgresStore, Query, SqliteStore, Store, StoreError, StoreLocation,
};
pub use verify::{Broken, ChainReport, Fault, VerifyError, verify};
