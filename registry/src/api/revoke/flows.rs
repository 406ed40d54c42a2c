//! Revocation flows through the API methods against a memory store: removal, the race with a
//! signing in flight, rejoining, self-revocation, the interceptor and pruning.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use mesh_api::name::Label;
use mesh_api::{NodeName, TrustDomain};
use mesh_ca::Authority;

use super::*;
use crate::api::Metrics;
use crate::config::Config;
use crate::store::{MemoryStore, NodeRecord};

const NOW: i64 = 1_900_000_000;

struct Fixture {
    api: RegistryApi,
    store: Arc<MemoryStore>,
    td: TrustDomain,
    _shutdown: watch::Sender<bool>,
}

fn fixture() -> Fixture {
    let td = TrustDomain::new("mesh.test").unwrap();
    let text = Config::render(
        &td,
        Path::new("/nonexistent"),
        "127.0.0.1:7700".parse().unwrap(),
        "127.0.0.1:7701".parse().unwrap(),
    );
    let config = Config::from_toml_str(Path::new("registry.toml"), &text).unwrap();
    let (ca, _) = Authority::generate(&td, SystemTime::now()).unwrap();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let store = Arc::new(MemoryStore::new());
    let api = RegistryApi::new(
        store.clone(),
        Arc::new(crate::ca::CaHandle::new(ca)),
        config,
        Metrics::default(),
        shutdown_rx,
    )
    .unwrap();
    Fixture {
        api,
        store,
        td,
        _shutdown: shutdown,
    }
}

fn cert(serial: &str, identity: &str, node: &str, not_after: i64) -> CertRecord {
    CertRecord {
        serial: serial.into(),
        identity: identity.into(),
        node: node.into(),
        issued_unix: 0,
        not_before_unix: 0,
        not_after_unix: not_after,
    }
}

impl Fixture {
    fn admin(&self, serial: &str) -> PeerInfo {
        PeerInfo {
            identity: Some(Identity::Admin {
                trust_domain: self.td.clone(),
                name: Label::new("operator").unwrap(),
            }),
            serial: Some(serial.to_owned()),
            ..PeerInfo::default()
        }
    }

    fn register(&self, name: &str, certs: &[CertRecord]) {
        let store = self.api.inner.store.as_ref();
        store
            .put_node(&NodeRecord {
                name: name.into(),
                datacenter: "dc1".into(),
                zone: "a".into(),
                allowed_services: vec!["default/api".into()],
                token_id: "t".into(),
                joined_unix: 0,
                last_renewed_unix: 0,
                cert_serial: String::new(),
                cert_not_after_unix: 0,
            })
            .unwrap();
        for c in certs {
            store.put_cert(c).unwrap();
        }
    }

    fn denies(&self, serial: &str) -> bool {
        self.api.inner.revocations.denies(serial)
    }
}

#[tokio::test]
async fn a_removal_whose_deny_list_commit_fails_leaves_the_node_registered() {
    let f = fixture();
    let live = NOW * 2;
    f.register("x", &[cert("0a", "spiffe://mesh.test/node/x", "x", live)]);
    f.store.fail_policy_writes(true);
    let failed = f
        .api
        .do_remove_node(&f.admin("ff"), pb::RemoveNodeRequest { name: "x".into() })
        .await
        .expect_err("the deny-list could not be written");
    assert_eq!(failed.status.code(), tonic::Code::Unavailable);
    // Nothing half-done: the node is neither denied nor deleted, so the error is the truth.
    assert!(!f.denies("0a"));
    assert!(f.api.inner.store.get_node("x").unwrap().is_some());

    f.store.fail_policy_writes(false);
    let resp = f
        .api
        .do_remove_node(&f.admin("ff"), pb::RemoveNodeRequest { name: "x".into() })
        .await
        .unwrap_or_else(|r| panic!("{:?}", r.status));
    assert!(resp.node_removed && f.denies("0a"));
    assert!(f.api.inner.store.get_node("x").unwrap().is_none());
}

