//! X.509 target: a client certificate as the TLS layer hands it to the hub (DER bytes an
//! unauthenticated peer chose). Calls [`leaf_identity`], [`verify_presented_chain`] (alone and
//! followed by the CA) and [`TrustedCas::anchor`] with a trusted CA. Properties: the thumbprints
//! read are the input's digests, and a certificate the trusted CA signed also passes the presented
//! chain check (its signature covers the validity period the check reads).

use iothub_emulator::x509::{Thumbprints, TrustedCas, leaf_identity, verify_presented_chain};
use rustls::pki_types::CertificateDer;

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

/// A CA made with `iothub-emulator cert ca --days 36500` (valid 2026-2126).
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVSgAwIBAgIUFVLHKuWGWvt7Mq76l7AUVIjtRRYwCgYIKoZIzj0EAwIw
NDEQMA4GA1UEAwwHRnV6eiBDQTEgMB4GA1UECgwXaW90aHViLWVtdWxhdG9yIHRl
c3QgQ0EwIBcNMjYxMjAyMDk0MTI2WhgPMjEyNjExMDkwOTQxMjZaMDQxEDAOBgNV
BAMMB0Z1enogQ0ExIDAeBgNVBAoMF2lvdGh1Yi1lbXVsYXRvciB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEm+VOwn+6vFqRTas0aMMgtrhRP6S7GCle
IDpZyTyNc09llQaT2jY+n1bephfRAO+F7o+x0zoE+W8RL3ECqUecpKNCMEAwDgYD
VR0PAQH/BAQDAgGGMB0GA1UdDgQWBBTsVKejwvmodSZ9qSWDNGi2UlDFIDAPBgNV
HRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIHdk2IPT4vNpWg/QNPUoaskv
YBUv1wT9oJGTxnZRhSwoAiEAmbW8cx9wqRVah+dJjDj7Oae0QzXDkB1SpqRYSFBc
AjE=
-----END CERTIFICATE-----\n";
/// A device certificate it signed (`cert device fuzz-dev --ca-dir`).
const LEAF_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkjCCATmgAwIBAgIUeefD2s0SfXnPGbTkGASX79KncmowCgYIKoZIzj0EAwIw
NDEQMA4GA1UEAwwHRnV6eiBDQTEgMB4GA1UECgwXaW90aHViLWVtdWxhdG9yIHRl
c3QgQ0EwIBcNMjYxMjAyMDk0MTI2WhgPMjEyNjExMDkwOTQxMjZaMBMxETAPBgNV
BAMMCGZ1enotZGV2MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVy6ePHfsGXeo
jbXPi/bbacN+8JijFWQsmnAH1QtxVn25YDxR61ZZdKXqU9j0R3I6Bh7Ky84+oQrN
cmrGk3p7AKNIMEYwHwYDVR0jBBgwFoAU7FSno8L5qHUmfaklgzRotlJQxSAwDgYD
VR0PAQH/BAQDAgOIMBMGA1UdJQQMMAoGCCsGAQUFBwMCMAoGCCqGSM49BAMCA0cA
MEQCIFlWCo1w9T9FgpP7H8DAQBnYfIGzeUPhcJvqZqbrcxh+AiAGl8h6/ppisUqB
6o1X9oTGFFvlYzVYqchXAvLPJAKW3Q==
-----END CERTIFICATE-----\n";
/// A self-signed device certificate (`cert device fuzz-self`).
const SELF_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBUTCB+aADAgECAhRf7IZwuLIQABY3HqujKcWAZc67rDAKBggqhkjOPQQDAjAU
MRIwEAYDVQQDDAlmdXp6LXNlbGYwIBcNMjYxMjAyMDk0MTI2WhgPMjEyNjExMDkw
OTQxMjZaMBQxEjAQBgNVBAMMCWZ1enotc2VsZjBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABEPQSRHDXppxZKQY+byKcLjBvZJVm21bvvr4bcAu91m/QGl+TqKNWtnS
Mhe+swtl5FkG2aVcFQPyeqUZZHBiUm+jJzAlMA4GA1UdDwEB/wQEAwIDiDATBgNV
HSUEDDAKBggrBgEFBQcDAjAKBggqhkjOPQQDAgNHADBEAiBEHYuGFrLCjL4yv3nL
+XpWaMvL8TCKSCajSWz5vsMaugIgX6oUMlTPOZdO2UsFM/ayjBAM+D5J6a4tvk3P
FsRbog4=
-----END CERTIFICATE-----\n";
/// Inside every seed's validity period (2033-05-18).
const NOW_SECS: i64 = 2_000_000_000;

fn der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes()).flatten().next().map(|c| c.to_vec()).unwrap_or_default()
}

fn seeds() -> Vec<Vec<u8>> {
    vec![der(LEAF_PEM), der(SELF_PEM), der(CA_PEM)]
}

fn check() -> Check {
    let (trusted, ca) = untracked(|| {
        let trusted = TrustedCas::default();
        let _ = trusted.add_pem(CA_PEM);
        (trusted, der(CA_PEM))
    });
    Box::new(move |input| {
        let alone = verify_presented_chain(&[input], NOW_SECS);
        let with_ca = verify_presented_chain(&[input, &ca], NOW_SECS);
        let anchored = trusted.anchor(&[CertificateDer::from(input)]);
        if anchored.is_some() && with_ca.is_err() {
            return Err(format!("anchored at {anchored:?} but the presented chain fails: {with_ca:?}"));
        }
        let Ok(identity) = leaf_identity(input) else {
            return Ok(Outcome::Rejected);
        };
        if identity.thumbprints != Thumbprints::of(input) {
            return Err("leaf_identity's thumbprints are not the input's digests".into());
        }
        Ok(if alone.is_ok() || with_ca.is_ok() { Outcome::Accepted } else { Outcome::Rejected })
    })
}

/// Client certificate chains (`x509::leaf_identity`, `verify_presented_chain`, `TrustedCas::anchor`).
pub const CHAIN: Target = Target {
    name: "x509_chain",
    about: "x509::leaf_identity, verify_presented_chain and TrustedCas::anchor on a client certificate",
    seeds,
    dictionary: || {
        [
            &[0x30u8, 0x82][..],
            &[0x06, 0x03, 0x55, 0x04, 0x03],
            &[0x17, 0x0d],
            &[0x18, 0x0f],
            &[0x01, 0x01, 0xff],
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect()
    },
    max_len: 4096,
    alloc_k: 64,
    alloc_c: 256 * 1024,
    make: check,
};
