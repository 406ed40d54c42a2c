//! Policy cases of the [`Store`] contract (both stores), plus sled-only reopen, corrupt-record
//! and hard-kill cases for policy applies.

use std::path::Path;
use std::sync::Barrier;

use super::{CRASH_DIR_ENV, kv_store, reopen, reopen_raw, run_aborting_child};
use crate::store::{
    ChangeAction, Error, MemoryStore, PolicyChange, PolicyRecord, SledStore, Store,
};

contract_suite!(
    policy_empty_store_is_revision_zero,
    policy_apply_bumps_revision_once,
    policy_unchanged_is_detected_and_not_written,
    policy_delete_and_not_found,
    policy_history_oldest_first_with_deletions,
    policy_changes_since_returns_latest_versions,
    policy_dry_run_writes_nothing,
    policy_apply_is_all_or_nothing,
    policy_list_sorted_by_kind_namespace_name,
    policy_concurrent_applies_get_distinct_revisions,
);

const NOW: i64 = 1_700_000_000;
const AUTHOR: &str = "spiffe://mesh.test/admin/operator";

fn put(kind: &str, name: &str, spec: &str) -> PolicyChange {
    PolicyChange {
        kind: kind.to_owned(),
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        spec_json: Some(spec.to_owned()),
    }
}

fn del(kind: &str, name: &str) -> PolicyChange {
    PolicyChange {
        spec_json: None,
        ..put(kind, name, "")
    }
}

fn apply(store: &dyn Store, changes: &[PolicyChange]) -> (u64, Vec<ChangeAction>) {
    let (revision, outcomes) = store.apply_policies(changes, AUTHOR, NOW, false).unwrap();
    (revision, outcomes.into_iter().map(|(a, _)| a).collect())
}

fn record(kind: &str, name: &str, spec: &str, revision: u64) -> PolicyRecord {
    PolicyRecord {
        kind: kind.to_owned(),
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        spec_json: spec.to_owned(),
        revision,
        author: AUTHOR.to_owned(),
        updated_unix: NOW,
        deleted: false,
    }
}

fn tombstone(kind: &str, name: &str, revision: u64) -> PolicyRecord {
    PolicyRecord {
        deleted: true,
        ..record(kind, name, "", revision)
    }
}

/// `(name, revision, deleted)` of each record, for compact assertions.
fn summary(records: &[PolicyRecord]) -> Vec<(&str, u64, bool)> {
    records
        .iter()
        .map(|r| (r.name.as_str(), r.revision, r.deleted))
        .collect()
}

fn assert_empty(store: &dyn Store) {
    assert_eq!(store.policy_revision().unwrap(), 0);
    assert_eq!(store.list_policies().unwrap(), (0, vec![]));
    assert_eq!(store.policy_changes_since(0).unwrap(), (0, vec![]));
}

// === contract cases ===

fn policy_empty_store_is_revision_zero(store: &dyn Store) {
    assert_empty(store);
    assert!(
        store
            .policy_history("Route", "shop", "web")
            .unwrap()
            .is_empty()
    );
}

fn policy_apply_bumps_revision_once(store: &dyn Store) {
    let changes = [
        put("Route", "web", "{\"a\":1}"),
        put("Route", "api", "{\"a\":2}"),
        put("Authz", "web", "{}"),
    ];
    let (revision, outcomes) = store.apply_policies(&changes, AUTHOR, NOW, false).unwrap();
    assert_eq!(revision, 1);
    assert_eq!(outcomes, vec![(ChangeAction::Created, None); 3]);
    assert_eq!(store.policy_revision().unwrap(), 1);
    let (at, records) = store.list_policies().unwrap();
    assert_eq!(at, 1);
    assert_eq!(
        records,
        vec![
            record("Authz", "web", "{}", 1),
            record("Route", "api", "{\"a\":2}", 1),
            record("Route", "web", "{\"a\":1}", 1),
        ]
    );
    assert_eq!(
        apply(store, &[put("Route", "new", "{}")]),
        (2, vec![ChangeAction::Created])
    );
}

