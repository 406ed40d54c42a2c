//! Revocation: the registry-owned deny-list of revoked certificates and removed nodes, the
//! pure edits the registry makes to it, and [`DenyList`], the form every meshd checks
//! handshakes and gossip members against.
//!
//! The deny-list rides the policy watch as one resource, `Revocation/mesh-system/revocations`,
//! so it is versioned, persisted on every node (`policy.json`) and resynced exactly like policy:
//! a node keeps enforcing it while the registry is down. Only the registry writes it (operators
//! use `meshctl node remove` / `meshctl cert revoke`; `meshctl apply` of this kind is refused).
//! Each certificate entry carries its `not_after`, so the registry prunes entries once the
//! certificate has expired anyway: the list stays as short as the live certificates it names.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table};
use super::{Kind, ResourceKey, Snapshot, Spec, root_namespace};
use crate::name::{Label, NodeName};

/// The name of a registry's own Revocation (in `mesh-system`).
pub const REVOCATION_NAME: &str = "revocations";

/// The prefix of the name of another site's Revocation, as a registry imports it from that
/// site's registry: `site-<site>`. Every meshd enforces the union of all of them.
pub const SITE_REVOCATION_PREFIX: &str = "site-";

/// Longest certificate serial accepted, hex digits: RFC 5280 caps serials at 20 octets.
pub const MAX_SERIAL_HEX: usize = 40;

/// `kind = "Revocation"`: certificates no meshd may accept and nodes gossip must drop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Revocation {
    /// Revoked certificates, by serial (sorted, so equal lists have equal JSON).
    pub certificates: Vec<RevokedCert>,
    /// Removed nodes, by name (sorted).
    pub nodes: Vec<RemovedNode>,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RevokedCert {
    /// Serial, lowercase hex without colons (as the registry's CA writes it).
    pub serial: String,
    /// When the certificate expires, Unix seconds: after that the entry is pruned.
    pub not_after: i64,
    /// The identity it carried (for people reading the list).
    pub identity: String,
    /// The node it was issued to; empty for operator credentials.
    pub node: String,
    /// When it was revoked, Unix seconds.
    pub revoked_unix: i64,
}

/// One removed node: its name may not gossip, and joins again only with a replace token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RemovedNode {
    /// The node's name.
    pub name: NodeName,
    /// When it was removed, Unix seconds.
    pub removed_unix: i64,
}

/// The compiled deny-list a meshd checks: built once per policy snapshot, read per handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    serials: HashSet<String>,
    nodes: HashSet<String>,
}

// === impl Revocation ===

impl Revocation {
    /// Adds `certs` (a serial already listed keeps its first entry). Returns how many were new.
    pub fn add_certs(&mut self, certs: impl IntoIterator<Item = RevokedCert>) -> usize {
        let mut by_serial: BTreeMap<String, RevokedCert> = std::mem::take(&mut self.certificates)
            .into_iter()
            .map(|c| (c.serial.clone(), c))
            .collect();
        let before = by_serial.len();
        for c in certs {
            by_serial.entry(c.serial.clone()).or_insert(c);
        }
        let added = by_serial.len() - before;
        self.certificates = by_serial.into_values().collect();
        added
    }

    /// Marks `name` removed at `now_unix` (kept from the first removal if already listed).
    pub fn add_node(&mut self, name: NodeName, now_unix: i64) {
        if !self.nodes.iter().any(|n| n.name == name) {
            self.nodes.push(RemovedNode {
                name,
                removed_unix: now_unix,
            });
            self.nodes.sort();
        }
    }

    /// Lifts the removal of `name` (it joined again with a replace token). Its revoked
    /// certificates stay revoked. Returns whether it was listed.
    pub fn readmit_node(&mut self, name: &str) -> bool {
        let before = self.nodes.len();
        self.nodes.retain(|n| n.name.as_str() != name);
        self.nodes.len() != before
    }

    /// Drops certificate entries that expired before `now_unix` (a TLS peer refuses them
    /// anyway). Returns how many were dropped. Removed nodes are kept: they are few, and a
    /// name must stay refused until an operator readmits it.
    pub fn prune(&mut self, now_unix: i64) -> usize {
        let before = self.certificates.len();
        self.certificates.retain(|c| c.not_after > now_unix);
        before - self.certificates.len()
    }

