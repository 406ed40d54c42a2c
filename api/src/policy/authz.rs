//! Authorization and mTLS decisions: pure functions over a policy [`Snapshot`] and one request,
//! so the proxy's enforcement is a thin wrapper and every rule is table-tested without sockets.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::net::IpAddr;

use super::decode::choice_enum;
use super::{Action, AuthorizationPolicy, DefaultAction, Kind, Operation, ROOT_NAMESPACE};
use super::{Pattern, ResourceKey, Rule, Selector, Snapshot, Source, Spec};
use crate::identity::Identity;
use crate::name::{Label, ServiceKey};

/// [`Decision::Deny`] reason: a DENY policy matched.
pub const REASON_DENY_POLICY: &str = "deny_policy";
/// [`Decision::Deny`] reason: ALLOW policies select the workload and none matched.
pub const REASON_NO_ALLOW_MATCH: &str = "no_allow_match";
/// [`Decision::Deny`] reason: no ALLOW policy selects the workload and the mesh default is deny.
pub const REASON_DEFAULT_DENY: &str = "default_deny";

/// [`Decision::Deny`] reason: a plaintext request to a workload whose mTLS mode is STRICT.
pub const REASON_MTLS_REQUIRED: &str = "mtls_required";

/// The local workload a request is for.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// Its service.
    pub service: &'a ServiceKey,
    /// Its labels (from its service definition).
    pub labels: &'a BTreeMap<String, String>,
}

/// Request headers as authorization reads them. The proxy implements it over its own header
/// map, so deciding a request copies no header.
pub trait Headers {
    /// Whether some value of the header `name` (ASCII case-insensitive) satisfies `f`; a
    /// name may repeat.
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool;
}

impl Headers for Vec<(String, String)> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool {
        self.iter()
            .any(|(n, v)| n.eq_ignore_ascii_case(name) && f(v))
    }
}

/// The HTTP part of a request.
#[derive(Clone, Copy)]
pub struct Http<'a> {
    /// Method, as sent (`GET`).
    pub method: &'a str,
    /// Request path; a query string or fragment is ignored for matching.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a (dyn Headers + Sync),
}

impl std::fmt::Debug for Http<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One inbound request (or, for TCP, connection) to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified peer identity; `None` = plaintext (accepted only in PERMISSIVE mode).
    pub source: Option<&'a Identity>,
    /// The peer's address.
    pub source_ip: IpAddr,
    /// The workload being called.
    pub workload: Workload<'a>,
    /// The destination port.
    pub port: u16,
    /// `None` for TCP.
    pub http: Option<Http<'a>>,
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through.
    Allow {
        /// The ALLOW policy that matched; `None` when no ALLOW policy selects the workload and
        /// the mesh default is allow.
        policy: Option<ResourceKey>,
        /// AUDIT policies that matched.
        audit: Vec<ResourceKey>,
    },
    /// Refuse the request.
    Deny {
        /// The DENY policy that matched; `None` for the other reasons.
        policy: Option<ResourceKey>,
        /// [`REASON_DENY_POLICY`], [`REASON_NO_ALLOW_MATCH`], [`REASON_DEFAULT_DENY`] or
        /// [`REASON_MTLS_REQUIRED`].
        reason: &'static str,
        /// AUDIT policies that matched.
        audit: Vec<ResourceKey>,
    },
}

choice_enum! {
    /// Whether a workload accepts plaintext (PeerAuthentication `mode`, MeshConfig `default_mtls`).
    pub enum MtlsMode {
        /// mTLS only.
        Strict = "strict",
        /// mTLS and plaintext (for migrating clients into the mesh).
        Permissive = "permissive",
    }
}

/// The peer facts rules look at, computed once per request (the URI only if a rule needs it).
struct Peer<'a> {
    identity: Option<&'a Identity>,
    uri: OnceCell<Option<String>>,
    namespace: Option<&'a str>,
    ip: IpAddr,
}

// === impl Decision ===

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }

    /// The AUDIT policies that matched.
    pub fn audit(&self) -> &[ResourceKey] {
        match self {
            Self::Allow { audit, .. } | Self::Deny { audit, .. } => audit,
        }
    }
}

// === authorize ===

