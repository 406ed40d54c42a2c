//! Gossip keys, the keyring, and the per-sender subkeys version 2 seals with.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::Rng as _;
use ring::aead::{CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use ring::{digest, hkdf};

use super::{Error, InstanceId, KEY_ID_LEN, KEY_LEN};

/// HKDF salt of the subkey derivation: names its purpose, so no other use of a gossip key (or a
/// later format) derives the same bytes.
const SUBKEY_LABEL: &[u8] = b"meshd gossip seal v2";

/// The key id: first [`KEY_ID_LEN`] bytes of SHA-256 of the key; printed as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub(super) [u8; KEY_ID_LEN]);

/// A 32-byte gossip key. Printed only on request ([`GossipKey::to_base64`]); `Debug` shows the id.
#[derive(Clone)]
pub struct GossipKey {
    bytes: [u8; KEY_LEN],
    id: KeyId,
    /// All of SHA-256 of the key: tells a cached subkey's parent apart from a different key that
    /// happens to share the 4-byte id.
    fingerprint: [u8; digest::SHA256_OUTPUT_LEN],
    /// Seals and opens version 1 (the key itself, no subkey).
    pub(super) aead: LessSafeKey,
    /// HKDF-Extract of the key, done once: a subkey then costs one HMAC (HKDF-Expand).
    prk: hkdf::Prk,
}

/// The keys a node gossips with: it seals with `primary` and opens with any key.
///
/// Accepting several keys is what makes rotation possible without a moment where two nodes
/// cannot talk. Rotate from key `old` to key `new` in three steps, each applied to every node
/// (in any order, one node at a time) before the next step starts:
///
/// 1. install `new` as a secondary key: `{primary: old, others: [new]}`. Everyone still seals
///    with `old`, and nodes already updated can open `new`;
/// 2. switch the primary: `{primary: new, others: [old]}`. Updated nodes seal with `new`, which
///    every node can open since step 1; nodes not yet updated still seal with `old`, which every
///    node still opens;
/// 3. remove the old key: `{primary: new}`. Nobody seals with `old` any more since step 2.
///
/// Skipping a step splits the cluster: a node at step 3 cannot open what a node at step 1 seals.
#[derive(Clone, Debug)]
pub struct Keyring {
    primary: GossipKey,
    others: Vec<GossipKey>,
}

/// The ChaCha20-Poly1305 key of one sender instance under one keyring key:
/// HKDF-SHA256(salt = [`SUBKEY_LABEL`], key = the gossip key, info = the instance id).
///
/// Kept as bytes: ring's `LessSafeKey` is 544 bytes (it has room for an AES key schedule), and
/// a receiver caches a subkey per instance it hears.
pub(super) struct Subkey {
    parent: [u8; digest::SHA256_OUTPUT_LEN],
    key: [u8; KEY_LEN],
}

// === impl KeyId ===

impl KeyId {
    /// The id as it appears on the wire.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// === impl GossipKey ===

impl GossipKey {
    /// A new random key (from the thread-local CSPRNG, seeded by the OS).
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rng().fill(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        // The id the registry and meshctl use for the same key.
        let id = mesh_api::gossip_key::KeyMaterial::from_bytes(bytes).id().0;
        let mut fingerprint = [0u8; digest::SHA256_OUTPUT_LEN];
        fingerprint.copy_from_slice(digest::digest(&digest::SHA256, &bytes).as_ref());
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .expect("a KEY_LEN-byte key is a valid ChaCha20-Poly1305 key");
        Self {
            bytes,
            id: KeyId(id),
            fingerprint,
            aead: LessSafeKey::new(unbound),
            prk: hkdf::Salt::new(hkdf::HKDF_SHA256, SUBKEY_LABEL).extract(&bytes),
        }
    }

    /// Parses standard padded base64 (surrounding whitespace, such as a key file's final
    /// newline, is ignored).
    pub fn from_base64(text: &str) -> Result<Self, Error> {
        let decoded = BASE64.decode(text.trim()).map_err(Error::KeyNotBase64)?;
        let bytes = <[u8; KEY_LEN]>::try_from(decoded.as_slice())
            .map_err(|_| Error::KeyWrongLength { len: decoded.len() })?;
        Ok(Self::from_bytes(bytes))
    }

    /// The key as standard base64: secret material, for key files only.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.bytes)
    }

    /// The id that names this key on the wire.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The subkey `instance` seals with under this key.
    pub(super) fn subkey(&self, instance: &InstanceId) -> Subkey {
        let info = [instance.as_bytes().as_slice()];
        let mut key = [0u8; KEY_LEN];
        self.prk
            .expand(&info, &CHACHA20_POLY1305)
            .and_then(|okm| okm.fill(&mut key))
            .expect("HKDF-SHA256 expands up to 8160 bytes, a ChaCha20-Poly1305 key is 32");
        Subkey {
            parent: self.fingerprint,
            key,
        }
    }

    /// Same key material (a configuration-time check, so constant time is not needed).
    fn same_material(&self, other: &GossipKey) -> bool {
        self.bytes == other.bytes
    }
}

impl FromStr for GossipKey {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        Self::from_base64(text)
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GossipKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

// === impl Keyring ===

impl Keyring {
    /// A keyring sealing with `primary` and also opening with `others`; no key may appear twice,
    /// and distinct keys must have distinct ids.
    pub fn new(primary: GossipKey, others: Vec<GossipKey>) -> Result<Self, Error> {
        let keyring = Self { primary, others };
        let keys: Vec<&GossipKey> = keyring.keys().collect();
        for (i, key) in keys.iter().enumerate() {
            for earlier in &keys[..i] {
                if key.same_material(earlier) {
                    return Err(Error::DuplicateKey { key_id: key.id });
                }
                if key.id == earlier.id {
                    return Err(Error::KeyIdCollision { key_id: key.id });
                }
            }
        }
        Ok(keyring)
    }

    /// A keyring of one key: the state outside rotations.
    pub fn single(primary: GossipKey) -> Self {
        Self {
            primary,
            others: Vec::new(),
        }
    }

    /// The key that seals.
    pub fn primary(&self) -> &GossipKey {
        &self.primary
    }

    /// The keys that only open.
    pub fn others(&self) -> &[GossipKey] {
        &self.others
    }

    /// The key named `id`, if held.
    pub fn key(&self, id: KeyId) -> Option<&GossipKey> {
        self.keys().find(|key| key.id == id)
    }

    fn keys(&self) -> impl Iterator<Item = &GossipKey> {
        std::iter::once(&self.primary).chain(&self.others)
    }
}

// === impl Subkey ===

impl Subkey {
    /// Derived from `key` (not merely from a key with the same id).
    pub(super) fn is_of(&self, key: &GossipKey) -> bool {
        self.parent == key.fingerprint
    }

    /// The AEAD key (setting up a ChaCha20 key copies its 32 bytes).
    pub(super) fn aead(&self) -> LessSafeKey {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &self.key)
            .expect("a KEY_LEN-byte key is a valid ChaCha20-Poly1305 key");
        LessSafeKey::new(unbound)
    }
}

impl fmt::Debug for Subkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subkey").finish_non_exhaustive()
    }
}