    /// Whether the node `name` is removed.
    pub fn is_removed(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.name.as_str() == name)
    }

    /// The compiled form.
    pub fn deny_list(&self) -> DenyList {
        DenyList {
            serials: self.certificates.iter().map(|c| c.serial.clone()).collect(),
            nodes: self.nodes.iter().map(|n| n.name.to_string()).collect(),
        }
    }

    /// The resource key of the mesh's Revocation.
    pub fn key() -> ResourceKey {
        ResourceKey::new(
            Kind::Revocation,
            root_namespace(),
            Label::new(REVOCATION_NAME).expect("\"revocations\" is a label"),
        )
    }

    /// The key under which a registry stores site `site`'s Revocation.
    pub fn site_key(site: &Label) -> Option<ResourceKey> {
        let name = Label::new(&format!("{SITE_REVOCATION_PREFIX}{site}")).ok()?;
        Some(ResourceKey::new(Kind::Revocation, root_namespace(), name))
    }

    /// Whether `name` may name a Revocation: the registry's own, or another site's.
    pub fn is_valid_name(name: &str) -> bool {
        name == REVOCATION_NAME
            || name
                .strip_prefix(SITE_REVOCATION_PREFIX)
                .is_some_and(|site| Label::new(site).is_ok())
    }

    /// Every Revocation of `snapshot` (this site's and those imported from other sites) in
    /// one: what a meshd enforces.
    pub fn merged(snapshot: &Snapshot) -> Revocation {
        let mut all = Revocation::default();
        for r in snapshot.of_kind(Kind::Revocation) {
            if let Spec::Revocation(rev) = &r.spec {
                all.add_certs(rev.certificates.iter().cloned());
                for n in &rev.nodes {
                    if !all.is_removed(n.name.as_str()) {
                        all.nodes.push(n.clone());
                    }
                }
            }
        }
        all.nodes.sort();
        all
    }

    /// The mesh's Revocation in `snapshot`, or an empty one.
    pub fn of(snapshot: &Snapshot) -> Revocation {
        static KEY: std::sync::LazyLock<ResourceKey> = std::sync::LazyLock::new(Revocation::key);
        match snapshot.resources.get(&*KEY).map(|r| &r.spec) {
            Some(Spec::Revocation(r)) => r.clone(),
            _ => Revocation::default(),
        }
    }
}

// === impl DenyList ===

impl DenyList {
    /// The deny-list of `snapshot`: every Revocation in it, this site's and other sites'
    /// (empty when it has none).
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        Revocation::merged(snapshot).deny_list()
    }

    /// Whether the certificate with this serial (lowercase hex) is revoked.
    pub fn denies_serial(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// Whether the node of this name is removed.
    pub fn denies_node(&self, name: &str) -> bool {
        self.nodes.contains(name)
    }

    /// Revoked serials and removed nodes, counted.
    pub fn len(&self) -> (usize, usize) {
        (self.serials.len(), self.nodes.len())
    }

    /// Whether nothing is denied.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty() && self.nodes.is_empty()
    }
}

/// `serial` in canonical form (lowercase hex, no colons, no leading zero octets beyond what
/// the CA writes), or `None` when it is not a certificate serial.
pub fn canonical_serial(serial: &str) -> Option<String> {
    let s: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let ok = !s.is_empty() && s.len() <= MAX_SERIAL_HEX && s.chars().all(|c| c.is_ascii_hexdigit());
    ok.then_some(s)
}

// === reading ===

pub(crate) fn revocation(map: &Map<String, Value>, cx: &mut Cx) -> Option<Revocation> {
    let t = Table::from_map(map, "", &["certificates", "nodes"], cx);
    let certificates = t
        .opt("certificates", cx, |v, at, cx| {
            decode::list(v, at, cx, revoked_cert)
        })
        .unwrap_or_default();
    let nodes = t
        .opt("nodes", cx, |v, at, cx| {
            decode::list(v, at, cx, removed_node)
        })
        .unwrap_or_default();
    let serials = certificates.iter().map(|c: &RevokedCert| c.serial.as_str());
    no_repeats(serials, "certificates", "serial", cx);
    no_repeats(nodes.iter().map(|n| n.name.as_str()), "nodes", "name", cx);
    let mut r = Revocation {
        certificates,
        nodes,
    };
    r.certificates.sort();
    r.nodes.sort();
    cx.is_clean().then_some(r)
}