fn policy_unchanged_is_detected_and_not_written(store: &dyn Store) {
    apply(
        store,
        &[put("Route", "web", "v1"), put("Route", "api", "v1")],
    );
    let (revision, outcomes) = store
        .apply_policies(&[put("Route", "web", "v1")], AUTHOR, NOW + 5, false)
        .unwrap();
    assert_eq!(revision, 1, "nothing changed, so no new revision");
    assert_eq!(
        outcomes,
        vec![(ChangeAction::Unchanged, Some("v1".to_owned()))]
    );

    let (revision, outcomes) = store
        .apply_policies(
            &[put("Route", "web", "v1"), put("Route", "api", "v2")],
            AUTHOR,
            NOW,
            false,
        )
        .unwrap();
    assert_eq!(revision, 2);
    assert_eq!(
        outcomes,
        vec![
            (ChangeAction::Unchanged, Some("v1".to_owned())),
            (ChangeAction::Updated, Some("v1".to_owned())),
        ]
    );
    let (_, records) = store.list_policies().unwrap();
    assert_eq!(summary(&records), [("api", 2, false), ("web", 1, false)]);
    assert_eq!(
        store.policy_history("Route", "shop", "web").unwrap().len(),
        1
    );
}

fn policy_delete_and_not_found(store: &dyn Store) {
    apply(
        store,
        &[put("Route", "web", "v1"), put("Route", "api", "v1")],
    );
    let (revision, outcomes) = store
        .apply_policies(&[del("Route", "web")], AUTHOR, NOW, false)
        .unwrap();
    assert_eq!(
        (revision, outcomes),
        (2, vec![(ChangeAction::Deleted, Some("v1".to_owned()))])
    );
    assert_eq!(
        summary(&store.list_policies().unwrap().1),
        [("api", 1, false)]
    );

    // Deleting again, or something that never existed, changes nothing.
    let (revision, outcomes) = apply(store, &[del("Route", "web"), del("Route", "ghost")]);
    assert_eq!(revision, 2);
    assert_eq!(outcomes, [ChangeAction::NotFound, ChangeAction::NotFound]);

    // A deleted resource comes back as created, with no previous spec.
    let (revision, outcomes) = store
        .apply_policies(&[put("Route", "web", "v2")], AUTHOR, NOW, false)
        .unwrap();
    assert_eq!(
        (revision, outcomes),
        (3, vec![(ChangeAction::Created, None)])
    );
}

fn policy_history_oldest_first_with_deletions(store: &dyn Store) {
    apply(store, &[put("Route", "web", "v1")]);
    apply(
        store,
        &[put("Route", "web", "v2"), put("Route", "api", "v1")],
    );
    apply(store, &[del("Route", "web")]);
    apply(store, &[put("Route", "api", "v2")]);
    apply(store, &[put("Route", "web", "v3")]);
    assert_eq!(
        store.policy_history("Route", "shop", "web").unwrap(),
        vec![
            record("Route", "web", "v1", 1),
            record("Route", "web", "v2", 2),
            tombstone("Route", "web", 3),
            record("Route", "web", "v3", 5),
        ]
    );
    assert_eq!(
        summary(&store.policy_history("Route", "shop", "api").unwrap()),
        [("api", 2, false), ("api", 4, false)]
    );
    // Other kinds, namespaces and name prefixes are not mixed in.
    assert!(
        store
            .policy_history("Authz", "shop", "web")
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .policy_history("Route", "other", "web")
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .policy_history("Route", "shop", "we")
            .unwrap()
            .is_empty()
    );
}

