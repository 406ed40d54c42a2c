//! The [`Store`] contract suite, run against both [`MemoryStore`] and [`SledStore`], plus
//! sled-only tests: reopen, schema checks, corrupt records and acknowledged writes surviving
//! a hard kill of the process. Policy cases live in `tests/policy.rs`, gossip keyring cases in
//! `tests/gossip_keys.rs`, node report, traffic and SLO alert cases in `tests/observe.rs`.

use std::path::Path;
use std::process::Command;
use std::sync::Barrier;

use super::{
    CertRecord, Error, MemoryStore, NodeRecord, SCHEMA_VERSION, SledStore, Store, TokenRecord,
};

/// Runs each contract case as a `#[test]` against a fresh store of each kind.
macro_rules! contract_suite {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::MemoryStore::new());
                }
            )+
        }

        mod sled {
            $(
                #[test]
                fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$case(&super::SledStore::open(dir.path()).unwrap());
                }
            )+
        }

        // The same contract for the store written over the revisioned key-value space, on
        // each of its backends (etcd: a real member of its own per case).
        mod kv_memory {
            $(
                #[test]
                fn $case() {
                    let rt = tokio::runtime::Runtime::new().unwrap();
                    let kv = std::sync::Arc::new(crate::kv::MemoryKv::new());
                    super::$case(&super::kv_store(kv, &rt));
                }
            )+
        }

        mod kv_sled {
            $(
                #[test]
                fn $case() {
                    let rt = tokio::runtime::Runtime::new().unwrap();
                    let dir = tempfile::tempdir().unwrap();
                    let kv = std::sync::Arc::new(crate::kv::SledKv::open(dir.path()).unwrap());
                    super::$case(&super::kv_store(kv, &rt));
                }
            )+
        }

        mod kv_etcd {
            $(
                #[test]
                fn $case() {
                    let rt = tokio::runtime::Runtime::new().unwrap();
                    let (_member, channel) = rt.block_on(crate::kv::etcd::tests::member());
                    let kv = std::sync::Arc::new(crate::kv::EtcdKv::new(channel, b"/meshd/t/".to_vec()));
                    super::$case(&super::kv_store(kv, &rt));
                }
            )+
        }
    };
}

/// A [`super::KvStore`] on `kv`, telemetry in memory, async work on `rt`.
pub(crate) fn kv_store(
    kv: std::sync::Arc<dyn crate::kv::Kv>,
    rt: &tokio::runtime::Runtime,
) -> super::KvStore {
    super::KvStore::new(
        kv,
        std::sync::Arc::new(MemoryStore::new()),
        rt.handle().clone(),
    )
}

// Declared after the macro so these suites can use it.
mod gossip_keys;
mod observe;
mod policy;

contract_suite!(
    tokens_put_get_list,
    join_increments_uses_and_writes_node_and_cert,
    join_unknown_token_writes_nothing,
    join_expired_token_writes_nothing,
    join_exhausted_token_writes_nothing,
    join_unlimited_token,
    concurrent_single_use_join_has_one_winner,
    join_under_registered_name_is_refused_and_uses_nothing,
    replace_token_joins_only_its_name,
    concurrent_joins_under_one_new_name_have_one_winner,
    revoked_token_cannot_join,
    list_certs_newest_first_with_limit,
    prune_certs_drops_only_long_expired,
    delete_node_returns_the_record,
    list_nodes_sorted_by_name,
    put_node_replaces,
);

const NOW: i64 = 1_700_000_000;

fn token(id: &str, max_uses: u32) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        secret_sha256: format!("{:064x}", 0xfeed_u32),
        services: vec!["shop/web".to_owned(), "shop/*".to_owned()],
        created_unix: NOW - 60,
        expires_unix: NOW + 3600,
        max_uses,
        uses: 0,
        created_by: "operator@example".to_owned(),
        replace_node: None,
        revoked_unix: None,
        revoked_by: String::new(),
    }
}

fn replace_token(id: &str, max_uses: u32, replace: &str) -> TokenRecord {
    TokenRecord {
        replace_node: Some(replace.to_owned()),
        ..token(id, max_uses)
    }
}

