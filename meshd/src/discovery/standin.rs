//! Reading a full policy snapshot that holds resources this node cannot read (a registry newer
//! than this meshd, mid-upgrade): everything readable is applied, and what is not is skipped
//! without ever widening access. An unreadable resource of a kind that grants or relaxes
//! access is replaced by a fail-closed stand-in under the same key — an AuthorizationPolicy by a
//! DENY of every caller in its namespace, a PeerAuthentication by STRICT for its namespace, a
//! MeshConfig by `default_authorization = "deny"` — so the node enforces at least as much as the
//! registry meant, until a readable version replaces it. A kind this version does not know
//! (and Route, DestinationPolicy, RateLimit, SLO, Gateway, which never grant access) is skipped.
//! Each skip is counted and reported.

use std::collections::BTreeMap;

use mesh_api::name::Label;
use mesh_api::policy::{Kind, MESH_CONFIG_NAME, Problem, ROOT_NAMESPACE, Resource, ResourceKey};
use mesh_api::proto::v1 as pb;
use serde::Serialize;

/// A resource of a snapshot this node could not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    /// `Kind/namespace/name` as the registry sent it.
    pub resource: String,
    /// Why it could not be read.
    pub problems: Vec<String>,
    /// What is enforced in its place (`None`: skipped).
    pub stand_in: Option<&'static str>,
}

/// Deny every caller (every source address is in one of these blocks).
const DENY_ALL: &str =
    r#"{"action":"deny","rules":[{"from":[{"ip_blocks":["0.0.0.0/0","::/0"]}]}]}"#;
const STRICT: &str = r#"{"mode":"strict"}"#;
const DEFAULT_DENY: &str = r#"{"default_authorization":"deny"}"#;

/// Every resource of the full snapshot `event` that reads, plus stand-ins for the unreadable
/// ones that could grant access, keyed as [`mesh_api::policy::Snapshot`] keys them.
pub fn read_full(event: &pb::PolicyEvent) -> (BTreeMap<ResourceKey, Resource>, Vec<Unreadable>) {
    let mut resources = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut stand_ins = Vec::new();
    for (i, r) in event.resources.iter().filter(|r| !r.deleted).enumerate() {
        let problems = match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
            Ok(res) => {
                resources.insert(res.key.clone(), res);
                continue;
            }
            Err(p) => p.iter().map(Problem::to_string).collect(),
        };
        let stand_in = r.kind.parse::<Kind>().ok().and_then(|k| stand_in(k, r, i));
        unreadable.push(Unreadable {
            resource: format!("{}/{}/{}", r.kind, r.namespace, r.name),
            problems,
            stand_in: stand_in.as_ref().map(|(_, what)| *what),
        });
        if let Some((res, _)) = stand_in {
            stand_ins.push(res);
        }
    }
    // A stand-in never replaces a readable resource of the same key (there is none: keys are
    // unique in a snapshot) but is inserted last so a readable duplicate could not hide it.
    for res in stand_ins {
        resources.insert(res.key.clone(), res);
    }
    (resources, unreadable)
}

/// The fail-closed stand-in for an unreadable resource of kind `kind`, and what it does.
fn stand_in(kind: Kind, r: &pb::Resource, i: usize) -> Option<(Resource, &'static str)> {
    if kind == Kind::Revocation {
        return Some((
            salvage_revocation(&r.spec_json),
            "every serial and node name it lists is denied",
        ));
    }
    let (spec, what) = match kind {
        Kind::AuthorizationPolicy => (DENY_ALL, "deny every caller in its namespace"),
        Kind::PeerAuthentication => (STRICT, "strict mTLS for its namespace"),
        Kind::MeshConfig => (DEFAULT_DENY, "default_authorization = deny"),
        _ => return None,
    };
    let (namespace, name) = if kind == Kind::MeshConfig {
        (ROOT_NAMESPACE.to_owned(), MESH_CONFIG_NAME.to_owned())
    } else {
        // A namespace that is not a label cannot be scoped: the stand-in covers the mesh.
        let ns =
            Label::new(&r.namespace).map_or_else(|_| ROOT_NAMESPACE.to_owned(), |l| l.to_string());
        let name =
            Label::new(&r.name).map_or_else(|_| format!("unreadable-{i}"), |l| l.to_string());
        (ns, name)
    };
    let res = Resource::from_json(kind.as_str(), &namespace, &name, spec)
        .expect("stand-in specs are valid resources");
    Some((res, what))
}

