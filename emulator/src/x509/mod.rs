//! X.509 device authentication (reference-2 §3), sans-IO: what a client certificate chain says
//! (thumbprints, subject CN), whether the certificates a device presented are well-formed, in
//! their validity period and signed one by the next, and whether the chain leads to a CA the hub
//! trusts.
//!
//! Owns the hub's trusted device CAs ([`TrustedCas`]: `--x509-ca` files and
//! `POST /emulator/x509-cas`; IoT Hub's equivalent is the ARM "certificates" of the hub, verified
//! by proof of possession). The TLS side ([`verifier`]) asks for a client certificate without
//! requiring one and checks the presented chain; which device a chain may act as is decided at
//! CONNECT / request time by [`crate::hub::Hub::authenticate_x509`], which uses this module.
//! [`issue`] makes test CAs and device certificates (the `iothub-emulator cert` subcommand).

pub mod issue;
pub mod verifier;

use std::sync::RwLock;

use rustls::pki_types::CertificateDer;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// Most certificates a device may present (leaf and intermediates) that are examined.
pub const MAX_CHAIN_CERTIFICATES: usize = 8;
/// Most CA certificates the hub trusts at once.
pub const MAX_TRUSTED_CAS: usize = 64;

/// Why a certificate or chain is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not a DER X.509 certificate.
    #[error("certificate {index} of the chain is not a valid X.509 certificate: {reason}")]
    Malformed {
        /// Position in the chain (0 = the leaf).
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// Outside its validity period.
    #[error("certificate {index} of the chain ({subject}) is {when}")]
    OutsideValidity {
        /// Position in the chain.
        index: usize,
        /// Its subject.
        subject: String,
        /// `expired` or `not yet valid`.
        when: &'static str,
    },
    /// A certificate is not signed by the next one in the chain.
    #[error("certificate {index} of the chain ({subject}) is not signed by the next one ({issuer})")]
    BadLink {
        /// Position in the chain.
        index: usize,
        /// Its subject.
        subject: String,
        /// The next certificate's subject.
        issuer: String,
    },
    /// The chain has more certificates than [`MAX_CHAIN_CERTIFICATES`].
    #[error("the chain has {0} certificates; at most {MAX_CHAIN_CERTIFICATES} are accepted")]
    TooLong(usize),
    /// No certificate at all.
    #[error("no certificate was presented")]
    Empty,
    /// A PEM file or body holds no certificate, or one that is not a CA.
    #[error("{0}")]
    NotACa(String),
    /// The trust store is full.
    #[error("the hub already trusts {MAX_TRUSTED_CAS} CA certificates")]
    StoreFull,
}

/// A client's certificate chain as presented in the TLS handshake: the leaf first. Kept by a
/// connection only until its CONNECT (MQTT) or with its requests (HTTPS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientChain(pub Vec<CertificateDer<'static>>);

impl ClientChain {
    /// The chain a finished TLS handshake received, if the client sent a certificate.
    pub fn from_tls(conn: &rustls::ServerConnection) -> Option<std::sync::Arc<Self>> {
        let certs = conn.peer_certificates().filter(|c| !c.is_empty())?;
        Some(std::sync::Arc::new(Self(certs.iter().map(|c| c.clone().into_owned()).collect())))
    }

    /// The leaf (device) certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.0.first()
    }
}

/// The SHA-1 and SHA-256 digests of a certificate's DER bytes: its thumbprints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thumbprints {
    /// SHA-1 (40 hex digits).
    pub sha1: [u8; 20],
    /// SHA-256 (64 hex digits).
    pub sha256: [u8; 32],
}

impl Thumbprints {
    /// The thumbprints of `der`.
    pub fn of(der: &[u8]) -> Self {
        Self { sha1: Sha1::digest(der).into(), sha256: Sha256::digest(der).into() }
    }

    /// SHA-1 in upper-case hex (how the portal and `az` print it).
    pub fn sha1_hex(&self) -> String {
        hex_upper(&self.sha1)
    }

    /// SHA-256 in upper-case hex.
    pub fn sha256_hex(&self) -> String {
        hex_upper(&self.sha256)
    }

