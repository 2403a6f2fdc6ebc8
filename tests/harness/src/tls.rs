//! A throwaway PKI for TLS tests, and rustls client configs on the ring provider.
//!
//! [`TestPki`] owns a temp dir of PEM files: a test CA, a server certificate
//! for `127.0.0.1`/`localhost` and a client certificate both signed by it, and
//! an unrelated "rogue" CA with its own server certificate for rejection
//! tests. Only the ring crypto provider is used (never aws-lc), which keeps
//! cross-compilation simple.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

/// PEM files of a freshly generated test PKI. The files are removed on drop.
#[derive(Debug)]
pub struct TestPki {
    /// Test CA certificate: trust anchor for servers and clients alike.
    pub ca_cert: PathBuf,
    /// Server certificate for `127.0.0.1` and `localhost`, signed by the test CA.
    pub server_cert: PathBuf,
    /// Key of [`server_cert`](Self::server_cert).
    pub server_key: PathBuf,
    /// Client certificate (CN `ferry-test-client`), signed by the test CA.
    pub client_cert: PathBuf,
    /// Key of [`client_cert`](Self::client_cert).
    pub client_key: PathBuf,
    /// An unrelated CA; nothing issued by the test CA chains to it.
    pub rogue_ca_cert: PathBuf,
    /// Server certificate for `127.0.0.1` and `localhost`, signed by the rogue CA.
    pub rogue_server_cert: PathBuf,
    /// Key of [`rogue_server_cert`](Self::rogue_server_cert).
    pub rogue_server_key: PathBuf,
    dir: TempDir,
}

impl TestPki {
    /// Generates all keys and certificates and writes them into a new temp dir.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-pki-").tempdir().context("create PKI temp dir")?;
        let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            fs::write(&path, pem).with_context(|| format!("write {}", path.display()))?;
            Ok(path)
        };

        let (ca_pem, ca) = new_ca("Ferry Test CA")?;
        let (server_pem, server_key) = new_leaf(&ca, "localhost", Role::Server)?;
        let (client_pem, client_key) = new_leaf(&ca, "ferry-test-client", Role::Client)?;
        let (rogue_pem, rogue) = new_ca("Rogue CA")?;
        let (rogue_server_pem, rogue_server_key) = new_leaf(&rogue, "localhost", Role::Server)?;

        Ok(Self {
            ca_cert: write("ca.pem", ca_pem)?,
            server_cert: write("server.pem", server_pem)?,
            server_key: write("server.key", server_key)?,
            client_cert: write("client.pem", client_pem)?,
            client_key: write("client.key", client_key)?,
            rogue_ca_cert: write("rogue-ca.pem", rogue_pem)?,
            rogue_server_cert: write("rogue-server.pem", rogue_server_pem)?,
            rogue_server_key: write("rogue-server.key", rogue_server_key)?,
            dir,
        })
    }

    /// The temp dir holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A mosquitto TLS listener serving the test CA's server certificate.
    pub fn mosquitto_listener(&self, require_certificate: bool) -> crate::TlsListener {
        crate::TlsListener {
            ca: self.ca_cert.clone(),
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            require_certificate,
        }
    }
}

/// Installs ring as the process-wide rustls crypto provider.
///
/// Needed because rumqttc is built without a provider of its own. Safe to
/// call any number of times; a provider installed earlier stays.
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rustls client config on the ring provider that trusts only the CA in
/// `ca_pem`, optionally presenting a client certificate (`cert_pem`, `key_pem`).
pub fn client_config(
    ca_pem: &Path,
    client_identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    install_ring_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_pem)? {
        roots.add(cert).context("add CA to root store")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match client_identity {
        Some((cert, key)) => {
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read key {}", key.display()))?;
            builder.with_client_auth_cert(read_certs(cert)?, key).context("client certificate")?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("read certificates {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

enum Role {
    Server,
    Client,
}

fn new_ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().context("generate CA key")?;
    let cert = params.self_signed(&key).context("self-sign CA")?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// Returns (certificate PEM, private key PEM).
fn new_leaf(issuer: &Issuer<'static, KeyPair>, common_name: &str, role: Role) -> anyhow::Result<(String, String)> {
    let sans = match role {
        Role::Server => vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        Role::Client => vec![common_name.to_owned()],
    };
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![match role {
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    let key = KeyPair::generate().context("generate leaf key")?;
    let cert = params.signed_by(&key, issuer).context("sign leaf")?;
    Ok((cert.pem(), key.serialize_pem()))
}
