//! Table tests of the keyring rules: what install, use and remove do to a keyring and what
//! they refuse, plus creating the first keyring in a store.

use super::*;
use crate::store::MemoryStore;

const REVISION: u64 = 7;
/// Two different keys whose SHA-256 both start `12bf2ed8` (found by a birthday search over
/// little-endian counters), so their ids collide.
const SAME_ID: (u64, u64) = (5264, 57654);

/// Key material made of `n` as little-endian bytes, zero-padded.
fn material(n: u64) -> KeyMaterial {
    let mut bytes = [0u8; gossip_key::KEY_LEN];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    KeyMaterial::from_bytes(bytes)
}

fn b64(n: u64) -> String {
    material(n).to_base64()
}

fn id(n: u64) -> String {
    material(n).id().to_string()
}

fn ring(keys: &[u64]) -> GossipKeyring {
    GossipKeyring {
        revision: REVISION,
        keys: keys.iter().copied().map(b64).collect(),
    }
}

/// The key a request with an empty INSTALL key gets.
const GENERATED: u64 = 99;

fn generated() -> Result<KeyMaterial, gossip_key::Error> {
    Ok(material(GENERATED))
}

/// What a case expects: the keys after (and whether that is a change), or the error's variant
/// and a piece of its message.
enum Want {
    Changed(&'static [u64]),
    Unchanged,
    Refused(fn(&ChangeError) -> bool, &'static str),
}

#[test]
fn change_cases() {
    use Action::{Install, Remove, Use};
    use Want::{Changed, Refused, Unchanged};
    let cases: Vec<(&str, &[u64], Action, String, Want)> = vec![
        // INSTALL
        ("install appends", &[1], Install, b64(2), Changed(&[1, 2])),
        (
            "install keeps the primary first",
            &[1, 2],
            Install,
            b64(3),
            Changed(&[1, 2, 3]),
        ),
        (
            "install with no key generates one",
            &[1],
            Install,
            String::new(),
            Changed(&[1, GENERATED]),
        ),
        (
            "install with a blank key generates one",
            &[1],
            Install,
            " \n".to_owned(),
            Changed(&[1, GENERATED]),
        ),
        (
            "install ignores a key file's newline",
            &[1],
            Install,
            format!("{}\n", b64(2)),
            Changed(&[1, 2]),
        ),
        (
            "install into a full ring",
            &[1, 2, 3, 4],
            Install,
            b64(5),
            Refused(
                |e| matches!(e, ChangeError::KeyringFull),
                "already holds 4 keys",
            ),
        ),
        (
            "install a key that is not base64",
            &[1],
            Install,
            "not base64!".to_owned(),
            Refused(
                |e| matches!(e, ChangeError::BadKey(_)),
                "expected 32 bytes, base64, or empty",
            ),
        ),
        (
            "install a key of the wrong length",
            &[1],
            Install,
            "AAAA".to_owned(),
            Refused(
                |e| matches!(e, ChangeError::BadKey(_)),
                "3 bytes; expected 32 bytes",
            ),
        ),
        (
            "install a key that is installed",
            &[1, 2],
            Install,
            b64(2),
            Refused(
                |e| matches!(e, ChangeError::AlreadyInstalled(_)),
                "already installed; `use` it",
            ),
        ),
        (
            "install the primary again",
            &[1],
            Install,
            b64(1),
            Refused(
                |e| matches!(e, ChangeError::AlreadyInstalled(_)),
                "already installed",
            ),
        ),
        (
            "install a different key with an installed key's id",
            &[1, SAME_ID.0],
            Install,
            b64(SAME_ID.1),
            Refused(
                |e| matches!(e, ChangeError::IdTaken(_)),
                "already has id 12bf2ed8; install another key",
            ),
        ),
        // USE
        (
            "use moves a key to the front",
            &[1, 2, 3],
            Use,
            id(3),
            Changed(&[3, 1, 2]),
        ),
        ("use the second key", &[1, 2], Use, id(2), Changed(&[2, 1])),
        ("use the primary", &[1, 2], Use, id(1), Unchanged),
        (
            "use an id in capitals",
            &[1, 2],
            Use,
            id(2).to_uppercase(),
            Changed(&[2, 1]),
        ),
        (
            "use an unknown id",
            &[1, 2],
            Use,
            id(3),
            Refused(
                |e| matches!(e, ChangeError::UnknownKey { .. }),
                "installed keys: ",
            ),
        ),
        (
            "use a key instead of its id",
            &[1, 2],
            Use,
            b64(2),
            Refused(
                |e| matches!(e, ChangeError::BadKeyId(_)),
                "expected 8 hex digits",
            ),
        ),
        (
            "use nothing",
            &[1],
            Use,
            String::new(),
            Refused(
                |e| matches!(e, ChangeError::BadKeyId(_)),
                "expected 8 hex digits",
            ),
        ),
        // REMOVE
        (
            "remove the last key",
            &[1, 2, 3],
            Remove,
            id(3),
            Changed(&[1, 2]),
        ),
        (
            "remove a middle key",
            &[1, 2, 3],
            Remove,
            id(2),
            Changed(&[1, 3]),
        ),
        (
            "remove the primary",
            &[1, 2],
            Remove,
            id(1),
            Refused(
                |e| matches!(e, ChangeError::RemovePrimary(_)),
                "`use` another installed key first",
            ),
        ),
        (
            "remove an unknown id",
            &[1, 2],
            Remove,
            id(3),
            Refused(
                |e| matches!(e, ChangeError::UnknownKey { .. }),
                "no installed key has id",
            ),
        ),
        (
            "remove with a bad id",
            &[1, 2],
            Remove,
            "12345".to_owned(),
            Refused(|e| matches!(e, ChangeError::BadKeyId(_)), "8 hex digits"),
        ),
    ];
    for (what, keys, action, key, want) in cases {
        let current = ring(keys);
        let got = change(&current, action, &key, generated);
        match (got, want) {
            (Ok(outcome), Changed(after)) => {
                assert!(outcome.changed, "{what}");
                assert_eq!(outcome.keyring, ring_at(REVISION + 1, after), "{what}");
            }
            (Ok(outcome), Unchanged) => {
                assert!(!outcome.changed, "{what}");
                assert_eq!(outcome.keyring, current, "{what}");
            }
            (Err(e), Refused(is, message)) => {
                assert!(is(&e), "{what}: {e:?}");
                assert!(e.to_string().contains(message), "{what}: {e}");
            }
            (Ok(outcome), Refused(..)) => panic!("{what}: accepted: {outcome:?}"),
            (Err(e), _) => panic!("{what}: refused: {e}"),
        }
    }
}

fn ring_at(revision: u64, keys: &[u64]) -> GossipKeyring {
    GossipKeyring {
        revision,
        ..ring(keys)
    }
}

#[test]
fn the_collision_pair_shares_an_id() {
    assert_ne!(material(SAME_ID.0), material(SAME_ID.1));
    assert_eq!(id(SAME_ID.0), "12bf2ed8");
    assert_eq!(id(SAME_ID.1), "12bf2ed8");
}

#[test]
fn outcome_names_the_key_acted_on() {
    let current = ring(&[1, 2]);
    let cases = [
        (Action::Install, String::new(), id(GENERATED)),
        (Action::Install, b64(3), id(3)),
        (Action::Use, id(2), id(2)),
        (Action::Use, id(1), id(1)),
        (Action::Remove, id(2), id(2)),
    ];
    for (action, key, want) in cases {
        let outcome = change(&current, action, &key, generated).unwrap();
        assert_eq!(outcome.key_id.to_string(), want, "{action:?} {key}");
    }
}

#[test]
fn unknown_key_lists_the_installed_ids() {
    let e = change(&ring(&[1, 2]), Action::Use, &id(3), generated).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "no installed key has id {}; installed keys: {} (primary), {}",
            id(3),
            id(1),
            id(2)
        )
    );
}

