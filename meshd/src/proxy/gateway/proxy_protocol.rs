//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a load balancer in front of a
//! gateway listener sends before the client's bytes, carrying the client's address. Parsing is
//! pure and bounded; [`read`] consumes exactly the header from a connection. A listener set to
//! expect it refuses connections without one: whoever can reach such a listener directly could
//! otherwise claim any address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use mesh_api::policy::ProxyVersion;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 line, CRLF included (the specification's limit).
const V1_MAX: usize = 107;
/// Longest version 2 address block accepted (addresses plus TLVs); AWS and GCP send well under.
const V2_MAX_BLOCK: usize = 2048;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// More bytes are needed.
    Incomplete,
    /// Not a valid PROXY header.
    Invalid(&'static str),
    /// A header of `len` bytes; the client's address, or `None` for a `LOCAL`/`UNKNOWN`
    /// connection (the balancer's own health check), whose own address stands.
    Parsed {
        /// Bytes the header takes.
        len: usize,
        /// The client.
        source: Option<SocketAddr>,
    },
}

/// Parses the PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Header {
    if buf.len() >= V2_SIGNATURE.len() && buf.starts_with(V2_SIGNATURE) {
        return v2(buf);
    }
    if V2_SIGNATURE.starts_with(&buf[..buf.len().min(V2_SIGNATURE.len())])
        && buf.len() < V2_SIGNATURE.len()
        && !buf.is_empty()
    {
        return Header::Incomplete;
    }
    v1(buf)
}

fn v1(buf: &[u8]) -> Header {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Header::Invalid("no PROXY protocol header");
    }
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Header::Invalid("PROXY v1 line too long")
        } else {
            Header::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[PREFIX.len()..end]) else {
        return Header::Invalid("PROXY v1 line is not text");
    };
    let len = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["UNKNOWN", ..] => Header::Parsed { len, source: None },
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let (Ok(src), Ok(_dst)) = (src.parse::<IpAddr>(), dst.parse::<IpAddr>()) else {
                return Header::Invalid("PROXY v1 address is not an IP address");
            };
            if (*family == "TCP4") != src.is_ipv4() {
                return Header::Invalid("PROXY v1 address does not match its family");
            }
            match (port(sport), port(dport)) {
                (Some(sport), Some(_)) => Header::Parsed {
                    len,
                    source: Some(SocketAddr::new(src, sport)),
                },
                _ => Header::Invalid("PROXY v1 port is not a number 0-65535"),
            }
        }
        _ => Header::Invalid("PROXY v1 line has the wrong fields"),
    }
}

/// A decimal port without sign or leading zeros.
fn port(s: &str) -> Option<u16> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

fn v2(buf: &[u8]) -> Header {
    let Some(&[ver_cmd, family, hi, lo]) =
        buf.get(12..16).and_then(|b| <&[u8; 4]>::try_from(b).ok())
    else {
        return Header::Incomplete;
    };
    if ver_cmd >> 4 != 2 {
        return Header::Invalid("PROXY v2 version is not 2");
    }
    let block_len = usize::from(u16::from_be_bytes([hi, lo]));
    if block_len > V2_MAX_BLOCK {
        return Header::Invalid("PROXY v2 address block too long");
    }
    let len = 16 + block_len;
    let Some(block) = buf.get(16..len) else {
        return Header::Incomplete;
    };
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection; addresses are ignored.
        0 => return Header::Parsed { len, source: None },
        1 => {}
        _ => return Header::Invalid("PROXY v2 command is neither LOCAL nor PROXY"),
    }
    let source = match family {
        // TCP over IPv4: src, dst (4 bytes each), ports.
        0x11 if block.len() >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([block[8], block[9]]),
            ))
        }
        // TCP over IPv6: src, dst (16 bytes each), ports.
        0x21 if block.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([block[32], block[33]]),
            ))
        }
        0x11 | 0x21 => return Header::Invalid("PROXY v2 address block too short for its family"),
        // UNSPEC, UDP and unix sockets: no client address to use.
        _ => None,
    };
    Header::Parsed { len, source }
}

