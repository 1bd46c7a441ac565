//! The control plane's certificates: one CA that signs the apiserver's serving certificate and
//! every user's client certificate (CN is the user, O entries the groups), and the
//! service-account signing key.

use std::path::Path;

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::User;

pub(crate) const CA_CERT: &str = "ca.crt";
pub(crate) const SERVER_CERT: &str = "apiserver.crt";
pub(crate) const SERVER_KEY: &str = "apiserver.key";
pub(crate) const SA_KEY: &str = "service-account.key";
pub(crate) const SA_PUB: &str = "service-account.pub";

#[derive(Debug)]
pub(crate) struct Pki {
    ca_pem: String,
    ca_issuer: Issuer<'static, KeyPair>,
    server_pem: String,
    server_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
}

impl Pki {
    pub(crate) fn generate() -> Result<Self> {
        Self::generate_for(&[])
    }

    /// Like [`Pki::generate`], with `ips` added to the apiserver certificate's names (the node
    /// IP of a cluster, where pods reach the apiserver).
    pub(crate) fn generate_for(ips: &[std::net::IpAddr]) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = name("tollgate-e2e-ca", &[]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let ca_issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server
            .subject_alt_names
            .push(SanType::IpAddress([10, 0, 0, 1].into()));
        for ip in ips {
            server.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        server.subject_alt_names.push(SanType::DnsName(
            "kubernetes.default.svc.cluster.local".try_into()?,
        ));
        server.distinguished_name = name("kube-apiserver", &[]);
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_pem = server.signed_by(&server_key, &ca_issuer)?.pem();

        let sa_key = KeyPair::generate()?;
        Ok(Self {
            ca_pem,
            ca_issuer,
            server_pem,
            server_key_pem: server_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }

    pub(crate) fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join(CA_CERT), &self.ca_pem)?;
        std::fs::write(dir.join(SERVER_CERT), &self.server_pem)?;
        std::fs::write(dir.join(SERVER_KEY), &self.server_key_pem)?;
        std::fs::write(dir.join(SA_KEY), &self.sa_key_pem)?;
        std::fs::write(dir.join(SA_PUB), &self.sa_pub_pem)?;
        Ok(())
    }

    /// A kubeconfig for `user` with a fresh client certificate embedded.
    pub(crate) fn kubeconfig(&self, server: &str, user: User) -> Result<String> {
        self.kubeconfig_for(server, user.name(), user.groups())
    }

    /// A client certificate and its key (PEM) for `user` in `groups`.
    pub(crate) fn client(&self, user: &str, groups: &[&str]) -> Result<(String, String)> {
        self.leaf(
            user,
            groups,
            ExtendedKeyUsagePurpose::ClientAuth,
            Vec::new(),
        )
    }

    /// A serving certificate and its key (PEM) for `names` (DNS names or IP addresses).
    pub(crate) fn serving(&self, common_name: &str, names: &[&str]) -> Result<(String, String)> {
        let sans = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*n).try_into()?)),
            })
            .collect::<Result<Vec<_>>>()?;
        self.leaf(common_name, &[], ExtendedKeyUsagePurpose::ServerAuth, sans)
    }

    fn leaf(
        &self,
        common_name: &str,
        groups: &[&str],
        usage: ExtendedKeyUsagePurpose,
        sans: Vec<SanType>,
    ) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name, groups);
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca_issuer)?.pem();
        Ok((cert, key.serialize_pem()))
    }

    /// A kubeconfig for `user` in `groups` with a fresh client certificate embedded.
    pub(crate) fn kubeconfig_for(
        &self,
        server: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<String> {
        let (cert, key) = self.client(user, groups)?;
        let b64 = |s: &str| STANDARD.encode(s.as_bytes());
        Ok(format!(
            "apiVersion: v1
kind: Config
clusters:
- name: tollgate-e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {user}
  context:
    cluster: tollgate-e2e
    user: {user}
    namespace: default
current-context: {user}
",
            ca = b64(&self.ca_pem),
            cert = b64(&cert),
            key = b64(&key),
        ))
    }
}

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    for organization in organizations {
        name.push(DnType::OrganizationName, *organization);
    }
    name
}
