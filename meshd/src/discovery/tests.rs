//! Event application (full, incremental, deletion, stale, invalid) and the persisted snapshot.

use std::sync::Arc;

use mesh_api::policy::{Snapshot, parse_file};
use mesh_api::proto::v1 as pb;

use super::*;

const POLICIES: &str = r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow-web"
namespace = "shop"
selector = { service = "api" }
rules = [{ from = [{ namespaces = ["shop"] }] }]

[[resource]]
kind = "AuthorizationPolicy"
name = "deny-legacy"
namespace = "shop"
action = "deny"
rules = [{ from = [{ ip_blocks = ["10.9.0.0/16"] }] }]

[[resource]]
kind = "PeerAuthentication"
name = "mesh-strict"
namespace = "mesh-system"
mode = "strict"

[[resource]]
kind = "PeerAuthentication"
name = "web-permissive"
namespace = "shop"
mode = "permissive"
selector = { service = "web" }

[[resource]]
kind = "MeshConfig"
name = "default"
default_authorization = "deny"
"#;

/// Every resource of [`POLICIES`] in its wire form.
fn wire() -> Vec<pb::Resource> {
    parse_file("t.toml", POLICIES)
        .expect("test policies parse")
        .iter()
        .map(mesh_api::policy::Resource::to_proto)
        .collect()
}

fn event(revision: u64, full: bool, resources: Vec<pb::Resource>) -> pb::PolicyEvent {
    pb::PolicyEvent {
        revision,
        full_snapshot: full,
        resources,
        more: false,
    }
}

fn applied(o: Outcome) -> Snapshot {
    match o {
        Outcome::Applied { snapshot, .. } => snapshot,
        other => panic!("expected a new snapshot, got {other:?}"),
    }
}

fn names(s: &Snapshot) -> Vec<String> {
    s.resources.keys().map(ToString::to_string).collect()
}

fn full_at(rev: u64) -> Snapshot {
    applied(apply_event(&Snapshot::default(), &event(rev, true, wire()), true).unwrap())
}

#[test]
fn full_snapshot_replaces_everything() {
    let s = full_at(5);
    assert_eq!(s.revision, 5);
    assert_eq!(s.resources.len(), 5);
    // A later full snapshot with fewer resources drops the rest.
    let one = wire().into_iter().take(1).collect();
    let next = applied(apply_event(&s, &event(9, true, one), false).unwrap());
    assert_eq!(next.revision, 9);
    assert_eq!(names(&next), ["AuthorizationPolicy/shop/api-allow-web"]);
    // The same full snapshot again is "current", not an update.
    assert_eq!(
        apply_event(&s, &event(5, true, wire()), true).unwrap(),
        Outcome::Current
    );
}

#[test]
fn incremental_upserts_and_deletes() {
    let s = full_at(5);
    let mut changed = wire()[0].clone();
    changed.spec_json = changed.spec_json.replace("\"shop\"", "\"ops\"");
    let deleted = pb::Resource {
        kind: "PeerAuthentication".into(),
        namespace: "shop".into(),
        name: "web-permissive".into(),
        deleted: true,
        ..Default::default()
    };
    let new = pb::Resource {
        kind: "routes".into(), // aliases are accepted on the wire, stored canonically
        namespace: "shop".into(),
        name: "api".into(),
        spec_json: r#"{"service":"api","http":[{}]}"#.into(),
        ..Default::default()
    };
    let next =
        applied(apply_event(&s, &event(6, false, vec![changed, deleted, new]), false).unwrap());
    assert_eq!(next.revision, 6);
    assert_eq!(
        names(&next),
        [
            "AuthorizationPolicy/shop/api-allow-web",
            "AuthorizationPolicy/shop/deny-legacy",
            "PeerAuthentication/mesh-system/mesh-strict",
            "Route/shop/api",
            "MeshConfig/mesh-system/default",
        ]
    );
    let ap = &next.resources.keys().next().unwrap();
    assert!(next.resources[*ap].spec_json().contains("\"ops\""));
    // Deleting what is not there is harmless.
    let again = pb::Resource {
        kind: "PeerAuthentication".into(),
        namespace: "shop".into(),
        name: "web-permissive".into(),
        deleted: true,
        ..Default::default()
    };
    let after = applied(apply_event(&next, &event(7, false, vec![again]), false).unwrap());
    assert_eq!(after.resources, next.resources);
    assert_eq!(after.revision, 7);
}

