//! CSR checks and signing in the CA (`mesh_ca::csr::check`, `Authority::sign_csr`): the PEM a
//! host sends with its join, renewal or workload request. The input is the CSR's DER (wrapped in
//! PEM here, so mutations reach the ASN.1 parser), or PEM text when it starts with `-----BEGIN`.
//!
//! Invariants: never panics; a CSR that passes names no SAN but the expected identity and the
//! allowed DNS names, fails for any other identity if it asked for this one, and is issued a
//! certificate that names exactly the sign request's identity and certifies the CSR's key.

#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use mesh_api::identity::{Identity, TrustDomain};
use mesh_ca::{Authority, Error, SignRequest, cert_identities, csr};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

const WEB: &str = "spiffe://mesh.internal/ns/default/svc/web";
const OTHER: &str = "spiffe://mesh.internal/ns/default/svc/admin";
const DNS: &str = "web.default.svc.mesh";

struct Fixture {
    authority: Authority,
    web: Identity,
    other: Identity,
    allowed_dns: Vec<String>,
    now: SystemTime,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    // A fixed time, so a run does not depend on the clock.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let td = TrustDomain::new("mesh.internal").expect("valid trust domain");
    let (authority, _) = Authority::generate(&td, now).expect("CA generates");
    Fixture {
        authority,
        web: Identity::parse(WEB).expect("valid identity"),
        other: Identity::parse(OTHER).expect("valid identity"),
        allowed_dns: vec![DNS.to_owned()],
        now,
    }
});

fn pem_wrap(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}

fuzz_target!(|data: &[u8]| {
    let fx = &*FIXTURE;
    let pem = if data.starts_with(b"-----BEGIN") {
        match std::str::from_utf8(data) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    } else {
        pem_wrap(data)
    };
    let checked = match csr::check(&pem, &fx.web, &fx.allowed_dns) {
        Ok(checked) => checked,
        Err(
            Error::BadPem { .. }
            | Error::BadCsr { .. }
            | Error::CsrSignature
            | Error::UnsupportedKey { .. }
            | Error::CsrIdentityMismatch { .. },
        ) => return,
        Err(other) => panic!("csr::check returned an error it does not document: {other:?}"),
    };
    assert!(checked.requested_dns().iter().all(|d| d == DNS));
    // A CSR that asked for `web` never passes for another identity, and with no DNS allowed a
    // CSR that asked for a DNS name fails.
    let for_other = csr::check(&pem, &fx.other, &fx.allowed_dns);
    if checked.requests_identity() {
        assert!(
            matches!(for_other, Err(Error::CsrIdentityMismatch { .. })),
            "a CSR for {WEB} passed for {OTHER}: {for_other:?}"
        );
    }
    if !checked.requested_dns().is_empty() {
        assert!(matches!(
            csr::check(&pem, &fx.web, &[]),
            Err(Error::CsrIdentityMismatch { .. })
        ));
    }
    let req = SignRequest {
        identity: fx.web.clone(),
        dns_names: fx.allowed_dns.clone(),
        ttl: Duration::from_secs(3600),
        now: fx.now,
    };
    let issued = fx
        .authority
        .sign_csr(&pem, &req)
        .expect("a checked CSR is signed");
    let leaf = CertificateDer::from_pem_slice(issued.leaf_pem.as_bytes()).expect("leaf is PEM");
    assert_eq!(
        cert_identities(leaf.as_ref()).expect("leaf parses"),
        vec![WEB.to_owned()]
    );
    // The issued certificate certifies the CSR's key (its SPKI appears verbatim).
    assert!(
        leaf.as_ref()
            .windows(checked.spki_der().len())
            .any(|w| w == checked.spki_der()),
        "issued certificate does not carry the CSR's public key"
    );
});
