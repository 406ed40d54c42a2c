//! Protocol detection on accepted connections, from their first bytes without consuming them:
//! TLS or plaintext on a service's `listen` address (inbound), HTTP or opaque bytes from an
//! app whose upstream has no known instance yet (outbound).

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long a connection may stay silent before it is taken for a client of a
/// server-speaks-first protocol (plaintext inbound, opaque bytes outbound). A TLS or HTTP
/// client sends at once; a second leaves room for a lost first segment to be retransmitted.
pub const PROTOCOL_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the first byte of a connection says it is.
pub enum Transport {
    /// A TLS ClientHello.
    Tls,
    /// Anything else (or nothing within [`PROTOCOL_DETECT_TIMEOUT`]).
    Plaintext,
    /// Closed (or failed) before sending anything.
    Gone,
}

/// Peeks at the first byte without consuming it.
pub async fn transport(tcp: &TcpStream) -> Transport {
    let mut first = [0u8; 1];
    match timeout(PROTOCOL_DETECT_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(0) | Err(_)) => Transport::Gone,
        Ok(Ok(_)) if first[0] == TLS_HANDSHAKE_RECORD => Transport::Tls,
        Ok(Ok(_)) | Err(_) => Transport::Plaintext,
    }
}

/// Whether the app's first bytes on `tcp` (waiting at most
/// [`PROTOCOL_DETECT_TIMEOUT`]) start an HTTP/1 request or the HTTP/2 preface.
pub async fn looks_like_http(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match timeout(PROTOCOL_DETECT_TIMEOUT, tcp.peek(&mut buf)).await {
        Ok(Ok(n)) => starts_like_http(&buf[..n]),
        _ => false,
    }
}

/// Whether `bytes` begin an HTTP/1 request line (`METHOD ` with a token method) or the
/// HTTP/2 connection preface.
pub fn starts_like_http(bytes: &[u8]) -> bool {
    if bytes.starts_with(b"PRI * HTTP/2") {
        return true;
    }
    let Some(space) = bytes.iter().position(|&b| b == b' ') else {
        return false;
    };
    // RFC 9110 methods are tokens; the common ones are upper-case letters.
    (1..=10).contains(&space) && bytes[..space].iter().all(u8::is_ascii_uppercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_apart() {
        #[rustfmt::skip]
        let cases: &[(&[u8], bool)] = &[
            (b"GET / HTTP/1.1\r\n", true),
            (b"POST /x HTTP/1.1", true),
            (b"OPTIONS * HTTP/1.1", true),
            (b"PRI * HTTP/2.0\r\n\r\nSM", true),
            (b"GET", false),            // not yet a request line
            (b"get / HTTP/1.1", false),  // methods are case-sensitive
            (b"\x16\x03\x01\x02\x00", false),
            (b"SSH-2.0-OpenSSH", false),
            (b" / HTTP/1.1", false),
            (b"", false),
            (b"VERYLONGMETHOD / HTTP/1.1", false),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                starts_like_http(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