fn policy_changes_since_returns_latest_versions(store: &dyn Store) {
    apply(
        store,
        &[
            put("Route", "a", "v1"),
            put("Route", "b", "v1"),
            put("Route", "c", "v1"),
        ],
    );
    apply(store, &[put("Route", "a", "v2")]);
    apply(store, &[del("Route", "b"), put("Route", "a", "v3")]);

    let (current, all) = store.policy_changes_since(0).unwrap();
    assert_eq!(current, 3);
    assert_eq!(
        summary(&all),
        [("a", 3, false), ("b", 3, true), ("c", 1, false)]
    );
    assert_eq!(all[0].spec_json, "v3");
    let (_, since_1) = store.policy_changes_since(1).unwrap();
    assert_eq!(summary(&since_1), [("a", 3, false), ("b", 3, true)]);
    assert_eq!(store.policy_changes_since(3).unwrap(), (3, vec![]));
    assert_eq!(store.policy_changes_since(99).unwrap(), (3, vec![]));
}

fn policy_dry_run_writes_nothing(store: &dyn Store) {
    let (revision, outcomes) = store
        .apply_policies(&[put("Route", "web", "v1")], AUTHOR, NOW, true)
        .unwrap();
    assert_eq!(
        (revision, outcomes),
        (0, vec![(ChangeAction::Created, None)])
    );
    assert_empty(store);
    assert!(
        store
            .policy_history("Route", "shop", "web")
            .unwrap()
            .is_empty()
    );

    apply(store, &[put("Route", "web", "v1")]);
    let (revision, outcomes) = store
        .apply_policies(
            &[put("Route", "web", "v2"), del("Route", "web2")],
            AUTHOR,
            NOW,
            true,
        )
        .unwrap();
    assert_eq!(revision, 1, "a dry run reports the current revision");
    assert_eq!(
        outcomes,
        vec![
            (ChangeAction::Updated, Some("v1".to_owned())),
            (ChangeAction::NotFound, None)
        ]
    );
    let (_, outcomes) = store
        .apply_policies(&[del("Route", "web")], AUTHOR, NOW, true)
        .unwrap();
    assert_eq!(
        outcomes,
        vec![(ChangeAction::Deleted, Some("v1".to_owned()))]
    );
    assert_eq!(
        store.list_policies().unwrap(),
        (1, vec![record("Route", "web", "v1", 1)])
    );
    assert_eq!(
        store.policy_history("Route", "shop", "web").unwrap().len(),
        1
    );
}

fn policy_apply_is_all_or_nothing(store: &dyn Store) {
    apply(store, &[put("Route", "kept", "v1")]);
    let before = store.list_policies().unwrap();
    let err = store
        .apply_policies(
            &[
                put("Route", "a", "v1"),
                del("Route", "kept"),
                put("Route", "a", "v2"),
            ],
            AUTHOR,
            NOW,
            false,
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicatePolicyChange { kind, name, .. } if kind == "Route" && name == "a"),
        "{err:?}"
    );
    assert_eq!(store.list_policies().unwrap(), before);
    assert_eq!(store.policy_changes_since(1).unwrap(), (1, vec![]));
    assert!(
        store
            .policy_history("Route", "shop", "a")
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.policy_history("Route", "shop", "kept").unwrap().len(),
        1
    );
}

fn policy_list_sorted_by_kind_namespace_name(store: &dyn Store) {
    let mut changes = vec![];
    for (kind, ns, name) in [
        ("b", "x", "a"),
        ("a", "y", "a"),
        ("a", "x", "b"),
        ("a", "x", "a"),
    ] {
        changes.push(PolicyChange {
            kind: kind.to_owned(),
            namespace: ns.to_owned(),
            name: name.to_owned(),
            spec_json: Some("{}".to_owned()),
        });
    }
    apply(store, &changes);
    let keys: Vec<_> = store
        .list_policies()
        .unwrap()
        .1
        .into_iter()
        .map(|r| format!("{}/{}/{}", r.kind, r.namespace, r.name))
        .collect();
    assert_eq!(keys, ["a/x/a", "a/x/b", "a/y/a", "b/x/a"]);
}

