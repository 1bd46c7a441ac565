//! Child processes of the control plane, and the supervisor that stops them.
//!
//! A test binary keeps its control plane in a static, and statics are never dropped, so Drop
//! cannot stop anything. Instead a small supervisor shell process watches the test binary's pid
//! and, once it is gone (finished, panicked, killed with -9), terminates every child listed in
//! `<dir>/pids` and removes the directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result};

const SUPERVISOR: &str = r#"
parent=$1 dir=$2
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
if [ -f "$dir/pids" ]; then
  pids=$(cat "$dir/pids")
  kill $pids 2>/dev/null
  for _ in $(seq 1 40); do
    alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.25
  done
  kill -9 $pids 2>/dev/null
fi
[ -n "${TOLLGATE_E2E_KEEP:-}" ] || rm -rf "$dir"
"#;

/// Starts processes and makes sure they end with the test binary.
#[derive(Debug)]
pub struct Supervisor {
    dir: PathBuf,
}

impl Supervisor {
    pub fn spawn(dir: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt as _;
        Command::new("bash")
            .args(["-c", SUPERVISOR, "tollgate-e2e-supervisor"])
            // A process group of its own: a job runner that ends the test binary by killing its
            // group (`timeout --foreground`, CI step runners, interactive shells on ^C) must not
            // take the supervisor along, or the directory stays behind (gigabytes after a bench).
            .process_group(0)
            .arg(std::process::id().to_string())
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the e2e supervisor")?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Records the processes it starts in `<dir>/pids` without a watcher of its own: for a caller
    /// whose processes something else stops (the e2e node's teardown, see `cluster`).
    pub fn attach(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Starts `command` with its output in `<dir>/<name>.log`.
    pub fn start(&self, name: &str, command: &mut Command) -> Result<Process> {
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let mut pids = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))?;
        writeln!(pids, "{}", child.id())?;
        Ok(Process {
            name: name.to_owned(),
            log,
            child: Mutex::new(child),
        })
    }
}

/// One running component.
#[derive(Debug)]
pub struct Process {
    name: String,
    log: PathBuf,
    child: Mutex<Child>,
}

impl Process {
    /// The component's name, such as `kube-apiserver`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its exit status, if it has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child.lock().ok()?.try_wait().ok().flatten()
    }

    /// Sends it `signal` (a name `kill` knows, such as `INT`).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("{}: poisoned", self.name))?
            .id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "kill -{signal} {pid} ({}) failed",
            self.name
        );
        Ok(())
    }

    /// The last `lines` lines of its output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