fn node(name: &str, token_id: &str) -> NodeRecord {
    NodeRecord {
        name: name.to_owned(),
        datacenter: "dc1".to_owned(),
        zone: "a".to_owned(),
        allowed_services: vec!["shop/web".to_owned()],
        token_id: token_id.to_owned(),
        joined_unix: NOW,
        last_renewed_unix: NOW,
        cert_serial: format!("serial-{name}"),
        cert_not_after_unix: NOW + 86_400,
    }
}

fn cert(serial: &str, node: &str, issued_unix: i64) -> CertRecord {
    CertRecord {
        serial: serial.to_owned(),
        identity: format!("spiffe://mesh.local/node/{node}"),
        node: node.to_owned(),
        issued_unix,
        not_before_unix: issued_unix - 60,
        not_after_unix: issued_unix + 86_400,
    }
}

fn serials(certs: &[CertRecord]) -> Vec<&str> {
    certs.iter().map(|c| c.serial.as_str()).collect()
}

/// Asserts that a failed join left no trace: no node, no cert, token unchanged.
fn assert_nothing_written(store: &dyn Store, node_name: &str, token_before: Option<&TokenRecord>) {
    assert_eq!(store.get_node(node_name).unwrap(), None);
    assert!(
        !store
            .list_certs(0)
            .unwrap()
            .iter()
            .any(|c| c.node == node_name)
    );
    if let Some(before) = token_before {
        assert_eq!(store.get_token(&before.id).unwrap().as_ref(), Some(before));
    }
}

// === contract cases ===

fn tokens_put_get_list(store: &dyn Store) {
    let b = token("00000000000000bb", 1);
    let a = token("00000000000000aa", 0);
    store.put_token(&b).unwrap();
    store.put_token(&a).unwrap();
    assert_eq!(store.get_token(&a.id).unwrap(), Some(a.clone()));
    assert_eq!(store.get_token("00000000000000cc").unwrap(), None);
    assert_eq!(store.list_tokens().unwrap(), vec![a.clone(), b.clone()]);

    let replaced = TokenRecord { uses: 7, ..b };
    store.put_token(&replaced).unwrap();
    assert_eq!(store.list_tokens().unwrap(), vec![a, replaced]);
}

fn join_increments_uses_and_writes_node_and_cert(store: &dyn Store) {
    let t = token("0000000000000001", 2);
    store.put_token(&t).unwrap();
    let n = node("node-1", &t.id);
    let c = cert("serial-node-1", "node-1", NOW);

    let used = store.join(&t.id, NOW, &n, &c).unwrap();
    assert_eq!(
        used,
        TokenRecord {
            uses: 1,
            ..t.clone()
        }
    );
    assert_eq!(store.get_token(&t.id).unwrap(), Some(used));
    assert_eq!(store.get_node("node-1").unwrap(), Some(n));
    assert_eq!(store.list_certs(0).unwrap(), vec![c]);
}

fn join_unknown_token_writes_nothing(store: &dyn Store) {
    let n = node("node-1", "0000000000000404");
    let err = store
        .join("0000000000000404", NOW, &n, &cert("s1", "node-1", NOW))
        .unwrap_err();
    assert!(matches!(err, Error::TokenNotFound), "{err:?}");
    assert_nothing_written(store, "node-1", None);
    assert!(store.list_tokens().unwrap().is_empty());
}

fn join_expired_token_writes_nothing(store: &dyn Store) {
    let t = token("0000000000000002", 0);
    store.put_token(&t).unwrap();
    let n = node("node-1", &t.id);
    // Valid while now < expires_unix: the expiry second itself is already expired.
    let err = store
        .join(&t.id, t.expires_unix, &n, &cert("s1", "node-1", NOW))
        .unwrap_err();
    assert!(
        matches!(err, Error::TokenExpired { expired_unix } if expired_unix == t.expires_unix),
        "{err:?}"
    );
    assert_nothing_written(store, "node-1", Some(&t));
    // One second earlier it still works.
    store
        .join(&t.id, t.expires_unix - 1, &n, &cert("s1", "node-1", NOW))
        .unwrap();
}

