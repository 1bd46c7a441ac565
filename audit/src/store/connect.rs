//! How the PostgreSQL store reaches its server: a libpq connection string (URL or `key=value`
//! form) with libpq's TLS settings.
//!
//! | `sslmode` | what Tollgate does |
//! |---|---|
//! | unset, `disable` | plain TCP (a loopback or otherwise trusted network) |
//! | `verify-full` | TLS; the server's certificate must chain to `sslrootcert` and name the host |
//! | `verify-ca` | TLS; the certificate must chain to `sslrootcert` (any name) |
//! | `require` with `sslrootcert` | as `verify-ca` (libpq does the same) |
//! | `require` without it, `prefer`, `allow` | refused |
//!
//! libpq's `require` without a root certificate encrypts but accepts whoever answers, and
//! `prefer` and `allow` fall back to plain text when the server (or whoever sits between) says
//! so. An audit store must know it talks to its database, so Tollgate refuses those modes and
//! says what to write instead. `sslcert` and `sslkey` (PEM) present a client certificate.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// A parsed connection string: what tokio-postgres connects with, and the TLS connector when
/// the string asks for TLS.
pub(crate) struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The TLS settings taken out of a connection string (tokio-postgres knows none of them but
/// `sslmode`, and not its verifying values).
#[derive(Debug, Default, PartialEq, Eq)]
struct Tls {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Tls {
    /// Takes `key` if it is a TLS setting; false leaves it to tokio-postgres.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Connection(message.into())
}

/// Parses `url` (libpq URL or `key=value` string) and builds its TLS connector.
pub(crate) fn target(url: &str) -> Result<Target, StoreError> {
    let (rest, tls) = split(url)?;
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
        invalid(format!("cannot parse the connection string: {e}{cause}"))
    })?;
    let Some(client) = client_config(&tls)? else {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        return Ok(Target { config, tls: None });
    };
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    Ok(Target {
        config,
        tls: Some(MakeRustlsConnect::new(client)),
    })
}

/// Splits the TLS settings off a connection string; the rest goes to tokio-postgres as it was.
fn split(url: &str) -> Result<(String, Tls), StoreError> {
    let mut tls = Tls::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !tls.take(&percent_decode(key)?, percent_decode(value)?) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, tls));
    }
    let mut kept = Vec::new();
    for (key, value) in key_values(url)? {
        if !tls.take(&key, value.clone()) {
            kept.push(format!("{key}={}", quote(&value)));
        }
    }
    Ok((kept.join(" "), tls))
}

fn percent_decode(text: &str) -> Result<String, StoreError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid(format!("bad percent-escape in {text:?}")))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid(format!("{text:?} does not decode to UTF-8")))
}

