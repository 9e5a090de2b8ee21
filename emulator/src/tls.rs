//! The hub's local certificate authority and server certificate, and the rustls server config.
//!
//! On first start the hub generates a CA (`ca.pem`, `ca-key.pem`) and a server certificate signed by
//! it (`server.pem`, `server-key.pem`) under `<data-dir>/certs/`. Later starts reuse the CA; the
//! server certificate is reused while its subject alternative names still match the hub's host name
//! and it is not close to expiry, and re-issued from the same CA otherwise, so a CA that users already
//! trust keeps working. The CA is rebuilt for signing from its stored key and fixed distinguished
//! name, so no certificate parsing is needed. The device endpoints' configurations
//! ([`HubCertificates::device_server_config`]) also ask clients for a certificate, never requiring
//! one (X.509 devices, [`crate::x509`]).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// CA certificate lifetime.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Server certificate lifetime.
const SERVER_VALIDITY_DAYS: i64 = 365;
/// A server certificate this close to expiry is re-issued on start.
const SERVER_RENEW_BEFORE_DAYS: i64 = 30;
/// The CA's common name; fixed so the CA can be rebuilt for signing from its key alone.
const CA_COMMON_NAME: &str = "IoT Hub Emulator Local CA";

/// Errors while preparing certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file under the certificate directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A stored key or certificate could not be used.
    #[error("{path}: {reason} (delete the certs folder to start over with a new CA)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificates a hub serves with, and where they live.
#[derive(Debug, Clone)]
pub struct HubCertificates {
    /// `<data-dir>/certs/ca.pem`: what clients must trust.
    pub ca_path: PathBuf,
    /// The CA certificate in PEM.
    pub ca_pem: String,
    /// The server certificate chain (server, then CA) in PEM.
    pub chain_pem: String,
    /// The server private key in PEM.
    pub key_pem: String,
}

impl HubCertificates {
    /// Loads or creates the CA and a server certificate for `hostname` (and `extra_names`, see
    /// [`subject_alt_names`]) under `cert_dir`. The server certificate is re-issued when the names
    /// change or it nears expiry; the CA is kept.
    pub fn load_or_create(cert_dir: &Path, hostname: &str, extra_names: &[String]) -> Result<Self, TlsError> {
        fs::create_dir_all(cert_dir).map_err(|source| io_err(cert_dir, source))?;
        let ca_path = cert_dir.join("ca.pem");
        let ca_key_path = cert_dir.join("ca-key.pem");
        let (ca_key, ca_pem) = if ca_path.exists() && ca_key_path.exists() {
            let key_pem = read(&ca_key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&ca_key_path, e))?;
            (key, read(&ca_path)?)
        } else {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write(&ca_key_path, &key.serialize_pem())?;
            write(&ca_path, &cert.pem())?;
            tracing::info!(path = %ca_path.display(), "generated a new local CA");
            (key, cert.pem())
        };
        let issuer = Issuer::new(ca_params()?, ca_key);

