//! The server name a TLS client asks for, read from its ClientHello without terminating TLS
//! (for `tls` passthrough listeners). Pure and bounded: it looks at the handshake records at the
//! start of a connection, never past [`MAX_HELLO`] bytes, and says whether it needs more.

/// Most bytes read to find the ClientHello (a record's largest payload, plus its header): a
/// hello that has not ended by then is refused.
pub const MAX_HELLO: usize = 16 * 1024 + 5;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed to decide.
    Incomplete,
    /// Not a TLS ClientHello (or a malformed one).
    NotTls(&'static str),
    /// A ClientHello, with its SNI host name (lowercase) if it sent one.
    Sni(Option<String>),
}

/// Reads the SNI of the ClientHello at the start of `buf` (bytes as received, records
/// included).
pub fn client_hello(buf: &[u8]) -> Hello {
    // Reassemble the handshake message from the handshake records (a large hello may span
    // several), stopping at the first record not yet complete.
    let mut msg = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        if rest[0] != 0x16 {
            return Hello::NotTls("not a TLS handshake record");
        }
        if rest[1] != 3 {
            return Hello::NotTls("not a TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 16 * 1024 {
            return Hello::NotTls("bad TLS record length");
        }
        let Some(payload) = rest.get(5..5 + len) else {
            return Hello::Incomplete;
        };
        msg.extend_from_slice(payload);
        rest = &rest[5 + len..];
        if msg.len() >= 4 {
            if msg[0] != 1 {
                return Hello::NotTls("first handshake message is not a ClientHello");
            }
            let body_len =
                (usize::from(msg[1]) << 16) | (usize::from(msg[2]) << 8) | usize::from(msg[3]);
            if body_len + 4 > MAX_HELLO {
                return Hello::NotTls("ClientHello too large");
            }
            if msg.len() >= body_len + 4 {
                return match sni(&msg[4..4 + body_len]) {
                    Some(found) => Hello::Sni(found),
                    None => Hello::NotTls("malformed ClientHello"),
                };
            }
        }
    }
}

/// A cursor over a byte slice that fails (None) instead of running past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The SNI of a ClientHello body: `Some(None)` without the extension, `None` if malformed.
fn sni(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(None); // no extensions at all (TLS 1.2 allows it)
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (name_type, name); host_name is type 0, and RFC 6066 allows
        // one name of each type.
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record as rustls writes it, for `sni`.
    fn rustls_hello(sni: &str) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(mesh_runtime::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_sni_rustls_sends() {
        let hello = rustls_hello("Shop.Example.com");
        assert_eq!(
            client_hello(&hello),
            Hello::Sni(Some("shop.example.com".into()))
        );
        // Any prefix is incomplete, never an error or a wrong name.
        for n in 0..hello.len() {
            assert_eq!(
                client_hello(&hello[..n]),
                Hello::Incomplete,
                "prefix of {n}"
            );
        }
        // Split into two records, it still reads.
        let payload = &hello[5..];
        let (a, b) = payload.split_at(payload.len() / 2);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(
            client_hello(&two),
            Hello::Sni(Some("shop.example.com".into()))
        );
    }

    #[test]
    fn refuses_what_is_not_a_hello() {
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
            (&[0x16, 2, 0, 0, 5], "not a TLS record version"),
            (&[0x16, 3, 1, 0, 0], "bad TLS record length"),
            (
                &[0x16, 3, 1, 0, 4, 2, 0, 0, 0],
                "first handshake message is not a ClientHello",
            ),
            (&[0x16, 3, 1, 0, 4, 1, 0, 0, 0], "malformed ClientHello"),
        ];
        for (bytes, why) in cases {
            assert_eq!(client_hello(bytes), Hello::NotTls(why), "{bytes:?}");
        }
    }
}
