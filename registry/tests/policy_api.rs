//! In-process test of the policy API: a registry from `init::run` + `app::build` on loopback
//! port 0, driven by real tonic clients over mTLS with the admin, viewer and a node
//! certificate. Covers apply → watch (full snapshot, incremental, current), the viewer's
//! read-only access, and watch streams ending when the registry drains.

#![allow(clippy::unwrap_used)]

mod common;

use mesh_api::proto::v1 as pb;
use pb::registry_client::RegistryClient;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use common::{TIMEOUT, metrics};

/// A spec the policy model accepts for `ROUTE_KIND`.
const ROUTE_KIND: &str = "Route";
const ROUTE_V1: &str = r#"{"service":"web","http":[{}]}"#;
const ROUTE_V2: &str = r#"{"service":"web","http":[{"timeout":"2s"}]}"#;

fn route(name: &str, spec: &str) -> pb::Resource {
    pb::Resource {
        kind: ROUTE_KIND.to_owned(),
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        spec_json: spec.to_owned(),
        ..Default::default()
    }
}

async fn next(stream: &mut Streaming<pb::PolicyEvent>) -> Option<pb::PolicyEvent> {
    tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("watch event within the timeout")
        .expect("watch stream healthy")
}

async fn watch(
    client: &mut RegistryClient<Channel>,
    since_revision: u64,
) -> Streaming<pb::PolicyEvent> {
    client
        .watch_policy(pb::WatchPolicyRequest { since_revision })
        .await
        .unwrap()
        .into_inner()
}

fn names(event: &pb::PolicyEvent) -> Vec<(&str, bool)> {
    event
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.deleted))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_watch_viewer_and_drain() {
    let common::Running {
        _dir,
        admin_addr,
        stop_tx,
        running,
        mut admin,
        mut viewer,
        mut node,
        ..
    } = common::start().await;

    // A fresh node gets a full (empty) snapshot at revision 0.
    let mut first = watch(&mut node, 0).await;
    let snapshot = next(&mut first).await.unwrap();
    assert!(snapshot.full_snapshot);
    assert_eq!((snapshot.revision, snapshot.resources.len()), (0, 0));

    // Apply: created, revision 1, with a diff; the watcher gets exactly that change.
    let applied = admin
        .apply(pb::ApplyRequest {
            resources: vec![route("web", ROUTE_V1), route("api", ROUTE_V1)],
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.revision, 1);
    assert!(
        applied
            .changes
            .iter()
            .all(|c| c.action == "created" && c.diff.starts_with("+ ")),
        "{applied:?}"
    );
    let event = next(&mut first).await.unwrap();
    assert!(!event.full_snapshot);
    assert_eq!(event.revision, 1);
    assert_eq!(names(&event), [("web", false), ("api", false)]);

    // A node that is current gets an empty event at the current revision; one that is behind
    // gets the changes; one with nothing gets everything.
    let mut current = watch(&mut node, 1).await;
    let event = next(&mut current).await.unwrap();
    assert_eq!(
        (event.revision, event.full_snapshot, event.resources.len()),
        (1, false, 0)
    );
    let mut fresh = watch(&mut node, 0).await;
    let event = next(&mut fresh).await.unwrap();
    assert_eq!((event.revision, event.full_snapshot), (1, true));
    assert_eq!(names(&event), [("api", false), ("web", false)]);

    // A dry run changes nothing; an update and a delete reach every open watch in order.
    let dry = admin
        .apply(pb::ApplyRequest {
            resources: vec![route("web", ROUTE_V2)],
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (dry.revision, dry.changes[0].action.as_str()),
        (1, "updated")
    );
    admin
        .apply(pb::ApplyRequest {
            resources: vec![route("web", ROUTE_V2)],
            dry_run: false,
        })
        .await
        .unwrap();
    let deleted = admin
        .delete_resource(pb::DeleteResourceRequest {
            kind: ROUTE_KIND.to_owned(),
            namespace: "shop".to_owned(),
            name: "api".to_owned(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (deleted.revision, deleted.changes[0].action.as_str()),
        (3, "deleted")
    );
    for stream in [&mut first, &mut current, &mut fresh] {
        let update = next(stream).await.unwrap();
        assert_eq!((update.revision, names(&update)), (2, vec![("web", false)]));
        let delete = next(stream).await.unwrap();
        assert_eq!((delete.revision, names(&delete)), (3, vec![("api", true)]));
    }
    let mut behind = watch(&mut node, 1).await;
    let event = next(&mut behind).await.unwrap();
    assert_eq!((event.revision, event.full_snapshot), (3, false));
    assert_eq!(names(&event), [("api", true), ("web", false)]);

    // Rejections: unknown resource, invalid spec (nothing half-applied), the viewer writing.
    let missing = admin
        .delete_resource(pb::DeleteResourceRequest {
            kind: ROUTE_KIND.to_owned(),
            namespace: "shop".to_owned(),
            name: "api".to_owned(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("shop/api"), "{missing:?}");
    let invalid = admin
        .apply(pb::ApplyRequest {
            resources: vec![route("new", ROUTE_V1), route("bad", "not json")],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let denied = viewer
        .apply(pb::ApplyRequest {
            resources: vec![route("web", ROUTE_V1)],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("read-only"), "{denied:?}");

    // The viewer reads; nothing above changed the state.
    let got = viewer
        .get_resources(pb::GetResourcesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.revision, 3);
    assert_eq!(
        got.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["web"]
    );
    let history = viewer
        .history(pb::HistoryRequest {
            kind: ROUTE_KIND.to_owned(),
            namespace: "shop".to_owned(),
            name: "api".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history
            .versions
            .iter()
            .map(|v| (v.revision, v.deleted))
            .collect::<Vec<_>>(),
        [(1, false), (3, true)]
    );
    assert!(
        history.versions[0].author.ends_with("/admin/operator"),
        "{history:?}"
    );

    let text = metrics(admin_addr).await;
    for line in [
        "mesh_registry_policy_revision 3",
        "mesh_registry_policy_watch_starts_total{snapshot=\"full\"} 2",
        "mesh_registry_policy_watch_starts_total{snapshot=\"current\"} 1",
        "mesh_registry_policy_watch_starts_total{snapshot=\"incremental\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    // Draining ends every watch stream, so shutdown is not held open by them.
    stop_tx.send(()).unwrap();
    for stream in [&mut first, &mut current, &mut fresh, &mut behind] {
        assert_eq!(next(stream).await, None);
    }
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap();
}