fn no_repeats<'a>(items: impl Iterator<Item = &'a str>, at: &str, what: &str, cx: &mut Cx) {
    let mut seen = BTreeSet::new();
    for item in items {
        if !seen.insert(item) {
            cx.error(at, format!("{what} {item:?} is listed more than once"));
        }
    }
}

fn revoked_cert(v: &Value, at: &str, cx: &mut Cx) -> Option<RevokedCert> {
    const KEYS: &[&str] = &["serial", "not_after", "identity", "node", "revoked_unix"];
    let t = Table::new(v, at, KEYS, cx)?;
    let serial = t.req("serial", "the certificate serial in hex", cx, |v, at, cx| {
        let s = decode::string(v, at, cx)?;
        match canonical_serial(&s) {
            Some(c) if c == s => Some(c),
            _ => {
                cx.error(
                    at,
                    format!(
                        "expected a serial of 1 to {MAX_SERIAL_HEX} lowercase hex digits, found {:?}",
                        s.chars().take(64).collect::<String>()
                    ),
                );
                None
            }
        }
    });
    let not_after = t.req("not_after", "Unix seconds", cx, unix);
    let revoked_unix = t.opt("revoked_unix", cx, unix).unwrap_or(0);
    let identity = t.opt("identity", cx, decode::string).unwrap_or_default();
    let node = t.opt("node", cx, decode::string).unwrap_or_default();
    Some(RevokedCert {
        serial: serial?,
        not_after: not_after?,
        identity,
        node,
        revoked_unix,
    })
}

fn removed_node(v: &Value, at: &str, cx: &mut Cx) -> Option<RemovedNode> {
    let t = Table::new(v, at, &["name", "removed_unix"], cx)?;
    let name = t.req("name", "a node name", cx, |v, at, cx| {
        let s = decode::string(v, at, cx)?;
        NodeName::new(&s)
            .map_err(|e| cx.error(at, format!("not a node name: {e}")))
            .ok()
    });
    let removed_unix = t.opt("removed_unix", cx, unix).unwrap_or(0);
    Some(RemovedNode {
        name: name?,
        removed_unix,
    })
}

