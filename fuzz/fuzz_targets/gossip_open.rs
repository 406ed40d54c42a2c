//! Gossip `open` (`meshd::gossip_seal::open`): every UDP datagram that reaches the gossip port
//! goes through it before chitchat sees a byte.
//!
//! The first input byte picks a mode. Even: the rest is a datagram from the network; `open`
//! must classify it exactly as the module docs say (version, then length, then key id, then
//! tag, then send time and counter), with version 1 refused or opened as configured, never
//! panic, and leave the replay state alone unless the datagram is authentic. Odd: the rest is a
//! chitchat message; sealing then opening returns it once (a second copy is a replay, a late one
//! is stale), and changing any one byte of the sealed datagram (picked by the input), truncating
//! it or extending it makes `open` reject it without moving the replay window. The message
//! bytes, read as 16-bit counters, are also put through a replay `Window` and checked against
//! a model.

#![no_main]

use std::collections::HashSet;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshd::gossip_seal::{
    DropReason, FORMAT_VERSION, GossipKey, InstanceId, KEY_ID_LEN, KEY_LEN, Keyring, Legacy,
    MAX_CLOCK_SKEW_SECS, MAX_DATAGRAM_LEN, OpenError, Opener, SEAL_OVERHEAD, Sealer, WINDOW_LEN,
    Window, open, seal,
};

/// Local time of every `open`, Unix seconds; authentic version-2 seeds are sealed at it.
const NOW: u64 = 1_750_000_000;
/// The first byte of a version-1 datagram.
const LEGACY_VERSION: u8 = 1;
/// Header and tag of version 1.
const LEGACY_SEAL_OVERHEAD: usize = 33;

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
        network(rest, Legacy::Refuse);
        network(rest, Legacy::Accept);
    } else {
        round_trip(mode, rest);
        window(rest);
    }
});

fn network(datagram: &[u8], legacy: Legacy) {
    let keyring = &*KEYRING;
    let mut opener = Opener::new(legacy);
    let result = open(keyring, &mut opener, NOW, datagram);
    let expected_class = classify(datagram, legacy);
    match (&result, expected_class) {
        (Err(OpenError::Malformed { len }), Class::Malformed) => assert_eq!(*len, datagram.len()),
        (Err(OpenError::UnknownVersion { version }), Class::UnknownVersion(v)) => {
            assert_eq!(*version, v)
        }
        (Err(OpenError::Legacy), Class::Legacy) => {}
        (Err(OpenError::UnknownKey { key_id }), Class::UnknownKey) => {
            assert_eq!(key_id.as_bytes(), &datagram[1..1 + KEY_ID_LEN])
        }
        (Err(OpenError::AuthenticationFailed), Class::Crypto { .. }) => {}
        // Authentic (a seed) but sent at another time: refused, and nothing remembered.
        (Err(OpenError::Stale { .. }), Class::Crypto { overhead }) => {
            assert_eq!(overhead, SEAL_OVERHEAD)
        }
        (Ok(plaintext), Class::Crypto { overhead }) => {
            // Only an authentic datagram (a seed) gets here; it must stay authentic only as is.
            assert_eq!(plaintext.len() + overhead, datagram.len());
            let mut tampered = datagram.to_vec();
            let last = tampered.len() - 1;
            tampered[last] ^= 0x80;
            assert!(open(keyring, &mut Opener::new(legacy), NOW, &tampered).is_err());
            let cut = &datagram[..last];
            assert!(open(keyring, &mut Opener::new(legacy), NOW, cut).is_err());
            if overhead == SEAL_OVERHEAD {
                // Version 2: accepted once.
                assert_eq!(opener.replay().len(), 1);
                let again = open(keyring, &mut opener, NOW, datagram);
                assert_eq!(again.map_err(|err| err.reason()), Err(DropReason::Replayed));
            }
        }
        (result, class) => panic!("open gave {result:?} for a datagram of class {class:?}"),
    }
    if result.is_err() {
        assert!(
            opener.replay().is_empty(),
            "a refused datagram moved the replay state"
        );
    }
}