/// The deny-list read leniently: every well-formed serial and node name found in it, whatever
/// else is wrong (denying what it lists is the safe direction; dropping it would readmit them).
fn salvage_revocation(spec_json: &str) -> Resource {
    use mesh_api::policy::{Revocation, RevokedCert, Spec, revocation::canonical_serial};
    let v: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
    let mut r = Revocation::default();
    let entries = |key: &str| {
        v.get(key)
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default()
    };
    r.add_certs(entries("certificates").iter().filter_map(|c| {
        let serial = canonical_serial(c.get("serial")?.as_str()?)?;
        Some(RevokedCert {
            serial,
            not_after: c
                .get("not_after")
                .and_then(|n| n.as_i64())
                .unwrap_or(i64::MAX),
            identity: String::new(),
            node: String::new(),
            revoked_unix: 0,
        })
    }));
    for n in entries("nodes") {
        if let Some(name) = n
            .get("name")
            .and_then(|s| s.as_str())
            .and_then(|s| mesh_api::NodeName::new(s).ok())
        {
            r.add_node(name, 0);
        }
    }
    Resource {
        key: Revocation::key(),
        spec: Spec::Revocation(r),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::IpAddr;

    use mesh_api::policy::Snapshot;
    use mesh_api::policy::authz::{self, Workload};
    use mesh_api::{Identity, ServiceKey, TrustDomain};

    use super::*;

    fn wire(kind: &str, ns: &str, name: &str, spec: &str) -> pb::Resource {
        pb::Resource {
            kind: kind.to_owned(),
            namespace: ns.to_owned(),
            name: name.to_owned(),
            spec_json: spec.to_owned(),
            ..Default::default()
        }
    }

    fn full(resources: Vec<pb::Resource>) -> pb::PolicyEvent {
        pb::PolicyEvent {
            revision: 9,
            full_snapshot: true,
            resources,
            more: false,
        }
    }

    fn allowed(s: &Snapshot, caller: Option<&Identity>, svc: &str) -> bool {
        let service = ServiceKey::parse(svc).unwrap();
        let labels = BTreeMap::new();
        let req = authz::Request {
            source: caller,
            source_ip: "10.1.2.3".parse::<IpAddr>().unwrap(),
            workload: Workload {
                service: &service,
                labels: &labels,
            },
            port: 8080,
            http: None,
        };
        authz::decide(s, &req).is_allowed()
    }

    #[test]
    fn unreadable_resources_never_widen_access() {
        let web = Identity::workload(
            &TrustDomain::new("mesh.test").unwrap(),
            &ServiceKey::parse("shop/web").unwrap(),
        );
        let allow_web = r#"{"action":"allow","rules":[{"from":[{"namespaces":["shop"]}]}]}"#;
        let event = full(vec![
            wire("AuthorizationPolicy", "shop", "allow-web", allow_web),
            // A DENY from a newer registry, with a field this version does not know.
            wire(
                "AuthorizationPolicy",
                "billing",
                "deny-new",
                r#"{"action":"deny","rules":[],"when_v9":[1]}"#,
            ),
            wire("FutureKind", "shop", "x", "{}"),
            wire("Route", "shop", "r", r#"{"service":"api","http":"nope"}"#),
            wire(
                "PeerAuthentication",
                "shop",
                "pa",
                r#"{"mode":"sometimes"}"#,
            ),
        ]);
        let (resources, unreadable) = read_full(&event);
        let s = Snapshot {
            revision: 9,
            resources,
        };
        let stand_ins: Vec<_> = unreadable
            .iter()
            .map(|u| (u.resource.as_str(), u.stand_in))
            .collect();
        assert_eq!(
            stand_ins,
            [
                (
                    "AuthorizationPolicy/billing/deny-new",
                    Some("deny every caller in its namespace")
                ),
                ("FutureKind/shop/x", None),
                ("Route/shop/r", None),
                (
                    "PeerAuthentication/shop/pa",
                    Some("strict mTLS for its namespace")
                ),
            ]
        );
        assert!(unreadable.iter().all(|u| !u.problems.is_empty()));
        // The readable ALLOW is in force; the unreadable DENY's namespace is closed.
        assert!(allowed(&s, Some(&web), "shop/api"));
        assert!(!allowed(&s, Some(&web), "billing/ledger"));
        // Plaintext to shop is refused (strict stand-in), as STRICT is the default anyway.
        assert!(!allowed(&s, None, "shop/api"));
        // Stand-ins round-trip through the wire form (they are persisted in policy.json).
        for r in s.resources.values() {
            Resource::from_json(
                r.key.kind.as_str(),
                r.key.namespace.as_str(),
                r.key.name.as_str(),
                &r.spec_json(),
            )
            .unwrap();
        }
    }

    #[test]
    fn an_unreadable_mesh_config_denies_by_default() {
        let (resources, unreadable) = read_full(&full(vec![wire(
            "MeshConfig",
            "mesh-system",
            "default",
            r#"{"default_authorization":"allow","quantum":true}"#,
        )]));
        let s = Snapshot {
            revision: 9,
            resources,
        };
        assert_eq!(unreadable[0].stand_in, Some("default_authorization = deny"));
        let web = Identity::workload(
            &TrustDomain::new("mesh.test").unwrap(),
            &ServiceKey::parse("shop/web").unwrap(),
        );
        assert!(!allowed(&s, Some(&web), "shop/api"));
    }

    #[test]
    fn an_unscoped_policy_closes_the_mesh() {
        let (resources, _) = read_full(&full(vec![wire(
            "AuthorizationPolicy",
            "Not A Label",
            "x",
            "{}",
        )]));
        let s = Snapshot {
            revision: 9,
            resources,
        };
        let web = Identity::workload(
            &TrustDomain::new("mesh.test").unwrap(),
            &ServiceKey::parse("shop/web").unwrap(),
        );
        assert!(!allowed(&s, Some(&web), "anything/api"));
    }
}
