//! The [`Kv`] contract, every case against every backend (`contract_suite!`: memory, sled, a
//! real etcd member of its own), plus what only a durable backend can show (reopen). Revisions
//! are counted from where each store starts (etcd starts at 1, the others at 0).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::log::{MAX_TXN_BYTES, MAX_TXN_OPS};
use super::*;

macro_rules! contract_suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(std::sync::Arc::new(super::MemoryKv::new())).await;
                }
            )*
        }
        mod sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let kv = super::SledKv::open(dir.path()).unwrap();
                    super::$case(std::sync::Arc::new(kv)).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_member, channel) = crate::kv::etcd::tests::member().await;
                    let kv = super::EtcdKv::new(channel, b"/meshd/test/".to_vec());
                    super::$case(std::sync::Arc::new(kv)).await;
                }
            )*
        }
    };
}

contract_suite!(
    revisions_count_commits_and_entries_remember_theirs,
    compares_guard_writes_and_a_failed_one_writes_nothing,
    of_concurrent_creates_exactly_one_wins,
    compare_and_set_loops_lose_no_increment,
    a_range_is_sorted_filtered_and_at_one_revision,
    a_watch_replays_then_follows_each_commit_once_in_order,
    a_watch_after_a_revision_starts_there,
    a_compacted_history_is_an_error_never_a_gap,
    a_transaction_over_the_bound_is_refused,
    a_key_written_twice_in_one_transaction_is_refused,
);

fn put(key: &str, value: &str) -> Op {
    Op::Put(key.as_bytes().to_vec(), value.as_bytes().to_vec())
}

fn del(key: &str) -> Op {
    Op::Delete(key.as_bytes().to_vec())
}

fn ops(ops: Vec<Op>) -> Txn {
    Txn {
        compares: Vec::new(),
        ops,
    }
}

async fn commit(kv: &dyn Kv, ops_: Vec<Op>) -> Revision {
    kv.txn(ops(ops_))
        .await
        .unwrap()
        .expect("no compare to fail")
}

fn entry(value: &str, mod_revision: Revision, create_revision: Revision) -> Entry {
    Entry {
        value: value.as_bytes().to_vec(),
        mod_revision,
        create_revision,
    }
}

async fn revisions_count_commits_and_entries_remember_theirs(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    assert_eq!(commit(&*kv, vec![put("a", "1")]).await, b + 1);
    assert_eq!(kv.get(b"a").await.unwrap(), Some(entry("1", b + 1, b + 1)));
    assert_eq!(
        commit(&*kv, vec![put("a", "2"), put("b", "x")]).await,
        b + 2
    );
    assert_eq!(kv.get(b"a").await.unwrap(), Some(entry("2", b + 2, b + 1)));
    assert_eq!(kv.get(b"b").await.unwrap(), Some(entry("x", b + 2, b + 2)));
    assert_eq!(commit(&*kv, vec![del("a")]).await, b + 3);
    assert_eq!(kv.get(b"a").await.unwrap(), None);
    // Deleting what is absent changes nothing: no revision.
    assert_eq!(commit(&*kv, vec![del("a")]).await, b + 3);
    assert_eq!(kv.revision().await.unwrap(), b + 3);
    // Created again: a new life.
    assert_eq!(commit(&*kv, vec![put("a", "3")]).await, b + 4);
    assert_eq!(kv.get(b"a").await.unwrap(), Some(entry("3", b + 4, b + 4)));
}

async fn compares_guard_writes_and_a_failed_one_writes_nothing(kv: SharedKv) {
    let created = commit(&*kv, vec![put("k", "v1")]).await;
    let stale = Txn {
        compares: vec![Compare::ModRevision(b"k".to_vec(), created + 7)],
        ops: vec![put("k", "lost"), put("other", "lost")],
    };
    assert_eq!(kv.txn(stale).await.unwrap(), None);
    let taken = Txn {
        compares: vec![Compare::Absent(b"k".to_vec())],
        ops: vec![put("other", "lost")],
    };
    assert_eq!(kv.txn(taken).await.unwrap(), None);
    assert_eq!(kv.get(b"other").await.unwrap(), None);
    assert_eq!(kv.revision().await.unwrap(), created);

    let fresh = Txn {
        compares: vec![
            Compare::ModRevision(b"k".to_vec(), created),
            Compare::Absent(b"other".to_vec()),
        ],
        ops: vec![put("k", "v2"), put("other", "w")],
    };
    assert_eq!(kv.txn(fresh).await.unwrap(), Some(created + 1));
    assert_eq!(
        kv.get(b"k").await.unwrap(),
        Some(entry("v2", created + 1, created))
    );
    // A compare on a deleted key: absent holds again, a revision compare does not.
    commit(&*kv, vec![del("k")]).await;
    let on_deleted = Txn {
        compares: vec![Compare::ModRevision(b"k".to_vec(), created + 1)],
        ops: vec![put("k", "zombie")],
    };
    assert_eq!(kv.txn(on_deleted).await.unwrap(), None);
}

