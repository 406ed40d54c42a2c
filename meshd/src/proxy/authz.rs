//! Inbound authorization glue: the attributes of one accepted connection, turned into an
//! [`authz::Request`] and decided over the current policy snapshot, plus the bounded metric
//! labels of a decision. The rules themselves live in `mesh_api::policy::authz`.
//!
//! The destination port given to policy is the local service's app port (the port of its
//! `address`), not meshd's shared inbound port: every service on a host arrives on the same
//! inbound port, so only the app port tells `to.ports` rules apart (as Istio matches the
//! workload's target port).

use std::net::IpAddr;

use mesh_api::Identity;
use mesh_api::policy::Snapshot;
use mesh_api::policy::authz::{self, Decision, Request, Workload};

use crate::config::Service;

/// Metric `reason` of a connection closed because a policy change no longer allows it.
pub const REASON_POLICY_CHANGED: &str = "policy_changed";
/// Metric `reason` of an allow by a matching ALLOW policy.
pub const REASON_ALLOW_POLICY: &str = "allow_policy";
/// Metric `reason` of an allow because no ALLOW policy selects the service (mesh default).
pub const REASON_DEFAULT_ALLOW: &str = "default_allow";
/// Metric `reason` (and `x-mesh-error`) of a caller refused because the node holds no policy
/// snapshot yet: it fails closed.
pub const REASON_NO_POLICY: &str = "no_policy";
/// Metric `reason` of an AUDIT policy match (counted besides the allow or deny).
pub const REASON_AUDIT_POLICY: &str = "audit_policy";

/// An HTTP request's headers as policy reads them, without copying them.
pub struct HeaderView<'a>(pub &'a http::HeaderMap);

impl authz::Headers for HeaderView<'_> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool {
        // HeaderMap names are lowercase; `get_all` with a &str lowercases the name it looks up.
        (self.0.get_all(name).iter()).any(|v| f(&String::from_utf8_lossy(v.as_bytes())))
    }
}

/// What policy sees of one inbound connection; kept for the connection's life so a policy
/// change can be re-evaluated against it.
#[derive(Clone, Copy)]
pub struct Attrs<'a> {
    /// The caller's verified workload identity; `None` for plaintext (PERMISSIVE only).
    pub caller: Option<&'a Identity>,
    /// The caller's address as seen by this host.
    pub source_ip: IpAddr,
    /// The local service called.
    pub service: &'a Service,
    /// The request, when the connection carries HTTP; `None` for a byte stream, which HTTP
    /// rules then treat as Istio does TCP (fail closed).
    pub http: Option<authz::Http<'a>>,
}

// === impl Attrs ===

impl Attrs<'_> {
    /// The request policy evaluates.
    pub fn request(&self) -> Request<'_> {
        Request {
            source: self.caller,
            source_ip: self.source_ip,
            workload: Workload {
                service: &self.service.key,
                labels: &self.service.labels,
            },
            port: self.service.address.port(),
            http: self.http,
        }
    }

    /// Decides over `snapshot`: mTLS mode for plaintext callers, then authorization.
    pub fn decide(&self, snapshot: &Snapshot) -> Decision {
        authz::decide(snapshot, &self.request())
    }
}

/// `decision` and `reason` metric labels of `d`; `revoked` when an open connection is closed
/// by a policy change.
pub fn labels(d: &Decision, revoked: bool) -> (&'static str, &'static str) {
    match d {
        Decision::Allow {
            policy: Some(_), ..
        } => ("allow", REASON_ALLOW_POLICY),
        Decision::Allow { policy: None, .. } => ("allow", REASON_DEFAULT_ALLOW),
        Decision::Deny { .. } if revoked => ("deny", REASON_POLICY_CHANGED),
        Decision::Deny { reason, .. } => ("deny", reason),
    }
}

/// The caller for logs: its SPIFFE ID, or `plaintext` when it has none.
pub fn caller_text(caller: Option<&Identity>) -> String {
    caller.map_or_else(|| "plaintext".to_owned(), ToString::to_string)
}

/// The policy that decided `d` (`Kind/ns/name`), or empty for a default.
pub fn policy_of(d: &Decision) -> String {
    match d {
        Decision::Allow { policy, .. } | Decision::Deny { policy, .. } => {
            policy.as_ref().map(ToString::to_string).unwrap_or_default()
        }
    }
}

