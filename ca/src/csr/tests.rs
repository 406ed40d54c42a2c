use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use super::*;
use crate::cert::pem_encode;

const WEB: &str = "spiffe://mesh.internal/ns/default/svc/web";
/// `openssl req` output: P-256, URI SAN = WEB, plus subjectKeyIdentifier and basicConstraints
/// extensions that rcgen's own CSR parser would refuse.
const OPENSSL_P256: &str = include_str!("openssl-p256.csr.pem");
/// `openssl req` output: RSA 2048 (ring cannot generate RSA keys), URI SAN = WEB.
const OPENSSL_RSA: &str = include_str!("rsa2048.csr.pem");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ok,
    Mismatch,
    UnsupportedKey,
    Signature,
    BadPem,
    BadCsr,
}

fn classify(r: &Result<CheckedCsr, Error>) -> Expect {
    match r {
        Ok(_) => Expect::Ok,
        Err(Error::CsrIdentityMismatch { .. }) => Expect::Mismatch,
        Err(Error::UnsupportedKey { .. }) => Expect::UnsupportedKey,
        Err(Error::CsrSignature) => Expect::Signature,
        Err(Error::BadPem { .. }) => Expect::BadPem,
        Err(Error::BadCsr { .. }) => Expect::BadCsr,
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

fn san_uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

fn san_dns(s: &str) -> SanType {
    SanType::DnsName(Ia5String::try_from(s).unwrap())
}

/// A CSR signed by `key`, with subject CN "tamper-me" and the given SANs.
pub(crate) fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "tamper-me");
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn p256() -> KeyPair {
    KeyPair::generate().unwrap()
}

/// Re-encodes `pem` after `edit` changes its DER.
fn tampered(pem: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    edit(&mut der);
    pem_encode("CERTIFICATE REQUEST", &der)
}

#[test]
fn check_table() {
    let web = Identity::parse(WEB).unwrap();
    let allowed = vec!["web.example".to_owned()];
    let good = csr_with(&p256(), vec![san_uri(WEB)]);
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cases: Vec<(&str, String, Expect)> = vec![
        ("no san", csr_with(&p256(), vec![]), Expect::Ok),
        ("own identity", good.clone(), Expect::Ok),
        (
            "own identity and allowed dns",
            csr_with(&p256(), vec![san_uri(WEB), san_dns("web.example")]),
            Expect::Ok,
        ),
        (
            "other spiffe id",
            csr_with(
                &p256(),
                vec![san_uri("spiffe://mesh.internal/ns/default/svc/db")],
            ),
            Expect::Mismatch,
        ),
        (
            "own identity plus other spiffe id",
            csr_with(
                &p256(),
                vec![san_uri(WEB), san_uri("spiffe://mesh.internal/registry")],
            ),
            Expect::Mismatch,
        ),
        (
            "dns not allowed",
            csr_with(&p256(), vec![san_uri(WEB), san_dns("evil.example")]),
            Expect::Mismatch,
        ),
        (
            "ip san",
            csr_with(&p256(), vec![SanType::IpAddress([10, 0, 0, 1].into())]),
            Expect::Mismatch,
        ),
        (
            "email san",
            csr_with(
                &p256(),
                vec![SanType::Rfc822Name(
                    Ia5String::try_from("a@b.example").unwrap(),
                )],
            ),
            Expect::Mismatch,
        ),
        (
            "p-384 key",
            csr_with(&p384, vec![san_uri(WEB)]),
            Expect::UnsupportedKey,
        ),
        ("rsa key", OPENSSL_RSA.to_owned(), Expect::UnsupportedKey),
        (
            "openssl with extra extensions",
            OPENSSL_P256.to_owned(),
            Expect::Ok,
        ),
        (
            "flipped signature byte",
            tampered(&good, |der| {
                let last = der.len() - 1;
                der[last] ^= 0x01;
            }),
            Expect::Signature,
        ),
        (
            "flipped body byte",
            tampered(&good, |der| {
                let at = der.windows(9).position(|w| w == b"tamper-me").unwrap();
                der[at] ^= 0x01;
            }),
            Expect::Signature,
        ),
        (
            "truncated der",
            tampered(&good, |der| der.truncate(der.len() / 2)),
            Expect::BadCsr,
        ),
        ("garbage text", "hello".to_owned(), Expect::BadPem),
        (
            "certificate instead of csr",
            pem_encode("CERTIFICATE", b"\x30\x00"),
            Expect::BadPem,
        ),
        (
            "csr label around garbage der",
            pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
            Expect::BadCsr,
        ),
    ];
    for (name, pem, want) in cases {
        let got = check(&pem, &web, &allowed);
        assert_eq!(classify(&got), want, "{name}: {got:?}");
    }
}

#[test]
fn checked_reports_what_was_requested() {
    let web = Identity::parse(WEB).unwrap();
    let key = p256();
    let pem = csr_with(&key, vec![san_uri(WEB), san_dns("web.example")]);
    let checked = check(&pem, &web, &["web.example".to_owned()]).unwrap();
    assert!(checked.requests_identity());
    assert_eq!(checked.requested_dns(), ["web.example".to_owned()]);
    // The SPKI is the CSR key's, and the raw point is what rcgen will certify.
    assert!(checked.spki_der().ends_with(key.public_key_raw()));
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(&checked),
        key.public_key_raw()
    );

    let none = check(&csr_with(&key, vec![]), &web, &[]).unwrap();
    assert!(!none.requests_identity());
    assert!(none.requested_dns().is_empty());
}

#[test]
fn mismatch_names_the_requested_and_allowed_sans() {
    let web = Identity::parse(WEB).unwrap();
    let pem = csr_with(&p256(), vec![san_dns("evil.example")]);
    let err = check(&pem, &web, &["web.example".to_owned()]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("DNSName(evil.example)"), "{msg}");
    assert!(
        msg.contains(WEB) && msg.contains("DNSName(web.example)"),
        "{msg}"
    );
}

#[test]
fn an_unsupported_key_is_named() {
    let web = Identity::parse(WEB).unwrap();
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    for (name, pem, want) in [
        (
            "p-384",
            csr_with(&p384, vec![san_uri(WEB)]),
            "key is EC on curve secp384r1,",
        ),
        ("rsa", OPENSSL_RSA.to_owned(), "key is rsaEncryption,"),
    ] {
        let msg = check(&pem, &web, &[]).unwrap_err().to_string();
        assert!(msg.contains(want), "{name}: {msg}");
    }
}

#[test]
fn a_san_extension_that_does_not_parse_is_refused() {
    // Validly signed, but its subjectAltName (2.5.29.17) holds an INTEGER, not GeneralNames:
    // skipping it would accept a request whose names were never checked.
    let mut params = CertificateParams::default();
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        vec![0x02, 0x01, 0x05],
    )];
    let pem = params.serialize_request(&p256()).unwrap().pem().unwrap();
    let web = Identity::parse(WEB).unwrap();
    let got = check(&pem, &web, &[]);
    assert_eq!(classify(&got), Expect::BadCsr, "{got:?}");
}
