//! Tollgate's container images, built without a daemon: one image per shipped binary, holding
//! the binary, exactly the shared libraries it loads (as `ldd` lists them), the CA certificates,
//! and `/etc/passwd` and `/etc/group` naming the non-root user 65532. No shell, no package
//! manager, nothing writable needed: the images run with `readOnlyRootFilesystem`.
//!
//! An image is written as a docker-archive tarball (what `docker save` writes and `docker load`,
//! `ctr images import` and `podman load` read), with fixed timestamps and owners, so the same
//! binary always gives the same image digest. `images/Dockerfile` builds the same layout for
//! registries and release pipelines.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The registry and organisation of Tollgate's images: what the chart and config/ name.
pub const REPOSITORY: &str = "ghcr.io/tollgate-dev";

/// The user the images run as (distroless's `nonroot`).
pub const USER: u32 = 65532;

/// The binaries shipped as images: (package, binary).
pub const SHIPPED: [(&str, &str); 3] = [
    ("tollgate-operator", "tollgate-operator"),
    ("tollgate-webhook", "tollgate-webhook"),
    ("tollgate-gateway", "tollgate-gateway"),
];

/// The tag of every image: the workspace's version, as the chart's appVersion.
pub fn tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `ghcr.io/tollgate-dev/BINARY:TAG`.
pub fn reference(binary: &str) -> String {
    format!("{REPOSITORY}/{binary}:{}", tag())
}

/// Where the image archives go: `target/images/`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/images")
        .components()
        .collect()
}

/// The archive of `binary`'s image.
pub fn archive(binary: &str) -> PathBuf {
    dir().join(format!("{binary}-{}.tar", tag()))
}

/// One file of an image's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Its absolute path in the image.
    pub path: String,
    /// Its bytes.
    pub contents: Vec<u8>,
    /// Its mode bits.
    pub mode: u32,
}

/// What an image holds and how it starts.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `name:tag`.
    pub reference: String,
    /// The files, by path.
    pub files: BTreeMap<String, File>,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// Environment variables, `K=V`.
    pub env: Vec<String>,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
}

/// The shared libraries `binary` loads, as `ldd` resolves them here (absolute paths).
pub fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd (Debian's libc-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if text.contains("not a dynamic executable") || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
        // `linux-vdso.so.1 (0x...)` (in the kernel, nothing to copy).
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let path = rest.split_whitespace().next().unwrap_or_default();
                if path == "not" {
                    bail!("{}: library {} not found", binary.display(), name.trim());
                }
                path
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// The image of one Tollgate binary: it, its libraries, CA certificates, the non-root user.
pub fn spec_of(binary: &Path, name: &str) -> Result<Spec> {
    let mut files = BTreeMap::new();
    let mut add = |path: String, contents: Vec<u8>, mode: u32| {
        files.insert(
            path.clone(),
            File {
                path,
                contents,
                mode,
            },
        );
    };
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("read {}", path.display()));
    add(format!("/usr/local/bin/{name}"), read(binary)?, 0o755);
    for library in libraries(binary)? {
        // Copied at the path the loader looks for, whatever symlinks lead there on this host.
        add(library.display().to_string(), read(&library)?, 0o755);
    }
    let certificates = Path::new("/etc/ssl/certs/ca-certificates.crt");
    add(
        "/etc/ssl/certs/ca-certificates.crt".into(),
        read(certificates).context("the CA certificates (Debian's ca-certificates)")?,
        0o644,
    );
    add(
        "/etc/passwd".into(),
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{USER}:{USER}:nonroot:/home/nonroot:/sbin/nologin\n")
            .into_bytes(),
        0o644,
    );
    add(
        "/etc/group".into(),
        format!("root:x:0:\nnonroot:x:{USER}:\n").into_bytes(),
        0o644,
    );
    Ok(Spec {
        reference: reference(name),
        files,
        entrypoint: vec![format!("/usr/local/bin/{name}")],
        env: vec![
            "PATH=/usr/local/bin".into(),
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".into(),
        ],
        labels: BTreeMap::from([
            (
                "org.opencontainers.image.source".into(),
                "https://github.com/tollgate-dev/tollgate".into(),
            ),
            ("org.opencontainers.image.version".into(), tag().into()),
            ("org.opencontainers.image.title".into(), name.into()),
        ]),
    })
}

