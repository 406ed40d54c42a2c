use std::time::UNIX_EPOCH;

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;
use crate::{cert_identities, cert_not_after};

const DAY: Duration = Duration::from_secs(24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A table case's expectation on an error.
type ErrCheck = fn(&Error) -> bool;

fn td() -> TrustDomain {
    TrustDomain::new("mesh.internal").unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn web() -> Identity {
    Identity::parse("spiffe://mesh.internal/ns/default/svc/web").unwrap()
}

fn request(identity: Identity, ttl: Duration) -> SignRequest {
    SignRequest {
        identity,
        dns_names: Vec::new(),
        ttl,
        now: now(),
    }
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    parse_cert(der, "test").unwrap()
}

fn csr_for(identity: &str) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(identity).unwrap())];
    let key = KeyPair::generate().unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn close(a: SystemTime, b: SystemTime) -> bool {
    let d = a.duration_since(b).or_else(|e| Ok::<_, ()>(e.duration()));
    d.unwrap() <= Duration::from_secs(1)
}

#[test]
fn generate_then_load() {
    let (ca, files) = Authority::generate(&td(), now()).unwrap();
    assert!(files.root_key_pem.is_some());
    assert_eq!(ca.trust_domain(), &td());
    assert!(close(ca.intermediate_not_after(), now() + YEAR));
    assert!(close(ca.root_not_after(), now() + 10 * YEAR));

    type LoadCheck = fn(&Result<Authority, Error>) -> bool;
    let cases: Vec<(&str, SystemTime, LoadCheck)> = vec![
        ("at now", now(), |r| r.is_ok()),
        ("in 364 days", now() + 364 * DAY, |r| r.is_ok()),
        ("in two years", now() + 2 * YEAR, |r| {
            matches!(r, Err(Error::IntermediateExpired { .. }))
        }),
        ("an hour early", now() - Duration::from_secs(3600), |r| {
            matches!(r, Err(Error::IntermediateNotYetValid { .. }))
        }),
        ("in eleven years", now() + 11 * YEAR, |r| {
            matches!(r, Err(Error::RootExpired { .. }))
        }),
    ];
    for (name, at, want) in cases {
        let got = Authority::load(&td(), &files, at);
        assert!(want(&got), "{name}: {got:?}");
    }
    let loaded = Authority::load(&td(), &files, now()).unwrap();
    assert_eq!(loaded.root_fingerprint(), ca.root_fingerprint());
    assert_eq!(loaded.trust_bundle_pem(), files.root_cert_pem);
}

#[test]
fn generated_certificates() {
    let (ca, files) = Authority::generate(&td(), now()).unwrap();
    let root_der = ders(&files.root_cert_pem).remove(0);
    let int_der = ders(&files.intermediate_cert_pem).remove(0);
    assert_eq!(ca.root_der(), root_der.as_slice());
    let (root, int) = (parse(&root_der), parse(&int_der));

    let path_len = |c: &X509Certificate<'_>| {
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        bc.path_len_constraint
    };
    assert_eq!(path_len(&root), Some(1));
    assert_eq!(path_len(&int), Some(0));
    let cn = root.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "mesh.internal mesh root CA");
    root.verify_signature(None).unwrap();
    int.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(
        asn1_to_system(root.validity().not_before).unwrap(),
        now() - CLOCK_SKEW
    );
    assert!(close(
        asn1_to_system(root.validity().not_after).unwrap(),
        now() + 10 * YEAR
    ));

    let fp = ca.root_fingerprint();
    let digest = ring::digest::digest(&ring::digest::SHA256, &root_der);
    assert_eq!(fp, mesh_api::token::format_fingerprint(digest.as_ref()));
    assert!(format!("{files:?}").contains("<redacted>"));
    assert!(!format!("{files:?}").contains("PRIVATE KEY"));
}