    /// Whether a registered thumbprint (SHA-1 or SHA-256 by its length, any case, `:` and
    /// whitespace ignored) names this certificate.
    pub fn matches(&self, registered: &str) -> bool {
        match normalize_thumbprint(registered) {
            Ok(t) if t.len() == 40 => t == self.sha1_hex(),
            Ok(t) => t == self.sha256_hex(),
            Err(_) => false,
        }
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// A registered thumbprint in canonical form: upper-case hex without `:` or whitespace, 40
/// (SHA-1) or 64 (SHA-256) digits. IoT Hub accepts either (reference-2 §3.1).
pub fn normalize_thumbprint(s: &str) -> Result<String, String> {
    let t: String = s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    if !t.chars().all(|c| c.is_ascii_hexdigit()) || !(t.len() == 40 || t.len() == 64) {
        return Err(format!(
            "thumbprint '{s}' is not valid: use the certificate's SHA-1 (40 hex digits) or SHA-256 (64 hex digits)"
        ));
    }
    Ok(t.to_ascii_uppercase())
}

/// What the hub reads from a device's leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafIdentity {
    /// Its thumbprints.
    pub thumbprints: Thumbprints,
    /// The subject's first common name, if any.
    pub common_name: Option<String>,
    /// `notAfter`, seconds since the epoch.
    pub not_after_secs: i64,
}

fn parse(index: usize, der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CertError::Malformed { index, reason: "trailing bytes after the certificate".into() }),
        Err(e) => Err(CertError::Malformed { index, reason: e.to_string() }),
    }
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string)
}

/// Reads the leaf certificate `der`.
pub fn leaf_identity(der: &[u8]) -> Result<LeafIdentity, CertError> {
    let cert = parse(0, der)?;
    Ok(LeafIdentity {
        thumbprints: Thumbprints::of(der),
        common_name: common_name(&cert),
        not_after_secs: cert.validity().not_after.timestamp(),
    })
}

/// Checks the certificates a client presented, as the TLS layer does: each parses, is within its
/// validity period at `now_secs`, and is signed by the next one (whose subject is its issuer).
/// Where the chain ends (a self-signed leaf, or an intermediate a trusted CA issued) is not judged
/// here: that is [`TrustedCas::anchor`]'s and the device's business.
pub fn verify_presented_chain(chain: &[&[u8]], now_secs: i64) -> Result<(), CertError> {
    if chain.is_empty() {
        return Err(CertError::Empty);
    }
    if chain.len() > MAX_CHAIN_CERTIFICATES {
        return Err(CertError::TooLong(chain.len()));
    }
    let certs = chain.iter().enumerate().map(|(i, der)| parse(i, der)).collect::<Result<Vec<_>, _>>()?;
    for (index, cert) in certs.iter().enumerate() {
        let v = cert.validity();
        let when = if now_secs < v.not_before.timestamp() {
            "not yet valid"
        } else if now_secs > v.not_after.timestamp() {
            "expired"
        } else {
            continue;
        };
        return Err(CertError::OutsideValidity { index, subject: cert.subject().to_string(), when });
    }
    for (index, pair) in certs.windows(2).enumerate() {
        let (cert, issuer) = (&pair[0], &pair[1]);
        let linked = cert.issuer().as_raw() == issuer.subject().as_raw()
            && cert.verify_signature(Some(issuer.public_key())).is_ok();
        if !linked {
            return Err(CertError::BadLink {
                index,
                subject: cert.subject().to_string(),
                issuer: issuer.subject().to_string(),
            });
        }
    }
    Ok(())
}

/// A CA certificate the hub trusts, as listed by `GET /emulator/x509-cas`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaSummary {
    /// The subject, e.g. `CN=My Test CA`.
    pub subject: String,
    /// SHA-1 thumbprint, upper-case hex (what IoT Hub's certificates API shows).
    pub thumbprint: String,
    /// SHA-256 thumbprint, upper-case hex.
    pub thumbprint_sha256: String,
    /// `notAfter`, seconds since the epoch.
    pub not_after: i64,
}