#[tokio::test]
async fn a_removed_node_is_denied_and_a_signing_in_flight_is_revoked_with_it() {
    let f = fixture();
    let live = NOW * 2;
    f.register(
        "x",
        &[
            cert("0a", "spiffe://mesh.test/node/x", "x", live),
            cert("0b", "spiffe://mesh.test/ns/default/svc/api", "x", live),
            cert("0c", "spiffe://mesh.test/node/x", "x", 10),
        ],
    );
    f.register("y", &[cert("0d", "spiffe://mesh.test/node/y", "y", live)]);
    let resp = f
        .api
        .do_remove_node(&f.admin("ff"), pb::RemoveNodeRequest { name: "x".into() })
        .await
        .unwrap_or_else(|r| panic!("{:?}", r.status));
    assert!(resp.node_removed);
    let mut revoked: Vec<_> = resp.revoked.iter().map(|c| c.serial.as_str()).collect();
    revoked.sort_unstable();
    assert_eq!(
        revoked,
        ["0a", "0b"],
        "expired 0c is not listed, y's 0d is untouched"
    );
    assert!(f.denies("0a") && f.denies("0b") && !f.denies("0d"));
    assert!(f.api.inner.store.get_node("x").unwrap().is_none());

    // A certificate signed for x while the removal ran is recorded, refused and revoked.
    let name = NodeName::new("x").unwrap();
    let late = cert("0e", "spiffe://mesh.test/ns/default/svc/api", "x", live);
    let refused = f.api.record_issued(&name, late).await.unwrap_err();
    assert_eq!(refused.reason, "node_removed");
    assert!(f.denies("0e"));
    // y still signs.
    let ok = cert("0f", "spiffe://mesh.test/node/y", "y", live);
    f.api
        .record_issued(&NodeName::new("y").unwrap(), ok)
        .await
        .unwrap();
    assert!(!f.denies("0f"));

    // The name joins again only with a token made to replace it.
    assert_eq!(
        f.api.check_removed_join(&name, None).unwrap_err().reason,
        "node_removed"
    );
    assert_eq!(
        f.api
            .check_removed_join(&name, Some("other"))
            .unwrap_err()
            .reason,
        "node_removed"
    );
    assert!(f.api.check_removed_join(&name, Some("x")).unwrap());
    f.api.readmit(&name).await;
    assert!(!f.api.check_removed_join(&name, None).unwrap());
    assert!(
        f.denies("0a"),
        "readmitting the name keeps its old certificates revoked"
    );
}

#[tokio::test]
async fn nobody_revokes_their_own_credentials_and_revoked_callers_are_refused() {
    let f = fixture();
    let store = f.api.inner.store.as_ref();
    store
        .put_cert(&cert(
            "aa",
            "spiffe://mesh.test/admin/operator",
            "",
            NOW * 2,
        ))
        .unwrap();
    store
        .put_cert(&cert("bb", "spiffe://mesh.test/admin/ops", "", NOW * 2))
        .unwrap();
    let own = pb::RevokeCertificatesRequest {
        identity: "admin/operator".into(),
        ..Default::default()
    };
    let refused = f
        .api
        .do_revoke_certificates(&f.admin("aa"), own)
        .await
        .unwrap_err();
    assert_eq!(refused.reason, "own_credentials");
    assert!(!f.denies("aa"));
    let other = pb::RevokeCertificatesRequest {
        identity: "admin/ops".into(),
        ..Default::default()
    };
    f.api
        .do_revoke_certificates(&f.admin("aa"), other)
        .await
        .unwrap_or_else(|r| panic!("{:?}", r.status));
    assert!(f.denies("bb"));

    // The interceptor in front of every call.
    let mut check = f.api.revocation_check();
    let call = |serial: &str| {
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(f.admin(serial));
        req
    };
    let err = check(call("bb")).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(check(call("aa")).is_ok());
    assert_eq!(f.api.inner.metrics.revoked_calls.get(), 1);

    // Selectors: exactly one, and well-formed.
    for bad in [
        pb::RevokeCertificatesRequest::default(),
        pb::RevokeCertificatesRequest {
            serial: "zz".into(),
            ..Default::default()
        },
        pb::RevokeCertificatesRequest {
            serial: "aa".into(),
            node: "x".into(),
            ..Default::default()
        },
        pb::RevokeCertificatesRequest {
            service: "Bad Name/x".into(),
            ..Default::default()
        },
        pb::RevokeCertificatesRequest {
            identity: "root/x".into(),
            ..Default::default()
        },
    ] {
        let r = f
            .api
            .do_revoke_certificates(&f.admin("aa"), bad.clone())
            .await;
        assert_eq!(r.unwrap_err().reason, "bad_request", "{bad:?}");
    }
}

#[tokio::test]
async fn expired_entries_leave_the_deny_list() {
    let f = fixture();
    let now = unix(SystemTime::now());
    f.register(
        "x",
        &[
            cert("01", "spiffe://mesh.test/node/x", "x", now + 2),
            cert("02", "spiffe://mesh.test/node/x", "x", now + 3_600),
        ],
    );
    f.api
        .do_remove_node(&f.admin("ff"), pb::RemoveNodeRequest { name: "x".into() })
        .await
        .unwrap_or_else(|r| panic!("{:?}", r.status));
    assert!(f.denies("01") && f.denies("02"));
    // As of three seconds later: 01 has expired, 02 has not.
    f.api.prune_revocations_at(now + 3).await;
    assert!(!f.denies("01") && f.denies("02"));
    assert!(
        f.api.inner.revocations.current().spec.is_removed("x"),
        "the name stays removed"
    );
}