/// Istio's order: a matching DENY policy denies; then, if any ALLOW policy selects the workload,
/// the request must match one of them; otherwise the MeshConfig default decides. Matching AUDIT
/// policies are listed either way and never change the outcome.
///
/// For TCP requests (no `http`), a `to` entry that uses HTTP fields (methods, paths, headers)
/// never matches in ALLOW and AUDIT policies, while in DENY policies those fields are ignored so
/// the entry matches on its other fields: unenforceable rules fail closed, as in Istio.
pub fn authorize(snapshot: &Snapshot, req: &Request<'_>) -> Decision {
    let peer = Peer::of(req);
    let mut audit = Vec::new();
    let mut deny = None;
    let mut allow_selects = false;
    let mut allow = None;
    for (key, policy) in selecting(snapshot, &req.workload) {
        match policy.action {
            Action::Deny if deny.is_none() && policy_matches(policy, &peer, req) => {
                deny = Some(key.clone());
            }
            Action::Allow => {
                allow_selects = true;
                if allow.is_none() && policy_matches(policy, &peer, req) {
                    allow = Some(key.clone());
                }
            }
            Action::Audit if policy_matches(policy, &peer, req) => audit.push(key.clone()),
            _ => {}
        }
    }
    if let Some(policy) = deny {
        return Decision::Deny {
            policy: Some(policy),
            reason: REASON_DENY_POLICY,
            audit,
        };
    }
    if allow_selects {
        return match allow {
            Some(policy) => Decision::Allow {
                policy: Some(policy),
                audit,
            },
            None => Decision::Deny {
                policy: None,
                reason: REASON_NO_ALLOW_MATCH,
                audit,
            },
        };
    }
    match snapshot.mesh_config().default_authorization {
        DefaultAction::Allow => Decision::Allow {
            policy: None,
            audit,
        },
        DefaultAction::Deny => Decision::Deny {
            policy: None,
            reason: REASON_DEFAULT_DENY,
            audit,
        },
    }
}

/// The whole inbound decision: a plaintext request (no verified source) is refused unless the
/// workload's mTLS mode ([`mtls_mode`]) is PERMISSIVE; what passes is [`authorize`]d. As in
/// Istio, a plaintext caller has no identity, so rules on principals or namespaces never match
/// it and only `ip_blocks`, ports and HTTP fields can let it through an ALLOW policy.
pub fn decide(snapshot: &Snapshot, req: &Request<'_>) -> Decision {
    if req.source.is_none() && mtls_mode(snapshot, &req.workload) == MtlsMode::Strict {
        return Decision::Deny {
            policy: None,
            reason: REASON_MTLS_REQUIRED,
            audit: Vec::new(),
        };
    }
    authorize(snapshot, req)
}

/// The AuthorizationPolicies that apply to `workload`, in key order: those of its namespace and
/// of the root namespace whose selector matches it.
pub fn selecting<'s>(
    snapshot: &'s Snapshot,
    workload: &Workload<'_>,
) -> impl Iterator<Item = (&'s ResourceKey, &'s AuthorizationPolicy)> {
    scopes(snapshot, Kind::AuthorizationPolicy, workload).filter_map(move |(r, _)| match &r.spec {
        Spec::AuthorizationPolicy(p) if selector_matches(&p.selector, workload) => {
            Some((&r.key, p))
        }
        _ => None,
    })
}

/// Resources of `kind` in the workload's namespace and the root namespace, in key order, each
/// with whether it comes from the workload's own namespace.
fn scopes<'s, 'w>(
    snapshot: &'s Snapshot,
    kind: Kind,
    workload: &Workload<'w>,
) -> impl Iterator<Item = (&'s super::Resource, bool)> + use<'s, 'w> {
    let own: &'w Label = &workload.service.namespace;
    let root = super::root_namespace_ref();
    let (first, second) = if own.as_str() <= ROOT_NAMESPACE {
        (own, (own != root).then_some(root))
    } else {
        (root, Some(own))
    };
    let firsts = snapshot.in_namespace(kind, first);
    let seconds = second
        .map(|ns| snapshot.in_namespace(kind, ns))
        .into_iter()
        .flatten();
    firsts
        .chain(seconds)
        .map(move |r| (r, r.key.namespace == *own))
}

