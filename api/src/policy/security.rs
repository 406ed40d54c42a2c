//! Security kinds: AuthorizationPolicy (who may call what), PeerAuthentication (whether plaintext
//! is accepted) and MeshConfig (mesh-wide defaults), with their readers.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::authz::MtlsMode;
use super::decode::{self, Cx, Table, choice_enum};
use super::path::{self, EscapedSlashes, Normalization};
use super::value::{self, IpBlock, Pattern};
use crate::identity::Identity;
use crate::name::Label;

choice_enum! {
    /// What an AuthorizationPolicy does with the requests it matches.
    pub enum Action {
        /// Requests must match one of the ALLOW policies that select the workload.
        Allow = "allow",
        /// Matching requests are refused, whatever ALLOW policies say.
        Deny = "deny",
        /// Matching requests are reported (access log, metrics), never blocked.
        Audit = "audit",
    }
}

choice_enum! {
    /// The mesh-wide answer for a workload that no ALLOW policy selects.
    pub enum DefaultAction {
        /// Allowed (Istio's behaviour; the default).
        Allow = "allow",
        /// Denied: every service needs an ALLOW policy (zero trust by default).
        Deny = "deny",
    }
}

/// Which workloads a policy applies to. Empty: every workload in the policy's namespace (the
/// whole mesh for [`ROOT_NAMESPACE`](super::ROOT_NAMESPACE)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Selector {
    /// Only this service (by name, within the namespaces the policy covers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Label>,
    /// Only workloads carrying all of these labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `kind = "AuthorizationPolicy"`: allow, deny or audit requests to the selected workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    /// allow (default), deny or audit.
    pub action: Action,
    /// The workloads it applies to.
    pub selector: Selector,
    /// A request matches the policy if it matches any rule; no rules match nothing.
    pub rules: Vec<Rule>,
}

/// One rule: a request matches if it comes from any `from` entry and asks for any `to` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Sources; empty (omitted) = any source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Operations; empty (omitted) = any operation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// Who is calling. Every non-empty field must match; within a field any item matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    /// SPIFFE IDs of the peer: exact, `prefix*`, `*suffix`, or `*` (any authenticated peer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<Pattern>,
    /// The peer's SPIFFE ID must match none of these (plaintext peers have none, so match).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<Pattern>,
    /// Namespace of the peer's workload identity.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Pattern>,
    /// The peer's namespace must match none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<Pattern>,
    /// The peer's IP address (the connection's source address).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
    /// The peer's IP must lie in none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpBlock>,
}

/// What is being asked for. Every non-empty field must match; within a field any item matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// Destination ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// The destination port must be none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    /// HTTP methods (case-sensitive, `GET`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The method must be none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths without the query string: exact, `prefix*`, `*suffix` or `*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Pattern>,
    /// The path must match none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<Pattern>,
    /// Lowercase header name → patterns; the header must be present with a matching value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<Pattern>>,
}

/// `kind = "PeerAuthentication"`: whether the selected workloads accept plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    /// strict (mTLS only) or permissive (mTLS and plaintext).
    pub mode: MtlsMode,
    /// The workloads it applies to; empty = the whole namespace (or mesh, in the root namespace).
    pub selector: Selector,
}

/// `kind = "MeshConfig"`, name `default` in `mesh-system`: settings for the whole mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MeshConfig {
    /// The answer for workloads no ALLOW policy selects (default allow).
    pub default_authorization: DefaultAction,
    /// The mTLS mode where no PeerAuthentication applies (default strict).
    pub default_mtls: MtlsMode,
    /// How request paths are normalized before policy and routing (default `merge_slashes`).
    pub path_normalization: Normalization,
    /// What `%2F`/`%5C` in a path do under `base`/`merge_slashes` (default `reject`).
    pub escaped_slashes: EscapedSlashes,
    /// Where apps may send through the mesh besides mesh services (default `allow_any`).
    pub outbound_traffic: OutboundTraffic,
}

choice_enum! {
    /// Which destinations outside the mesh an app may reach through its meshd (the
    /// `http_proxy` listener today; every connection once transparent mode exists).
    pub enum OutboundTraffic {
        /// Any host: one that is neither a mesh service nor an ExternalService is reached
        /// directly, without TLS origination or policy (Istio's `ALLOW_ANY`; the default).
        AllowAny = "allow_any",
        /// Only mesh services and ExternalServices; any other host is refused with an answer
        /// saying so (Istio's `REGISTRY_ONLY`).
        RegistryOnly = "registry_only",
    }
}

// === impl Selector ===

