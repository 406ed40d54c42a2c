//! Join tokens: what a new host needs on first contact with the registry — the token's id and
//! secret, the CA fingerprint to pin the registry's chain to (as kubeadm does), and the services
//! the host may run — packed into one copy-pasteable string.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Every token string starts with this, so a token is recognisable and versioned.
pub const PREFIX: &str = "mjt1.";

/// Why a token string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Missing the `mjt1.` prefix.
    #[error("not a meshd join token (it should start with {PREFIX:?})")]
    BadPrefix,
    /// The body is not base64url.
    #[error("join token body is not base64url: {0}")]
    BadEncoding(String),
    /// The body is not the expected JSON.
    #[error("join token body is malformed: {0}")]
    BadBody(String),
    /// The CA fingerprint is not `sha256:<64 hex>`.
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

    /// Reads a token string (surrounding whitespace is ignored, as from a file).
    pub fn decode(s: &str) -> Result<Self, Error> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(Error::BadPrefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| Error::BadEncoding(e.to_string()))?;
        let token: Self =
            serde_json::from_slice(&json).map_err(|e| Error::BadBody(e.to_string()))?;
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

/// Parses `sha256:<64 hex>` into bytes.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], Error> {
    let bad = || Error::BadFingerprint(s.to_owned());
    let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
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
    }
}
