//! Watch streams against a memory store, driven through the API methods: how the first event
//! is chosen, resync after falling behind, who may watch, and the end on drain.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt as _;
use mesh_api::name::Label;
use mesh_api::{NodeName, ServiceKey, TrustDomain};
use mesh_ca::Authority;
use tonic::Code;

use super::*;
use crate::api::{Metrics, WATCH_BUFFER};
use crate::config::Config;
use crate::store::MemoryStore;

const ROUTE: &str = r#"{"service":"web","http":[{}]}"#;

struct Fixture {
    api: RegistryApi,
    shutdown: watch::Sender<bool>,
    td: TrustDomain,
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
    let api = RegistryApi::new(
        Arc::new(MemoryStore::new()),
        Arc::new(crate::ca::CaHandle::new(ca)),
        config,
        Metrics::default(),
        shutdown_rx,
    )
    .unwrap();
    Fixture { api, shutdown, td }
}

fn peer(identity: Option<Identity>) -> PeerInfo {
    PeerInfo {
        identity,
        ..PeerInfo::default()
    }
}

impl Fixture {
    fn admin(&self) -> PeerInfo {
        peer(Some(Identity::Admin {
            trust_domain: self.td.clone(),
            name: Label::new("operator").unwrap(),
        }))
    }

    fn node(&self) -> PeerInfo {
        peer(Some(Identity::node(
            &self.td,
            &NodeName::new("n1").unwrap(),
        )))
    }

    async fn apply(&self, name: &str) -> u64 {
        let req = pb::ApplyRequest {
            resources: vec![pb::Resource {
                kind: "Route".to_owned(),
                namespace: "shop".to_owned(),
                name: name.to_owned(),
                spec_json: ROUTE.to_owned(),
                ..Default::default()
            }],
            dry_run: false,
        };
        let applied = self.api.do_apply(&self.admin(), req).await;
        applied
            .unwrap_or_else(|r| panic!("{:?}", r.status))
            .revision
    }

    async fn watch(&self, since_revision: u64) -> PolicyStream {
        let req = pb::WatchPolicyRequest { since_revision };
        let watched = self.api.do_watch_policy(&self.node(), req).await;
        watched.unwrap_or_else(|r| panic!("{:?}", r.status))
    }

    fn starts(&self, snapshot: &'static str) -> u64 {
        let starts = &self.api.inner.metrics.policy_watch_starts;
        starts.get_or_create(&WatchStartLabels { snapshot }).get()
    }
}

async fn next(stream: &mut PolicyStream) -> pb::PolicyEvent {
    stream
        .next()
        .await
        .expect("an event")
        .expect("not an error")
}

#[tokio::test(flavor = "current_thread")]
async fn first_event_depends_on_since_revision() {
    let f = fixture();
    f.apply("a").await;
    f.apply("b").await;
    // (since, full_snapshot, resources, metric label)
    let cases = [
        (0, true, 2, "full"),
        (1, false, 1, "incremental"),
        (2, false, 0, "current"),
        (7, true, 2, "full"), // the node is ahead of this registry: resync
    ];
    for (since, full, resources, label) in cases {
        let before = f.starts(label);
        let first = next(&mut f.watch(since).await).await;
        assert_eq!(
            (first.revision, first.full_snapshot, first.resources.len()),
            (2, full, resources),
            "since {since}"
        );
        assert_eq!(f.starts(label), before + 1, "since {since}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_watcher_that_falls_behind_gets_a_full_snapshot() {
    let f = fixture();
    let mut stream = f.watch(0).await;
    assert_eq!(next(&mut stream).await.revision, 0);
    let applies = WATCH_BUFFER as u64 + 5;
    for i in 0..applies {
        f.apply(&format!("r{i}")).await;
    }
    let event = next(&mut stream).await;
    assert!(event.full_snapshot);
    assert_eq!(event.revision, applies);
    assert_eq!(event.resources.len(), applies as usize);
    // Then incremental again.
    f.apply("after").await;
    let event = next(&mut stream).await;
    assert_eq!((event.revision, event.full_snapshot), (applies + 1, false));
}

#[tokio::test(flavor = "current_thread")]
async fn watch_ends_when_the_registry_drains() {
    let f = fixture();
    let mut stream = f.watch(0).await;
    next(&mut stream).await;
    f.shutdown.send_replace(true);
    assert!(stream.next().await.is_none());
    // A watch opened during the drain gets its first event and then ends too.
    let mut late = f.watch(0).await;
    next(&mut late).await;
    assert!(late.next().await.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn who_may_watch() {
    let f = fixture();
    let other_td = TrustDomain::new("other.test").unwrap();
    let viewer = Identity::Viewer {
        trust_domain: f.td.clone(),
        name: Label::new("ro").unwrap(),
    };
    let workload = Identity::workload(&f.td, &ServiceKey::parse("shop/web").unwrap());
    let foreign = Identity::node(&other_td, &NodeName::new("n1").unwrap());
    let cases = [
        (f.node(), None),
        (f.admin(), None),
        (peer(Some(viewer)), None),
        (peer(Some(workload)), Some(Code::PermissionDenied)),
        (peer(Some(foreign)), Some(Code::PermissionDenied)),
        (peer(None), Some(Code::Unauthenticated)),
    ];
    for (who, want) in cases {
        let req = pb::WatchPolicyRequest { since_revision: 0 };
        let got = f.api.do_watch_policy(&who, req).await.err();
        assert_eq!(got.map(|r| r.status.code()), want, "{:?}", who.identity);
    }
}

#[test]
fn parts_split_by_size_and_mark_all_but_the_last() {
    let record = |i: usize| PolicyRecord {
        kind: "Route".to_owned(),
        namespace: "shop".to_owned(),
        name: format!("r{i:03}"),
        spec_json: format!("{{\"pad\":\"{}\"}}", "x".repeat(1_000)),
        revision: 3,
        author: String::new(),
        updated_unix: 0,
        deleted: false,
    };
    let all: Vec<PolicyRecord> = (0..50).map(record).collect();
    let split = parts(3, true, all, 10_000);
    assert!(split.len() >= 5, "{} parts", split.len());
    let (last, rest) = split.split_last().unwrap();
    assert!(rest.iter().all(|p| p.more) && !last.more);
    assert!(split.iter().all(|p| p.revision == 3 && p.full_snapshot));
    for p in &split {
        let size: usize = p.resources.iter().map(prost::Message::encoded_len).sum();
        assert!(size <= 10_000, "a part of {size} bytes");
    }
    let names: Vec<String> = split
        .iter()
        .flat_map(|p| p.resources.iter().map(|r| r.name.clone()))
        .collect();
    assert_eq!(
        names,
        (0..50).map(|i| format!("r{i:03}")).collect::<Vec<_>>(),
        "in order, each once"
    );
    // Nothing to send is still one (empty, final) part; one huge resource gets its own part.
    let empty = parts(4, false, Vec::new(), 10_000);
    assert_eq!((empty.len(), empty[0].more), (1, false));
    let mut huge = record(0);
    huge.spec_json = "y".repeat(50_000);
    let alone = parts(5, true, vec![record(1), huge, record(2)], 10_000);
    assert_eq!(
        alone.iter().map(|p| p.resources.len()).collect::<Vec<_>>(),
        [1, 1, 1]
    );
}
