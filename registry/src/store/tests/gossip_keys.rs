//! Gossip keyring cases of the [`Store`] contract (both stores), plus sled-only reopen,
//! corrupt-record and hard-kill cases.

use std::path::Path;

use super::{CRASH_DIR_ENV, kv_store, reopen, reopen_raw, run_aborting_child};
use crate::store::{Error, GossipKeyring, MemoryStore, SledStore, Store};

contract_suite!(
    gossip_keyring_absent_until_put,
    gossip_keyring_put_replaces,
    gossip_keyring_is_independent_of_policy,
);

/// Base64 of 32 bytes of `fill`: valid key material, easy to tell apart.
fn key(fill: u8) -> String {
    mesh_api::gossip_key::KeyMaterial::from_bytes([fill; 32]).to_base64()
}

fn keyring(revision: u64, fills: &[u8]) -> GossipKeyring {
    GossipKeyring {
        revision,
        keys: fills.iter().copied().map(key).collect(),
    }
}

// === contract cases ===

fn gossip_keyring_absent_until_put(store: &dyn Store) {
    assert_eq!(store.get_gossip_keyring().unwrap(), None);
    let first = keyring(1, &[1]);
    store.put_gossip_keyring(&first).unwrap();
    assert_eq!(store.get_gossip_keyring().unwrap(), Some(first));
}

fn gossip_keyring_put_replaces(store: &dyn Store) {
    store.put_gossip_keyring(&keyring(1, &[1])).unwrap();
    let rotated = keyring(2, &[2, 1]);
    store.put_gossip_keyring(&rotated).unwrap();
    assert_eq!(store.get_gossip_keyring().unwrap(), Some(rotated));
    // The store keeps what it is given; revision rules belong to the caller.
    let back = keyring(1, &[3]);
    store.put_gossip_keyring(&back).unwrap();
    assert_eq!(store.get_gossip_keyring().unwrap(), Some(back));
}

fn gossip_keyring_is_independent_of_policy(store: &dyn Store) {
    store.put_gossip_keyring(&keyring(5, &[1, 2])).unwrap();
    assert_eq!(store.policy_revision().unwrap(), 0);
    assert_eq!(store.list_policies().unwrap(), (0, Vec::new()));
    assert!(store.list_tokens().unwrap().is_empty());
}

// === sled only ===

#[test]
fn sled_gossip_keyring_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(3, &[7, 8, 9]);
    reopen(dir.path())
        .unwrap()
        .put_gossip_keyring(&ring)
        .unwrap();
    let store = reopen(dir.path()).unwrap();
    assert_eq!(store.get_gossip_keyring().unwrap(), Some(ring));
}

/// A database written before the keyring existed (schema 1, no `gossip_keys` tree) opens and
/// reports no keyring, so startup can create one.
#[test]
fn sled_database_without_keyring_tree_opens() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()).unwrap());
    {
        let db = reopen_raw(dir.path());
        assert!(db.drop_tree("gossip_keys").unwrap());
        db.flush().unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    assert_eq!(store.get_gossip_keyring().unwrap(), None);
}

#[test]
fn sled_reports_corrupt_keyring() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()).unwrap());
    {
        let db = reopen_raw(dir.path());
        db.open_tree("gossip_keys")
            .unwrap()
            .insert("keyring", "not json")
            .unwrap();
        db.flush().unwrap();
    }
    let err = reopen(dir.path())
        .unwrap()
        .get_gossip_keyring()
        .unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { tree: "gossip_keys", ref key, .. } if key == "keyring"),
        "{err:?}"
    );
}

const CRASH_REVISIONS: u64 = 10;

/// Child half of [`sled_gossip_keyring_survives_abort`]: puts keyrings, then aborts straight
/// after the last acknowledged put. Does nothing unless the parent set [`CRASH_DIR_ENV`].
#[test]
#[ignore = "run as a child process by sled_gossip_keyring_survives_abort"]
fn sled_gossip_crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let store = SledStore::open(Path::new(&dir)).unwrap();
    for revision in 1..=CRASH_REVISIONS {
        store
            .put_gossip_keyring(&keyring(revision, &[revision as u8]))
            .unwrap();
    }
    eprintln!("crash child: all writes acknowledged, aborting");
    std::process::abort();
}

#[test]
fn sled_gossip_keyring_survives_abort() {
    let dir = tempfile::tempdir().unwrap();
    run_aborting_child(
        concat!(module_path!(), "::sled_gossip_crash_child"),
        dir.path(),
    );
    let store = reopen(dir.path()).unwrap();
    assert_eq!(
        store.get_gossip_keyring().unwrap(),
        Some(keyring(CRASH_REVISIONS, &[CRASH_REVISIONS as u8]))
    );
}