#[derive(Debug)]
struct TrustedCa {
    der: CertificateDer<'static>,
    summary: CaSummary,
}

/// The CA certificates devices' chains may lead to. Read at every CA-signed device's connection,
/// written only when a CA is added; the lock is never held across an await.
#[derive(Debug, Default)]
pub struct TrustedCas {
    cas: RwLock<Vec<TrustedCa>>,
}

impl TrustedCas {
    /// Adds every certificate in `pem` (one or more `CERTIFICATE` blocks). Each must parse and be
    /// a CA (`basicConstraints CA:TRUE`); one already trusted is not added twice. Returns what
    /// the PEM held. Nothing is added when any certificate is refused.
    pub fn add_pem(&self, pem: &str) -> Result<Vec<CaSummary>, CertError> {
        let ders = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::NotACa(format!("the PEM text cannot be read: {e}")))?;
        if ders.is_empty() {
            return Err(CertError::NotACa("no CERTIFICATE block in the PEM text".into()));
        }
        let mut parsed = Vec::with_capacity(ders.len());
        for (index, der) in ders.into_iter().enumerate() {
            let cert = parse(index, &der)?;
            if !cert.is_ca() {
                return Err(CertError::NotACa(format!(
                    "{} is not a CA certificate (no basicConstraints CA:TRUE)",
                    cert.subject()
                )));
            }
            let t = Thumbprints::of(&der);
            let summary = CaSummary {
                subject: cert.subject().to_string(),
                thumbprint: t.sha1_hex(),
                thumbprint_sha256: t.sha256_hex(),
                not_after: cert.validity().not_after.timestamp(),
            };
            drop(cert);
            parsed.push(TrustedCa { der, summary });
        }
        let added: Vec<CaSummary> = parsed.iter().map(|c| c.summary.clone()).collect();
        let mut cas = self.cas.write().unwrap_or_else(|p| p.into_inner());
        let new: Vec<TrustedCa> =
            parsed.into_iter().filter(|p| !cas.iter().any(|c| c.der == p.der)).collect();
        if cas.len() + new.len() > MAX_TRUSTED_CAS {
            return Err(CertError::StoreFull);
        }
        cas.extend(new);
        Ok(added)
    }

    /// The trusted CAs, oldest first.
    pub fn list(&self) -> Vec<CaSummary> {
        self.cas.read().unwrap_or_else(|p| p.into_inner()).iter().map(|c| c.summary.clone()).collect()
    }

    /// The subject of the trusted CA that `chain` (leaf first, as presented) leads to: walking
    /// from the leaf, the first certificate a trusted CA signed (or that is a trusted CA itself),
    /// with every certificate before it signed by the next. `None` when the chain leads to no
    /// trusted CA.
    pub fn anchor(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        let cas = self.cas.read().unwrap_or_else(|p| p.into_inner());
        if cas.is_empty() || chain.is_empty() || chain.len() > MAX_CHAIN_CERTIFICATES {
            return None;
        }
        let anchors: Vec<(X509Certificate<'_>, &CaSummary)> =
            cas.iter().filter_map(|c| Some((parse(0, &c.der).ok()?, &c.summary))).collect();
        let mut previous: Option<X509Certificate<'_>> = None;
        for (index, der) in chain.iter().enumerate() {
            let cert = parse(index, der).ok()?;
            if let Some(prev) = &previous
                && (prev.issuer().as_raw() != cert.subject().as_raw()
                    || prev.verify_signature(Some(cert.public_key())).is_err())
            {
                return None;
            }
            // The device sent the trusted CA itself along: the link to it was checked above.
            if let Some((_, s)) = anchors.iter().find(|(ca, _)| ca.as_raw() == der.as_ref()) {
                return (index > 0).then(|| s.subject.clone());
            }
            let signed = anchors.iter().find(|(ca, _)| {
                cert.issuer().as_raw() == ca.subject().as_raw()
                    && cert.verify_signature(Some(ca.public_key())).is_ok()
            });
            if let Some((_, s)) = signed {
                return Some(s.subject.clone());
            }
            previous = Some(cert);
        }
        None
    }
}

#[cfg(test)]
mod tests;