fn classify(datagram: &[u8], legacy: Legacy) -> Class {
    let overhead = match (datagram.first(), legacy) {
        (None, _) => return Class::Malformed,
        (Some(&FORMAT_VERSION), _) => SEAL_OVERHEAD,
        (Some(&LEGACY_VERSION), Legacy::Accept) => LEGACY_SEAL_OVERHEAD,
        (Some(&LEGACY_VERSION), Legacy::Refuse) => return Class::Legacy,
        (Some(&v), _) => return Class::UnknownVersion(v),
    };
    if datagram.len() < overhead || datagram.len() > MAX_DATAGRAM_LEN {
        return Class::Malformed;
    }
    let id: [u8; KEY_ID_LEN] = datagram[1..1 + KEY_ID_LEN].try_into().expect("4 bytes");
    let known = std::iter::once(KEYRING.primary())
        .chain(KEYRING.others())
        .any(|k| k.id().as_bytes() == &id);
    if known {
        Class::Crypto { overhead }
    } else {
        Class::UnknownKey
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
    // The instance and starting counter come from the input too (counter near the top of the
    // counter space when `mode` says so, to cross it).
    let counter = u64::from_le_bytes([*a, *b, *flip, mode, 0, 0, 0, 0]);
    let counter = if mode & 0x80 != 0 {
        u64::MAX - counter % 4
    } else {
        counter
    };
    let mut sealer = Sealer::starting_at(InstanceId::from_bytes([mode; 16]), counter);
    let sealed = seal(keyring, &mut sealer, NOW, message);
    assert_eq!(sealed.len(), message.len() + SEAL_OVERHEAD);
    assert_eq!(sealed[0], FORMAT_VERSION);

    let flip = if *flip == 0 { 1 } else { *flip };
    let at = usize::from(u16::from_le_bytes([*a, *b])) % sealed.len();
    let mut tampered = sealed.clone();
    tampered[at] ^= flip;
    let mut opener = Opener::new(Legacy::Refuse);
    assert!(
        open(keyring, &mut opener, NOW, &tampered).is_err(),
        "byte {at} of {} changed (xor {flip:#04x}) and open accepted it",
        sealed.len()
    );
    let cut = usize::from(mode >> 1) % sealed.len();
    assert!(open(keyring, &mut opener, NOW, &sealed[..cut]).is_err());
    let mut extended = sealed.clone();
    extended.push(flip);
    assert!(open(keyring, &mut opener, NOW, &extended).is_err());
    assert!(
        opener.replay().is_empty(),
        "a refused datagram moved the replay state"
    );
    // Too late, then in time and once only.
    let late = NOW + MAX_CLOCK_SKEW_SECS + 1;
    assert_eq!(
        open(keyring, &mut opener, late, &sealed).map_err(|err| err.reason()),
        Err(DropReason::Stale)
    );
    assert_eq!(
        open(keyring, &mut opener, NOW, &sealed).as_deref(),
        Ok(message)
    );
    assert_eq!(
        open(keyring, &mut opener, NOW, &sealed).map_err(|err| err.reason()),
        Err(DropReason::Replayed)
    );
    // The next datagram of the same socket is new (another instance if the counter ran out).
    let next = seal(keyring, &mut sealer, NOW, message);
    assert_eq!(
        open(keyring, &mut opener, NOW, &next).as_deref(),
        Ok(message)
    );
    // A key outside the keyring opens nothing sealed under it, and vice versa.
    let stranger = Keyring::single(GossipKey::from_bytes([3; KEY_LEN]));
    assert!(matches!(
        open(&stranger, &mut Opener::new(Legacy::Accept), NOW, &sealed),
        Err(OpenError::UnknownKey { .. })
    ));
}

/// The bytes as little-endian 16-bit counters delivered in that order: a `Window` accepts
/// exactly what the model does, each counter at most once.
fn window(bytes: &[u8]) {
    let mut counters = bytes
        .chunks_exact(2)
        .map(|pair| u64::from(u16::from_le_bytes([pair[0], pair[1]])));
    let Some(first) = counters.next() else {
        return;
    };
    let mut window = Window::new(first);
    let mut accepted = HashSet::from([first]);
    let mut top = first;
    for counter in counters {
        let expected =
            (counter > top || top - counter < WINDOW_LEN) && !accepted.contains(&counter);
        assert_eq!(
            window.accept(counter),
            expected,
            "counter {counter} after top {top}"
        );
        if expected {
            accepted.insert(counter);
            top = top.max(counter);
        }
        assert_eq!(window.top(), top);
    }
}

#[derive(Debug, Clone, Copy)]
enum Class {
    Malformed,
    UnknownVersion(u8),
    Legacy,
    UnknownKey,
    Crypto { overhead: usize },
}
