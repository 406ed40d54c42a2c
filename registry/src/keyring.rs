//! The gossip keyring's rules: the first keyring (made by `init`, or at startup for a data dir
//! from an older registry) and the pure decision of what an install, use or remove does to it.
//! The API applies the decision; the store only keeps the result.

use mesh_api::gossip_key::{self, KeyId, KeyMaterial};

use crate::store::{self, GossipKeyring, Store};

/// Most keys a keyring may hold. Every key is tried when opening a datagram, so the ring stays
/// small; a rotation needs two (old primary and new), and headroom covers an overlapping one.
pub const MAX_GOSSIP_KEYS: usize = 4;
/// Revision of the first keyring.
pub const FIRST_REVISION: u64 = 1;

/// A change an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Add a key that only opens (step 1 of a rotation).
    Install,
    /// Make an installed key the primary, which seals (step 2).
    Use,
    /// Remove a key that is not the primary (step 3).
    Remove,
}

/// Why a change was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The request names no action.
    #[error("action is unspecified or unknown; expected INSTALL, USE or REMOVE")]
    UnknownAction,
    /// INSTALL was given something that is not key material.
    #[error("{0}, or empty to have the registry generate one")]
    BadKey(#[source] gossip_key::Error),
    /// USE or REMOVE was given something that is not a key id.
    #[error("{0}")]
    BadKeyId(#[source] gossip_key::Error),
    /// The key to install is installed already.
    #[error("key {0} is already installed; `use` it to make it the primary")]
    AlreadyInstalled(KeyId),
    /// A different installed key has the same id, so ids could not tell them apart.
    #[error("a different installed key already has id {0}; install another key")]
    IdTaken(KeyId),
    /// The ring is full.
    #[error(
        "the keyring already holds {MAX_GOSSIP_KEYS} keys, the most it may; \
         remove a key that is not the primary first"
    )]
    KeyringFull,
    /// No installed key has that id.
    #[error("no installed key has id {id}; installed keys: {installed}")]
    UnknownKey {
        /// The id asked for.
        id: KeyId,
        /// The installed ids, primary first, comma-separated.
        installed: String,
    },
    /// REMOVE named the primary.
    #[error(
        "key {0} is the primary and seals all gossip; `use` another installed key first, \
         then remove this one"
    )]
    RemovePrimary(KeyId),
    /// A key could not be generated.
    #[error("generating a gossip key failed")]
    Generate(#[source] gossip_key::Error),
    /// The stored keyring is unreadable.
    #[error(transparent)]
    Corrupt(#[from] CorruptKeyring),
}

/// The stored keyring holds something that is not key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stored gossip keyring is corrupt: key {index} is unreadable")]
pub struct CorruptKeyring {
    /// Position of the bad key.
    pub index: usize,
    /// Why it is unreadable.
    #[source]
    pub source: gossip_key::Error,
}

/// What an accepted change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The keyring after the change (the current one when nothing changed).
    pub keyring: GossipKeyring,
    /// Whether the keyring changed (and so has a new revision to store and publish).
    pub changed: bool,
    /// The key the change was about.
    pub key_id: KeyId,
}

/// The keyring [`ensure`] found or created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The stored keyring.
    pub keyring: GossipKeyring,
    /// The id of its primary key.
    pub primary: KeyId,
    /// Whether it was created now (the store had none).
    pub created: bool,
}

/// Why the keyring could not be made sure of at startup or init.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A key could not be generated.
    #[error("generating the first gossip key failed")]
    Generate(#[source] gossip_key::Error),
    /// The stored keyring is unreadable.
    #[error(transparent)]
    Corrupt(#[from] CorruptKeyring),
    /// The stored keyring has no key, which no change can produce.
    #[error("the stored gossip keyring has no keys")]
    Empty,
}

// === impl Action ===

impl Action {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Use => "use",
            Self::Remove => "remove",
        }
    }
}

/// A new keyring holding `key` only, at [`FIRST_REVISION`].
pub fn first(key: &KeyMaterial) -> GossipKeyring {
    GossipKeyring {
        revision: FIRST_REVISION,
        keys: vec![key.to_base64()],
    }
}