#[test]
fn old_and_out_of_order_events_are_ignored() {
    let s = full_at(5);
    let one = || wire().into_iter().take(1).collect::<Vec<_>>();
    assert_eq!(
        apply_event(&s, &event(4, false, one()), false).unwrap(),
        Outcome::Stale
    );
    assert_eq!(
        apply_event(&s, &event(5, false, one()), false).unwrap(),
        Outcome::Stale
    );
    assert_eq!(
        apply_event(&s, &event(3, true, one()), false).unwrap(),
        Outcome::Stale,
        "an old full snapshot in the middle of a stream is out of order"
    );
    // The registry's "you are current" answer to since_revision.
    assert_eq!(
        apply_event(&s, &event(5, false, vec![]), true).unwrap(),
        Outcome::Current
    );
    // A registry that is behind the node resyncs it with a full snapshot as its first event.
    let resync = applied(apply_event(&s, &event(3, true, one()), true).unwrap());
    assert_eq!(resync.revision, 3);
    assert_eq!(resync.resources.len(), 1);
}

#[test]
fn an_invalid_resource_skips_the_whole_event() {
    let s = full_at(5);
    let mut bad = wire()[1].clone();
    bad.spec_json = r#"{"action":"maybe"}"#.into();
    let good = pb::Resource {
        kind: "Route".into(),
        namespace: "shop".into(),
        name: "api".into(),
        spec_json: r#"{"service":"api","http":[{}]}"#.into(),
        ..Default::default()
    };
    let err = apply_event(&s, &event(6, false, vec![good.clone(), bad.clone()]), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("revision 6"), "{err}");
    assert!(
        err.contains("AuthorizationPolicy/shop/deny-legacy"),
        "{err}"
    );
    assert!(apply_event(&s, &event(6, true, vec![good.clone(), bad]), false).is_err());
    let unknown_kind = pb::Resource {
        kind: "Nope".into(),
        name: "x".into(),
        deleted: true,
        ..Default::default()
    };
    assert!(apply_event(&s, &event(6, false, vec![good, unknown_kind]), false).is_err());
}

#[test]
fn persisted_snapshot_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(POLICY_FILE);
    assert!(store::load(&path).unwrap().is_none());
    let s = full_at(42);
    store::save(&path, &s).unwrap();
    assert_eq!(store::load(&path).unwrap().unwrap(), s);
    // Overwrite in place; no temp file is left behind.
    let empty = Snapshot {
        revision: 43,
        ..Default::default()
    };
    store::save(&path, &empty).unwrap();
    assert_eq!(store::load(&path).unwrap().unwrap(), empty);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1);

    // Garbage, another format, or one bad resource: refused as a whole.
    std::fs::write(&path, "{").unwrap();
    assert!(store::load(&path).is_err());
    std::fs::write(&path, r#"{"format":2,"revision":1,"resources":[]}"#).unwrap();
    assert!(store::load(&path).is_err());
    std::fs::write(
        &path,
        r#"{"format":1,"revision":1,"resources":[{"kind":"Route","namespace":"a","name":"b","spec":{}}]}"#,
    )
    .unwrap();
    let e = store::load(&path).unwrap_err().to_string();
    assert!(e.contains("Route/a/b"), "{e}");
}

