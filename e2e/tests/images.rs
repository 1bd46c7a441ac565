//! Tollgate's images as `cargo run -p tollgate-e2e --bin images` writes them (`e2e/prepare.sh`,
//! the README's test command, does, before the tests): what they hold, and that each runs under
//! a real container runtime (containerd and runc from Debian, which `e2e/prepare.sh` installs)
//! as user 65532 on a read-only root filesystem.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_e2e::image::{self, SHIPPED, USER};

fn archive_of(binary: &str) -> PathBuf {
    let archive = image::archive(binary);
    assert!(
        archive.exists(),
        "{} is missing: build the images first with `cargo run -p tollgate-e2e --bin images` \
         (.ci/run does)",
        archive.display()
    );
    archive
}

#[test]
fn each_image_holds_its_binary_its_libraries_and_certificates_and_nothing_else() {
    for (_, binary) in SHIPPED {
        let inspected = image::inspect(&archive_of(binary)).unwrap();
        assert_eq!(
            inspected.manifest[0]["RepoTags"][0],
            image::reference(binary),
            "{binary}"
        );
        let config = &inspected.config["config"];
        assert_eq!(config["User"], format!("{USER}:{USER}"), "{binary}");
        assert_eq!(
            config["Entrypoint"][0],
            format!("/usr/local/bin/{binary}"),
            "{binary}"
        );
        assert_eq!(inspected.config["os"], "linux");
        // No shell and no tools: the only executables are the binary and the libraries the
        // release binary loads.
        let executables: Vec<&str> = inspected
            .files
            .iter()
            .filter(|(_, (mode, _, dir))| !dir && mode & 0o111 != 0)
            .map(|(path, _)| path.as_str())
            .collect();
        let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
        let mut expected: Vec<String> = image::libraries(&release.join(binary))
            .unwrap()
            .into_iter()
            .map(|p| p.display().to_string())
            .collect();
        expected.push(format!("/usr/local/bin/{binary}"));
        expected.sort();
        assert_eq!(executables, expected, "{binary}");
        for absent in ["/bin/sh", "/bin/bash", "/usr/bin/env", "/bin/busybox"] {
            assert!(!inspected.files.contains_key(absent), "{binary}: {absent}");
        }
        for present in [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/passwd",
            "/etc/group",
        ] {
            assert!(inspected.files.contains_key(present), "{binary}: {present}");
        }
        // Everything belongs to root, so the non-root user can change nothing in it.
        for (path, (_, owner, _)) in &inspected.files {
            if path != "/home/nonroot/" {
                assert_eq!(*owner, 0, "{binary}: {path}");
            }
        }
    }
}

#[test]
fn the_same_binary_always_gives_the_same_image() {
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let binary = "tollgate-gateway";
    let dir = tempfile::tempdir().unwrap();
    let spec = image::spec_of(&release.join(binary), binary).unwrap();
    let a = image::write(&spec, &dir.path().join("a.tar")).unwrap();
    let b = image::write(&spec, &dir.path().join("b.tar")).unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(
        std::fs::read(&a.path).unwrap(),
        std::fs::read(&b.path).unwrap()
    );
}

/// A containerd of the test's own: its root, state and socket in a temporary directory, and a
/// namespace of its own (runc keeps its state under /run/containerd/runc/NAMESPACE whatever the
/// root). Dropping it deletes its containers, so their shims exit, then stops it.
struct Containerd {
    dir: tempfile::TempDir,
    child: std::process::Child,
    namespace: String,
}

/// Installs Debian's containerd and runc when they are missing (needs root, as in CI).
fn ensure_containerd() {
    let present = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        present("containerd") && present("ctr") && present("runc"),
        "containerd and runc are missing: run `bash e2e/prepare.sh`, which installs what the \
         tests need, or `apt-get install -y containerd runc` as root"
    );
}

