//! TLS for the listener, the upstreams and Redis: one crypto provider
//! (ring) for the whole process, and PEM loading with errors that name the file.

use std::path::Path;
use std::sync::{Arc, Once};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{TlsFiles, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Installs ring as the process-wide default provider (the redis crate
/// builds its own rustls configs from it). Safe to call many times.
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Every certificate of a PEM file (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = crate::config::read_bounded(path)
        .map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            file_error(
                path,
                format!("not a PEM certificate file: {}", pem_reason(&e)),
            )
        })?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// A PEM error in words: its own text shows a missing end marker as a
/// list of byte values ("[45, 45, 45, ...]").
fn pem_reason(error: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "its \"-----END {}-----\" line is missing (a truncated file?)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!(
                "a malformed BEGIN line: \"{}\"",
                String::from_utf8_lossy(line)
            )
        }
        Error::NoItemsFound => "no PEM block of that kind found".to_owned(),
        other => other.to_string(),
    }
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = crate::config::read_bounded(path)
        .map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(file_error(
            path,
            "an encrypted private key, which idemgate cannot decrypt: write it unencrypted (openssl pkey -in KEY -out PLAIN) and keep the file readable by idemgate only",
        ));
    }
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error(path, format!("no usable private key: {}", pem_reason(&e))))
}

/// The listener's config: certificate chain and key, ALPN h2 and http/1.1.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    install_provider();
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            // The certificate's own fault, not the key's (regression: a
            // corrupt certificate was blamed on key_file).
            rustls::Error::InvalidCertificate(_) => {
                file_error(&files.cert_file, format!("not a usable certificate: {e}"))
            }
            _ => file_error(
                &files.key_file,
                format!("does not match the certificate: {e}"),
            ),
        })?;
    // HTTP/1.0 too: a client that offers only it was refused the handshake
    // (rustls's no_application_protocol), though hyper serves it.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(Arc::new(config))
}

/// An upstream client config: the system roots, or `ca_file` instead;
/// a client certificate for mutual TLS when given.
pub fn client_config(tls: Option<&UpstreamTls>) -> Result<ClientConfig, TlsError> {
    install_provider();
    let mut roots = RootCertStore::empty();
    match tls.and_then(|t| t.ca_file.as_deref()) {
        Some(ca) => {
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error(ca, format!("not a usable CA certificate: {e}")))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let client_auth = tls.and_then(|t| {
        Some((
            t.client_cert_file.as_deref()?,
            t.client_key_file.as_deref()?,
        ))
    });
    // hyper-rustls sets ALPN itself (http/1.1 for upstreams).
    let config = match client_auth {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| file_error(key, format!("does not match the client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// How long before its end a certificate's coming expiry is warned of.
const EXPIRY_NOTICE: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

/// A warning when the first certificate of a PEM file (the leaf of a
/// chain) is out of its validity at `now`, or ends within 14 days: nothing
/// else says it (rustls serves an expired certificate, and every client
/// then refuses the handshake), found by an audit. `None` for a file that
/// cannot be read or parsed: its error is reported where it is loaded.
/// `apply` is how a renewed one is taken up ("reload", or "restart
/// idemgate" for the store's, read once at startup).
pub fn expiry_warning(path: &Path, now: std::time::SystemTime, apply: &str) -> Option<String> {
    let certs = load_certs(path).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let validity = cert.validity();
    let now = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    let (start, end) = (validity.not_before, validity.not_after);
    let path = path.display();
    if now > end.timestamp() {
        Some(format!(
            "{path}: the certificate expired on {end}: its TLS peers refuse it (renew it, then {apply})"
        ))
    } else if now < start.timestamp() {
        Some(format!(
            "{path}: the certificate is valid only from {start}: its TLS peers refuse it until then (is the clock right?)"
        ))
    } else if end.timestamp() - now < EXPIRY_NOTICE.as_secs() as i64 {
        let days = (end.timestamp() - now) / 86_400;
        Some(format!(
            "{path}: the certificate expires on {end}, in {days} day{}: renew it, then {apply}",
            if days == 1 { "" } else { "s" }
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("idemgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem at all").unwrap();
        let err = load_certs(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.pem"), "{err}");
        let err = load_key(&dir.join("missing.key")).unwrap_err().to_string();
        assert!(
            err.contains("missing.key") && err.contains("cannot read"),
            "{err}"
        );
    }
}
