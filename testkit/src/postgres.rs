//! A throwaway PostgreSQL server on loopback, for the audit store's tests and benchmarks.
//!
//! The server comes from Debian's `postgresql` package, which `e2e/prepare.sh` installs (a test
//! installs nothing: without it the tests fail saying so). PostgreSQL refuses to run as root, so as root the
//! harness runs initdb and the server as the package's `postgres` user through `setpriv`, which
//! execs in place: the supervisor's signal reaches the server itself. The data directory lives
//! under /tmp (every user can reach it) and is removed with the test binary. The server speaks
//! TLS too (its own CA, a certificate for `localhost`), and one role, [`CERT_USER`], may only log
//! in over TLS with a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{Process, Supervisor};

/// A running server. It accepts plain TCP and TLS (a certificate for `localhost` only, signed
/// by a CA of its own), and the role `tollgate_cert` only over TLS with a client certificate.
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    dir: PathBuf,
    /// How the server is started, for [`Postgres::restart`].
    bin: PathBuf,
    root: bool,
    supervisor: Supervisor,
    server: Mutex<Process>,
}

/// The role that must log in with a client certificate.
pub const CERT_USER: &str = "tollgate_cert";

const CA_FILE: &str = "ca.crt";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const CLIENT_CERT: &str = "client.crt";
const CLIENT_KEY: &str = "client.key";
const OTHER_CA_FILE: &str = "other-ca.crt";

/// The server's certificate (for `localhost`, not for 127.0.0.1), a client certificate for
/// [`CERT_USER`], both from one CA, and a second CA that signed neither.
fn write_certificates(dir: &Path) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca = |name: &str| -> Result<(String, Issuer<'static, KeyPair>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key)?.pem();
        Ok((pem, Issuer::new(params, key)))
    };
    let (ca_pem, issuer) = ca("tollgate-e2e-postgres-ca")?;
    let (other_pem, _) = ca("tollgate-e2e-postgres-ca")?;
    let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(vec!["localhost".to_owned()], "localhost")?;
    let (client_pem, client_key) = leaf(Vec::new(), CERT_USER)?;
    for (file, content) in [
        (CA_FILE, &ca_pem),
        (OTHER_CA_FILE, &other_pem),
        (SERVER_CERT, &server_pem),
        (SERVER_KEY, &server_key),
        (CLIENT_CERT, &client_pem),
        (CLIENT_KEY, &client_key),
    ] {
        std::fs::write(dir.join(file), content)?;
    }
    use std::os::unix::fs::PermissionsExt;
    // The server refuses a key that others can read.
    std::fs::set_permissions(dir.join(SERVER_KEY), std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

static POSTGRES: OnceLock<Postgres> = OnceLock::new();

/// The PostgreSQL server of this test binary, started on first use. Panics with the reason
/// when it cannot start: a test that needs PostgreSQL must not pass without one.
pub fn postgres() -> &'static Postgres {
    POSTGRES.get_or_init(|| match Postgres::start() {
        Ok(server) => server,
        Err(e) => panic!("PostgreSQL did not start: {e:#}"),
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The directory holding initdb and postgres, newest major version first.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn install() -> Result<PathBuf> {
    bin_dir().context(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): run `bash e2e/prepare.sh`, \
         which installs what the tests need, or `apt-get install -y postgresql` as root",
    )
}

/// `command` as the server's user: the `postgres` account when we are root.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    fn start() -> Result<Self> {
        let bin = install()?;
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir_in("/tmp")?
            .keep();
        let supervisor = Supervisor::spawn(&dir)?;
        let data = dir.join("data");
        write_certificates(&dir)?;
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?;
            if !status.success() {
                bail!("chown {} to postgres failed", dir.display());
            }
        }
        let initdb = as_server_user(&bin.join("initdb"), root)
            .args(["--auth=trust", "--username=tollgate", "--encoding=UTF8"])
            .arg("-D")
            .arg(&data)
            .output()
            .context("run initdb")?;
        if !initdb.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        }
        // The certificate role: TLS and a client certificate naming it, nothing else.
        let hba = data.join("pg_hba.conf");
        let rest = std::fs::read_to_string(&hba).context("read pg_hba.conf")?;
        std::fs::write(
            &hba,
            format!(
                "hostssl all {CERT_USER} 127.0.0.1/32 cert\nhost all {CERT_USER} 127.0.0.1/32 reject\n{rest}"
            ),
        )
        .context("write pg_hba.conf")?;
        let port = crate::free_port()?;
        let server = launch(&supervisor, &bin, root, &dir, port)?;
        let postgres = Self {
            port,
            dir,
            bin,
            root,
            supervisor,
            server: Mutex::new(server),
        };
        postgres.psql(
            "postgres",
            &format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"),
        )?;
        Ok(postgres)
    }

    /// A server of the caller's own, apart from the binary's shared one: for tests that stop
    /// and start it ([`Postgres::restart`]).
    pub fn own() -> Result<Self> {
        Self::start()
    }

    /// Stops the server as an operator's restart or a failover does (fast shutdown: every
    /// session is cut), keeps it down for `down`, and starts it again on the same port and data.
    pub fn restart(&self, down: Duration) -> Result<()> {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        server.signal("INT")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.exited().is_none() {
            if Instant::now() > deadline {
                bail!("postgres did not stop within 30s:\n{}", server.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(down);
        *server = launch(&self.supervisor, &self.bin, self.root, &self.dir, self.port)?;
        Ok(())
    }

    fn psql(&self, database: &str, sql: &str) -> Result<()> {
        let psql = bin_dir()
            .map(|b| b.join("psql"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let output = Command::new(psql)
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-d"])
            .arg(self.url(database))
            .args(["-c", sql])
            .output()
            .context("run psql")?;
        if !output.status.success() {
            bail!("{sql} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that signed the server's certificate (for `localhost`) and the client
    /// certificate of [`CERT_USER`].
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// A CA that signed nothing the server holds.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.join(OTHER_CA_FILE)
    }

    /// The client certificate and key of [`CERT_USER`].
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.join(CLIENT_CERT), self.dir.join(CLIENT_KEY))
    }

    /// The server's directory (data and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=tollgate dbname={database}",
            self.port
        )
    }

    /// Creates a new empty database and returns its URL; every test gets its own.
    pub fn database(&self, prefix: &str) -> Result<String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}_{}_{}",
            prefix.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }
}

