//! Gossip key RPCs against a memory store, driven through the API methods: the watch (first
//! keyring, then each change, end on drain), reports and connections in the status, who may
//! call what, and how refused changes are reported.

use std::path::Path;

use futures::StreamExt as _;
use mesh_api::name::Label;
use mesh_api::{ServiceKey, TrustDomain};
use mesh_ca::Authority;
use tonic::Code;

use super::*;
use crate::config::Config;
use crate::store::MemoryStore;

use pb::change_gossip_keys_request::Action as Wire;

struct Fixture {
    api: RegistryApi,
    store: Arc<MemoryStore>,
    shutdown: watch::Sender<bool>,
    td: TrustDomain,
}

/// A registry API over a memory store holding a first keyring of one fresh key.
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
    let store = Arc::new(MemoryStore::new());
    keyring::ensure(store.as_ref()).unwrap();
    let (shutdown, shutdown_rx) = watch::channel(false);
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
        shutdown,
        td,
    }
}

fn peer(identity: Option<Identity>) -> PeerInfo {
    PeerInfo {
        identity,
        ..PeerInfo::default()
    }
}

fn key(fill: u8) -> String {
    KeyMaterial::from_bytes([fill; 32]).to_base64()
}

fn id_of(key: &str) -> String {
    KeyMaterial::from_base64(key).unwrap().id().to_string()
}

impl Fixture {
    fn admin(&self) -> PeerInfo {
        peer(Some(Identity::Admin {
            trust_domain: self.td.clone(),
            name: Label::new("operator").unwrap(),
        }))
    }

    fn viewer(&self) -> PeerInfo {
        peer(Some(Identity::Viewer {
            trust_domain: self.td.clone(),
            name: Label::new("ro").unwrap(),
        }))
    }

    fn node(&self, name: &str) -> PeerInfo {
        peer(Some(Identity::node(
            &self.td,
            &NodeName::new(name).unwrap(),
        )))
    }

    fn stored(&self) -> GossipKeyring {
        self.store.get_gossip_keyring().unwrap().unwrap()
    }

    async fn change_as(
        &self,
        who: &PeerInfo,
        action: Wire,
        key: &str,
    ) -> Result<pb::GossipKeyStatus, Status> {
        let req = pb::ChangeGossipKeysRequest {
            action: action as i32,
            key: key.to_owned(),
        };
        let changed = self.api.do_change_gossip_keys(who, req).await;
        changed.map_err(|r| r.status)
    }

    async fn change(&self, action: Wire, key: &str) -> pb::GossipKeyStatus {
        let changed = self.change_as(&self.admin(), action, key).await;
        changed.unwrap_or_else(|s| panic!("{action:?} {key}: {s:?}"))
    }

    async fn watch(&self, node: &str) -> GossipKeyStream {
        let watched = self.api.do_watch_gossip_keys(&self.node(node)).await;
        watched.unwrap_or_else(|r| panic!("{:?}", r.status))
    }

    fn report(&self, node: &str, revision: u64) {
        let req = pb::ReportGossipKeysRequest { revision };
        let reported = self.api.do_report_gossip_keys(&self.node(node), req);
        reported.unwrap_or_else(|r| panic!("{:?}", r.status));
    }

    async fn status(&self) -> pb::GossipKeyStatus {
        let got = self.api.do_get_gossip_keys(&self.viewer()).await;
        got.unwrap_or_else(|r| panic!("{:?}", r.status))
    }

    fn changes(&self, action: &'static str) -> u64 {
        let changes = &self.api.inner.metrics.gossip_key_changes;
        changes
            .get_or_create(&GossipKeyChangeLabels { action })
            .get()
    }
}

async fn next(stream: &mut GossipKeyStream) -> pb::GossipKeyring {
    stream
        .next()
        .await
        .expect("a keyring")
        .expect("not an error")
}