/// The root filesystem as one tar layer: directories made for every file, owned by root, at
/// time zero, in path order.
fn layer(spec: &Spec) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    let mut dirs = std::collections::BTreeSet::new();
    for path in spec.files.keys() {
        let mut at = Path::new(path.trim_start_matches('/'));
        while let Some(parent) = at.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_path_buf());
            at = parent;
        }
    }
    // /tmp exists (some libraries look for it) but nothing needs to write there.
    dirs.insert(PathBuf::from("tmp"));
    dirs.insert(PathBuf::from("home/nonroot"));
    for dir in &dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == Path::new("tmp") {
            0o1777
        } else {
            0o755
        });
        header.set_size(0);
        header.set_mtime(0);
        let (uid, gid) = if dir == Path::new("home/nonroot") {
            (USER, USER)
        } else {
            (0, 0)
        };
        header.set_uid(uid.into());
        header.set_gid(gid.into());
        builder.append_data(&mut header, format!("{}/", dir.display()), std::io::empty())?;
    }
    for file in spec.files.values() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(file.mode);
        header.set_size(file.contents.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        builder.append_data(
            &mut header,
            file.path.trim_start_matches('/'),
            file.contents.as_slice(),
        )?;
    }
    Ok(builder.into_inner()?)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// The archive.
    pub path: PathBuf,
    /// `name:tag`.
    pub reference: String,
    /// `sha256:…` of the image configuration: the image id.
    pub id: String,
    /// The size of the root filesystem layer, in bytes.
    pub layer_bytes: u64,
}

/// Writes `spec` as a docker-archive tarball at `out`.
pub fn write(spec: &Spec, out: &Path) -> Result<Written> {
    let layer = layer(spec)?;
    let layer_digest = sha256(&layer);
    let config = serde_json::json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": format!("{USER}:{USER}"),
            "Entrypoint": spec.entrypoint,
            "Env": spec.env,
            "WorkingDir": "/",
            "Labels": spec.labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tollgate-e2e images"}],
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{config_digest}.json"),
        "RepoTags": [spec.reference],
        "Layers": [format!("{layer_digest}/layer.tar")],
    }]))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let partial = out.with_extension("tar.partial");
    let file =
        std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    archive.mode(tar::HeaderMode::Deterministic);
    let mut entry = |name: &str, bytes: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        header.set_mtime(0);
        archive.append_data(&mut header, name, bytes)?;
        Ok(())
    };
    entry(&format!("{layer_digest}/layer.tar"), &layer)?;
    entry(&format!("{config_digest}.json"), &config)?;
    entry("manifest.json", &manifest)?;
    archive.into_inner()?.flush()?;
    std::fs::rename(&partial, out).with_context(|| format!("write {}", out.display()))?;
    Ok(Written {
        path: out.to_owned(),
        reference: spec.reference.clone(),
        id: format!("sha256:{config_digest}"),
        layer_bytes: layer.len() as u64,
    })
}

/// Reads an archive back: its manifest, configuration and the paths of its root filesystem.
pub fn inspect(archive: &Path) -> Result<Inspected> {
    let bytes = std::fs::read(archive).with_context(|| format!("read {}", archive.display()))?;
    let mut members = BTreeMap::new();
    for entry in tar::Archive::new(bytes.as_slice()).entries()? {
        let mut entry = entry?;
        let name = entry.path()?.display().to_string();
        let mut contents = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut contents)?;
        members.insert(name, contents);
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(members.get("manifest.json").context("no manifest.json")?)?;
    let config_name = manifest[0]["Config"].as_str().context("no Config")?;
    let config: serde_json::Value =
        serde_json::from_slice(members.get(config_name).context("no configuration")?)?;
    let layer_name = manifest[0]["Layers"][0].as_str().context("no layer")?;
    let layer = members.get(layer_name).context("no layer file")?;
    let mut files = BTreeMap::new();
    for entry in tar::Archive::new(layer.as_slice()).entries()? {
        let entry = entry?;
        let header = entry.header();
        files.insert(
            format!("/{}", entry.path()?.display()),
            (header.mode()?, header.uid()?, header.entry_type().is_dir()),
        );
    }
    Ok(Inspected {
        manifest,
        config,
        files,
    })
}

/// An archive read back.
#[derive(Debug)]
pub struct Inspected {
    /// `manifest.json`.
    pub manifest: serde_json::Value,
    /// The image configuration.
    pub config: serde_json::Value,
    /// The root filesystem: path -> (mode, owner, is a directory).
    pub files: BTreeMap<String, (u32, u64, bool)>,
}

/// Builds the shipped binaries in release mode and writes their images under [`dir`]. Returns
/// what was written.
pub fn build_shipped() -> Result<Vec<Written>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["build", "--release", "--locked"]);
    for (package, binary) in SHIPPED {
        cargo.args(["-p", package, "--bin", binary]);
    }
    let status = cargo.status().context("run cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release of the shipped binaries failed");
    }
    let release = root.join("target/release");
    SHIPPED
        .iter()
        .map(|(_, binary)| {
            let spec = spec_of(&release.join(binary), binary)?;
            write(&spec, &archive(binary))
        })
        .collect()
}
