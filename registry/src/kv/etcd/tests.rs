//! A real etcd for tests (Debian's etcd-server, installed by `scripts/setup`: one member on
//! loopback in a temporary directory, killed on drop), and the committed client
//! (`proto/etcd.proto`, our own subset of etcd's v3 API) against it: a compare-and-set
//! transaction, a range, a watch replaying from a revision, a compacted watch, a lease whose
//! key goes with it, and member status. A wrong field number or service path shows here, not
//! in production. The [`crate::kv::Kv`] contract runs on etcd in `kv/tests.rs`.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use pb::watch_client::WatchClient;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// One etcd member, killed on drop.
pub(crate) struct Etcd {
    child: Child,
    client: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer) = (free_port(), free_port());
    let child = Command::new("etcd")
        .args(["--name", "wire"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg(format!("--listen-client-urls=http://{client}"))
        .arg(format!("--advertise-client-urls=http://{client}"))
        .arg(format!("--listen-peer-urls=http://{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
        .arg(format!("--initial-cluster=wire=http://{peer}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd runs (scripts/setup installs etcd-server)");
    Etcd {
        child,
        client,
        _dir: dir,
    }
}

/// A channel to `etcd` once it answers, or `None` if it exited or stayed silent for `wait`
/// (its ports, picked free a moment earlier, may have been taken meanwhile).
async fn answering(etcd: &mut Etcd, wait: Duration) -> Option<Channel> {
    let deadline = Instant::now() + wait;
    let endpoint = format!("http://{}", etcd.client);
    while Instant::now() < deadline {
        if etcd.child.try_wait().ok().flatten().is_some() {
            return None;
        }
        let connected = Channel::from_shared(endpoint.clone())
            .expect("a valid URI")
            .connect()
            .await;
        if let Ok(ch) = connected {
            let status = MaintenanceClient::new(ch.clone())
                .status(pb::StatusRequest {})
                .await;
            if status.is_ok() {
                return Some(ch);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// A fresh etcd member and a channel to it; a start that fails (ports taken between picking
/// and binding) is retried on new ports.
pub(crate) async fn member() -> (Etcd, Channel) {
    for _ in 0..3 {
        let mut etcd = start_etcd();
        if let Some(ch) = answering(&mut etcd, Duration::from_secs(15)).await {
            return (etcd, ch);
        }
    }
    panic!("etcd did not start and answer in three tries (is etcd-server installed?)");
}

fn put(key: &str, value: &str, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
        })),
    }
}

fn absent(key: &str) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.into(),
        target_union: Some(TargetUnion::CreateRevision(0)),
    }
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

#[tokio::test]
async fn the_committed_client_speaks_etcd() {
    let (_etcd, ch) = member().await;
    let mut kv = KvClient::new(ch.clone());

    // Create-if-absent: the first wins, the second fails its compare and writes nothing.
    let txn = |value: &str| pb::TxnRequest {
        compare: vec![absent("policy/a")],
        success: vec![put("policy/a", value, 0)],
        failure: vec![],
    };
    let first = kv.txn(txn("one")).await.unwrap().into_inner();
    assert!(first.succeeded);
    let created = first.header.expect("a header").revision;
    let second = kv.txn(txn("two")).await.unwrap().into_inner();
    assert!(!second.succeeded);
    assert_eq!(second.header.unwrap().revision, created, "nothing written");

    // Compare on the mod revision, then a range under the prefix.
    let cas = pb::TxnRequest {
        compare: vec![pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: b"policy/a".to_vec(),
            target_union: Some(TargetUnion::ModRevision(created)),
        }],
        success: vec![put("policy/a", "three", 0), put("policy/b", "b", 0)],
        failure: vec![],
    };
    let updated = kv.txn(cas).await.unwrap().into_inner();
    assert!(updated.succeeded);
    let updated_at = updated.header.unwrap().revision;
    assert_eq!(
        updated_at,
        created + 1,
        "one revision for the whole transaction"
    );
    let range = kv
        .range(pb::RangeRequest {
            key: b"policy/".to_vec(),
            range_end: prefix_end("policy/"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(Vec<u8>, Vec<u8>, i64, i64)> = range
        .kvs
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.clone(),
                kv.create_revision,
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (b"policy/a".to_vec(), b"three".to_vec(), created, updated_at),
            (b"policy/b".to_vec(), b"b".to_vec(), updated_at, updated_at),
        ]
    );

    // A watch from the first revision replays both transactions, in order.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: b"policy/".to_vec(),
                range_end: prefix_end("policy/"),
                start_revision: created,
                progress_notify: true,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut watch = WatchClient::new(ch.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a watch response in 10 s")
            .expect("the watch goes on")
            .unwrap();
        for event in resp.events {
            let kv = event.kv.unwrap();
            seen.push((kv.key, kv.mod_revision));
        }
    }
    assert_eq!(
        seen,
        vec![
            (b"policy/a".to_vec(), created),
            (b"policy/a".to_vec(), updated_at),
            (b"policy/b".to_vec(), updated_at),
        ]
    );
    drop(tx);

    // After a compaction, a watch from before it is cancelled with the compacted revision.
    kv.compact(pb::CompactionRequest {
        revision: updated_at,
        physical: true,
    })
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: b"policy/".to_vec(),
                range_end: prefix_end("policy/"),
                start_revision: created,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut stale = WatchClient::new(ch.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let cancelled = loop {
        let resp = tokio::time::timeout(Duration::from_secs(10), stale.next())
            .await
            .expect("an answer in 10 s")
            .expect("a response")
            .unwrap();
        if resp.canceled {
            break resp;
        }
    };
    assert_eq!(cancelled.compact_revision, updated_at);
    drop(tx);

    // A key on a lease goes when the lease is revoked.
    let mut lease = LeaseClient::new(ch.clone());
    let granted = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 5, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(granted.id != 0 && granted.ttl == 5, "{granted:?}");
    let leader_key = pb::TxnRequest {
        compare: vec![absent("leader")],
        success: vec![put("leader", "replica-1", granted.id)],
        failure: vec![],
    };
    assert!(kv.txn(leader_key).await.unwrap().into_inner().succeeded);
    lease
        .lease_revoke(pb::LeaseRevokeRequest { id: granted.id })
        .await
        .unwrap();
    let gone = kv
        .range(pb::RangeRequest {
            key: b"leader".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.kvs.is_empty(), "the leased key went with its lease");

    // Member status: a leader, a version, no alarm.
    let status = MaintenanceClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.version.starts_with("3."), "{}", status.version);
    assert_ne!(status.leader, 0);
    assert!(status.errors.is_empty(), "{:?}", status.errors);
}

#[tokio::test]
async fn a_member_that_stops_answering_is_an_error_within_the_request_bound() {
    use crate::kv::{EtcdKv, Kv};
    let (etcd, ch) = member().await;
    let kv = EtcdKv::new(ch, b"/meshd/t/".to_vec());
    kv.get(b"k").await.expect("a live member answers");
    // Frozen, not dead: the connection stays open and nothing comes back (a partition).
    let pid = etcd.child.id().to_string();
    let stopped = Command::new("kill").args(["-STOP", &pid]).status();
    assert!(stopped.expect("kill runs").success());
    let started = Instant::now();
    let err = kv
        .get(b"k")
        .await
        .expect_err("no answer from a frozen member");
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert!(
        matches!(&err, crate::kv::Error::Backend { reason, .. } if reason.contains("no answer")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}