/// `(node, revision, connected)` of every node in a status.
fn nodes(status: &pb::GossipKeyStatus) -> Vec<(&str, u64, bool)> {
    status
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), n.revision, n.connected))
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_watch_gets_the_keyring_then_each_change() {
    let f = fixture();
    let first = f.stored();
    let mut stream = f.watch("n1").await;
    let got = next(&mut stream).await;
    assert_eq!((got.revision, &got.keys), (first.revision, &first.keys));

    let installed = f.change(Wire::Install, &key(2)).await;
    assert_eq!(installed.revision, first.revision + 1);
    let got = next(&mut stream).await;
    assert_eq!(got.revision, first.revision + 1);
    assert_eq!(got.keys, [first.keys[0].clone(), key(2)]);

    // Using the primary changes nothing and publishes nothing: the next keyring the node sees
    // is the one after the next real change.
    let unchanged = f.change(Wire::Use, &id_of(&first.keys[0])).await;
    assert_eq!(unchanged.revision, first.revision + 1);
    f.change(Wire::Use, &id_of(&key(2))).await;
    let got = next(&mut stream).await;
    assert_eq!(got.revision, first.revision + 2);
    assert_eq!(got.keys, [key(2), first.keys[0].clone()]);
    assert_eq!(f.stored().revision, first.revision + 2);
    assert_eq!((f.changes("install"), f.changes("use")), (1, 1));
    assert_eq!(
        f.api.inner.metrics.gossip_keyring_revision.get(),
        (first.revision + 2) as i64
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_watch_ends_when_the_registry_drains() {
    let f = fixture();
    let mut stream = f.watch("n1").await;
    next(&mut stream).await;
    f.shutdown.send_replace(true);
    assert!(stream.next().await.is_none());
    // A watch opened during the drain gets the keyring and then ends too.
    let mut late = f.watch("n1").await;
    next(&mut late).await;
    assert!(late.next().await.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn only_nodes_of_this_mesh_hold_keys() {
    let f = fixture();
    let workload = Identity::workload(&f.td, &ServiceKey::parse("shop/web").unwrap());
    let other_td = TrustDomain::new("other.test").unwrap();
    let foreign = Identity::node(&other_td, &NodeName::new("n1").unwrap());
    let cases = [
        (f.node("n1"), None),
        (f.admin(), Some(Code::PermissionDenied)),
        (f.viewer(), Some(Code::PermissionDenied)),
        (peer(Some(workload)), Some(Code::PermissionDenied)),
        (peer(Some(foreign)), Some(Code::PermissionDenied)),
        (peer(None), Some(Code::Unauthenticated)),
    ];
    for (who, want) in cases {
        let watched = f.api.do_watch_gossip_keys(&who).await.err();
        assert_eq!(
            watched.as_ref().map(|r| r.status.code()),
            want,
            "watch {:?}",
            who.identity
        );
        if want == Some(Code::PermissionDenied) {
            let message = watched.unwrap().status.message().to_owned();
            assert!(message.contains("may not hold gossip keys"), "{message}");
        }
        let req = pb::ReportGossipKeysRequest { revision: 1 };
        let reported = f.api.do_report_gossip_keys(&who, req).err();
        assert_eq!(
            reported.map(|r| r.status.code()),
            want,
            "report {:?}",
            who.identity
        );
    }
    // Refused reports leave no trace.
    assert_eq!(nodes(&f.status().await), [("n1", 1, false)]);
}

#[tokio::test(flavor = "current_thread")]
async fn only_admins_change_keys() {
    let f = fixture();
    let before = f.stored();
    let cases = [
        (f.viewer(), Code::PermissionDenied, "read-only"),
        (f.node("n1"), Code::PermissionDenied, "not an operator"),
        (peer(None), Code::Unauthenticated, "operator credentials"),
    ];
    for (who, code, message) in cases {
        let refused = f.change_as(&who, Wire::Install, "").await.unwrap_err();
        assert_eq!(refused.code(), code, "{:?}", who.identity);
        assert!(refused.message().contains(message), "{refused:?}");
    }
    assert_eq!(f.stored(), before);
    assert_eq!(f.changes("install"), 0);
    let installed = f.change(Wire::Install, "").await;
    assert_eq!(installed.revision, before.revision + 1);
    assert_eq!(installed.key_ids.len(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn admins_and_viewers_read_the_status_without_key_material() {
    let f = fixture();
    f.change(Wire::Install, &key(2)).await;
    let stored = f.stored();
    let want_ids: Vec<String> = stored.keys.iter().map(|k| id_of(k)).collect();
    for who in [f.admin(), f.viewer()] {
        let got = f.api.do_get_gossip_keys(&who).await;
        let status = got.unwrap_or_else(|r| panic!("{:?}", r.status));
        assert_eq!(status.revision, stored.revision);
        assert_eq!(status.key_ids, want_ids);
        let shown = format!("{status:?}");
        assert!(stored.keys.iter().all(|k| !shown.contains(k.as_str())));
    }
    for (who, code) in [
        (f.node("n1"), Code::PermissionDenied),
        (peer(None), Code::Unauthenticated),
    ] {
        let refused = f.api.do_get_gossip_keys(&who).await.err();
        assert_eq!(refused.map(|r| r.status.code()), Some(code));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn reports_and_open_watches_show_in_the_status() {
    let f = fixture();
    assert!(f.status().await.nodes.is_empty());

    f.report("n2", 1);
    let mut watch_n2 = f.watch("n2").await;
    // n1 watches twice (a reconnect overlapping the old stream) but has not reported yet.
    let watch_n1 = f.watch("n1").await;
    let second_n1 = f.watch("n1").await;
    assert_eq!(nodes(&f.status().await), [("n2", 1, true)]);

    f.report("n1", 1);
    f.change(Wire::Install, &key(2)).await;
    next(&mut watch_n2).await;
    f.report("n2", 2);
    let status = f.status().await;
    assert_eq!(nodes(&status), [("n1", 1, true), ("n2", 2, true)]);
    assert!(status.nodes.iter().all(|n| n.reported_unix > 0));

    drop(watch_n1);
    assert_eq!(nodes(&f.status().await), [("n1", 1, true), ("n2", 2, true)]);
    drop(second_n1);
    drop(watch_n2);
    assert_eq!(
        nodes(&f.status().await),
        [("n1", 1, false), ("n2", 2, false)]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn refused_changes_say_what_would_be_valid() {
    let f = fixture();
    let primary = id_of(&f.stored().keys[0]);
    f.change(Wire::Install, &key(2)).await;
    let before = f.stored();
    let cases = [
        (
            Wire::Unspecified,
            String::new(),
            Code::InvalidArgument,
            "expected INSTALL, USE or REMOVE",
        ),
        (
            Wire::Install,
            "AAAA".to_owned(),
            Code::InvalidArgument,
            "expected 32 bytes, base64",
        ),
        (
            Wire::Use,
            "zz".to_owned(),
            Code::InvalidArgument,
            "expected 8 hex digits",
        ),
        (
            Wire::Install,
            key(2),
            Code::FailedPrecondition,
            "already installed",
        ),
        (
            Wire::Remove,
            primary.clone(),
            Code::FailedPrecondition,
            "`use` another installed key first",
        ),
        (
            Wire::Use,
            id_of(&key(3)),
            Code::NotFound,
            "installed keys: ",
        ),
    ];
    for (action, key, code, message) in cases {
        let refused = f.change_as(&f.admin(), action, &key).await.unwrap_err();
        assert_eq!(refused.code(), code, "{action:?} {key}: {refused:?}");
        assert!(refused.message().contains(message), "{refused:?}");
    }
    let unknown = pb::ChangeGossipKeysRequest {
        action: 42,
        key: String::new(),
    };
    let refused = f.api.do_change_gossip_keys(&f.admin(), unknown).await.err();
    assert_eq!(
        refused.map(|r| r.status.code()),
        Some(Code::InvalidArgument)
    );

    f.change(Wire::Install, &key(3)).await;
    f.change(Wire::Install, &key(4)).await;
    let full = f
        .change_as(&f.admin(), Wire::Install, "")
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::FailedPrecondition, "{full:?}");
    assert!(full.message().contains("remove a key"), "{full:?}");
    assert_eq!(f.stored().revision, before.revision + 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_without_a_keyring_is_a_failed_precondition() {
    let f = fixture();
    let empty = RegistryApi::new(
        Arc::new(MemoryStore::new()),
        f.api.inner.ca.clone(),
        f.api.inner.config.clone(),
        Metrics::default(),
        f.shutdown.subscribe(),
    )
    .unwrap();
    let watched = empty.do_watch_gossip_keys(&f.node("n1")).await.err();
    let got = empty.do_get_gossip_keys(&f.admin()).await.err();
    let req = pb::ChangeGossipKeysRequest {
        action: Wire::Install as i32,
        key: String::new(),
    };
    let changed = empty.do_change_gossip_keys(&f.admin(), req).await.err();
    for refused in [watched, got, changed] {
        let status = refused.expect("refused").status;
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("no gossip keyring"), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_get_distinct_revisions() {
    let f = fixture();
    let start = f.stored().revision;
    let installs = (2..=keyring::MAX_GOSSIP_KEYS as u8).map(|fill| {
        let api = f.api.clone();
        let admin = f.admin();
        tokio::spawn(async move {
            let req = pb::ChangeGossipKeysRequest {
                action: Wire::Install as i32,
                key: key(fill),
            };
            api.do_change_gossip_keys(&admin, req)
                .await
                .map(|s| s.revision)
                .map_err(|r| r.status)
        })
    });
    let mut revisions = Vec::new();
    for install in installs.collect::<Vec<_>>() {
        revisions.push(install.await.unwrap().unwrap());
    }
    revisions.sort_unstable();
    let want: Vec<u64> = (1..keyring::MAX_GOSSIP_KEYS as u64)
        .map(|i| start + i)
        .collect();
    assert_eq!(revisions, want);
    assert_eq!(f.stored().keys.len(), keyring::MAX_GOSSIP_KEYS);
}

#[test]
fn wire_actions_map_to_actions() {
    let cases = [
        (Wire::Unspecified as i32, Err(ChangeError::UnknownAction)),
        (Wire::Install as i32, Ok(Action::Install)),
        (Wire::Use as i32, Ok(Action::Use)),
        (Wire::Remove as i32, Ok(Action::Remove)),
        (-1, Err(ChangeError::UnknownAction)),
        (4, Err(ChangeError::UnknownAction)),
    ];
    for (wire, want) in cases {
        assert_eq!(action_of(wire), want, "{wire}");
    }
}
