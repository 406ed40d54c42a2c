//! Validated names: DNS-label style service, namespace, datacenter and zone names, node names,
//! and the `namespace/name` key that identifies a service across the mesh.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than allowed.
    #[error("{len} characters is longer than the limit of {max}")]
    TooLong {
        /// Length of the rejected value.
        len: usize,
        /// Largest length allowed.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error("character {0:?} is not allowed (use lowercase letters, digits and '-')")]
    BadChar(char),
    /// Starts or ends with a character that may only sit inside.
    #[error("must start and end with a lowercase letter or digit")]
    BadEdge,
    /// A `namespace/name` key without the slash or with extra parts.
    #[error("expected \"name\" or \"namespace/name\"")]
    BadKey,
}

/// A DNS-label style name (RFC 1123 label): lowercase letters, digits and `-`, 1..=63 chars.
/// Used for service names, namespaces, datacenters and zones, so they fit in SNI and SPIFFE IDs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

/// A node name: one or more labels separated by dots (a host name), at most 253 chars.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

/// A service across the mesh: namespace plus name. Displays as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// The namespace, `default` unless said otherwise.
    pub namespace: Label,
    /// The service name.
    pub name: Label,
}

/// The namespace used when a service or token entry names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Domain suffix of the TLS server name (SNI) meshd uses between hosts.
pub const SNI_SUFFIX: &str = "svc.mesh";

// === impl Label ===

impl Label {
    /// Largest label length (RFC 1123).
    pub const MAX_LEN: usize = 63;

    /// Validates `s` as a label.
    pub fn new(s: &str) -> Result<Self, Error> {
        check_label(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The empty string: not a valid label, sorts before every label, and costs no allocation
    /// — the lower bound of a range scan over keys that hold labels.
    pub(crate) fn least() -> Self {
        Self(String::new())
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_label(s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(Error::Empty);
    }
    if s.len() > Label::MAX_LEN {
        return Err(Error::TooLong {
            len: s.len(),
            max: Label::MAX_LEN,
        });
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(Error::BadChar(c));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(Error::BadEdge);
    }
    Ok(())
}

impl FromStr for Label {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for Label {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        check_label(&s)?;
        Ok(Self(s))
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl NodeName ===

impl NodeName {
    /// Largest node name length (a DNS name).
    pub const MAX_LEN: usize = 253;

    /// Validates `s` as a node name.
    pub fn new(s: &str) -> Result<Self, Error> {
        if s.len() > Self::MAX_LEN {
            return Err(Error::TooLong {
                len: s.len(),
                max: Self::MAX_LEN,
            });
        }
        if s.is_empty() {
            return Err(Error::Empty);
        }
        for part in s.split('.') {
            check_label(part)?;
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl ServiceKey ===

impl ServiceKey {
    /// Builds a key from already validated parts.
    pub fn new(namespace: Label, name: Label) -> Self {
        Self { namespace, name }
    }

    /// Parses `name` (namespace `default`) or `namespace/name`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let mut parts = s.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => Ok(Self {
                namespace: Label::new(DEFAULT_NAMESPACE).expect("default namespace is a label"),
                name: Label::new(name)?,
            }),
            (Some(ns), Some(name), None) => Ok(Self {
                namespace: Label::new(ns)?,
                name: Label::new(name)?,
            }),
            _ => Err(Error::BadKey),
        }
    }

    /// The TLS server name a client sends to reach this service: `<name>.<namespace>.svc.mesh`.
    pub fn sni(&self) -> String {
        format!("{}.{}.{SNI_SUFFIX}", self.name, self.namespace)
    }

    /// Reverses [`ServiceKey::sni`]; `None` for any other server name.
    pub fn from_sni(sni: &str) -> Option<Self> {
        let rest = sni.strip_suffix(SNI_SUFFIX)?.strip_suffix('.')?;
        let (name, ns) = rest.split_once('.')?;
        Some(Self {
            namespace: Label::new(ns).ok()?,
            name: Label::new(name).ok()?,
        })
    }

    /// The server name of this service in site `site`, sent through that site's east-west
    /// gateway: `<name>.<namespace>.<site>.svc.mesh`. The gateway routes on it without
    /// decrypting; the destination proves the same identity as for [`ServiceKey::sni`].
    pub fn site_sni(&self, site: &Label) -> String {
        format!("{}.{}.{site}.{SNI_SUFFIX}", self.name, self.namespace)
    }

    /// Reverses [`ServiceKey::site_sni`]: the service and its site.
    pub fn from_site_sni(sni: &str) -> Option<(Self, Label)> {
        let rest = sni.strip_suffix(SNI_SUFFIX)?.strip_suffix('.')?;
        let mut parts = rest.split('.');
        let (name, ns, site) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let key = Self {
            namespace: Label::new(ns).ok()?,
            name: Label::new(name).ok()?,
        };
        Some((key, Label::new(site).ok()?))
    }
}

impl FromStr for ServiceKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let cases: &[(&str, Result<(), Error>)] = &[
            ("web", Ok(())),
            ("a", Ok(())),
            ("api-v2", Ok(())),
            ("9lives", Ok(())),
            ("", Err(Error::Empty)),
            ("Web", Err(Error::BadChar('W'))),
            ("we_b", Err(Error::BadChar('_'))),
            ("web.", Err(Error::BadChar('.'))),
            ("-web", Err(Error::BadEdge)),
            ("web-", Err(Error::BadEdge)),
        ];
        for (input, want) in cases {
            assert_eq!(&Label::new(input).map(|_| ()), want, "input {input:?}");
        }
        let long = "a".repeat(64);
        assert_eq!(Label::new(&long), Err(Error::TooLong { len: 64, max: 63 }));
    }

    #[test]
    fn node_names() {
        assert!(NodeName::new("node-1").is_ok());
        assert!(NodeName::new("web-01.dc1.example").is_ok());
        assert!(NodeName::new("web..x").is_err());
        assert!(NodeName::new(".x").is_err());
        assert!(NodeName::new("").is_err());
    }

    #[test]
    fn service_keys() {
        let k = ServiceKey::parse("api").unwrap();
        assert_eq!(k.to_string(), "default/api");
        let k = ServiceKey::parse("shop/api").unwrap();
        assert_eq!(k.to_string(), "shop/api");
        assert_eq!(k.sni(), "api.shop.svc.mesh");
        assert_eq!(ServiceKey::from_sni(&k.sni()), Some(k.clone()));
        assert_eq!(ServiceKey::from_sni("api.shop.svc.other"), None);
        assert_eq!(ServiceKey::from_sni("svc.mesh"), None);
        assert_eq!(ServiceKey::from_sni("a.b.c.svc.mesh"), None);
        let site = Label::new("east").unwrap();
        assert_eq!(k.site_sni(&site), "api.shop.east.svc.mesh");
        assert_eq!(
            ServiceKey::from_site_sni("api.shop.east.svc.mesh"),
            Some((k, site))
        );
        for bad in [
            "api.shop.svc.mesh",
            "a.b.c.d.svc.mesh",
            "api.shop.East.svc.mesh",
            "api..east.svc.mesh",
            "api.shop.east.svc.mesh.evil",
            "api.shop.eastsvc.mesh",
        ] {
            assert_eq!(ServiceKey::from_site_sni(bad), None, "{bad}");
        }
        assert_eq!(ServiceKey::parse("a/b/c"), Err(Error::BadKey));
        assert!(ServiceKey::parse("A/b").is_err());
    }
}