#[tokio::test(flavor = "current_thread")]
async fn startup_loads_the_persisted_snapshot_and_events_persist_before_publishing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, handle) = Discovery::load(dir.path(), Metrics::default());
    assert!(
        !*handle.synced_rx.borrow(),
        "nothing persisted: not in place yet"
    );
    assert_eq!(handle.policy_rx.borrow().revision, 0);

    d.handle(&event(7, true, wire()), true).await.unwrap();
    assert!(*handle.synced_rx.borrow());
    let published: Arc<Snapshot> = handle.policy_rx.borrow().clone();
    assert_eq!(published.revision, 7);
    assert_eq!(d.metrics.revision.get(), 7);
    assert_eq!(d.metrics.updates.get(), 1);
    let on_disk = store::load(&dir.path().join(POLICY_FILE)).unwrap().unwrap();
    assert_eq!(on_disk, *published);

    // An invalid incremental event changes nothing, published or persisted, and asks for a
    // resync (the next stream starts from revision 0: a full snapshot).
    let mut bad = wire()[0].clone();
    bad.spec_json = "[]".into();
    assert!(
        d.handle(&event(8, false, vec![bad.clone()]), false)
            .await
            .is_err()
    );
    assert_eq!(handle.policy_rx.borrow().revision, 7);
    assert_eq!(d.metrics.updates.get(), 1);
    assert!(d.resync);
    assert_eq!(d.metrics.resyncs.get(), 1);
    // The full snapshot of the resync is read resource by resource: the readable changes
    // apply, the unreadable policy is enforced as a fail-closed stand-in, and it is reported.
    let mut full = wire();
    full[0] = bad;
    full.push(pb::Resource {
        kind: "FutureKind".into(),
        namespace: "shop".into(),
        name: "x".into(),
        spec_json: "{}".into(),
        ..Default::default()
    });
    d.handle(&event(8, true, full), true).await.unwrap();
    assert!(!d.resync);
    let now = handle.policy_rx.borrow().clone();
    assert_eq!(now.revision, 8);
    assert_eq!(now.resources.len(), wire().len());
    let unreadable = handle.unreadable_rx.borrow().clone();
    assert_eq!(unreadable.len(), 2, "{unreadable:?}");
    assert_eq!(d.metrics.unreadable.get(), 2);
    // A later snapshot it can read clears the report.
    d.handle(&event(9, true, wire()), true).await.unwrap();
    assert!(handle.unreadable_rx.borrow().is_empty());
    assert_eq!(d.metrics.unreadable.get(), 0);
    drop(d);
    let (mut d, _) = Discovery::load(dir.path(), Metrics::default());
    d.handle(&event(7, true, wire()), true).await.unwrap();

    // After a restart the snapshot is in place before any registry contact.
    drop(d);
    let (d2, h2) = Discovery::load(dir.path(), Metrics::default());
    assert!(*h2.synced_rx.borrow());
    assert_eq!(*h2.policy_rx.borrow().clone(), *published);
    assert_eq!(d2.metrics.revision.get(), 7);

    // A first event of "you are current" marks a fresh node ready without a new snapshot.
    let empty = tempfile::tempdir().unwrap();
    let (mut d3, h3) = Discovery::load(empty.path(), Metrics::default());
    d3.handle(&event(0, true, vec![]), true).await.unwrap();
    assert!(*h3.synced_rx.borrow());
    assert_eq!(d3.metrics.updates.get(), 0);
    // ...and puts the empty snapshot on disk, so a restart without the registry is ready.
    drop(d3);
    let (_d4, h4) = Discovery::load(empty.path(), Metrics::default());
    assert!(*h4.synced_rx.borrow());
    assert_eq!(h4.policy_rx.borrow().revision, 0);
}

#[test]
fn an_unusable_persisted_snapshot_is_set_aside_and_the_node_waits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(POLICY_FILE);
    std::fs::write(&path, r#"{"format":1,"revision":4,"resour"#).unwrap();
    let metrics = Metrics::default();
    let (_d, handle) = Discovery::load(dir.path(), metrics.clone());
    assert!(
        !*handle.synced_rx.borrow(),
        "fails closed: no snapshot in place"
    );
    assert_eq!(metrics.set_aside.get(), 1);
    assert!(!path.exists());
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(aside[0].starts_with("policy.json.unusable-"), "{aside:?}");
}

#[test]
fn a_failed_persist_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The data dir is a file: the snapshot cannot be written under it.
    let blocker = dir.path().join("data");
    std::fs::write(&blocker, "").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (mut d, handle) = Discovery::load(&blocker, Metrics::default());
    assert!(
        rt.block_on(d.handle(&event(3, true, wire()), true))
            .is_err()
    );
    assert_eq!(handle.policy_rx.borrow().revision, 0);
    assert!(!*handle.synced_rx.borrow());
}

#[test]
fn effective_lists_the_policies_selecting_a_service() {
    let s = full_at(1);
    let labels = Default::default();
    let api = mesh_api::ServiceKey::parse("shop/api").unwrap();
    let keys: Vec<String> = effective(&s, &api, &labels)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        keys,
        [
            "AuthorizationPolicy/shop/api-allow-web",
            "AuthorizationPolicy/shop/deny-legacy",
            "PeerAuthentication/mesh-system/mesh-strict",
        ]
    );
    let web = mesh_api::ServiceKey::parse("shop/web").unwrap();
    let keys: Vec<String> = effective(&s, &web, &labels)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        keys,
        [
            "AuthorizationPolicy/shop/deny-legacy",
            "PeerAuthentication/mesh-system/mesh-strict",
            "PeerAuthentication/shop/web-permissive",
        ]
    );
}