/// libpq's `key = value` form: values bare or in single quotes with `\'` and `\\` escapes.
fn key_values(text: &str) -> Result<Vec<(String, String)>, StoreError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(invalid(format!(
                "connection string: {key:?} has no value (expected {key}=VALUE)"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(invalid(format!(
                            "connection string: the quoted value of {key:?} is not closed"
                        )));
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(invalid(format!(
                                "connection string: the value of {key:?} ends in a backslash"
                            )));
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        out.push((key, value));
    }
}

fn quote(value: &str) -> String {
    if !value.is_empty() && !value.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Whether the certificate's names are checked against the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Full,
    ChainOnly,
}

/// The rustls configuration the settings ask for; None for plain TCP.
fn client_config(tls: &Tls) -> Result<Option<rustls::ClientConfig>, StoreError> {
    let mode = tls.mode.as_deref().unwrap_or("disable");
    let check = match (mode, &tls.root_cert) {
        ("disable", None) if tls.cert.is_none() && tls.key.is_none() => return Ok(None),
        ("disable", _) => {
            return Err(invalid(
                "sslrootcert, sslcert or sslkey is set but sslmode is disable (or unset): set sslmode=verify-full to use them",
            ));
        }
        ("verify-full", Some(_)) => Check::Full,
        ("verify-ca" | "require", Some(_)) => Check::ChainOnly,
        ("verify-full" | "verify-ca", None) => {
            return Err(invalid(format!(
                "sslmode={mode} needs sslrootcert=FILE: the PEM certificate(s) of the CA that signed the server's certificate"
            )));
        }
        ("require" | "prefer" | "allow", None) => {
            return Err(invalid(format!(
                "sslmode={mode} would accept any server that answers (or fall back to plain text); \
                 the audit store must know it talks to its database: use sslmode=verify-full with sslrootcert=FILE, \
                 or sslmode=disable on a trusted network"
            )));
        }
        (other, _) => {
            return Err(invalid(format!(
                "unknown sslmode {other:?}: expected disable, verify-ca or verify-full"
            )));
        }
    };
    let root_file = tls.root_cert.as_deref().unwrap_or_default();
    let mut roots = RootCertStore::empty();
    let certificates = read_certificates(Path::new(root_file), "sslrootcert")?;
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(invalid(format!(
            "sslrootcert {root_file}: no usable CA certificate in it"
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| invalid(format!("sslrootcert {root_file}: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            inner: verifier,
            check,
        }));
    let config = match (&tls.cert, &tls.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certificates(Path::new(cert), "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| invalid(format!("sslkey {key}: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid(format!("sslcert/sslkey: {e}")))?
        }
        _ => {
            return Err(invalid(
                "sslcert and sslkey go together: set both for a client certificate, or neither",
            ));
        }
    };
    Ok(Some(config))
}

fn read_certificates(
    path: &Path,
    setting: &str,
) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let what = |e: &dyn std::fmt::Display| invalid(format!("{setting} {}: {e}", path.display()));
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| what(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| what(&e))?;
    if certificates.is_empty() {
        return Err(what(&"no PEM certificate in it"));
    }
    Ok(certificates)
}

/// WebPKI verification of the server's chain; with [`Check::ChainOnly`], a certificate for
/// another name is accepted (libpq's `verify-ca`). Everything else, expiry and signatures
/// included, is checked either way.
#[derive(Debug)]
struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    check: Check,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::ChainOnly => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: &str, root: Option<&str>) -> Tls {
        Tls {
            mode: Some(mode.to_owned()),
            root_cert: root.map(str::to_owned),
            ..Tls::default()
        }
    }

    #[test]
    fn tls_settings_come_off_both_forms_and_the_rest_is_kept() {
        let (rest, got) = split(
            "postgresql://audit:p%40ss@db.example:5432/tollgate?sslmode=verify-full&application_name=gw&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://audit:p%40ss@db.example:5432/tollgate?application_name=gw"
        );
        assert_eq!(
            got,
            Tls {
                root_cert: Some("/etc/ca dir/ca.pem".into()),
                ..tls("verify-full", None)
            }
        );
        let (rest, got) = split(
            "host=db.example  port = 5432 password='it\\'s secret' sslmode=verify-ca sslrootcert='/etc/ca dir/ca.pem' dbname=tollgate",
        )
        .unwrap();
        assert_eq!(
            rest,
            "host=db.example port=5432 password='it\\'s secret' dbname=tollgate"
        );
        assert_eq!(
            got,
            Tls {
                root_cert: Some("/etc/ca dir/ca.pem".into()),
                ..tls("verify-ca", None)
            }
        );
        let parsed = tokio_postgres::Config::from_str(&rest).unwrap();
        assert_eq!(parsed.get_password(), Some(&b"it's secret"[..]));
        let (rest, got) = split("postgres://localhost/db").unwrap();
        assert_eq!(
            (rest.as_str(), got),
            ("postgres://localhost/db", Tls::default())
        );
    }

    #[test]
    fn malformed_strings_are_named() {
        for (text, says) in [
            ("host=a dbname", "\"dbname\" has no value"),
            ("host='a", "not closed"),
            ("host='a\\", "ends in a backslash"),
            ("postgres://a/b?sslrootcert=%zz", "bad percent-escape"),
        ] {
            let err = split(text).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        let err = target("host=a nosuchoption=1").unwrap_err().to_string();
        assert!(err.contains("nosuchoption"), "{err}");
    }

    #[test]
    fn modes_that_accept_any_server_are_refused_with_what_to_write_instead() {
        for mode in ["require", "prefer", "allow"] {
            let err = client_config(&tls(mode, None)).unwrap_err().to_string();
            assert!(err.contains(&format!("sslmode={mode}")), "{err}");
            assert!(err.contains("verify-full with sslrootcert"), "{err}");
        }
        for mode in ["verify-full", "verify-ca"] {
            let err = client_config(&tls(mode, None)).unwrap_err().to_string();
            assert!(err.contains("needs sslrootcert=FILE"), "{err}");
        }
        let err = client_config(&tls("verify_full", Some("/x")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown sslmode \"verify_full\""), "{err}");
        let err = client_config(&Tls {
            root_cert: Some("/x".into()),
            ..Tls::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslmode is disable"), "{err}");
        let err = client_config(&tls("verify-full", Some("/nonexistent/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
        assert!(client_config(&Tls::default()).unwrap().is_none());
        assert!(client_config(&tls("disable", None)).unwrap().is_none());
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_config(&tls("verify-full", empty.to_str()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
