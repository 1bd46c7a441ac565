//! Real processes for Tollgate's tests, shared by crates that cannot depend on the e2e crate
//! (it links every other crate, so a dev-dependency on it from `tollgate-audit` would bring in a
//! second copy of the audit types).
//!
//! - [`process`]: child processes stopped by a supervisor once the test binary is gone, however
//!   it ends.
//! - [`postgres`]: a throwaway PostgreSQL server on loopback, plain TCP and TLS.

pub mod postgres;
pub mod process;

pub use process::Process;

/// A TCP port on loopback nobody listens on at the moment of asking.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
