//! Join token decode (`mesh_api::token`): the string an operator pastes into a new host, and that
//! the registry reads back on join. Never panics; what decodes re-encodes to a token that decodes
//! to the same value, and its CA fingerprint round-trips through `format_fingerprint`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::token::{self, JoinToken};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The fingerprint parser on its own: the registry also calls it on stored tokens.
    if let Ok(digest) = token::parse_fingerprint(text) {
        assert_eq!(
            token::format_fingerprint(&digest),
            text.to_ascii_lowercase()
        );
    }
    let Ok(decoded) = JoinToken::decode(text) else {
        return;
    };
    let fingerprint = decoded
        .ca_fingerprint()
        .expect("decode checked the fingerprint");
    assert_eq!(
        token::parse_fingerprint(&token::format_fingerprint(&fingerprint)),
        Ok(fingerprint)
    );
    let encoded = decoded.encode();
    assert!(encoded.starts_with(token::PREFIX));
    assert_eq!(JoinToken::decode(&encoded).as_ref(), Ok(&decoded));
    // Canonical: encoding is a fixed point.
    assert_eq!(JoinToken::decode(&encoded).map(|t| t.encode()), Ok(encoded));
});
