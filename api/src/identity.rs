//! SPIFFE identities of the mesh: workloads, nodes, the registry and operators, with parsing
//! and display that round-trip, and the trust domain they live in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::name::{self, Label, NodeName, ServiceKey};

/// Why an identity or trust domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a `spiffe://` URI.
    #[error("identity {0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    /// The trust domain part is invalid.
    #[error("trust domain {value:?} is invalid: {reason}")]
    BadTrustDomain {
        /// The rejected trust domain.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The path does not name one of the mesh's identity kinds.
    #[error(
        "identity path {0:?} is not one of /ns/<ns>/svc/<name>, /node/<name>, /registry, /admin/<name>, /viewer/<name>"
    )]
    UnknownPath(String),
    /// A name inside the path is invalid.
    #[error("identity {uri:?}: {source}")]
    BadName {
        /// The URI being parsed.
        uri: String,
        /// The name problem.
        #[source]
        source: name::Error,
    },
}

/// The trust domain chosen when the registry is initialised, e.g. `mesh.internal`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

/// A verified principal of the mesh, carried as a URI SAN in its X.509 certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identity {
    /// `spiffe://<td>/ns/<namespace>/svc/<name>`: a service instance.
    Workload {
        /// Trust domain.
        trust_domain: TrustDomain,
        /// The service.
        service: ServiceKey,
    },
    /// `spiffe://<td>/node/<name>`: a meshd host.
    Node {
        /// Trust domain.
        trust_domain: TrustDomain,
        /// Node name.
        name: NodeName,
    },
    /// `spiffe://<td>/registry`: the registry's serving identity.
    Registry {
        /// Trust domain.
        trust_domain: TrustDomain,
    },
    /// `spiffe://<td>/admin/<name>`: an operator credential (meshctl), full access.
    Admin {
        /// Trust domain.
        trust_domain: TrustDomain,
        /// Operator name.
        name: Label,
    },
    /// `spiffe://<td>/viewer/<name>`: a read-only operator credential (get, history, list).
    Viewer {
        /// Trust domain.
        trust_domain: TrustDomain,
        /// Operator name.
        name: Label,
    },
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Validates a trust domain: a lowercase DNS-style name of labels separated by dots.
    pub fn new(s: &str) -> Result<Self, Error> {
        NodeName::new(s).map_err(|e| Error::BadTrustDomain {
            value: s.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self(s.to_owned()))
    }

    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl Identity ===

impl Identity {
    /// The workload identity of `service` in `trust_domain`.
    pub fn workload(trust_domain: &TrustDomain, service: &ServiceKey) -> Self {
        Self::Workload {
            trust_domain: trust_domain.clone(),
            service: service.clone(),
        }
    }

    /// The node identity of `name` in `trust_domain`.
    pub fn node(trust_domain: &TrustDomain, name: &NodeName) -> Self {
        Self::Node {
            trust_domain: trust_domain.clone(),
            name: name.clone(),
        }
    }

    /// The registry's identity in `trust_domain`.
    pub fn registry(trust_domain: &TrustDomain) -> Self {
        Self::Registry {
            trust_domain: trust_domain.clone(),
        }
    }

    /// The trust domain this identity belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            Self::Workload { trust_domain, .. }
            | Self::Node { trust_domain, .. }
            | Self::Registry { trust_domain }
            | Self::Admin { trust_domain, .. }
            | Self::Viewer { trust_domain, .. } => trust_domain,
        }
    }

    /// Parses a `spiffe://` URI into one of the mesh's identity kinds.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| Error::NotSpiffe(uri.to_owned()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        let trust_domain = TrustDomain::new(td)?;
        let bad_name = |source| Error::BadName {
            uri: uri.to_owned(),
            source,
        };
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "svc", name] => Ok(Self::Workload {
                trust_domain,
                service: ServiceKey::new(
                    Label::new(ns).map_err(bad_name)?,
                    Label::new(name).map_err(bad_name)?,
                ),
            }),
            ["node", name] => Ok(Self::Node {
                trust_domain,
                name: NodeName::new(name).map_err(bad_name)?,
            }),
            ["registry"] => Ok(Self::Registry { trust_domain }),
            ["admin", name] => Ok(Self::Admin {
                trust_domain,
                name: Label::new(name).map_err(bad_name)?,
            }),
            ["viewer", name] => Ok(Self::Viewer {
                trust_domain,
                name: Label::new(name).map_err(bad_name)?,
            }),
            _ => Err(Error::UnknownPath(format!("/{path}"))),
        }
    }
}

impl FromStr for Identity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workload {
                trust_domain,
                service,
            } => write!(
                f,
                "spiffe://{trust_domain}/ns/{}/svc/{}",
                service.namespace, service.name
            ),
            Self::Node { trust_domain, name } => write!(f, "spiffe://{trust_domain}/node/{name}"),
            Self::Registry { trust_domain } => write!(f, "spiffe://{trust_domain}/registry"),
            Self::Admin { trust_domain, name } => {
                write!(f, "spiffe://{trust_domain}/admin/{name}")
            }
            Self::Viewer { trust_domain, name } => {
                write!(f, "spiffe://{trust_domain}/viewer/{name}")
            }
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for uri in [
            "spiffe://mesh.internal/ns/default/svc/web",
            "spiffe://mesh.internal/node/host-1.dc1",
            "spiffe://mesh.internal/registry",
            "spiffe://example/admin/operator",
            "spiffe://example/viewer/auditor",
        ] {
            let id = Identity::parse(uri).unwrap();
            assert_eq!(id.to_string(), uri);
        }
    }

    #[test]
    fn rejects() {
        let cases = [
            "https://mesh.internal/ns/default/svc/web",
            "spiffe://Mesh/ns/default/svc/web",
            "spiffe://mesh/ns/default/svc/Web",
            "spiffe://mesh/ns/default/svc",
            "spiffe://mesh/ns/default/svc/web/extra",
            "spiffe://mesh/",
            "spiffe://mesh",
            "spiffe:///registry",
            "spiffe://mesh/sa/web",
        ];
        for uri in cases {
            assert!(Identity::parse(uri).is_err(), "{uri} should be rejected");
        }
    }

    #[test]
    fn kinds() {
        let td = TrustDomain::new("mesh.internal").unwrap();
        let svc = ServiceKey::parse("shop/api").unwrap();
        let id = Identity::workload(&td, &svc);
        assert_eq!(id.to_string(), "spiffe://mesh.internal/ns/shop/svc/api");
        assert_eq!(id.trust_domain(), &td);
        assert!(matches!(
            Identity::parse("spiffe://mesh.internal/registry").unwrap(),
            Identity::Registry { .. }
        ));
    }
}
