//! The TLS side of X.509 device authentication: a rustls [`ClientCertVerifier`] that asks every
//! client for a certificate without requiring one (SAS devices and services send none and are
//! served as before), and checks a presented chain with [`super::verify_presented_chain`]: each
//! certificate well-formed, within its validity period and signed by the next; the handshake
//! signature proves the client holds the leaf's key. Which device the chain may act as, and
//! whether it leads to a trusted CA, is decided later, at CONNECT or request time
//! ([`crate::hub::Hub::authenticate_x509`]), where a refusal can be said in the protocol's terms.
//! Keeps no state beyond the crypto provider.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use super::{CertError, verify_presented_chain};

/// Requests (never requires) a client certificate and checks the chain the client presents.
#[derive(Debug)]
pub struct DeviceCertVerifier {
    provider: Arc<CryptoProvider>,
}

impl DeviceCertVerifier {
    /// A verifier checking handshake signatures with `provider`'s algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }
}

/// rustls's name for why a chain was refused (it becomes the TLS alert).
fn to_rustls(e: &CertError) -> Error {
    let c = match e {
        CertError::OutsideValidity { when: "expired", .. } => CertificateError::Expired,
        CertError::OutsideValidity { .. } => CertificateError::NotValidYet,
        CertError::BadLink { .. } => CertificateError::BadSignature,
        _ => CertificateError::BadEncoding,
    };
    Error::InvalidCertificate(c)
}

impl ClientCertVerifier for DeviceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends whatever certificate it was configured with.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let chain: Vec<&[u8]> =
            std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(|c| c.as_ref())).collect();
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match verify_presented_chain(&chain, now_secs) {
            Ok(()) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                tracing::info!("TLS client certificate refused: {e}");
                Err(to_rustls(&e))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