fn join_exhausted_token_writes_nothing(store: &dyn Store) {
    let t = token("0000000000000003", 1);
    store.put_token(&t).unwrap();
    store
        .join(
            &t.id,
            NOW,
            &node("node-1", &t.id),
            &cert("s1", "node-1", NOW),
        )
        .unwrap();
    let after_first = store.get_token(&t.id).unwrap().unwrap();

    let err = store
        .join(
            &t.id,
            NOW,
            &node("node-2", &t.id),
            &cert("s2", "node-2", NOW),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::TokenExhausted { max_uses: 1 }),
        "{err:?}"
    );
    assert_nothing_written(store, "node-2", Some(&after_first));
    assert_eq!(after_first.uses, 1);
    assert_eq!(serials(&store.list_certs(0).unwrap()), ["s1"]);
}

fn join_unlimited_token(store: &dyn Store) {
    let t = token("0000000000000004", 0);
    store.put_token(&t).unwrap();
    for i in 1..=5 {
        let name = format!("node-{i}");
        let used = store
            .join(
                &t.id,
                NOW,
                &node(&name, &t.id),
                &cert(&format!("s{i}"), &name, NOW),
            )
            .unwrap();
        assert_eq!(used.uses, i);
    }
    assert_eq!(store.list_nodes().unwrap().len(), 5);
    assert_eq!(store.list_certs(0).unwrap().len(), 5);
}

fn concurrent_single_use_join_has_one_winner(store: &dyn Store) {
    const THREADS: usize = 8;
    let t = token("0000000000000005", 1);
    store.put_token(&t).unwrap();
    let start = Barrier::new(THREADS);
    let results: Vec<Result<TokenRecord, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (start, id) = (&start, t.id.as_str());
                s.spawn(move || {
                    let name = format!("node-{i}");
                    start.wait();
                    store.join(
                        id,
                        NOW,
                        &node(&name, id),
                        &cert(&format!("s{i}"), &name, NOW),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, Error::TokenExhausted { max_uses: 1 })),
        "{results:?}"
    );
    assert_eq!(store.get_token(&t.id).unwrap().unwrap().uses, 1);
    assert_eq!(store.list_nodes().unwrap().len(), 1);
    assert_eq!(store.list_certs(0).unwrap().len(), 1);
}

fn join_under_registered_name_is_refused_and_uses_nothing(store: &dyn Store) {
    let first = token("0000000000000010", 1);
    let second = token("0000000000000011", 0);
    store.put_token(&first).unwrap();
    store.put_token(&second).unwrap();
    let original = node("node-1", &first.id);
    store
        .join(&first.id, NOW, &original, &cert("s1", "node-1", NOW))
        .unwrap();

    let err = store
        .join(
            &second.id,
            NOW,
            &node("node-1", &second.id),
            &cert("s2", "node-1", NOW),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::NodeExists { name } if name == "node-1"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("meshctl token create --replace node-1"),
        "{err}"
    );
    // The token is not used, the original record and certs are untouched.
    assert_eq!(store.get_token(&second.id).unwrap(), Some(second));
    assert_eq!(store.get_node("node-1").unwrap(), Some(original));
    assert_eq!(serials(&store.list_certs(0).unwrap()), ["s1"]);
}

fn replace_token_joins_only_its_name(store: &dyn Store) {
    let ordinary = token("0000000000000020", 1);
    let replace = replace_token("0000000000000021", 2, "node-1");
    store.put_token(&ordinary).unwrap();
    store.put_token(&replace).unwrap();
    store
        .join(
            &ordinary.id,
            NOW,
            &node("node-1", &ordinary.id),
            &cert("s1", "node-1", NOW),
        )
        .unwrap();

    // Not under another name, registered (node-3) or not (node-2); nothing is used.
    store.put_node(&node("node-3", "t")).unwrap();
    for (other, serial) in [("node-2", "s2"), ("node-3", "s3")] {
        let err = store
            .join(
                &replace.id,
                NOW,
                &node(other, &replace.id),
                &cert(serial, other, NOW),
            )
            .unwrap_err();
        assert!(
            matches!(&err, Error::TokenForOtherNode { replace_node, name }
                if replace_node == "node-1" && name == other),
            "{err:?}"
        );
    }
    assert_eq!(store.get_token(&replace.id).unwrap(), Some(replace.clone()));
    assert_eq!(store.get_node("node-2").unwrap(), None);

    // Under its own name it replaces the registered node's record.
    let reinstalled = NodeRecord {
        zone: "b".to_owned(),
        ..node("node-1", &replace.id)
    };
    let used = store
        .join(&replace.id, NOW, &reinstalled, &cert("s4", "node-1", NOW))
        .unwrap();
    assert_eq!(used.uses, 1);
    assert_eq!(store.get_node("node-1").unwrap(), Some(reinstalled));
    assert_eq!(serials(&store.list_certs(0).unwrap()), ["s4", "s1"]);
}

