//! Gossip `open` (`meshd::gossip_seal::open`): every UDP datagram that reaches the gossip port
//! goes through it before chitchat sees a byte.
//!
//! The first input byte picks a mode. Even: the rest is a datagram from the network; `open`
//! must classify it exactly as the module docs say (version, then length, then key id, then
//! tag) and never panic. Odd: the rest is a chitchat message; sealing then opening returns it,
//! and changing any one byte of the sealed datagram (picked by the input), truncating it or
//! extending it makes `open` reject it.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshd::gossip_seal::{
    FORMAT_VERSION, GossipKey, KEY_ID_LEN, KEY_LEN, Keyring, MAX_DATAGRAM_LEN, OpenError,
    SEAL_OVERHEAD, open, seal,
};

/// Sealing key 0x01 repeated and an opening-only key 0x02 repeated, as the seeds were sealed.
static KEYRING: LazyLock<Keyring> = LazyLock::new(|| {
    Keyring::new(
        GossipKey::from_bytes([1; KEY_LEN]),
        vec![GossipKey::from_bytes([2; KEY_LEN])],
    )
    .expect("distinct keys")
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        network(rest);
    } else {
        round_trip(mode, rest);
    }
});

fn network(datagram: &[u8]) {
    let keyring = &*KEYRING;
    let result = open(keyring, datagram);
    let expected_class = match datagram.first() {
        None => Class::Malformed,
        Some(&v) if v != FORMAT_VERSION => Class::UnknownVersion(v),
        Some(_) if datagram.len() < SEAL_OVERHEAD || datagram.len() > MAX_DATAGRAM_LEN => {
            Class::Malformed
        }
        Some(_) => {
            let id: [u8; KEY_ID_LEN] = datagram[1..1 + KEY_ID_LEN].try_into().expect("4 bytes");
            let known = std::iter::once(keyring.primary())
                .chain(keyring.others())
                .any(|k| k.id().as_bytes() == &id);
            if known {
                Class::Crypto
            } else {
                Class::UnknownKey
            }
        }
    };
    match (&result, expected_class) {
        (Err(OpenError::Malformed { len }), Class::Malformed) => assert_eq!(*len, datagram.len()),
        (Err(OpenError::UnknownVersion { version }), Class::UnknownVersion(v)) => {
            assert_eq!(*version, v)
        }
        (Err(OpenError::UnknownKey { key_id }), Class::UnknownKey) => {
            assert_eq!(key_id.as_bytes(), &datagram[1..1 + KEY_ID_LEN])
        }
        (Err(OpenError::AuthenticationFailed), Class::Crypto) => {}
        (Ok(plaintext), Class::Crypto) => {
            // Only an authentic datagram (a seed) gets here; it must stay authentic only as is.
            assert_eq!(plaintext.len() + SEAL_OVERHEAD, datagram.len());
            let mut tampered = datagram.to_vec();
            let last = tampered.len() - 1;
            tampered[last] ^= 0x80;
            assert!(open(keyring, &tampered).is_err());
            assert!(open(keyring, &datagram[..last]).is_err());
        }
        (result, class) => panic!("open gave {result:?} for a datagram of class {class:?}"),
    }
}

fn round_trip(mode: u8, rest: &[u8]) {
    // The next two bytes say which byte to change and how; the remainder is the message.
    let [a, b, flip, message @ ..] = rest else {
        return;
    };
    if message.len() + SEAL_OVERHEAD > MAX_DATAGRAM_LEN {
        return;
    }
    let keyring = &*KEYRING;
    let sealed = seal(keyring, message);
    assert_eq!(sealed.len(), message.len() + SEAL_OVERHEAD);
    assert_eq!(sealed[0], FORMAT_VERSION);
    assert_eq!(open(keyring, &sealed).as_deref(), Ok(message));

    let flip = if *flip == 0 { 1 } else { *flip };
    let at = usize::from(u16::from_le_bytes([*a, *b])) % sealed.len();
    let mut tampered = sealed.clone();
    tampered[at] ^= flip;
    assert!(
        open(keyring, &tampered).is_err(),
        "byte {at} of {} changed (xor {flip:#04x}) and open accepted it",
        sealed.len()
    );
    let cut = usize::from(mode >> 1) % sealed.len();
    assert!(open(keyring, &sealed[..cut]).is_err());
    let mut extended = sealed.clone();
    extended.push(flip);
    assert!(open(keyring, &extended).is_err());
    // A key outside the keyring opens nothing sealed under it, and vice versa.
    let stranger = Keyring::single(GossipKey::from_bytes([3; KEY_LEN]));
    assert!(matches!(
        open(&stranger, &sealed),
        Err(OpenError::UnknownKey { .. })
    ));
}

#[derive(Debug, Clone, Copy)]
enum Class {
    Malformed,
    UnknownVersion(u8),
    UnknownKey,
    Crypto,
}