fn policy_concurrent_applies_get_distinct_revisions(store: &dyn Store) {
    const THREADS: usize = 8;
    let start = Barrier::new(THREADS);
    let mut revisions: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    apply(store, &[put("Route", &format!("r{i}"), "{}")]).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    revisions.sort_unstable();
    assert_eq!(revisions, (1..=THREADS as u64).collect::<Vec<_>>());
    let (revision, records) = store.list_policies().unwrap();
    assert_eq!((revision, records.len()), (THREADS as u64, THREADS));
}

// === sled only ===

#[test]
fn sled_policy_reopen_keeps_revision_and_history() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = reopen(dir.path()).unwrap();
        apply(
            &store,
            &[put("Route", "web", "v1"), put("Route", "api", "v1")],
        );
        apply(&store, &[del("Route", "api")]);
    }
    let store = reopen(dir.path()).unwrap();
    assert_eq!(
        store.list_policies().unwrap(),
        (2, vec![record("Route", "web", "v1", 1)])
    );
    assert_eq!(
        summary(&store.policy_history("Route", "shop", "api").unwrap()),
        [("api", 1, false), ("api", 2, true)]
    );
    assert_eq!(apply(&store, &[put("Route", "api", "v2")]).0, 3);
}

/// A failure in the middle of an apply (here: the third resource's stored record is corrupt)
/// leaves the first two unwritten and the revision where it was.
#[test]
fn sled_policy_corrupt_record_aborts_whole_apply() {
    let dir = tempfile::tempdir().unwrap();
    drop(reopen(dir.path()).unwrap());
    {
        let db = reopen_raw(dir.path());
        db.open_tree("policies")
            .unwrap()
            .insert(b"Route\0shop\0c", b"not json".as_slice())
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    let err = store
        .apply_policies(
            &[
                put("Route", "a", "v1"),
                put("Route", "b", "v1"),
                put("Route", "c", "v1"),
            ],
            AUTHOR,
            NOW,
            false,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                tree: "policies",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.policy_revision().unwrap(), 0);
    assert!(
        store
            .policy_history("Route", "shop", "a")
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .policy_history("Route", "shop", "b")
            .unwrap()
            .is_empty()
    );
}

const CRASH_APPLIES: u64 = 10;

/// Child half of [`sled_policy_applies_survive_abort`]: applies, then aborts straight after
/// the last acknowledged apply. Does nothing unless the parent set [`CRASH_DIR_ENV`].
#[test]
#[ignore = "run as a child process by sled_policy_applies_survive_abort"]
fn sled_policy_crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let store = SledStore::open(Path::new(&dir)).unwrap();
    for i in 1..=CRASH_APPLIES {
        let spec = format!("v{i}");
        apply(
            &store,
            &[
                put("Route", "web", &spec),
                put("Route", &format!("r{i}"), &spec),
            ],
        );
    }
    apply(&store, &[del("Route", "r1")]);
    eprintln!("crash child: all writes acknowledged, aborting");
    std::process::abort();
}

#[test]
fn sled_policy_applies_survive_abort() {
    let dir = tempfile::tempdir().unwrap();
    run_aborting_child(
        concat!(module_path!(), "::sled_policy_crash_child"),
        dir.path(),
    );

    let store = reopen(dir.path()).unwrap();
    let (revision, records) = store.list_policies().unwrap();
    assert_eq!(revision, CRASH_APPLIES + 1);
    // r2..r10 plus web; r1 was deleted by the last apply.
    assert_eq!(records.len(), CRASH_APPLIES as usize);
    assert!(records.iter().all(|r| r.name != "r1"));
    let web = store.policy_history("Route", "shop", "web").unwrap();
    assert_eq!(web.len(), CRASH_APPLIES as usize);
    assert_eq!(web.last().unwrap().spec_json, format!("v{CRASH_APPLIES}"));
    assert_eq!(
        summary(&store.policy_changes_since(CRASH_APPLIES).unwrap().1),
        [("r1", CRASH_APPLIES + 1, true)]
    );
}