fn concurrent_joins_under_one_new_name_have_one_winner(store: &dyn Store) {
    const THREADS: usize = 8;
    let t = token("0000000000000030", 0);
    store.put_token(&t).unwrap();
    let start = Barrier::new(THREADS);
    let results: Vec<Result<TokenRecord, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (start, id) = (&start, t.id.as_str());
                s.spawn(move || {
                    start.wait();
                    store.join(
                        id,
                        NOW,
                        &node("node-1", id),
                        &cert(&format!("s{i}"), "node-1", NOW),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        (results.iter().filter_map(|r| r.as_ref().err()))
            .all(|e| matches!(e, Error::NodeExists { name } if name == "node-1")),
        "{results:?}"
    );
    assert_eq!(store.get_token(&t.id).unwrap().unwrap().uses, 1);
    assert_eq!(store.list_certs(0).unwrap().len(), 1);
}

fn revoked_token_cannot_join(store: &dyn Store) {
    let t = token("0000000000000040", 0);
    store.put_token(&t).unwrap();
    store
        .join(
            &t.id,
            NOW,
            &node("node-1", &t.id),
            &cert("s1", "node-1", NOW),
        )
        .unwrap();

    let (revoked, already) = store.revoke_token(&t.id, NOW + 5, "admin-a").unwrap();
    assert!(!already);
    assert_eq!(
        revoked,
        TokenRecord {
            uses: 1,
            revoked_unix: Some(NOW + 5),
            revoked_by: "admin-a".to_owned(),
            ..t.clone()
        }
    );
    assert_eq!(store.get_token(&t.id).unwrap().as_ref(), Some(&revoked));

    let err = store
        .join(
            &t.id,
            NOW + 6,
            &node("node-2", &t.id),
            &cert("s2", "node-2", NOW),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::TokenRevoked { revoked_unix } if revoked_unix == NOW + 5),
        "{err:?}"
    );
    assert_nothing_written(store, "node-2", Some(&revoked));

    // A second revocation changes nothing; an unknown id is not found.
    assert_eq!(
        store.revoke_token(&t.id, NOW + 9, "admin-b").unwrap(),
        (revoked, true)
    );
    let err = store
        .revoke_token("0000000000000404", NOW, "admin-a")
        .unwrap_err();
    assert!(matches!(err, Error::TokenNotFound), "{err:?}");
    assert_eq!(store.list_tokens().unwrap().len(), 1);
}

fn list_certs_newest_first_with_limit(store: &dyn Store) {
    for (serial, issued) in [
        ("a", NOW + 10),
        ("b", NOW + 30),
        ("c", NOW + 20),
        ("d", NOW + 30),
    ] {
        store.put_cert(&cert(serial, "node-1", issued)).unwrap();
    }
    // Ties on issued_unix are broken by serial, descending.
    assert_eq!(serials(&store.list_certs(0).unwrap()), ["d", "b", "c", "a"]);
    assert_eq!(serials(&store.list_certs(2).unwrap()), ["d", "b"]);
    assert_eq!(store.list_certs(10).unwrap().len(), 4);
}

fn prune_certs_drops_only_long_expired(store: &dyn Store) {
    for (serial, issued) in [("old", NOW - 10_000), ("new", NOW)] {
        store.put_cert(&cert(serial, "node-1", issued)).unwrap();
    }
    let all = store.list_certs(0).unwrap();
    let old_expiry = all
        .iter()
        .find(|c| c.serial == "old")
        .unwrap()
        .not_after_unix;
    assert_eq!(
        store.prune_certs(old_expiry).unwrap(),
        0,
        "expiring at the cutoff stays"
    );
    assert_eq!(store.prune_certs(old_expiry + 1).unwrap(), 1);
    assert_eq!(serials(&store.list_certs(0).unwrap()), ["new"]);
}

fn delete_node_returns_the_record(store: &dyn Store) {
    store.put_node(&node("node-a", "t")).unwrap();
    assert_eq!(store.delete_node("node-a").unwrap().unwrap().name, "node-a");
    assert_eq!(store.delete_node("node-a").unwrap(), None);
    assert!(store.get_node("node-a").unwrap().is_none());
}

fn list_nodes_sorted_by_name(store: &dyn Store) {
    for name in ["node-c", "node-a", "node-b"] {
        store.put_node(&node(name, "t")).unwrap();
    }
    let names: Vec<_> = store
        .list_nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["node-a", "node-b", "node-c"]);
}