async fn of_concurrent_creates_exactly_one_wins(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let kv = kv.clone();
            tokio::spawn(async move {
                let txn = Txn {
                    compares: vec![Compare::Absent(b"leader".to_vec())],
                    ops: vec![put("leader", &format!("replica-{i}"))],
                };
                kv.txn(txn).await.unwrap().is_some()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
    assert_eq!(kv.revision().await.unwrap(), b + 1);
}

async fn compare_and_set_loops_lose_no_increment(kv: SharedKv) {
    let start = commit(&*kv, vec![put("counter", "0")]).await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let kv = kv.clone();
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..25 {
                    loop {
                        let seen = kv.get(b"counter").await.unwrap().unwrap();
                        let n: u64 = String::from_utf8(seen.value).unwrap().parse().unwrap();
                        let txn = Txn {
                            compares: vec![Compare::ModRevision(
                                b"counter".to_vec(),
                                seen.mod_revision,
                            )],
                            ops: vec![put("counter", &(n + 1).to_string())],
                        };
                        if kv.txn(txn).await.unwrap().is_some() {
                            break;
                        }
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let end = kv.get(b"counter").await.unwrap().unwrap();
    assert_eq!(end.value, b"100");
    assert_eq!(
        end.mod_revision,
        start + 100,
        "one revision per committed increment"
    );
}

async fn a_range_is_sorted_filtered_and_at_one_revision(kv: SharedKv) {
    let first = commit(&*kv, vec![put("policy/b", "2"), put("node/x", "n")]).await;
    let second = commit(
        &*kv,
        vec![put("policy/a", "1"), put("policyx", "not under")],
    )
    .await;
    let snapshot = kv.range(b"policy/").await.unwrap();
    assert_eq!(snapshot.revision, second);
    let keys: Vec<&[u8]> = snapshot.entries.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, [b"policy/a".as_slice(), b"policy/b".as_slice()]);
    assert_eq!(snapshot.entries[1].1, entry("2", first, first));
    assert!(kv.range(b"nothing/").await.unwrap().entries.is_empty());
    // Past a page of keys (etcd is read 1,000 at a time, at one pinned revision).
    for chunk in 0..15 {
        let puts = (0..100)
            .map(|i| put(&format!("many/{:05}", chunk * 100 + i), "v"))
            .collect();
        commit(&*kv, puts).await;
    }
    let many = kv.range(b"many/").await.unwrap();
    assert_eq!(many.entries.len(), 1500);
    assert!(
        many.entries.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted, no repeat"
    );
}

async fn next(stream: &mut WatchStream) -> Batch {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a batch within 10 s")
        .expect("the watch goes on")
        .expect("no error")
}

async fn a_watch_replays_then_follows_each_commit_once_in_order(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    commit(
        &*kv,
        vec![put("p/a", "1"), put("q/x", "ignored"), put("p/b", "2")],
    )
    .await;
    commit(
        &*kv,
        vec![put("q/y", "a batch with nothing under p/ is skipped")],
    )
    .await;
    commit(&*kv, vec![del("p/a")]).await;
    let mut watch = kv.watch(b"p/", b).await.unwrap();
    let first = next(&mut watch).await;
    assert_eq!(first.revision, b + 1);
    assert_eq!(
        first.events,
        vec![
            Event::Put {
                key: b"p/a".to_vec(),
                entry: entry("1", b + 1, b + 1)
            },
            Event::Put {
                key: b"p/b".to_vec(),
                entry: entry("2", b + 1, b + 1)
            },
        ]
    );
    let second = next(&mut watch).await;
    assert_eq!(second.revision, b + 3);
    assert_eq!(
        second.events,
        vec![Event::Delete {
            key: b"p/a".to_vec(),
            mod_revision: b + 3
        }]
    );
    // Live: writers in another task, the watch sees each of their commits once, in order.
    let writer = {
        let kv = kv.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                commit(
                    &*kv,
                    vec![put("p/live", &i.to_string()), put("q/noise", "n")],
                )
                .await;
            }
        })
    };
    let mut last = b + 3;
    for i in 0..50 {
        let batch = next(&mut watch).await;
        assert!(batch.revision > last, "in order, no repeat");
        last = batch.revision;
        assert_eq!(batch.events.len(), 1);
        let Event::Put { entry, .. } = &batch.events[0] else {
            panic!("a put")
        };
        assert_eq!(entry.value, i.to_string().as_bytes());
    }
    writer.await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
}

async fn a_watch_after_a_revision_starts_there(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    for i in 0..5 {
        commit(&*kv, vec![put("k", &i.to_string())]).await;
    }
    let mut watch = kv.watch(b"", b + 3).await.unwrap();
    assert_eq!(next(&mut watch).await.revision, b + 4);
    assert_eq!(next(&mut watch).await.revision, b + 5);
    // At the current revision: only what comes next.
    let mut current = kv.watch(b"", b + 5).await.unwrap();
    commit(&*kv, vec![put("k", "new")]).await;
    assert_eq!(next(&mut current).await.revision, b + 6);
}

