//! What a request gains at the edge of the mesh, all pure: the client's address in
//! `x-forwarded-for` and `forwarded`, the scheme it used in `x-forwarded-proto`, and a new
//! `x-request-id` (an outside client does not choose the ids in the mesh's logs).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName, HeaderValue};

/// `x-forwarded-for`: the client addresses a request passed through, the last one added by
/// the gateway (the only one it vouches for).
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`: `http` or `https`, as the client spoke to the gateway.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-request-id`: set by the gateway for every request.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Adds the edge headers for a request from `client` over `proto` (`http` | `https`), with
/// `request_id` as its id. Earlier `x-forwarded-for`/`forwarded` entries are kept (a proxy in
/// front may have added them; they are the client's claims) and the gateway's appended last;
/// `x-forwarded-proto` and `x-request-id` are replaced.
pub fn add(headers: &mut HeaderMap, client: SocketAddr, proto: &'static str, request_id: &str) {
    let ip = canonical(client.ip());
    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    // RFC 7239: IPv6 addresses are bracketed and quoted.
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let fwd = match joined(headers, &FORWARDED) {
        Some(prev) => format!("{prev}, for={node};proto={proto}"),
        None => format!("for={node};proto={proto}"),
    };
    for (name, value) in [
        (X_FORWARDED_FOR, xff),
        (FORWARDED, fwd),
        (X_FORWARDED_PROTO, proto.to_owned()),
        (X_REQUEST_ID, request_id.to_owned()),
    ] {
        // Addresses, digits and the previous (already valid) values: cannot fail.
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    }
}

/// A new request id: 128 random bits as 32 hex digits.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Every value of `name` joined with `, ` (several header lines are one list); `None` when
/// absent or not text.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = (headers.get_all(name).iter())
        .map(|v| v.to_str().ok())
        .collect::<Option<_>>()?;
    (!values.is_empty()).then(|| values.join(", "))
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 clients) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get(h: &HeaderMap, name: &str) -> Vec<String> {
        (h.get_all(name).iter())
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// Headers before, client address, `x-forwarded-for` and `forwarded` after.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str, &'a str);

    #[test]
    fn the_client_is_appended_and_ids_replaced() {
        let cases: &[Case<'_>] = &[
            (
                &[],
                "192.0.2.7:5555",
                "192.0.2.7",
                "for=192.0.2.7;proto=https",
            ),
            (
                &[
                    ("x-forwarded-for", "10.0.0.1"),
                    ("x-forwarded-for", "10.0.0.2"),
                    ("forwarded", "for=10.0.0.1"),
                ],
                "192.0.2.7:5555",
                "10.0.0.1, 10.0.0.2, 192.0.2.7",
                "for=10.0.0.1, for=192.0.2.7;proto=https",
            ),
            (
                &[],
                "[2001:db8::1]:443",
                "2001:db8::1",
                "for=\"[2001:db8::1]\";proto=https",
            ),
            (
                &[],
                "[::ffff:192.0.2.9]:443",
                "192.0.2.9",
                "for=192.0.2.9;proto=https",
            ),
        ];
        for (before, client, xff, fwd) in cases {
            let mut h = headers(before);
            h.insert(X_REQUEST_ID, HeaderValue::from_static("chosen-by-client"));
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("gopher"));
            add(&mut h, client.parse().unwrap(), "https", "abc");
            assert_eq!(get(&h, "x-forwarded-for"), [*xff], "{client}");
            assert_eq!(get(&h, "forwarded"), [*fwd], "{client}");
            assert_eq!(get(&h, "x-forwarded-proto"), ["https"]);
            assert_eq!(get(&h, "x-request-id"), ["abc"]);
        }
    }

    #[test]
    fn request_ids_are_fresh_hex() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