fn put_node_replaces(store: &dyn Store) {
    store.put_node(&node("node-1", "t")).unwrap();
    let moved = NodeRecord {
        zone: "b".to_owned(),
        cert_serial: "serial-2".to_owned(),
        ..node("node-1", "t")
    };
    store.put_node(&moved).unwrap();
    assert_eq!(store.get_node("node-1").unwrap(), Some(moved.clone()));
    assert_eq!(store.list_nodes().unwrap(), vec![moved]);
}

// === sled only ===

/// sled 0.34 releases its file lock from background threads shortly after the last handle is
/// dropped, so reopening at once in the same process can fail with `WouldBlock` (sled's own
/// test build blocks on the lock for this reason). Retries only that error, for at most ~5s.
// Waits on sled's own background thread, from a synchronous test: real time is what it means.
#[allow(clippy::disallowed_methods)]
fn retry_while_locked<T, E>(
    open: impl Fn() -> Result<T, E>,
    sled_error: impl Fn(&E) -> Option<&::sled::Error>,
) -> Result<T, E> {
    let mut attempts = 0;
    loop {
        match open() {
            Err(err) if attempts < 500 && sled_error(&err).is_some_and(lock_busy) => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

fn lock_busy(err: &::sled::Error) -> bool {
    matches!(err, ::sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// [`SledStore::open`] on a directory this process may just have closed.
pub(crate) fn reopen(dir: &Path) -> Result<SledStore, Error> {
    retry_while_locked(
        || SledStore::open(dir),
        |err| match err {
            Error::Sled { source, .. } => Some(source),
            _ => None,
        },
    )
}

/// Raw `sled::open`, to tamper with the database behind the store's back.
fn reopen_raw(dir: &Path) -> ::sled::Db {
    retry_while_locked(|| ::sled::open(dir), |err| Some(err)).unwrap()
}

#[test]
fn sled_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let t = token("0000000000000006", 3);
    let n = node("node-1", &t.id);
    let c = cert("s1", "node-1", NOW);
    let extra = cert("s2", "node-2", NOW + 1);
    {
        let store = reopen(dir.path()).unwrap();
        store.put_token(&t).unwrap();
        store.join(&t.id, NOW, &n, &c).unwrap();
        store.put_cert(&extra).unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    assert_eq!(
        store.list_tokens().unwrap(),
        vec![TokenRecord { uses: 1, ..t }]
    );
    assert_eq!(store.list_nodes().unwrap(), vec![n]);
    assert_eq!(store.list_certs(0).unwrap(), vec![extra, c]);
}

#[test]
fn sled_reads_tokens_stored_before_replace_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()).unwrap());
    let t = token("0000000000000050", 1);
    {
        // The record as registries before `replace_node` and revocation wrote it.
        let mut old = serde_json::to_value(&t).unwrap();
        let fields = old.as_object_mut().unwrap();
        for new in ["replace_node", "revoked_unix", "revoked_by"] {
            assert!(fields.remove(new).is_some(), "{new}");
        }
        let db = reopen_raw(dir.path());
        (db.open_tree("tokens").unwrap())
            .insert(&t.id, serde_json::to_vec(&old).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    assert_eq!(store.get_token(&t.id).unwrap(), Some(t.clone()));
    store
        .join(
            &t.id,
            NOW,
            &node("node-1", &t.id),
            &cert("s1", "node-1", NOW),
        )
        .unwrap();
}

#[test]
fn sled_refuses_other_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()).unwrap());
    {
        let db = reopen_raw(dir.path());
        let meta = db.open_tree("meta").unwrap();
        let found = meta.get("schema_version").unwrap().unwrap();
        assert_eq!(&*found, SCHEMA_VERSION.to_string().as_bytes());
        meta.insert("schema_version", "2").unwrap();
        db.flush().unwrap();
    }
    let err = reopen(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedSchema {
                found: 2,
                supported: SCHEMA_VERSION
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("run a mesh-registry version that matches"),
        "{err}"
    );
}

#[test]
fn sled_refuses_data_without_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = reopen_raw(dir.path());
        db.open_tree("tokens").unwrap().insert("x", "{}").unwrap();
        db.flush().unwrap();
    }
    let err = reopen(dir.path()).unwrap_err();
    assert!(matches!(err, Error::MissingSchema { .. }), "{err:?}");
}

