//! Join tokens: what a new host needs on first contact with the registry — the token's id and
//! secret, the CA fingerprint to pin the registry's chain to (as kubeadm does), and the services
//! the host may run — packed into one copy-pasteable string.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Every token string starts with this, so a token is recognisable and versioned.
pub const PREFIX: &str = "mjt1.";
/// Longest token string read, bytes (surrounding whitespace excluded). A real token is a few
/// hundred bytes; the bound keeps a hostile one from costing more than a glance.
pub const MAX_LEN: usize = 64 * 1024;
/// Longest piece of a rejected value quoted back in an error, characters: errors reach logs
/// and gRPC statuses, so what a hostile token holds is never echoed whole.
const MAX_QUOTED: usize = 120;

/// Why a token string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Missing the `mjt1.` prefix.
    #[error("not a meshd join token (it should start with {PREFIX:?})")]
    BadPrefix,
    /// Longer than [`MAX_LEN`].
    #[error("join token is {0} bytes, longer than the {MAX_LEN} allowed")]
    TooLong(usize),
    /// The body is not base64url.
    #[error("join token body is not base64url: {0}")]
    BadEncoding(String),
    /// The body is not the expected JSON.
    #[error("join token body is malformed: {0}")]
    BadBody(String),
    /// The CA fingerprint is not `sha256:<64 hex>` (the value, shortened if long).
    #[error("join token CA fingerprint {0:?} is not sha256:<64 hex digits>")]
    BadFingerprint(String),
}

/// A decoded join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Public id: the registry's record key, safe to log.
    pub id: String,
    /// Secret: the registry keeps only its hash.
    pub secret: String,
    /// `sha256:<hex>` of the mesh root certificate (DER).
    pub ca: String,
    /// Trust domain of the mesh, so the host can ask for its node identity.
    pub td: String,
    /// Registry addresses to try (`host:port`), so a host needs nothing else to join.
    #[serde(default)]
    pub registry: Vec<String>,
    /// Services the host may run, `namespace/name` or `namespace/*` (informational: the
    /// registry enforces its own record, never this copy).
    pub services: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

// === impl JoinToken ===

impl JoinToken {
    /// The token as the operator sees it: `mjt1.<base64url(json)>`.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("token serialises to JSON");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a token string (surrounding whitespace is ignored, as from a file). Any input,
    /// however hostile, gives a token or an [`Error`] whose text quotes at most a short,
    /// whole-character prefix of what the token held.
    pub fn decode(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.len() > MAX_LEN {
            return Err(Error::TooLong(s.len()));
        }
        let body = s.strip_prefix(PREFIX).ok_or(Error::BadPrefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| Error::BadEncoding(shorten(&e.to_string())))?;
        // serde_json quotes the offending value in its messages, so they are shortened too.
        let token: Self =
            serde_json::from_slice(&json).map_err(|e| Error::BadBody(shorten(&e.to_string())))?;
        token.ca_fingerprint()?;
        Ok(token)
    }

    /// The pinned CA fingerprint as raw SHA-256 bytes.
    pub fn ca_fingerprint(&self) -> Result<[u8; 32], Error> {
        parse_fingerprint(&self.ca)
    }
}

/// Formats a SHA-256 digest as `sha256:<hex>`.
pub fn format_fingerprint(digest: &[u8]) -> String {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Parses `sha256:<64 hex>` into bytes (hex digits of either case, nothing else).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], Error> {
    let bad = || Error::BadFingerprint(shorten(s));
    let hex = s.strip_prefix("sha256:").ok_or_else(bad)?.as_bytes();
    // Bytes, not chars: any multi-byte character fails the digit test, so no index below
    // can fall inside one (slicing the str at byte offsets once panicked on such input).
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
            return Err(bad());
        };
        *byte = hi << 4 | lo;
    }
    Ok(out)
}

