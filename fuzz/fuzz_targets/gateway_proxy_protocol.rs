//! The first bytes of a connection on a gateway listener behind a load balancer → its PROXY
//! protocol header, v1 or v2 (`meshd::proxy::gateway::proxy_protocol::parse`).
//!
//! Invariants: never panics; a parsed header's length lies within the input and does not
//! change when more bytes follow; every proper prefix of a parsed header is incomplete (the
//! reader waits for the rest rather than acting on part of it).

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::proxy::gateway::proxy_protocol::{Header, parse};

fuzz_target!(|data: &[u8]| {
    let got = parse(data);
    if let Header::Parsed { len, source } = &got {
        assert!(*len <= data.len() && *len >= 15);
        let mut more = data[..*len].to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&more),
            Header::Parsed {
                len: *len,
                source: *source
            }
        );
        for cut in 1..*len {
            let part = parse(&data[..cut]);
            assert_eq!(
                part,
                Header::Incomplete,
                "prefix {cut} of a {len}-byte header"
            );
        }
    }
});