#[test]
fn sled_reports_corrupt_records() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()).unwrap());
    {
        let db = reopen_raw(dir.path());
        db.open_tree("tokens")
            .unwrap()
            .insert("bad", "not json")
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    let err = store.get_token("bad").unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { tree: "tokens", ref key, .. } if key == "bad"),
        "{err:?}"
    );
    assert!(matches!(store.list_tokens(), Err(Error::Corrupt { .. })));
    let err = store
        .join(
            "bad",
            NOW,
            &node("node-1", "bad"),
            &cert("s1", "node-1", NOW),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_eq!(store.get_node("node-1").unwrap(), None);
}

/// Set by [`sled_acknowledged_writes_survive_abort`] for its child process.
const CRASH_DIR_ENV: &str = "MESH_REGISTRY_STORE_CRASH_DIR";
const CRASH_TOKENS: u32 = 20;

/// Child half of [`sled_acknowledged_writes_survive_abort`]: writes, joins, then aborts the
/// process straight after the last acknowledged write. Does nothing unless the parent set
/// [`CRASH_DIR_ENV`], so `cargo test -- --ignored` does not abort the test run.
#[test]
#[ignore = "run as a child process by sled_acknowledged_writes_survive_abort"]
fn sled_crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let store = SledStore::open(Path::new(&dir)).unwrap();
    for i in 0..CRASH_TOKENS {
        store.put_token(&token(&format!("{i:016x}"), 1)).unwrap();
    }
    let last = format!("{:016x}", CRASH_TOKENS - 1);
    store
        .join(
            &last,
            NOW,
            &node("node-1", &last),
            &cert("s1", "node-1", NOW),
        )
        .unwrap();
    eprintln!("crash child: all writes acknowledged, aborting");
    std::process::abort();
}

/// Runs the ignored test `child_test` (a full module path, as `module_path!()` gives it) in a
/// child process with [`CRASH_DIR_ENV`] = `dir`, and asserts it aborted after printing
/// "all writes acknowledged, aborting".
fn run_aborting_child(child_test: &str, dir: &Path) {
    let child_test = child_test.split_once("::").unwrap().1; // drop the crate name
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            child_test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("all writes acknowledged, aborting"),
        "child did not reach the abort: {out:?}"
    );
    assert!(!out.status.success(), "child should have aborted: {out:?}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(6), "expected SIGABRT: {out:?}");
    }
}

#[test]
fn sled_acknowledged_writes_survive_abort() {
    let dir = tempfile::tempdir().unwrap();
    run_aborting_child(concat!(module_path!(), "::sled_crash_child"), dir.path());

    let store = reopen(dir.path()).unwrap();
    let tokens = store.list_tokens().unwrap();
    assert_eq!(tokens.len(), CRASH_TOKENS as usize);
    assert_eq!(tokens.last().unwrap().uses, 1);
    assert_eq!(
        store.get_node("node-1").unwrap(),
        Some(node("node-1", &tokens.last().unwrap().id))
    );
}
