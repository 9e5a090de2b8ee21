//! Test certificates for X.509 devices (the `iothub-emulator cert` subcommand, the SDK tests and
//! the fleet): a local test CA, device certificates it signs, and self-signed device certificates
//! whose thumbprint is registered on the device. Every device certificate has `CN={deviceId}`, an
//! ECDSA P-256 key and the client-auth extended key usage. Pure: returns PEM text; writing files
//! is the caller's business.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::Thumbprints;

/// Default lifetime of issued certificates, in days.
pub const DEFAULT_VALIDITY_DAYS: i64 = 365;

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen refused the parameters or a key.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA certificate or key given to sign with is unusable.
    #[error("the CA to sign with is unusable: {0}")]
    BadCa(String),
}

/// An issued certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (just the leaf; the hub holds the CA).
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// Its thumbprints, as the registry's `x509Thumbprint` takes them.
    pub thumbprints: Thumbprints,
}

impl Issued {
    fn new(cert: &rcgen::Certificate, key: &KeyPair) -> Self {
        Self { cert_pem: cert.pem(), key_pem: key.serialize_pem(), thumbprints: Thumbprints::of(cert.der()) }
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days.max(1));
}

fn named(cn: &str) -> Result<CertificateParams, IssueError> {
    let mut params = CertificateParams::new(Vec::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    Ok(params)
}

/// A test CA named `common_name`, valid for `days`: what `--x509-ca` and
/// `POST /emulator/x509-cas` take, and what [`ca_signed_device`] signs with.
pub fn test_ca(common_name: &str, days: i64) -> Result<Issued, IssueError> {
    let mut params = named(common_name)?;
    params.distinguished_name.push(DnType::OrganizationName, "iothub-emulator test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued::new(&cert, &key))
}

fn device_params(device_id: &str, days: i64) -> Result<CertificateParams, IssueError> {
    let mut params = named(device_id)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days);
    Ok(params)
}

/// A self-signed certificate for `device_id`, valid for `days`: register its thumbprint as the
/// device's `x509Thumbprint.primaryThumbprint` (`authentication.type` `selfSigned`).
pub fn self_signed_device(device_id: &str, days: i64) -> Result<Issued, IssueError> {
    let key = KeyPair::generate()?;
    let cert = device_params(device_id, days)?.self_signed(&key)?;
    Ok(Issued::new(&cert, &key))
}

/// A certificate for `device_id` signed by the CA `ca_cert_pem` / `ca_key_pem`, valid for `days`
/// (a `certificateAuthority` device, once the hub trusts the CA).
pub fn ca_signed_device(
    device_id: &str,
    ca_cert_pem: &str,
    ca_key_pem: &str,
    days: i64,
) -> Result<Issued, IssueError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| IssueError::BadCa(format!("the CA key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)
        .map_err(|e| IssueError::BadCa(format!("the CA certificate: {e}")))?;
    let mut params = device_params(device_id, days)?;
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued::new(&cert, &key))
}