/// The PROXY header `version` that names `client` connecting to `local` (a listener set to
/// send one to its service). Mixed families (an IPv4 client on an IPv6 listener) are written
/// as IPv6, the IPv4 address mapped.
pub fn encode(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(client, local);
    match version {
        ProxyVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            // Version 2, command PROXY.
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// Both addresses in one family: IPv4 when both are, else IPv6 (IPv4 mapped).
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a.is_ipv4() && b.is_ipv4() {
        return (a, b);
    }
    (
        SocketAddr::new(v6(a.ip()).into(), a.port()),
        SocketAddr::new(v6(b.ip()).into(), b.port()),
    )
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The header is missing or invalid.
    #[error("{0}")]
    Invalid(&'static str),
    /// It did not arrive in time.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The connection failed or closed first.
    #[error("connection ended before the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads and consumes the PROXY header of `tcp` within `limit`; the client's address (or
/// `peer`, for a LOCAL connection).
pub async fn read(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Result<SocketAddr, Error> {
    let header = tokio::time::timeout(limit, async {
        let mut buf = vec![0u8; 16 + V2_MAX_BLOCK];
        let mut seen = 0;
        loop {
            let n = tcp.peek(&mut buf).await?;
            match parse(&buf[..n]) {
                Header::Incomplete if n == seen => {
                    // Nothing new since the last look: wait a little for more bytes.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Header::Incomplete => seen = n,
                Header::Invalid(why) => return Err(Error::Invalid(why)),
                Header::Parsed { len, source } => return Ok((len, source)),
            }
            if n == 0 {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    })
    .await
    .map_err(|_| Error::Timeout(limit))??;
    let (len, source) = header;
    let mut consumed = vec![0u8; len];
    tcp.read_exact(&mut consumed).await?;
    Ok(source.unwrap_or(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20 | cmd, family]);
        h.extend_from_slice(&(block.len() as u16).to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    #[test]
    fn version_1() {
        let ok = |len: usize, src: &str| Header::Parsed {
            len,
            source: Some(src.parse().unwrap()),
        };
        let cases: Vec<(&[u8], Header)> = vec![
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET",
                ok(45, "192.0.2.1:56324"),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
                ok(40, "[2001:db8::1]:1"),
            ),
            (
                b"PROXY UNKNOWN\r\n",
                Header::Parsed {
                    len: 15,
                    source: None,
                },
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324",
                Header::Incomplete,
            ),
            (b"PRO", Header::Incomplete),
            (b"", Header::Incomplete),
            (
                b"GET / HTTP/1.1\r\n",
                Header::Invalid("no PROXY protocol header"),
            ),
            (
                b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
                Header::Invalid("PROXY v1 address does not match its family"),
            ),
            (
                b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 2\r\n",
                Header::Invalid("PROXY v1 port is not a number 0-65535"),
            ),
            (
                b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
                Header::Invalid("PROXY v1 port is not a number 0-65535"),
            ),
            (
                b"PROXY TCP4 x 192.0.2.2 1 2\r\n",
                Header::Invalid("PROXY v1 address is not an IP address"),
            ),
            (
                b"PROXY TCP4 192.0.2.1\r\n",
                Header::Invalid("PROXY v1 line has the wrong fields"),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert_eq!(parse(&long), Header::Invalid("PROXY v1 line too long"));
    }

    #[test]
    fn version_2() {
        let v4 = [192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb];
        let h = v2_header(1, 0x11, &v4);
        assert_eq!(
            parse(&h),
            Header::Parsed {
                len: 28,
                source: Some("192.0.2.1:56324".parse().unwrap())
            }
        );
        for n in 1..h.len() {
            assert_eq!(parse(&h[..n]), Header::Incomplete, "prefix {n}");
        }
        let mut v6 = [0u8; 36];
        v6[0] = 0x20;
        v6[1] = 0x01;
        v6[32] = 0;
        v6[33] = 80;
        assert_eq!(
            parse(&v2_header(1, 0x21, &v6)),
            Header::Parsed {
                len: 52,
                source: Some("[2001::]:80".parse().unwrap())
            }
        );
        // LOCAL: the balancer's health check.
        assert_eq!(
            parse(&v2_header(0, 0x00, &[])),
            Header::Parsed {
                len: 16,
                source: None
            }
        );
        // TLVs after the addresses are skipped with them.
        let with_tlv = [&v4[..], &[0x04, 0x00, 0x01, 0xff]].concat();
        assert!(matches!(
            parse(&v2_header(1, 0x11, &with_tlv)),
            Header::Parsed { len: 32, .. }
        ));
        assert_eq!(
            parse(&v2_header(1, 0x11, &v4[..8])),
            Header::Invalid("PROXY v2 address block too short for its family")
        );
        assert_eq!(
            parse(&v2_header(2, 0x11, &v4)),
            Header::Invalid("PROXY v2 command is neither LOCAL nor PROXY")
        );
        let mut bad_version = v2_header(1, 0x11, &v4);
        bad_version[12] = 0x11;
        assert_eq!(
            parse(&bad_version),
            Header::Invalid("PROXY v2 version is not 2")
        );
    }

    fn addr() -> impl proptest::strategy::Strategy<Value = SocketAddr> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(Ipv6Addr::from(ip).into(), p)),
        ]
    }

    proptest::proptest! {
        /// What a gateway sends, a PROXY reader (ours) reads back: the whole header, and the
        /// client (in the listener's family).
        #[test]
        fn encoded_headers_parse_back(client in addr(), local in addr(), v2 in proptest::bool::ANY) {
            let version = if v2 { ProxyVersion::V2 } else { ProxyVersion::V1 };
            let bytes = encode(version, client, local);
            let (want, _) = same_family(client, local);
            let mut more = bytes.clone();
            more.extend_from_slice(b"payload");
            proptest::prop_assert_eq!(
                parse(&more),
                Header::Parsed { len: bytes.len(), source: Some(want) }
            );
        }
    }

    #[test]
    fn encoded_v1_is_the_specified_line() {
        let c: SocketAddr = "203.0.113.9:51000".parse().unwrap();
        let l: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        assert_eq!(
            encode(ProxyVersion::V1, c, l),
            b"PROXY TCP4 203.0.113.9 10.0.0.5 51000 5432\r\n"
        );
        let l6: SocketAddr = "[2001:db8::5]:5432".parse().unwrap();
        assert_eq!(
            encode(ProxyVersion::V1, c, l6),
            b"PROXY TCP6 ::ffff:203.0.113.9 2001:db8::5 51000 5432\r\n"
        );
        assert_eq!(encode(ProxyVersion::V2, c, l).len(), 16 + 12);
    }
}