#[test]
fn import_table() {
    let (ca, good) = Authority::generate(&td(), now()).unwrap();
    let (_, other) = Authority::generate(&td(), now()).unwrap();
    let (leaf, leaf_key) = ca.issue(&request(web(), DAY)).unwrap();

    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, ErrCheck);
    let cases: Vec<Case<'_>> = vec![
        (
            "intermediate from another root",
            &good.root_cert_pem,
            &other.intermediate_cert_pem,
            &other.intermediate_key_pem,
            |e| matches!(e, Error::NotSignedByRoot),
        ),
        (
            "wrong intermediate key",
            &good.root_cert_pem,
            &good.intermediate_cert_pem,
            &other.intermediate_key_pem,
            |e| {
                matches!(
                    e,
                    Error::KeyMismatch {
                        which: "intermediate"
                    }
                )
            },
        ),
        (
            "leaf as intermediate",
            &good.root_cert_pem,
            &leaf.leaf_pem,
            &leaf_key,
            |e| {
                matches!(
                    e,
                    Error::NotCa {
                        which: "intermediate"
                    }
                )
            },
        ),
        (
            "leaf as root",
            &leaf.leaf_pem,
            &good.intermediate_cert_pem,
            &good.intermediate_key_pem,
            |e| matches!(e, Error::NotCa { which: "root" }),
        ),
        (
            "key is not pem",
            &good.root_cert_pem,
            &good.intermediate_cert_pem,
            "nope",
            |e| matches!(e, Error::BadKey { .. }),
        ),
        (
            "root is not pem",
            "nope",
            &good.intermediate_cert_pem,
            &good.intermediate_key_pem,
            |e| matches!(e, Error::BadPem { .. }),
        ),
    ];
    for (name, root, int, key, want) in cases {
        match Authority::import(&td(), root, int, key, now()) {
            Ok(_) => panic!("{name}: imported"),
            Err(e) => assert!(want(&e), "{name}: {e:?}"),
        }
    }

    // Good material, with the intermediate file carrying the root too (a common bundle).
    let bundle = format!("{}{}", good.intermediate_cert_pem, good.root_cert_pem);
    let (imported, files) = Authority::import(
        &td(),
        &good.root_cert_pem,
        &bundle,
        &good.intermediate_key_pem,
        now(),
    )
    .unwrap();
    assert_eq!(files.root_key_pem, None);
    assert_eq!(files.intermediate_cert_pem, good.intermediate_cert_pem);
    assert_eq!(imported.root_fingerprint(), ca.root_fingerprint());
    Authority::load(&td(), &files, now()).unwrap();
    imported.issue(&request(web(), DAY)).unwrap();
}

#[test]
fn load_checks_root_key_when_present() {
    let (_, mut files) = Authority::generate(&td(), now()).unwrap();
    files.root_key_pem = Some(files.intermediate_key_pem.clone());
    let err = Authority::load(&td(), &files, now()).unwrap_err();
    assert!(
        matches!(err, Error::KeyMismatch { which: "root" }),
        "{err:?}"
    );
}

#[test]
fn signed_leaf() {
    let (ca, files) = Authority::generate(&td(), now()).unwrap();
    let mut req = request(web(), DAY);
    req.dns_names = vec!["web.example".to_owned()];
    let csr = csr_for(&web().to_string());
    let issued = ca.sign_csr(&csr, &req).unwrap();

    let chain = ders(&issued.chain_pem);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], ders(&issued.leaf_pem)[0]);
    assert_eq!(chain[1], ders(&files.intermediate_cert_pem)[0]);
    let root_der = ders(&files.root_cert_pem).remove(0);
    let (leaf, int, root) = (parse(&chain[0]), parse(&chain[1]), parse(&root_der));
    leaf.verify_signature(Some(int.public_key())).unwrap();
    int.verify_signature(Some(root.public_key())).unwrap();
    assert!(leaf.verify_signature(Some(root.public_key())).is_err());

    assert_eq!(cert_identities(&chain[0]).unwrap(), vec![web().to_string()]);
    let sans = &leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        sans.general_names,
        vec![
            GeneralName::URI("spiffe://mesh.internal/ns/default/svc/web"),
            GeneralName::DNSName("web.example"),
        ]
    );
    let cn = leaf.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), web().to_string());
    assert!(!leaf.is_ca());
    assert!(
        leaf.basic_constraints().unwrap().is_some(),
        "explicit CA:FALSE"
    );
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));

    assert_eq!(issued.serial, leaf.raw_serial_as_string().replace(':', ""));
    assert_eq!(issued.identity, web());
    assert!(close(issued.not_after, now() + DAY));
    assert!(close(issued.not_before, now() - CLOCK_SKEW));
    assert_eq!(cert_not_after(&issued.chain_pem).unwrap(), issued.not_after);
    assert_eq!(
        asn1_to_system(leaf.validity().not_before).unwrap(),
        issued.not_before
    );
}

