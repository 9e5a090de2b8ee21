//! Unit tests of thumbprint matching, presented-chain checks and CA anchoring (no sockets).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::issue::{ca_signed_device, self_signed_device, test_ca};
use super::*;

fn der(pem: &str) -> CertificateDer<'static> {
    rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap()
}

#[test]
fn thumbprints_normalize_and_match_by_length() {
    let cert = self_signed_device("dev-1", 30).unwrap();
    let t = Thumbprints::of(&der(&cert.cert_pem));
    assert_eq!(t, cert.thumbprints);
    let sha1 = t.sha1_hex();
    assert_eq!(sha1.len(), 40);
    assert!(t.matches(&sha1));
    assert!(t.matches(&sha1.to_ascii_lowercase()), "case-insensitive");
    let colons: Vec<String> = sha1.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into()).collect();
    assert!(t.matches(&colons.join(":")), "colon-separated");
    assert!(t.matches(&format!(" {} ", t.sha256_hex())), "SHA-256 by its length");
    let other = Thumbprints::of(b"another certificate");
    assert!(!other.matches(&sha1));
    assert!(!t.matches(&sha1[..38]), "a short thumbprint matches nothing");
    assert!(normalize_thumbprint("xyz").is_err());
    assert!(normalize_thumbprint(&"a".repeat(41)).is_err());
    assert_eq!(normalize_thumbprint(&"ab".repeat(32)).unwrap(), "AB".repeat(32));
}

#[test]
fn leaf_identity_reads_the_common_name() {
    let cert = self_signed_device("fridge-7", 30).unwrap();
    let leaf = leaf_identity(&der(&cert.cert_pem)).unwrap();
    assert_eq!(leaf.common_name.as_deref(), Some("fridge-7"));
    assert!(leaf.not_after_secs > OffsetDateTime::now_utc().unix_timestamp());
    assert!(matches!(leaf_identity(b"\x30\x03\x02\x01\x01"), Err(CertError::Malformed { .. })));
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[test]
fn presented_chains_must_be_in_date_and_linked() {
    let ss = self_signed_device("d", 30).unwrap();
    verify_presented_chain(&[der(&ss.cert_pem).as_ref()], now()).unwrap();
    let ca = test_ca("Chain CA", 30).unwrap();
    let leaf = ca_signed_device("d", &ca.cert_pem, &ca.key_pem, 30).unwrap();
    let (leaf_der, ca_der) = (der(&leaf.cert_pem), der(&ca.cert_pem));
    verify_presented_chain(&[leaf_der.as_ref()], now()).unwrap();
    verify_presented_chain(&[leaf_der.as_ref(), ca_der.as_ref()], now()).unwrap();

    let other = test_ca("Other CA", 30).unwrap();
    let e = verify_presented_chain(&[leaf_der.as_ref(), der(&other.cert_pem).as_ref()], now()).unwrap_err();
    assert!(matches!(e, CertError::BadLink { index: 0, .. }), "{e}");

    let e = verify_presented_chain(&[leaf_der.as_ref()], now() + 400 * 86_400).unwrap_err();
    assert!(matches!(e, CertError::OutsideValidity { when: "expired", .. }), "{e}");
    let e = verify_presented_chain(&[leaf_der.as_ref()], now() - 5 * 86_400).unwrap_err();
    assert!(matches!(e, CertError::OutsideValidity { when: "not yet valid", .. }), "{e}");
    assert_eq!(verify_presented_chain(&[], now()), Err(CertError::Empty));
    let nine = vec![leaf_der.as_ref(); 9];
    assert_eq!(verify_presented_chain(&nine, now()), Err(CertError::TooLong(9)));
    assert!(matches!(verify_presented_chain(&[b"junk"], now()), Err(CertError::Malformed { index: 0, .. })));
}

/// An intermediate CA signed by `root`, and its key.
fn intermediate(root: &issue::Issued) -> (String, String) {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "Intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    let root_issuer =
        Issuer::from_ca_cert_pem(&root.cert_pem, KeyPair::from_pem(&root.key_pem).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &root_issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn chains_anchor_only_at_a_trusted_ca() {
    let cas = TrustedCas::default();
    let root = test_ca("Root", 30).unwrap();
    let leaf = ca_signed_device("d", &root.cert_pem, &root.key_pem, 30).unwrap();
    assert_eq!(cas.anchor(&[der(&leaf.cert_pem)]), None, "nothing is trusted yet");

    let added = cas.add_pem(&root.cert_pem).unwrap();
    assert_eq!(added.len(), 1);
    assert!(added[0].subject.contains("CN=Root"), "{}", added[0].subject);
    assert_eq!(added[0].thumbprint, root.thumbprints.sha1_hex());
    cas.add_pem(&root.cert_pem).unwrap();
    assert_eq!(cas.list().len(), 1, "the same CA is kept once");

    let subject = cas.anchor(&[der(&leaf.cert_pem)]).expect("leaf signed by the root");
    assert!(subject.contains("CN=Root"));
    assert!(cas.anchor(&[der(&leaf.cert_pem), der(&root.cert_pem)]).is_some(), "the root sent along");
    assert_eq!(cas.anchor(&[der(&root.cert_pem)]), None, "a CA is no device certificate");

    let stranger = test_ca("Stranger", 30).unwrap();
    let foreign = ca_signed_device("d", &stranger.cert_pem, &stranger.key_pem, 30).unwrap();
    assert_eq!(cas.anchor(&[der(&foreign.cert_pem)]), None);
    assert_eq!(cas.anchor(&[der(&foreign.cert_pem), der(&stranger.cert_pem)]), None);
    let ss = self_signed_device("d", 30).unwrap();
    assert_eq!(cas.anchor(&[der(&ss.cert_pem)]), None);

    // Through an intermediate the device presents; not without it.
    let (int_pem, int_key) = intermediate(&root);
    let via = ca_signed_device("d", &int_pem, &int_key, 30).unwrap();
    assert!(cas.anchor(&[der(&via.cert_pem), der(&int_pem)]).is_some());
    assert_eq!(cas.anchor(&[der(&via.cert_pem)]), None);
    // A forged link: the intermediate's name, the stranger's signature.
    assert_eq!(cas.anchor(&[der(&foreign.cert_pem), der(&int_pem)]), None);
}

#[test]
fn only_ca_certificates_can_be_trusted() {
    let cas = TrustedCas::default();
    let ss = self_signed_device("d", 30).unwrap();
    assert!(matches!(cas.add_pem(&ss.cert_pem), Err(CertError::NotACa(_))));
    assert!(matches!(cas.add_pem("not pem"), Err(CertError::NotACa(_))));
    assert!(cas.list().is_empty());
}
