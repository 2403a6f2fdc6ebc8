//! TLS for MQTT links: the rustls client config of an `mqtts://` endpoint.
//!
//! Built once per connection at start-up (so a bad file is a start-up
//! error naming the connection) and shared by every reconnect.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::link::LinkError;
use crate::config::MqttEndpoint;

/// Builds the rustls client config for an `mqtts://` endpoint: the CA file
/// or the system roots, plus the client certificate for mutual TLS.
pub fn tls_config(e: &MqttEndpoint) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    let tls_err = |what: &str, path: &std::path::Path, err: &dyn std::fmt::Display| {
        LinkError::Tls(format!("{what} {}: {err}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &e.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|err| tls_err("reading CA file", path, &err))?;
            if certs.is_empty() {
                return Err(LinkError::Tls(format!("CA file {} holds no certificate", path.display())));
            }
            for c in certs {
                roots.add(c).map_err(|err| tls_err("adding CA from", path, &err))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(LinkError::Tls("no system root certificates found; set ca_file".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| LinkError::Tls(err.to_string()))?
        .with_root_certificates(roots);
    let config = match (&e.client_cert, &e.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|err| tls_err("reading client certificate", cert, &err))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|err| tls_err("reading client key", key, &err))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|err| tls_err("client certificate", cert, &err))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