/// Whether a watch was refused as compacted, when created or at its first item (etcd cancels a
/// watch after creating it).
async fn refused_as_compacted(watch: Result<WatchStream, Error>, compacted: Revision) -> bool {
    let first = match watch {
        Err(e) => Err(e),
        Ok(mut stream) => tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an answer in 10 s")
            .expect("an item"),
    };
    matches!(first, Err(Error::Compacted { compacted: c, .. }) if c == compacted)
}

async fn a_compacted_history_is_an_error_never_a_gap(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    for i in 0..10 {
        commit(&*kv, vec![put("k", &i.to_string())]).await;
    }
    // A watcher at b + 2, not polled while the history up to b + 6 is compacted: it gets
    // either every later revision (etcd had already sent them) or the error, never a gap.
    let mut stalled = kv.watch(b"", b + 2).await.unwrap();
    kv.compact(b + 6).await.unwrap();
    let mut expect = b + 3;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next()).await {
            Ok(Some(Ok(batch))) => {
                assert_eq!(batch.revision, expect, "no gap");
                expect += 1;
                if expect > b + 10 {
                    break;
                }
            }
            Ok(Some(Err(Error::Compacted { after, compacted }))) => {
                assert_eq!((after, compacted), (expect - 1, b + 6));
                assert!(
                    stalled.next().await.is_none(),
                    "the watch ends after the error"
                );
                break;
            }
            other => panic!("expected a batch or Compacted, got {other:?}"),
        }
    }
    assert!(refused_as_compacted(kv.watch(b"", b + 5).await, b + 6).await);
    // The cure: list, then watch from the listed revision.
    let listed = kv.range(b"").await.unwrap();
    assert_eq!(listed.revision, b + 10);
    let mut resumed = kv.watch(b"", listed.revision).await.unwrap();
    commit(&*kv, vec![put("k", "after")]).await;
    assert_eq!(next(&mut resumed).await.revision, b + 11);
    // From the compacted revision itself the history is whole.
    let mut from_mark = kv.watch(b"", b + 6).await.unwrap();
    assert_eq!(next(&mut from_mark).await.revision, b + 7);
    // Compacting backwards or beyond the present changes nothing wrong.
    kv.compact(b + 3).await.unwrap();
    kv.compact(b + 1_000).await.unwrap();
    let mut latest = kv.watch(b"", b + 11).await.unwrap();
    commit(&*kv, vec![put("k", "later")]).await;
    assert_eq!(next(&mut latest).await.revision, b + 12);
}

async fn a_transaction_over_the_bound_is_refused(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    let big = "x".repeat(MAX_TXN_BYTES);
    let err = kv.txn(ops(vec![put("k", &big)])).await.unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { len, max, .. } if len == MAX_TXN_BYTES + 1 && max == MAX_TXN_BYTES),
        "{err}"
    );
    assert_eq!(kv.revision().await.unwrap(), b);
    let just = "x".repeat(MAX_TXN_BYTES - 1);
    assert_eq!(
        kv.txn(ops(vec![put("k", &just)])).await.unwrap(),
        Some(b + 1)
    );
    let many = |n: usize| ops((0..n).map(|i| put(&format!("op/{i}"), "v")).collect());
    let err = kv.txn(many(MAX_TXN_OPS + 1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                max: MAX_TXN_OPS,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(kv.txn(many(MAX_TXN_OPS)).await.unwrap(), Some(b + 2));
}

async fn a_key_written_twice_in_one_transaction_is_refused(kv: SharedKv) {
    let b = kv.revision().await.unwrap();
    let err = kv
        .txn(ops(vec![put("k", "1"), put("other", "o"), del("k")]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateKey { key } if key == "k"),
        "{err}"
    );
    assert_eq!(kv.revision().await.unwrap(), b);
    assert_eq!(kv.get(b"other").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_keeps_entries_revisions_and_history_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let kv = SledKv::open(dir.path()).unwrap();
        commit(&kv, vec![put("a", "1"), put("b", "2")]).await;
        commit(&kv, vec![del("b")]).await;
    }
    let kv = loop {
        // sled releases its file lock when the last handle (here, blocking tasks') drops.
        match SledKv::open(dir.path()) {
            Ok(kv) => break Arc::new(kv),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(kv.revision().await.unwrap(), 2);
    assert_eq!(kv.get(b"a").await.unwrap(), Some(entry("1", 1, 1)));
    let mut watch = kv.watch(b"", 0).await.unwrap();
    assert_eq!(next(&mut watch).await.revision, 1);
    assert_eq!(next(&mut watch).await.revision, 2);
    assert_eq!(commit(&*kv, vec![put("c", "3")]).await, 3);
    assert_eq!(next(&mut watch).await.revision, 3);
}