impl Containerd {
    fn start() -> Self {
        ensure_containerd();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        // No CRI (no kubelet here); containers run with runc's v2 shim, cgroupfs.
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = dir.path().join("containerd.sock").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian's containerd package; .ci/run installs it)");
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let namespace = format!(
            "tollgate-e2e-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let containerd = Self {
            dir,
            child,
            namespace,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while containerd.ctr(&["version"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["--namespace", &self.namespace])
            .args(args)
            .output()
            .expect("ctr (Debian's containerd package)")
    }

    fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Every container it still has, stopped and deleted, so that no shim outlives it.
        let listed = self.ctr(&["containers", "list", "--quiet"]);
        for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", id]);
            let _ = self.ctr(&["tasks", "delete", "--force", id]);
            let _ = self.ctr(&["containers", "delete", id]);
        }
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
        // runc (cgroupfs) made /<namespace>/<container> in every cgroup hierarchy; empty now.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let parent = hierarchy.path().join(&self.namespace);
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for child in children.flatten() {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
                let _ = std::fs::remove_dir(&parent);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The runtime's mounts under its root, if a container was left behind.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("root"))
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn each_image_runs_as_65532_on_a_read_only_root_filesystem() {
    let containerd = Containerd::start();
    for (_, binary) in SHIPPED {
        let archive = archive_of(binary);
        let imported = containerd.ctr(&["images", "import", archive.to_str().unwrap()]);
        assert!(
            imported.status.success(),
            "import {binary}: {}\n{}",
            String::from_utf8_lossy(&imported.stderr),
            containerd.log()
        );
        let reference = image::reference(binary);
        // The image's own entrypoint and user; a read-only root; its own empty network namespace.
        let ran = containerd.ctr(&[
            "run",
            "--rm",
            "--read-only",
            &reference,
            &format!("{binary}-version"),
            &format!("/usr/local/bin/{binary}"),
            "--version",
        ]);
        let out = String::from_utf8_lossy(&ran.stdout);
        assert!(
            ran.status.success() && out.contains(image::tag()),
            "{binary} --version in its image: {out}{}\n{}",
            String::from_utf8_lossy(&ran.stderr),
            containerd.log()
        );
    }
}

#[test]
fn the_gateway_image_serves_standalone_as_65532_and_stops_on_sigterm() {
    // As a pod runs it: a read-only root, a writable volume for the audit trail, the image's user.
    let containerd = Containerd::start();
    let binary = "tollgate-gateway";
    let imported = containerd.ctr(&["images", "import", archive_of(binary).to_str().unwrap()]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let data = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir(data.path().join("policies")).unwrap();
    for sample in ["support-agent.yaml", "deploy-agent.yaml"] {
        std::fs::copy(
            repo.join("config/samples").join(sample),
            data.path().join("policies").join(sample),
        )
        .unwrap();
    }
    std::fs::copy(
        repo.join("config/standalone/keys.yaml"),
        data.path().join("keys.yaml"),
    )
    .unwrap();
    let audit = data.path().join("audit");
    std::fs::create_dir(&audit).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.path().display()
    );
    let started = containerd.ctr(&[
        "run",
        "-d",
        "--read-only",
        "--mount",
        &mount,
        &image::reference(binary),
        "gateway-standalone",
        "/usr/local/bin/tollgate-gateway",
        "standalone",
        "--policies",
        "/data/policies",
        "--keys",
        "/data/keys.yaml",
        "--audit",
        "/data/audit/audit.db",
    ]);
    assert!(
        started.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&started.stderr),
        containerd.log()
    );
    // Its process, as the host sees it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        let tasks = containerd.ctr(&["tasks", "ls"]);
        let text = String::from_utf8_lossy(&tasks.stdout).into_owned();
        if let Some(line) = text.lines().find(|l| l.starts_with("gateway-standalone")) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.get(2), Some(&"RUNNING"), "{text}");
            break fields[1].parse::<u32>().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no task: {text}\n{}",
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65532"; 4],
        "{uid}"
    );
    // It opened its trail on the volume: the read-only root held it back from nothing it needs.
    let db = audit.join("audit.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !db.exists() {
        assert!(
            Instant::now() < deadline,
            "no audit store at {}",
            db.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM, as the kubelet sends it: the gateway drains and exits 0.
    let killed = containerd.ctr(&["tasks", "kill", "--signal", "SIGTERM", "gateway-standalone"]);
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = containerd.ctr(&["tasks", "ls"]);
        let text = String::from_utf8_lossy(&tasks.stdout).into_owned();
        match text.lines().find(|l| l.starts_with("gateway-standalone")) {
            Some(line) if line.contains("STOPPED") => break,
            None => break,
            Some(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "still running after SIGTERM: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = containerd.ctr(&["tasks", "delete", "gateway-standalone"]);
    let _ = containerd.ctr(&["containers", "delete", "gateway-standalone"]);
}

#[test]
fn the_chart_and_config_name_exactly_the_images_built_here() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |path: &str| std::fs::read_to_string(repo.join(path)).unwrap();
    for (path, binary) in [
        ("config/manager/manager.yaml", "tollgate-operator"),
        ("config/webhook/deployment.yaml", "tollgate-webhook"),
        ("config/gateway/deployment.yaml", "tollgate-gateway"),
    ] {
        let line = format!("image: {}", image::reference(binary));
        assert!(read(path).contains(&line), "{path} must say {line:?}");
    }
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/tollgate/values.yaml")).unwrap();
    for (key, binary) in [
        ("operator", "tollgate-operator"),
        ("webhook", "tollgate-webhook"),
        ("gateway", "tollgate-gateway"),
    ] {
        assert_eq!(
            format!(
                "{}:{}",
                values[key]["image"]["repository"].as_str().unwrap(),
                image::tag()
            ),
            image::reference(binary),
            "values.yaml {key}.image"
        );
    }
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/tollgate/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(image::tag()),
        "the chart's appVersion is the tag"
    );
}
