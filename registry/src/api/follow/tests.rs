//! Following the primary: parts joined into events, events into the primary's set (a revision
//! with an unreadable resource refused whole), and the set into this store's changes.

use super::*;

fn res(kind: &str, name: &str, spec: &str, deleted: bool) -> pb::Resource {
    pb::Resource {
        kind: kind.to_owned(),
        namespace: "default".to_owned(),
        name: name.to_owned(),
        spec_json: spec.to_owned(),
        deleted,
        ..Default::default()
    }
}

const EXPORT: &str = r#"{"services":["users"]}"#;
const EXPORT_ALL: &str = r#"{"services":["*"]}"#;
const DENY: &str = r#"{"action":"DENY","rules":[{"from":[{"principals":["spiffe://mesh.test/ns/default/svc/web"]}]}],"selector":{"service":"users"}}"#;

fn part(revision: u64, full: bool, resources: Vec<pb::Resource>, more: bool) -> pb::PolicyEvent {
    pb::PolicyEvent {
        revision,
        full_snapshot: full,
        resources,
        more,
    }
}

#[test]
fn parts_make_one_event() {
    let mut pending = None;
    let a = res("ServiceExport", "a", EXPORT, false);
    let b = res("ServiceExport", "b", EXPORT, false);
    assert_eq!(
        assemble(&mut pending, part(3, true, vec![a.clone()], true)),
        None
    );
    let e = assemble(&mut pending, part(3, true, vec![b.clone()], false)).unwrap();
    assert_eq!((e.revision, e.full, e.resources.len()), (3, true, 2));
    assert!(pending.is_none());
    // A part of another revision starts over: the unfinished one is dropped, never applied.
    assert_eq!(assemble(&mut pending, part(4, false, vec![a], true)), None);
    let e = assemble(&mut pending, part(5, false, vec![b], false)).unwrap();
    assert_eq!((e.revision, e.resources.len()), (5, 1));
}

fn event(revision: u64, full: bool, resources: Vec<pb::Resource>) -> Event {
    Event {
        revision,
        full,
        resources,
    }
}

fn key(kind: &str, name: &str) -> Key {
    (kind.to_owned(), "default".to_owned(), name.to_owned())
}

#[test]
fn the_mirror_follows_snapshots_and_changes() {
    let m = Mirror::default();
    let full = event(
        7,
        true,
        vec![
            res("ServiceExport", "out", EXPORT, false),
            res("AuthorizationPolicy", "no-web", DENY, false),
            // The primary's own deny-list and roots are not this site's.
            res("Revocation", "revoked", "{}", false),
        ],
    );
    let m = m.apply(&full).unwrap();
    assert_eq!(m.revision, 7);
    assert_eq!(
        m.resources.keys().cloned().collect::<Vec<_>>(),
        [
            key("AuthorizationPolicy", "no-web"),
            key("ServiceExport", "out")
        ]
    );
    let change = event(
        8,
        false,
        vec![
            res("ServiceExport", "out", EXPORT_ALL, false),
            res("AuthorizationPolicy", "no-web", "", true),
        ],
    );
    let m2 = m.apply(&change).unwrap();
    assert_eq!(m2.revision, 8);
    assert_eq!(m2.resources.len(), 1);
    assert_eq!(m2.resources[&key("ServiceExport", "out")], EXPORT_ALL);
    // A full snapshot replaces everything.
    let m3 = m2.apply(&event(9, true, vec![])).unwrap();
    assert!(m3.resources.is_empty());
    // A revision with a resource this registry cannot read is refused whole.
    let bad = event(
        10,
        false,
        vec![
            res("ServiceExport", "x", EXPORT, false),
            res("ServiceExport", "y", r#"{"services":[]}"#, false),
        ],
    );
    let e = m2.apply(&bad).unwrap_err();
    assert!(
        e.contains("primary revision 10: ServiceExport/default/y")
            && e.contains("keeping revision 8"),
        "{e}"
    );
}

fn record(kind: &str, name: &str, spec: &str) -> PolicyRecord {
    PolicyRecord {
        kind: kind.to_owned(),
        namespace: "default".to_owned(),
        name: name.to_owned(),
        spec_json: spec.to_owned(),
        revision: 1,
        author: "x".to_owned(),
        updated_unix: 0,
        deleted: false,
    }
}

#[test]
fn plan_makes_this_store_the_primarys() {
    let local = [
        record("ServiceExport", "out", EXPORT),
        record("ServiceExport", "stale", EXPORT),
        record("Revocation", "revoked", "{}"),
        PolicyRecord {
            deleted: true,
            ..record("Route", "gone", "")
        },
    ];
    let mirror: BTreeMap<Key, String> = [
        (key("ServiceExport", "out"), EXPORT_ALL.to_owned()),
        (key("AuthorizationPolicy", "no-web"), DENY.to_owned()),
    ]
    .into();
    let changes = plan(&local, &mirror);
    let got: Vec<(String, bool)> = changes
        .iter()
        .map(|c| (format!("{}/{}", c.kind, c.name), c.spec_json.is_some()))
        .collect();
    assert_eq!(
        got,
        [
            ("AuthorizationPolicy/no-web".to_owned(), true),
            ("ServiceExport/out".to_owned(), true),
            ("ServiceExport/stale".to_owned(), false),
        ],
        "the site's own Revocation is left alone"
    );
    // Once taken, nothing is left to do.
    let taken: Vec<PolicyRecord> = mirror
        .iter()
        .map(|((k, _, n), s)| record(k, n, s))
        .chain([record("Revocation", "revoked", "{}")])
        .collect();
    assert!(plan(&taken, &mirror).is_empty());
}

#[test]
fn a_peers_own_revocation_from_its_events() {
    let own = |spec: &str, deleted: bool| pb::Resource {
        kind: "Revocation".to_owned(),
        namespace: "mesh-system".to_owned(),
        name: "revocations".to_owned(),
        spec_json: spec.to_owned(),
        deleted,
        ..Default::default()
    };
    // Another site's import at the peer is not the peer's own.
    let imported = pb::Resource {
        name: "site-c".to_owned(),
        ..own(
            r#"{"certificates":[],"nodes":[{"name":"x","removed_unix":1}]}"#,
            false,
        )
    };
    let spec = r#"{"certificates":[],"nodes":[{"name":"web-a","removed_unix":5}]}"#;
    let full = event(
        3,
        true,
        vec![
            res("ServiceExport", "out", EXPORT, false),
            own(spec, false),
            imported.clone(),
        ],
    );
    assert_eq!(peer_revocation(None, &full).as_deref(), Some(spec));
    // A change without it keeps what was imported; a full snapshot without it empties it.
    let other = event(
        4,
        false,
        vec![res("ServiceExport", "out", EXPORT_ALL, false), imported],
    );
    assert_eq!(peer_revocation(Some(spec), &other).as_deref(), Some(spec));
    assert_eq!(peer_revocation(None, &other), None);
    let empty = event(5, true, vec![]);
    assert_eq!(
        peer_revocation(Some(spec), &empty).as_deref(),
        Some(EMPTY_REVOCATION)
    );
    let deleted = event(6, false, vec![own("", true)]);
    assert_eq!(
        peer_revocation(Some(spec), &deleted).as_deref(),
        Some(EMPTY_REVOCATION)
    );
    // What is imported is a valid Revocation under its site name.
    for s in [spec, EMPTY_REVOCATION] {
        assert!(
            Resource::from_json("Revocation", "mesh-system", "site-b", s).is_ok(),
            "{s}"
        );
    }
}
