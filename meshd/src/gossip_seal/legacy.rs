//! Version 1 of the wire format, opened (and sent back to peers heard in it) only when
//! `gossip.legacy_peers` is set, for a rolling upgrade from meshd that knew nothing else.
//!
//! ```text
//! | version=1 | key id  | nonce    | ChaCha20-Poly1305(chitchat message) | tag      |
//! | 1 byte    | 4 bytes | 12 bytes | same length as the message          | 16 bytes |
//!  \______ AAD ______/
//! ```
//!
//! Nonces are random under the fleet-wide key, and nothing stops a replay.

use ring::aead::{Aad, Nonce};

use super::{KEY_ID_LEN, KeyId, Keyring, MAX_DATAGRAM_LEN, NONCE_LEN, OpenError, TAG_LEN};

/// The first byte of a version-1 datagram.
pub(super) const VERSION: u8 = 1;
const AAD_LEN: usize = 1 + KEY_ID_LEN;
const HEADER_LEN: usize = AAD_LEN + NONCE_LEN;
/// Header and tag: 33 bytes.
pub(super) const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Opens a version-1 datagram (its first byte is [`VERSION`]) with any key of `keyring`.
pub(super) fn open(keyring: &Keyring, datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
    if datagram.len() < SEAL_OVERHEAD || datagram.len() > MAX_DATAGRAM_LEN {
        return Err(OpenError::Malformed {
            len: datagram.len(),
        });
    }
    let (header, sealed) = datagram.split_at(HEADER_LEN);
    let (aad, nonce) = header.split_at(AAD_LEN);
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&aad[1..]);
    let key_id = KeyId(key_id);
    let key = keyring
        .key(key_id)
        .ok_or(OpenError::UnknownKey { key_id })?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).expect("the nonce slice is NONCE_LEN");
    let mut in_out = sealed.to_vec();
    let plaintext_len = key
        .aead
        .open_in_place(nonce, Aad::from(aad), &mut in_out)
        .map_err(|_| OpenError::AuthenticationFailed)?
        .len();
    in_out.truncate(plaintext_len);
    Ok(in_out)
}

/// Seals as meshd before version 2 did: the keyring's primary key, a random nonce. Sent only to
/// peers last heard in format 1, while `gossip.legacy_peers` is on.
pub(super) fn seal(keyring: &Keyring, plaintext: &[u8]) -> Vec<u8> {
    use rand::Rng as _;

    let key = keyring.primary();
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill(&mut nonce);
    let mut aad = [VERSION; AAD_LEN];
    aad[1..].copy_from_slice(key.id().as_bytes());
    let mut datagram = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    datagram.extend_from_slice(&aad);
    datagram.extend_from_slice(&nonce);
    datagram.extend_from_slice(plaintext);
    let tag = key
        .aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut datagram[HEADER_LEN..],
        )
        .expect("ChaCha20-Poly1305 only refuses messages over 256 GiB");
    datagram.extend_from_slice(tag.as_ref());
    datagram
}