#[test]
fn ttl_is_clamped_to_the_intermediate() {
    let (ca, _) = Authority::generate(&td(), now()).unwrap();
    let (issued, _) = ca.issue(&request(web(), 5 * YEAR)).unwrap();
    assert_eq!(issued.not_after, ca.intermediate_not_after());
    let (issued, _) = ca.issue(&request(web(), Duration::MAX)).unwrap();
    assert_eq!(issued.not_after, ca.intermediate_not_after());
}

#[test]
fn refusals() {
    let (ca, _) = Authority::generate(&td(), now()).unwrap();
    let foreign = Identity::parse("spiffe://other.domain/ns/default/svc/web").unwrap();
    let csr = csr_for(&foreign.to_string());
    let mut late = request(web(), DAY);
    late.now = ca.intermediate_not_after() + DAY;
    let mut bad_dns = request(web(), DAY);
    bad_dns.dns_names = vec!["not a name".to_owned()];

    let cases: Vec<(&str, Result<Issued, Error>, ErrCheck)> = vec![
        (
            "sign_csr foreign",
            ca.sign_csr(&csr, &request(foreign.clone(), DAY)),
            |e| matches!(e, Error::ForeignTrustDomain { .. }),
        ),
        (
            "issue foreign",
            ca.issue(&request(foreign, DAY)).map(|(i, _)| i),
            |e| matches!(e, Error::ForeignTrustDomain { .. }),
        ),
        (
            "csr for another identity",
            ca.sign_csr(
                &csr_for("spiffe://mesh.internal/registry"),
                &request(web(), DAY),
            ),
            |e| matches!(e, Error::CsrIdentityMismatch { .. }),
        ),
        (
            "zero ttl",
            ca.issue(&request(web(), Duration::ZERO)).map(|(i, _)| i),
            |e| matches!(e, Error::ZeroTtl),
        ),
        (
            "after intermediate expiry",
            ca.issue(&late).map(|(i, _)| i),
            |e| matches!(e, Error::IntermediateExpired { .. }),
        ),
        (
            "invalid dns name",
            ca.issue(&bad_dns).map(|(i, _)| i),
            |e| matches!(e, Error::BadDnsName { .. }),
        ),
    ];
    for (name, got, want) in cases {
        match got {
            Ok(_) => panic!("{name}: issued"),
            Err(e) => assert!(want(&e), "{name}: {e:?}"),
        }
    }
}