/// The stored keyring, checked readable and not empty, or — when the store has none (new, or
/// made by an older registry) — a first one with a fresh key, written durably.
pub fn ensure(store: &dyn Store) -> Result<Ensured, Error> {
    let (keyring, created) = match store.get_gossip_keyring()? {
        Some(existing) => (existing, false),
        None => {
            let keyring = first(&KeyMaterial::generate().map_err(Error::Generate)?);
            store.put_gossip_keyring(&keyring)?;
            (keyring, true)
        }
    };
    let primary = *key_ids(&keyring)?.first().ok_or(Error::Empty)?;
    Ok(Ensured {
        keyring,
        primary,
        created,
    })
}

/// The ids of `keyring`'s keys, primary first.
pub fn key_ids(keyring: &GossipKeyring) -> Result<Vec<KeyId>, CorruptKeyring> {
    Ok(materials(keyring)?.iter().map(KeyMaterial::id).collect())
}

/// Decides what `action` on `key` does to `current`: INSTALL takes key material (base64;
/// empty = a key from `generate`) and appends it; USE and REMOVE take a key id. A real change
/// has the next revision; USE of the current primary changes nothing.
pub fn change(
    current: &GossipKeyring,
    action: Action,
    key: &str,
    generate: impl FnOnce() -> Result<KeyMaterial, gossip_key::Error>,
) -> Result<Outcome, ChangeError> {
    let mut keys = materials(current)?;
    let key_id = match action {
        Action::Install => {
            let material = if key.trim().is_empty() {
                generate().map_err(ChangeError::Generate)?
            } else {
                KeyMaterial::from_base64(key).map_err(ChangeError::BadKey)?
            };
            let id = material.id();
            if let Some(same_id) = keys.iter().find(|k| k.id() == id) {
                return Err(if *same_id == material {
                    ChangeError::AlreadyInstalled(id)
                } else {
                    ChangeError::IdTaken(id)
                });
            }
            if keys.len() >= MAX_GOSSIP_KEYS {
                return Err(ChangeError::KeyringFull);
            }
            keys.push(material);
            id
        }
        Action::Use => {
            let (index, id) = find(&keys, key)?;
            if index == 0 {
                return Ok(Outcome {
                    keyring: current.clone(),
                    changed: false,
                    key_id: id,
                });
            }
            let primary = keys.remove(index);
            keys.insert(0, primary);
            id
        }
        Action::Remove => {
            let (index, id) = find(&keys, key)?;
            if index == 0 {
                return Err(ChangeError::RemovePrimary(id));
            }
            keys.remove(index);
            id
        }
    };
    Ok(Outcome {
        keyring: GossipKeyring {
            revision: current.revision + 1,
            keys: keys.iter().map(KeyMaterial::to_base64).collect(),
        },
        changed: true,
        key_id,
    })
}

/// The stored keys, decoded.
fn materials(keyring: &GossipKeyring) -> Result<Vec<KeyMaterial>, CorruptKeyring> {
    keyring
        .keys
        .iter()
        .enumerate()
        .map(|(index, k)| {
            KeyMaterial::from_base64(k).map_err(|source| CorruptKeyring { index, source })
        })
        .collect()
}

/// The position and id of the installed key named by `id` (8 hex digits).
fn find(keys: &[KeyMaterial], id: &str) -> Result<(usize, KeyId), ChangeError> {
    let id: KeyId = id.parse().map_err(ChangeError::BadKeyId)?;
    let ids: Vec<KeyId> = keys.iter().map(KeyMaterial::id).collect();
    match ids.iter().position(|i| *i == id) {
        Some(index) => Ok((index, id)),
        None => Err(ChangeError::UnknownKey {
            id,
            installed: display_ids(&ids),
        }),
    }
}

/// Ids as operators read them: `ab12cd34 (primary), 0011aabb`.
fn display_ids(ids: &[KeyId]) -> String {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            if i == 0 {
                format!("{id} (primary)")
            } else {
                id.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