fn selector_matches(selector: &Selector, workload: &Workload<'_>) -> bool {
    selector
        .service
        .as_ref()
        .is_none_or(|s| *s == workload.service.name)
        && selector
            .labels
            .iter()
            .all(|(k, v)| workload.labels.get(k) == Some(v))
}

fn policy_matches(policy: &AuthorizationPolicy, peer: &Peer<'_>, req: &Request<'_>) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| rule_matches(rule, policy.action, peer, req))
}

fn rule_matches(rule: &Rule, action: Action, peer: &Peer<'_>, req: &Request<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, action, req)))
}

fn source_matches(s: &Source, peer: &Peer<'_>) -> bool {
    // A peer without a principal or namespace matches no list of them, and so every `not_` list.
    let any = |patterns: &[Pattern], value: Option<&str>| {
        value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
    };
    let uri = || peer.uri();
    (s.principals.is_empty() || any(&s.principals, uri()))
        && (s.not_principals.is_empty() || !any(&s.not_principals, uri()))
        && (s.namespaces.is_empty() || any(&s.namespaces, peer.namespace))
        && !any(&s.not_namespaces, peer.namespace)
        && any_or_empty(&s.ip_blocks, |b| b.contains(peer.ip))
        && !s.not_ip_blocks.iter().any(|b| b.contains(peer.ip))
}

fn operation_matches(o: &Operation, action: Action, req: &Request<'_>) -> bool {
    if !any_or_empty(&o.ports, |p| *p == req.port) || o.not_ports.contains(&req.port) {
        return false;
    }
    let Some(http) = &req.http else {
        let http_fields = !(o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty()
            && o.headers.is_empty());
        // Fail closed: an HTTP-only condition cannot be checked on TCP, so ALLOW/AUDIT do not
        // match and DENY matches on the remaining fields.
        return !http_fields || action == Action::Deny;
    };
    let path = http.path.split(['?', '#']).next().unwrap_or_default();
    any_or_empty(&o.methods, |m| m == http.method)
        && !o.not_methods.iter().any(|m| m == http.method)
        && any_or_empty(&o.paths, |p| p.matches(path))
        && !o.not_paths.iter().any(|p| p.matches(path))
        && o.headers.iter().all(|(name, patterns)| {
            (http.headers).any_value(name, &mut |v| patterns.iter().any(|p| p.matches(v)))
        })
}

fn any_or_empty<T>(items: &[T], f: impl FnMut(&T) -> bool) -> bool {
    items.is_empty() || items.iter().any(f)
}

// === impl Peer ===

impl<'a> Peer<'a> {
    fn of(req: &Request<'a>) -> Self {
        Self {
            identity: req.source,
            uri: OnceCell::new(),
            namespace: match req.source {
                Some(Identity::Workload { service, .. }) => Some(service.namespace.as_str()),
                _ => None,
            },
            ip: req.source_ip,
        }
    }

    /// The peer's SPIFFE ID; `None` for plaintext.
    fn uri(&self) -> Option<&str> {
        self.uri
            .get_or_init(|| self.identity.map(ToString::to_string))
            .as_deref()
    }
}

// === mtls_mode ===

/// The mTLS mode of `workload`: the first that exists of a PeerAuthentication in its namespace
/// whose selector picks it, one in its namespace without a selector, one in the root namespace
/// whose selector picks it, one in the root namespace without a selector, and finally
/// MeshConfig's `default_mtls` (strict). Ties go to the first name in order.
pub fn mtls_mode(snapshot: &Snapshot, workload: &Workload<'_>) -> MtlsMode {
    let mut best: Option<(u8, MtlsMode)> = None;
    for (r, own) in scopes(snapshot, Kind::PeerAuthentication, workload) {
        let Spec::PeerAuthentication(pa) = &r.spec else {
            continue;
        };
        if !selector_matches(&pa.selector, workload) {
            continue;
        }
        let rank = match (own, pa.selector.is_empty()) {
            (true, false) => 0,
            (true, true) => 1,
            (false, false) => 2,
            (false, true) => 3,
        };
        if best.is_none_or(|(b, _)| rank < b) {
            best = Some((rank, pa.mode));
        }
    }
    best.map_or_else(|| snapshot.mesh_config().default_mtls, |(_, mode)| mode)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