/// The value of one ASCII hex digit (`u8::from_str_radix` would also take a leading `+`).
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `s` as it may be quoted in an error: whole if short, else its first [`MAX_QUOTED`]
/// characters (never a split one) and `…`.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            id: "a1b2c3d4e5f60718".into(),
            secret: "s3cr3t".into(),
            ca: format_fingerprint(&[0xab; 32]),
            td: "mesh.internal".into(),
            registry: vec!["127.0.0.1:7700".into()],
            services: vec!["default/web".into(), "shop/*".into()],
            exp: 1_900_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with(PREFIX));
        assert_eq!(JoinToken::decode(&format!("  {s}\n")).unwrap(), t);
        assert_eq!(t.ca_fingerprint().unwrap(), [0xab; 32]);
    }

    #[test]
    fn rejects() {
        assert_eq!(JoinToken::decode("abc"), Err(Error::BadPrefix));
        assert!(matches!(
            JoinToken::decode("mjt1.!!!"),
            Err(Error::BadEncoding(_))
        ));
        let not_json = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b"{\"id\":1}"));
        assert!(matches!(
            JoinToken::decode(&not_json),
            Err(Error::BadBody(_))
        ));
        let mut t = sample();
        t.ca = "sha256:zz".into();
        assert!(matches!(
            JoinToken::decode(&t.encode()),
            Err(Error::BadFingerprint(_))
        ));
    }

    #[test]
    fn fingerprints() {
        let f = format_fingerprint(&[0x01; 32]);
        assert_eq!(f.len(), 7 + 64);
        assert_eq!(parse_fingerprint(&f).unwrap(), [0x01; 32]);
        assert!(parse_fingerprint("md5:00").is_err());
        assert!(parse_fingerprint(&format!("sha256:{}", "g".repeat(64))).is_err());
        let upper = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(parse_fingerprint(&upper).unwrap(), [0xab; 32]);
        // `u8::from_str_radix` reads "+f" as 15; a fingerprint holds hex digits only.
        assert!(parse_fingerprint(&format!("sha256:{}", "+f".repeat(32))).is_err());
    }

    /// Fingerprints whose 64 bytes hold multi-byte UTF-8, so byte offsets fall inside
    /// characters: each is an error (this once panicked the registry's join handler).
    #[test]
    fn multi_byte_fingerprints_are_errors_not_panics() {
        let cases = [
            "é".repeat(32),                        // 2-byte chars, 64 bytes
            format!("a{}a", "é".repeat(31)),       // offsets 1, 3, ... inside chars
            format!("{}€", "0".repeat(61)),        // 3-byte char at the end
            format!("€{}", "0".repeat(61)),        // and at the start
            "😀".repeat(16),                       // 4-byte chars
            format!("{}\u{0301}", "a".repeat(62)), // combining mark
            "é".repeat(1_000),
        ];
        for hex in cases {
            let fp = format!("sha256:{hex}");
            let e = parse_fingerprint(&fp).unwrap_err();
            let Error::BadFingerprint(quoted) = &e else {
                panic!("{e:?}")
            };
            assert!(quoted.chars().count() <= MAX_QUOTED + 1, "{quoted}");
            assert!(fp.starts_with(quoted.trim_end_matches('…')));
            // And through a whole token, as the registry and meshd read it.
            let mut t = sample();
            t.ca = fp;
            assert!(matches!(
                JoinToken::decode(&t.encode()),
                Err(Error::BadFingerprint(_))
            ));
        }
    }

    /// Other hostile tokens: multi-byte text anywhere, huge values, huge tokens. Errors quote
    /// only a short prefix of what the token held.
    #[test]
    fn hostile_tokens_get_short_errors() {
        let json = |body: &str| format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(body));
        let huge = "ж".repeat(10_000);
        let wrong_type = json(&format!(r#"{{"id":"{huge}","exp":"{huge}"}}"#));
        let unknown_key = json(&format!(r#"{{"{huge}":1}}"#));
        for token in [wrong_type, unknown_key] {
            let e = JoinToken::decode(&token).unwrap_err();
            assert!(matches!(e, Error::BadBody(_)), "{e:?}");
            assert!(e.to_string().chars().count() < 200, "{e}");
        }
        let e = JoinToken::decode(&format!("{PREFIX}{}", "ж".repeat(100))).unwrap_err();
        assert!(matches!(e, Error::BadEncoding(_)), "{e:?}");
        let long = format!("{PREFIX}{}", "A".repeat(MAX_LEN));
        assert_eq!(
            JoinToken::decode(&long),
            Err(Error::TooLong(MAX_LEN + PREFIX.len()))
        );
        assert_eq!(JoinToken::decode("mjt1"), Err(Error::BadPrefix));
        assert_eq!(JoinToken::decode("ж"), Err(Error::BadPrefix));
        // Multi-byte text where text is expected is fine: the registry judges it.
        let mut t = sample();
        t.id = "идентификатор".into();
        t.services = vec!["ns/сервис".into()];
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn shortening_keeps_whole_characters() {
        assert_eq!(shorten("abc"), "abc");
        let s = "é".repeat(MAX_QUOTED + 5);
        let short = shorten(&s);
        assert_eq!(short, format!("{}…", "é".repeat(MAX_QUOTED)));
        assert_eq!(shorten(&"é".repeat(MAX_QUOTED)), "é".repeat(MAX_QUOTED));
    }
}