impl Selector {
    /// Whether this selector narrows nothing (applies to every workload in scope).
    pub fn is_empty(&self) -> bool {
        self.service.is_none() && self.labels.is_empty()
    }
}

fn selector(v: &Value, at: &str, cx: &mut Cx) -> Option<Selector> {
    let t = Table::new(v, at, &["service", "labels"], cx)?;
    Some(Selector {
        service: t.opt("service", cx, decode::label),
        labels: t.opt("labels", cx, decode::labels).unwrap_or_default(),
    })
}

// === impl AuthorizationPolicy ===

const AUTHZ_KEYS: &[&str] = &["action", "selector", "rules"];

pub(crate) fn authorization_policy(
    map: &Map<String, Value>,
    cx: &mut Cx,
) -> Option<AuthorizationPolicy> {
    let t = Table::from_map(map, "", AUTHZ_KEYS, cx);
    let action = t.opt("action", cx, decode::choice).unwrap_or(Action::Allow);
    let selector = t.opt("selector", cx, selector).unwrap_or_default();
    let rules = t.opt("rules", cx, |v, at, cx| decode::list(v, at, cx, rule));
    Some(AuthorizationPolicy {
        action,
        selector,
        rules: rules.unwrap_or_default(),
    })
}

fn rule(v: &Value, at: &str, cx: &mut Cx) -> Option<Rule> {
    let t = Table::new(v, at, &["from", "to"], cx)?;
    let from = t.opt("from", cx, |v, at, cx| {
        decode::nonempty_list(v, at, cx, "omit `from` to match any source", source)
    });
    let to = t.opt("to", cx, |v, at, cx| {
        decode::nonempty_list(v, at, cx, "omit `to` to match any operation", operation)
    });
    Some(Rule {
        from: from.unwrap_or_default(),
        to: to.unwrap_or_default(),
    })
}

const SOURCE_KEYS: &[&str] = &[
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "ip_blocks",
    "not_ip_blocks",
];

fn source(v: &Value, at: &str, cx: &mut Cx) -> Option<Source> {
    let before = cx.count();
    let t = Table::new(v, at, SOURCE_KEYS, cx)?;
    let patterns = |key, check, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| {
            decode::list(v, at, cx, |v, at, cx| value::pattern(v, at, cx, check))
        })
        .unwrap_or_default()
    };
    let blocks = |key, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| {
            decode::list(v, at, cx, value::ip_block)
        })
        .unwrap_or_default()
    };
    let s = Source {
        principals: patterns("principals", check_principal, cx),
        not_principals: patterns("not_principals", check_principal, cx),
        namespaces: patterns("namespaces", check_namespace, cx),
        not_namespaces: patterns("not_namespaces", check_namespace, cx),
        ip_blocks: blocks("ip_blocks", cx),
        not_ip_blocks: blocks("not_ip_blocks", cx),
    };
    if s == Source::default() && cx.count() == before {
        cx.error(
            at,
            format!(
                "an empty source entry; set at least one of {}",
                SOURCE_KEYS.join(", ")
            ),
        );
        return None;
    }
    Some(s)
}

/// Exact principals must be mesh identities; patterns must be anchored at `spiffe://`.
fn check_principal(p: &Pattern) -> Result<(), String> {
    const SHAPE: &str = "spiffe://<trust-domain>/ns/<namespace>/svc/<service>";
    match p {
        Pattern::Any | Pattern::Suffix(_) => Ok(()),
        Pattern::Exact(s) => Identity::parse(s)
            .map(|_| ())
            .map_err(|e| format!("{e}; expected {SHAPE}, `prefix*`, `*suffix` or `*`")),
        Pattern::Prefix(s) if "spiffe://".starts_with(s.as_str()) || s.starts_with("spiffe://") => {
            Ok(())
        }
        Pattern::Prefix(s) => Err(format!(
            "{s:?}* can never match: principals are SPIFFE IDs such as {SHAPE}"
        )),
    }
}

fn check_namespace(p: &Pattern) -> Result<(), String> {
    match p {
        Pattern::Exact(s) => Label::new(s)
            .map(|_| ())
            .map_err(|e| format!("{s:?} is not a valid namespace: {e}")),
        _ => Ok(()),
    }
}

const OPERATION_KEYS: &[&str] = &[
    "ports",
    "not_ports",
    "methods",
    "not_methods",
    "paths",
    "not_paths",
    "headers",
];