        let sans = subject_alt_names(hostname, extra_names);
        let server_path = cert_dir.join("server.pem");
        let server_key_path = cert_dir.join("server-key.pem");
        let meta_path = cert_dir.join("server.meta");
        let meta = format!("{}\n", sans.join(","));
        let reusable = server_path.exists()
            && server_key_path.exists()
            && fs::read_to_string(&meta_path).is_ok_and(|m| server_meta_ok(&m, &meta));
        let (server_pem, key_pem) = if reusable {
            (read(&server_path)?, read(&server_key_path)?)
        } else {
            let key = KeyPair::generate()?;
            let cert = server_params(&sans)?.signed_by(&key, &issuer)?;
            write(&server_key_path, &key.serialize_pem())?;
            write(&server_path, &cert.pem())?;
            let not_after =
                (OffsetDateTime::now_utc() + Duration::days(SERVER_VALIDITY_DAYS)).unix_timestamp();
            write(&meta_path, &format!("{meta}{not_after}\n"))?;
            (cert.pem(), key.serialize_pem())
        };
        Ok(Self { ca_path, chain_pem: format!("{server_pem}{ca_pem}"), ca_pem, key_pem })
    }

    /// A rustls server configuration offering TLS 1.2 and 1.3 with this certificate, advertising
    /// `alpn` protocols (empty for none).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.config(alpn, false)
    }

    /// Like [`HubCertificates::server_config`], also asking clients for a certificate without
    /// requiring one ([`crate::x509::verifier`]): the device endpoints (MQTT, HTTPS), where X.509
    /// devices authenticate with theirs.
    pub fn device_server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.config(alpn, true)
    }

    fn config(&self, alpn: &[&[u8]], client_certs: bool) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = rustls_pemfile::certs(&mut self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(Path::new("server.pem"), e))?;
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .map_err(|e| invalid(Path::new("server-key.pem"), e))?
            .ok_or_else(|| invalid(Path::new("server-key.pem"), "no private key in the file"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = if client_certs {
            builder
                .with_client_cert_verifier(Arc::new(crate::x509::verifier::DeviceCertVerifier::new(provider)))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// The names the server certificate covers: the hub host name, `localhost`, `127.0.0.1`, `::1`,
/// then `extra_names` (other DNS names or addresses clients dial: a container's published address,
/// a compose service alias), lower-cased and without repeats.
pub fn subject_alt_names(hostname: &str, extra_names: &[String]) -> Vec<String> {
    let mut sans = vec![hostname.to_ascii_lowercase()];
    let builtin = ["localhost", "127.0.0.1", "::1"].map(String::from);
    for name in builtin.iter().chain(extra_names) {
        let name = name.to_ascii_lowercase();
        if !sans.contains(&name) {
            sans.push(name);
        }
    }
    sans
}

/// Checks that `name` can be a certificate name: an IP address or a DNS name (what `--tls-san`
/// accepts). Returns it unchanged.
pub fn parse_tls_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(name.to_string());
    }
    match rustls::pki_types::DnsName::try_from(name) {
        Ok(_) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(format!("{name:?} is neither an IP address nor a DNS name")),
    }
}

fn server_meta_ok(stored: &str, wanted_first_line: &str) -> bool {
    let mut lines = stored.lines();
    let sans_ok = lines.next().map(|l| format!("{l}\n")) == Some(wanted_first_line.to_string());
    let not_after = lines.next().and_then(|l| l.trim().parse::<i64>().ok()).unwrap_or(0);
    let renew_at = OffsetDateTime::now_utc() + Duration::days(SERVER_RENEW_BEFORE_DAYS);
    sans_ok && not_after > renew_at.unix_timestamp()
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "iothub-emulator");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    Ok(params)
}

fn server_params(sans: &[String]) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, sans.first().cloned().unwrap_or_default());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(SERVER_VALIDITY_DAYS);
    Ok(params)
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| io_err(path, source))
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    fs::write(path, contents).map_err(|source| io_err(path, source))
}

fn io_err(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io { path: path.to_path_buf(), source }
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid { path: path.to_path_buf(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("iothub-tls-{name}-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn creates_then_reuses_and_reissues_for_new_hostname() {
        let dir = temp_dir("reuse");
        let first = HubCertificates::load_or_create(&dir, "localhost", &[]).unwrap();
        let again = HubCertificates::load_or_create(&dir, "localhost", &[]).unwrap();
        assert_eq!(first.ca_pem, again.ca_pem);
        assert_eq!(first.chain_pem, again.chain_pem, "server cert reused for the same host");
        let other = HubCertificates::load_or_create(&dir, "127.0.0.9", &[]).unwrap();
        assert_eq!(first.ca_pem, other.ca_pem, "the CA survives a host name change");
        assert_ne!(first.chain_pem, other.chain_pem, "a new server cert for the new host");
        other.server_config(&[]).unwrap();
        let extra = HubCertificates::load_or_create(&dir, "127.0.0.9", &["172.17.0.1".into()]).unwrap();
        assert_ne!(other.chain_pem, extra.chain_pem, "a new server cert for a new extra name");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn server_cert_chains_to_the_ca() {
        let dir = temp_dir("chain");
        let extra = ["172.17.0.1".to_string(), "Hub.Compose".to_string()];
        let certs = HubCertificates::load_or_create(&dir, "myhub.local", &extra).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut certs.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> =
            rustls_pemfile::certs(&mut certs.chain_pem.as_bytes()).map(|c| c.unwrap()).collect();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for name in ["myhub.local", "localhost", "127.0.0.1", "::1", "172.17.0.1", "hub.compose"] {
            let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let wrong = rustls::pki_types::ServerName::try_from("other.example").unwrap();
        assert!(verifier.verify_server_cert(&chain[0], &chain[1..], &wrong, &[], now).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tls_names_are_addresses_or_dns_names() {
        assert_eq!(parse_tls_name("172.17.0.1").unwrap(), "172.17.0.1");
        assert_eq!(parse_tls_name("::1").unwrap(), "::1");
        assert_eq!(parse_tls_name("hub").unwrap(), "hub");
        assert_eq!(parse_tls_name("my-hub.example.com").unwrap(), "my-hub.example.com");
        for bad in ["", "two words", "a/b", "-x..y"] {
            let err = parse_tls_name(bad).unwrap_err();
            assert!(err.contains("neither an IP address nor a DNS name"), "{bad}: {err}");
        }
    }
}