#[test]
fn a_failing_random_source_is_reported() {
    let e = change(&ring(&[1]), Action::Install, "", || {
        Err(gossip_key::Error::Random)
    })
    .unwrap_err();
    assert!(matches!(e, ChangeError::Generate(_)), "{e:?}");
}

#[test]
fn a_corrupt_stored_ring_is_refused() {
    let mut current = ring(&[1, 2]);
    current.keys[1] = "garbage".to_owned();
    for (action, key) in [(Action::Install, b64(3)), (Action::Use, id(1))] {
        let e = change(&current, action, &key, generated).unwrap_err();
        assert!(
            matches!(e, ChangeError::Corrupt(CorruptKeyring { index: 1, .. })),
            "{e:?}"
        );
    }
}

#[test]
fn a_rotation_takes_three_revisions() {
    let mut current = first(&material(1));
    assert_eq!(current.revision, FIRST_REVISION);
    for (action, key) in [
        (Action::Install, b64(2)),
        (Action::Use, id(2)),
        (Action::Remove, id(1)),
    ] {
        current = change(&current, action, &key, generated).unwrap().keyring;
    }
    assert_eq!(current, ring_at(FIRST_REVISION + 3, &[2]));
}

#[test]
fn ensure_creates_once_then_reads() {
    let store = MemoryStore::new();
    let created = ensure(&store).unwrap();
    assert!(created.created);
    assert_eq!(created.keyring.revision, FIRST_REVISION);
    assert_eq!(created.keyring.keys.len(), 1);
    assert_eq!(key_ids(&created.keyring).unwrap(), [created.primary]);
    assert_eq!(
        store.get_gossip_keyring().unwrap().as_ref(),
        Some(&created.keyring)
    );

    let again = ensure(&store).unwrap();
    assert!(!again.created);
    assert_eq!(again.keyring, created.keyring);
    assert_eq!(again.primary, created.primary);
}

#[test]
fn ensure_refuses_an_unusable_stored_ring() {
    let store = MemoryStore::new();
    store.put_gossip_keyring(&ring(&[])).unwrap();
    assert!(matches!(ensure(&store), Err(Error::Empty)));
    let mut corrupt = ring(&[1]);
    corrupt.keys[0] = "garbage".to_owned();
    store.put_gossip_keyring(&corrupt).unwrap();
    assert!(matches!(ensure(&store), Err(Error::Corrupt(_))));
}

#[test]
fn debug_shows_key_ids_not_keys() {
    let keyring = ring(&[1, 2]);
    let shown = format!("{keyring:?}");
    assert!(shown.contains(&id(1)) && shown.contains(&id(2)), "{shown}");
    for key in &keyring.keys {
        assert!(!shown.contains(key.as_str()), "{shown}");
    }
}