/// The service of a workload identity (node and operator identities call no service).
pub fn workload_service(id: &Identity) -> Option<mesh_api::ServiceKey> {
    match id {
        Identity::Workload { service, .. } => Some(service.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::policy::parse_file;
    use mesh_api::{ServiceKey, TrustDomain};

    use super::*;

    fn service(address: &str) -> Service {
        Service {
            key: ServiceKey::parse("shop/api").unwrap(),
            address: address.parse().unwrap(),
            listen: None,
            protocol: crate::config::Protocol::Tcp,
            labels: BTreeMap::from([("version".to_owned(), "v2".to_owned())]),
            upstreams: vec![],
            http_proxy: None,
            checks: Vec::new(),
            file: "api.toml".into(),
        }
    }

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::new(1, parse_file("t.toml", text).unwrap())
    }

    fn caller(svc: &str) -> Identity {
        Identity::workload(
            &TrustDomain::new("mesh.test").unwrap(),
            &ServiceKey::parse(svc).unwrap(),
        )
    }

    const POLICY: &str = r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "web-to-api-v2"
namespace = "shop"
selector = { service = "api", labels = { version = "v2" } }
rules = [{ from = [{ principals = ["spiffe://mesh.test/ns/shop/svc/web"] }], to = [{ ports = [8080] }] }]

[[resource]]
kind = "AuthorizationPolicy"
name = "watch-ops"
namespace = "mesh-system"
action = "audit"
rules = [{ from = [{ namespaces = ["ops"] }] }]

[[resource]]
kind = "AuthorizationPolicy"
name = "no-lab"
namespace = "shop"
action = "deny"
rules = [{ from = [{ ip_blocks = ["10.66.0.0/16"] }] }]
"#;

    #[test]
    fn decisions_use_identity_labels_app_port_and_ip() {
        let snap = snapshot(POLICY);
        let api = service("127.0.0.1:8080");
        let web = caller("shop/web");
        let ops = caller("ops/tool");
        let attrs = |caller, ip: &str, svc| Attrs {
            caller: Some(caller),
            source_ip: ip.parse().unwrap(),
            service: svc,
            http: None,
        };

        let d = attrs(&web, "10.1.2.3", &api).decide(&snap);
        assert_eq!(labels(&d, false), ("allow", REASON_ALLOW_POLICY));
        assert_eq!(policy_of(&d), "AuthorizationPolicy/shop/web-to-api-v2");

        let d = attrs(&ops, "10.1.2.3", &api).decide(&snap);
        assert_eq!(labels(&d, false), ("deny", "no_allow_match"));
        assert_eq!(policy_of(&d), "");
        assert_eq!(
            d.audit()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["AuthorizationPolicy/mesh-system/watch-ops"]
        );

        let d = attrs(&web, "10.66.0.9", &api).decide(&snap);
        assert_eq!(labels(&d, false), ("deny", "deny_policy"));
        assert_eq!(labels(&d, true), ("deny", REASON_POLICY_CHANGED));
        assert_eq!(policy_of(&d), "AuthorizationPolicy/shop/no-lab");

        // The app port is what `to.ports` sees.
        let other_port = service("127.0.0.1:9090");
        let d = attrs(&web, "10.1.2.3", &other_port).decide(&snap);
        assert!(!d.is_allowed());

        // No policy at all: the mesh default (allow).
        let d = attrs(&web, "10.1.2.3", &api).decide(&Snapshot::default());
        assert_eq!(labels(&d, false), ("allow", REASON_DEFAULT_ALLOW));

        // Plaintext: refused under the default STRICT before any policy is looked at.
        let plain = Attrs {
            caller: None,
            source_ip: "10.1.2.3".parse().unwrap(),
            service: &api,
            http: None,
        };
        let d = plain.decide(&Snapshot::default());
        assert_eq!(labels(&d, false), ("deny", "mtls_required"));
        assert_eq!(caller_text(None), "plaintext");
        assert_eq!(
            caller_text(Some(&web)),
            "spiffe://mesh.test/ns/shop/svc/web"
        );
    }
}