/// Starts the server of `dir` on `port` and waits until it accepts connections.
fn launch(
    supervisor: &Supervisor,
    bin: &Path,
    root: bool,
    dir: &Path,
    port: u16,
) -> Result<Process> {
    let data = dir.join("data");
    let server = supervisor.start(
        "postgres",
        as_server_user(&bin.join("postgres"), root)
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("port={port}"),
                "-c",
                &format!("unix_socket_directories={}", dir.display()),
                "-c",
                "max_connections=200",
                "-c",
                "ssl=on",
                "-c",
                &format!("ssl_cert_file={}", dir.join(SERVER_CERT).display()),
                "-c",
                &format!("ssl_key_file={}", dir.join(SERVER_KEY).display()),
                "-c",
                &format!("ssl_ca_file={}", dir.join(CA_FILE).display()),
                // Durability stays on: fsync and synchronous_commit keep their defaults.
            ])
            .args(extra_settings()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::fs::read_to_string(server.log())
                .is_ok_and(|log| log.contains("ready to accept connections"))
        {
            return Ok(server);
        }
        if let Some(status) = server.exited() {
            bail!("postgres exited with {status}:\n{}", server.log_tail(30));
        }
        if Instant::now() > deadline {
            bail!(
                "postgres was not ready within 60s:\n{}",
                server.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `TOLLGATE_PG_SETTINGS="name=value …"`: more server settings (benchmarks compare tunings).
fn extra_settings() -> Vec<String> {
    std::env::var("TOLLGATE_PG_SETTINGS")
        .unwrap_or_default()
        .split_whitespace()
        .flat_map(|setting| ["-c".to_owned(), setting.to_owned()])
        .collect()
}