#[test]
fn issue_returns_matching_key_and_fresh_serials() {
    let (ca, _) = Authority::generate(&td(), now()).unwrap();
    let (a, key_a) = ca.issue(&request(web(), DAY)).unwrap();
    let (b, _) = ca.issue(&request(web(), DAY)).unwrap();
    assert_ne!(a.serial, b.serial);
    assert_eq!(a.serial.len(), 32);

    let key = KeyPair::from_pem(&key_a).unwrap();
    let der = ders(&a.leaf_pem).remove(0);
    let leaf = parse(&der);
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert!(key_a.starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[test]
fn signing_as_of_before_the_intermediate_existed_is_refused() {
    let (ca, _) = Authority::generate(&td(), now()).unwrap();
    let mut req = request(web(), Duration::from_secs(3600));
    req.now = now() - Duration::from_secs(2 * 24 * 3600);
    assert!(matches!(
        ca.issue(&req),
        Err(Error::IntermediateNotYetValid { .. })
    ));
}

#[test]
fn a_new_intermediate_signs_under_the_same_root() {
    let (old, files) = Authority::generate(&td(), now()).unwrap();
    let later = now() + 30 * DAY;
    let next = Authority::new_intermediate(&td(), &files, later).unwrap();
    assert_eq!(next.root_cert_pem, files.root_cert_pem, "same root");
    assert_ne!(next.intermediate_cert_pem, files.intermediate_cert_pem);
    let new = Authority::load(&td(), &next, later).unwrap();
    assert_eq!(new.root_der(), old.root_der());
    assert!(new.intermediate_not_after() > old.intermediate_not_after());
    // A leaf of the new intermediate chains to the root the old leaves chain to.
    let issued = new
        .sign_csr(
            &csr_for(web().to_string().as_str()),
            &SignRequest {
                now: later,
                ..request(web(), DAY)
            },
        )
        .unwrap();
    let chain = ders(&issued.chain_pem);
    let int = parse(&chain[1]);
    assert!(
        int.verify_signature(Some(parse(old.root_der()).public_key()))
            .is_ok()
    );
    // Without the root key there is nothing to sign with.
    let offline = CaFiles {
        root_key_pem: None,
        ..files
    };
    assert!(matches!(
        Authority::new_intermediate(&td(), &offline, later),
        Err(Error::RootKeyMissing)
    ));
}

#[test]
fn trust_bundles_must_hold_the_root_and_only_cas() {
    let (a, _) = Authority::generate(&td(), now()).unwrap();
    let (b, _) = Authority::generate(&td(), now()).unwrap();
    let both = format!("{}{}", b.root_pem(), a.root_pem());
    let a = a.with_trust_bundle(&both).unwrap();
    assert_eq!(ders(&a.trust_bundle_pem()).len(), 2);
    let (c, _) = Authority::generate(&td(), now()).unwrap();
    assert!(matches!(
        c.with_trust_bundle(b.root_pem()),
        Err(Error::BundleWithoutRoot)
    ));
    let (d, _) = Authority::generate(&td(), now()).unwrap();
    let (leaf, _) = d.issue(&request(web(), DAY)).unwrap();
    let with_leaf = format!("{}{}", d.root_pem(), leaf.leaf_pem);
    assert!(matches!(
        d.with_trust_bundle(&with_leaf),
        Err(Error::BundleNotCa { index: 1 })
    ));
}

#[test]
fn a_site_signs_under_the_shared_root_without_its_key() {
    let (a, files) = Authority::generate(&td(), now()).unwrap();
    let b_files = Authority::site_intermediate(&td(), &files, "b", now()).unwrap();
    assert_eq!(b_files.root_cert_pem, files.root_cert_pem, "one root");
    assert!(
        b_files.root_key_pem.is_none(),
        "a site never holds the root key"
    );
    let b = Authority::load(&td(), &b_files, now()).unwrap();
    assert_eq!(b.root_fingerprint(), a.root_fingerprint());
    let int = ders(b.intermediate_pem()).remove(0);
    let subject = parse(&int).subject().to_string();
    assert!(subject.contains("site b"), "{subject}");
    // Leaves of either site chain to the same root through their own intermediate.
    for ca in [&a, &b] {
        let (issued, _) = ca.issue(&request(web(), DAY)).unwrap();
        let chain = ders(&issued.chain_pem);
        assert!(
            parse(&chain[0])
                .verify_signature(Some(parse(&chain[1]).public_key()))
                .is_ok()
        );
        assert!(
            parse(&chain[1])
                .verify_signature(Some(parse(a.root_der()).public_key()))
                .is_ok()
        );
    }
    // A site's files cannot start a third site: no root key to sign with.
    assert!(matches!(
        Authority::site_intermediate(&td(), &b_files, "c", now()),
        Err(Error::RootKeyMissing)
    ));
}
