//! The first bytes of a connection on a gateway `tls` listener → the SNI of its ClientHello
//! (`meshd::proxy::gateway::sni::client_hello`), read before anything is relayed.
//!
//! Invariants: never panics; a complete answer does not change when more bytes follow (the
//! bytes after the hello are the client's, not the parser's); a name is lowercase; and a
//! prefix of input that gave an answer is either incomplete or gives the same answer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::proxy::gateway::sni::{Hello, MAX_HELLO, client_hello};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HELLO + 64)];
    let got = client_hello(data);
    if let Hello::Sni(Some(name)) = &got {
        assert_eq!(*name, name.to_ascii_lowercase());
    }
    if got != Hello::Incomplete {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(
            client_hello(&more),
            got,
            "trailing bytes changed the answer"
        );
    }
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let part = client_hello(&data[..cut]);
        assert!(
            part == Hello::Incomplete || part == got || matches!(part, Hello::NotTls(_)),
            "{part:?} vs {got:?}"
        );
    }
});