fn operation(v: &Value, at: &str, cx: &mut Cx) -> Option<Operation> {
    let before = cx.count();
    let t = Table::new(v, at, OPERATION_KEYS, cx)?;
    let ports = |key, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| {
            decode::list(v, at, cx, |v, at, cx| {
                decode::u16_in(v, at, cx, 1, u16::MAX)
            })
        })
        .unwrap_or_default()
    };
    let methods = |key, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| decode::list(v, at, cx, method))
            .unwrap_or_default()
    };
    let paths = |key, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| {
            decode::list(v, at, cx, |v, at, cx| value::pattern(v, at, cx, check_path))
        })
        .unwrap_or_default()
    };
    let headers = t.opt("headers", cx, |v, at, cx| {
        decode::map(v, at, cx, value::check_header_name, |v, at, cx| {
            decode::nonempty_list(
                v,
                at,
                cx,
                "use [\"*\"] to require only that the header is present",
                |v, at, cx| value::pattern(v, at, cx, |_| Ok(())),
            )
        })
    });
    let op = Operation {
        ports: ports("ports", cx),
        not_ports: ports("not_ports", cx),
        methods: methods("methods", cx),
        not_methods: methods("not_methods", cx),
        paths: paths("paths", cx),
        not_paths: paths("not_paths", cx),
        headers: headers.unwrap_or_default(),
    };
    if op == Operation::default() && cx.count() == before {
        cx.error(
            at,
            format!(
                "an empty operation entry; set at least one of {}",
                OPERATION_KEYS.join(", ")
            ),
        );
        return None;
    }
    Some(op)
}

/// HTTP methods are case-sensitive tokens; lowercase ones are almost always a mistake.
pub(crate) fn method(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let m = decode::nonempty(v, at, cx)?;
    if !m
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        cx.error(
            at,
            format!(
                "{m:?} is not an HTTP method; methods are case-sensitive, e.g. {:?}",
                m.to_ascii_uppercase()
            ),
        );
        return None;
    }
    Some(m)
}

fn check_path(p: &Pattern) -> Result<(), String> {
    match p {
        Pattern::Exact(s) | Pattern::Prefix(s) if !s.starts_with('/') => Err(format!(
            "{p} must start with '/' (or be \"*\" or \"*suffix\"), e.g. \"/api/*\""
        )),
        Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) if s.contains('?') => Err(
            format!("{p}: paths are matched without the query string; drop the '?...' part"),
        ),
        _ => Ok(()),
    }
}

// === impl PeerAuthentication ===

pub(crate) fn peer_authentication(
    map: &Map<String, Value>,
    cx: &mut Cx,
) -> Option<PeerAuthentication> {
    let t = Table::from_map(map, "", &["mode", "selector"], cx);
    let mode = t.req("mode", "\"strict\" or \"permissive\"", cx, decode::choice);
    let selector = t.opt("selector", cx, selector).unwrap_or_default();
    Some(PeerAuthentication {
        mode: mode?,
        selector,
    })
}

// === impl MeshConfig ===

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            default_authorization: DefaultAction::Allow,
            default_mtls: MtlsMode::Strict,
            path_normalization: path::DEFAULT_NORMALIZATION,
            escaped_slashes: path::DEFAULT_ESCAPED_SLASHES,
            outbound_traffic: OutboundTraffic::AllowAny,
        }
    }
}

impl MeshConfig {
    /// The path normalization settings.
    pub fn path_options(&self) -> path::Options {
        path::Options {
            normalization: self.path_normalization,
            escaped_slashes: self.escaped_slashes,
        }
    }
}

const MESH_CONFIG_KEYS: &[&str] = &[
    "default_authorization",
    "default_mtls",
    "path_normalization",
    "escaped_slashes",
    "outbound_traffic",
];

pub(crate) fn mesh_config(map: &Map<String, Value>, cx: &mut Cx) -> Option<MeshConfig> {
    let t = Table::from_map(map, "", MESH_CONFIG_KEYS, cx);
    let d = MeshConfig::default();
    Some(MeshConfig {
        default_authorization: t
            .opt("default_authorization", cx, decode::choice)
            .unwrap_or(d.default_authorization),
        default_mtls: t
            .opt("default_mtls", cx, decode::choice)
            .unwrap_or(d.default_mtls),
        path_normalization: t
            .opt("path_normalization", cx, decode::choice)
            .unwrap_or(d.path_normalization),
        escaped_slashes: t
            .opt("escaped_slashes", cx, decode::choice)
            .unwrap_or(d.escaped_slashes),
        outbound_traffic: t
            .opt("outbound_traffic", cx, decode::choice)
            .unwrap_or(d.outbound_traffic),
    })
}