fn unix(v: &Value, at: &str, cx: &mut Cx) -> Option<i64> {
    decode::uint(v, at, cx, 0, i64::MAX as u64).map(|n| n as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Resource;

    fn cert(serial: &str, not_after: i64) -> RevokedCert {
        RevokedCert {
            serial: serial.to_owned(),
            not_after,
            identity: "spiffe://mesh.test/node/a".to_owned(),
            node: "a".to_owned(),
            revoked_unix: 5,
        }
    }

    #[test]
    fn edits_keep_the_list_sorted_unique_and_pruned() {
        let mut r = Revocation::default();
        assert_eq!(r.add_certs([cert("0b", 100), cert("0a", 50)]), 2);
        assert_eq!(
            r.add_certs([cert("0a", 999)]),
            0,
            "a listed serial keeps its entry"
        );
        assert_eq!(r.certificates[0].not_after, 50);
        r.add_node(NodeName::new("b").unwrap(), 7);
        r.add_node(NodeName::new("a").unwrap(), 8);
        r.add_node(NodeName::new("a").unwrap(), 9);
        assert_eq!(r.nodes.len(), 2);
        assert_eq!(r.nodes[0].removed_unix, 8);
        assert!(r.is_removed("a") && !r.is_removed("c"));
        assert_eq!(r.prune(50), 1, "expired at 50: pruned at 50");
        let d = r.deny_list();
        assert!(d.denies_serial("0b") && !d.denies_serial("0a"));
        assert!(d.denies_node("a") && d.denies_node("b"));
        assert!(r.readmit_node("a") && !r.readmit_node("a"));
        assert!(!r.deny_list().denies_node("a"));
    }

    #[test]
    fn round_trips_through_canonical_json() {
        let mut r = Revocation::default();
        r.add_certs([cert("ff01", 100), cert("0a", 50)]);
        r.add_node(NodeName::new("node-1").unwrap(), 3);
        let key = Revocation::key();
        let res = Resource {
            key: key.clone(),
            spec: Spec::Revocation(r.clone()),
        };
        let back = Resource::from_json(
            "Revocation",
            key.namespace.as_str(),
            key.name.as_str(),
            &res.spec_json(),
        )
        .unwrap();
        assert_eq!(back, res);
        let snap = Snapshot::new(1, [back]);
        assert_eq!(Revocation::of(&snap), r);
        assert!(DenyList::from_snapshot(&snap).denies_serial("ff01"));
        assert!(DenyList::from_snapshot(&Snapshot::default()).is_empty());
    }

    #[test]
    fn other_sites_revocations_are_enforced_too() {
        let mut own = Revocation::default();
        own.add_certs([cert("0a", 100)]);
        own.add_node(NodeName::new("a").unwrap(), 1);
        let mut b = Revocation::default();
        b.add_certs([cert("0b", 100), cert("0a", 999)]);
        b.add_node(NodeName::new("web-b").unwrap(), 2);
        b.add_node(NodeName::new("a").unwrap(), 3);
        let site_b = Revocation::site_key(&Label::new("b").unwrap()).unwrap();
        assert_eq!(site_b.to_string(), "Revocation/mesh-system/site-b");
        let snap = Snapshot::new(
            1,
            [
                Resource {
                    key: Revocation::key(),
                    spec: Spec::Revocation(own.clone()),
                },
                Resource {
                    key: site_b,
                    spec: Spec::Revocation(b),
                },
            ],
        );
        assert_eq!(
            Revocation::of(&snap),
            own,
            "the registry edits its own only"
        );
        let merged = Revocation::merged(&snap);
        assert_eq!(merged.certificates.len(), 2);
        assert_eq!(merged.nodes.len(), 2);
        let deny = DenyList::from_snapshot(&snap);
        assert!(deny.denies_serial("0a") && deny.denies_serial("0b"));
        assert!(deny.denies_node("web-b") && deny.denies_node("a"));
        for (name, ok) in [
            ("revocations", true),
            ("site-b", true),
            ("site-", false),
            ("site-B", false),
            ("other", false),
        ] {
            assert_eq!(Revocation::is_valid_name(name), ok, "{name}");
            let parsed = Resource::from_json("Revocation", "mesh-system", name, "{}");
            assert_eq!(parsed.is_ok(), ok, "{name}: {parsed:?}");
        }
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            (
                r#"{"certificates":[{"serial":"AB","not_after":1}]}"#,
                "certificates[0].serial",
            ),
            (
                r#"{"certificates":[{"serial":"zz","not_after":1}]}"#,
                "certificates[0].serial",
            ),
            (
                r#"{"certificates":[{"serial":"ab"}]}"#,
                "certificates[0].not_after",
            ),
            (
                r#"{"certificates":[{"serial":"ab","not_after":1},{"serial":"ab","not_after":2}]}"#,
                "certificates",
            ),
            (r#"{"nodes":[{"name":"Bad Name"}]}"#, "nodes[0].name"),
            (r#"{"nodes":[{"name":"a"}],"extra":1}"#, "extra"),
        ];
        for (json, key) in cases {
            let problems = Resource::from_json("Revocation", "mesh-system", REVOCATION_NAME, json)
                .unwrap_err();
            assert!(
                problems.iter().any(|p| p.key == key),
                "{json}: expected a problem at {key}, got {problems:?}"
            );
        }
        let named = Resource::from_json("Revocation", "mesh-system", "other", "{}").unwrap_err();
        assert!(named.iter().any(|p| p.key == "name"), "{named:?}");
    }

    #[test]
    fn serials_are_canonicalised() {
        assert_eq!(canonical_serial("AB:cd:01").as_deref(), Some("abcd01"));
        assert_eq!(canonical_serial(""), None);
        assert_eq!(canonical_serial("xyz"), None);
        assert_eq!(canonical_serial(&"a".repeat(41)), None);
    }
}
