//! In-process test of the gossip key API: a registry from `init::run` + `app::build` on
//! loopback port 0, driven by real tonic clients over mTLS. A node watches the keyring init
//! created and sees a change, reports, and shows up in the status; viewers can neither watch
//! nor change keys; draining ends the watch.

#![allow(clippy::unwrap_used)]

mod common;

use mesh_api::gossip_key::KeyMaterial;
use mesh_api::proto::v1 as pb;
use pb::change_gossip_keys_request::Action;
use tonic::{Code, Streaming};

use common::{TIMEOUT, metrics};

async fn next(stream: &mut Streaming<pb::GossipKeyring>) -> Option<pb::GossipKeyring> {
    tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("keyring within the timeout")
        .expect("watch stream healthy")
}

fn ids(keyring: &pb::GossipKeyring) -> Vec<String> {
    let id = |k: &String| KeyMaterial::from_base64(k).unwrap().id().to_string();
    keyring.keys.iter().map(id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_change_report_and_status() {
    let common::Running {
        _dir,
        report,
        admin_addr,
        stop_tx,
        running,
        mut admin,
        mut viewer,
        mut node,
        ..
    } = common::start().await;

    // The node gets the keyring init made: revision 1, its one key.
    let mut watch = node
        .watch_gossip_keys(pb::WatchGossipKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut watch).await.unwrap();
    assert_eq!(first.revision, 1);
    assert_eq!(ids(&first), [report.gossip_key_id.to_string()]);

    // Viewers may neither hold keys nor change them.
    let denied = viewer
        .watch_gossip_keys(pb::WatchGossipKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = viewer
        .change_gossip_keys(pb::ChangeGossipKeysRequest {
            action: Action::Install as i32,
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("read-only"), "{denied:?}");

    // The admin installs a generated key: the status names it, the node receives it.
    let installed = admin
        .change_gossip_keys(pb::ChangeGossipKeysRequest {
            action: Action::Install as i32,
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(installed.revision, 2);
    assert_eq!(installed.key_ids[0], report.gossip_key_id.to_string());
    let second = next(&mut watch).await.unwrap();
    assert_eq!(second.revision, 2);
    assert_eq!(ids(&second), installed.key_ids);

    // The node reports what it holds; operators and viewers see it, connected.
    node.report_gossip_keys(pb::ReportGossipKeysRequest { revision: 2 })
        .await
        .unwrap();
    for reader in [&mut admin, &mut viewer] {
        let status = reader
            .get_gossip_keys(pb::GetGossipKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((status.revision, &status.key_ids), (2, &installed.key_ids));
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.revision, n.connected))
            .collect();
        assert_eq!(nodes, [("node-1", 2, true)]);
    }

    let text = metrics(admin_addr).await;
    for line in [
        "mesh_registry_gossip_keyring_revision 2",
        "mesh_registry_gossip_key_changes_total{action=\"install\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    // Draining ends the watch, so shutdown is not held open by it.
    stop_tx.send(()).unwrap();
    assert_eq!(next(&mut watch).await, None);
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap();
}
