//! Gossip key material as the registry stores and hands it out and meshd seals with it: 32
//! random bytes, written as standard base64, named on the wire and in tools by a 4-byte id (the
//! first bytes of their SHA-256), so nobody has to show a key to say which one they mean.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::digest;
use ring::rand::{SecureRandom as _, SystemRandom};

/// Key length: a ChaCha20-Poly1305 key.
pub const KEY_LEN: usize = 32;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 4;

/// Why key material or an id could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not base64.
    #[error("gossip key is not valid base64 ({0}); expected 32 bytes, base64")]
    NotBase64(String),
    /// Wrong length.
    #[error("gossip key is {len} bytes; expected 32 bytes, base64")]
    WrongLength {
        /// Decoded length.
        len: usize,
    },
    /// Not an id.
    #[error(
        "{0:?} is not a gossip key id; expected 8 hex digits, as `meshctl gossip-key list` shows"
    )]
    BadId(String),
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
}

/// Raw key bytes. `Debug` shows only the id.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial([u8; KEY_LEN]);

/// The short public name of a key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyMaterial {
    /// New random key material from the operating system's random source.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Random)?;
        Ok(Self(bytes))
    }

    /// From raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses standard padded base64; surrounding whitespace (a file's newline) is ignored.
    pub fn from_base64(text: &str) -> Result<Self, Error> {
        let decoded = BASE64
            .decode(text.trim())
            .map_err(|e| Error::NotBase64(e.to_string()))?;
        let bytes = <[u8; KEY_LEN]>::try_from(decoded.as_slice())
            .map_err(|_| Error::WrongLength { len: decoded.len() })?;
        Ok(Self(bytes))
    }

    /// Standard base64: secret, for key files and the registry's push to nodes only.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key's id: the first [`KEY_ID_LEN`] bytes of its SHA-256.
    pub fn id(&self) -> KeyId {
        let d = digest::digest(&digest::SHA256, &self.0);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&d.as_ref()[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for KeyId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadId(s.to_owned());
        let s = s.trim();
        if s.len() != KEY_ID_LEN * 2 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut id = [0u8; KEY_ID_LEN];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(KeyId(id))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn material_round_trips_and_ids_parse() {
        let k = KeyMaterial::generate().unwrap();
        let back = KeyMaterial::from_base64(&format!("{}\n", k.to_base64())).unwrap();
        assert_eq!(back, k);
        assert_eq!(k.id().to_string().parse::<KeyId>().unwrap(), k.id());
        assert!(!format!("{k:?}").contains(&k.to_base64()));
        // SHA-256 of 32 zero bytes starts 66687aad.
        assert_eq!(
            KeyMaterial::from_bytes([0; 32]).id().to_string(),
            "66687aad"
        );
    }

    #[test]
    fn bad_input_says_what_is_valid() {
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            ("not base64!", "expected 32 bytes, base64"),
            ("AAAA", "3 bytes; expected 32 bytes, base64"),
        ];
        for (text, want) in cases {
            let e = KeyMaterial::from_base64(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        for id in ["", "1234567", "123456789", "zzzzzzzz"] {
            let e = id.parse::<KeyId>().unwrap_err().to_string();
            assert!(e.contains("8 hex digits"), "{id}: {e}");
        }
    }
}
