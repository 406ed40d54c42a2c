//! Policy resources: the typed, validated model of everything an operator applies with
//! `meshctl apply -f` — AuthorizationPolicy, PeerAuthentication, Route, DestinationPolicy,
//! RateLimit, SLO, Gateway, ExternalService, ServiceExport and MeshConfig — and of the two the registry writes itself and pushes
//! the same way (Revocation, the deny-list; TrustBundle, the roots), their TOML file format,
//! their canonical JSON wire form, and (in [`authz`]) the pure authorization and mTLS decisions
//! over a [`Snapshot`].
//!
//! # File format
//!
//! One TOML file holds any number of resources, each a `[[resource]]` table with `kind`, `name`
//! and `namespace` (default `"default"`) beside the kind's own fields:
//!
//! ```toml
//! [[resource]]
//! kind = "AuthorizationPolicy"
//! name = "api-allow-web"
//! namespace = "shop"
//! action = "allow"                      # allow (default) | deny | audit
//! [resource.selector]                   # omitted: every workload in the namespace
//! service = "api"
//! labels = { version = "v1" }
//! [[resource.rules]]                    # matches if ANY rule matches; no rules match nothing
//! from = [{ principals = ["spiffe://mesh.internal/ns/shop/svc/web"] }]
//! to = [{ methods = ["GET"], paths = ["/api/*"] }]
//! ```
//!
//! Every key is checked: unknown keys, wrong types and out-of-range values are errors, and all
//! of them are reported at once as [`Problem`]s naming the file, the resource (`Kind/ns/name`,
//! or `resource[i]` while its key is unknown), the dotted key (`rules[0].from[1].ip_blocks[2]`)
//! and what would be valid. Durations are humane (`"250ms"`, `"2s"`, `"1m30s"`, `"30d"`).
//! Enumerated values are written lowercase; Istio's uppercase spellings (`ALLOW`, `STRICT`) are
//! accepted too. On the wire a resource is its kind, namespace, name and the rest of its fields
//! as JSON ([`Resource::spec_json`]): the same shape as the TOML table, with every default filled
//! in, so equal specs have equal strings. Versions of a resource are the registry's revisions.
//!
//! # Scope
//!
//! A resource applies within its namespace. AuthorizationPolicy and PeerAuthentication in the
//! root namespace [`ROOT_NAMESPACE`] (`mesh-system`) apply to every workload in the mesh; a
//! selector there still narrows by service name and labels. The `service` of Route,
//! DestinationPolicy, RateLimit, SLO, a Gateway listener and a gateway Route's destinations
//! names a service in the resource's namespace, and a Route's `gateways` a Gateway there. MeshConfig exists once: name `default` in `mesh-system` (the namespace may be
//! omitted for it). So do Revocation (`revocations`) and TrustBundle (`roots`), which only the
//! registry writes.
//!
//! # Authorization
//!
//! As Istio: DENY policies first (any match denies), then ALLOW (when any ALLOW policy selects
//! the workload, a request must match one of them), AUDIT only reports. A rule matches when the
//! request comes from ANY of its `from` entries and asks for ANY of its `to` entries; within an
//! entry every given field must match, and a list matches when any item does. See
//! [`authz::authorize`] and [`authz::mtls_mode`].
//!
//! # Differences from Istio
//!
//! * Format: TOML with snake_case keys; `kind`/`name`/`namespace` sit flat on the resource (no
//!   `apiVersion`, `metadata` or `spec` nesting); one file holds several kinds.
//! * Selectors pick a service by name and/or labels (Istio: pod `matchLabels`).
//! * Mesh-wide default: `MeshConfig.default_authorization = "deny"` denies every workload that
//!   no ALLOW policy selects (in Istio, an empty ALLOW policy in the root namespace). Also
//!   `default_mtls` sets the mesh-wide mTLS mode where no PeerAuthentication applies.
//! * Paths are normalized before authorization, rate limits and routing, and the app receives
//!   the normalized path: `MeshConfig.path_normalization` = `none` | `base` | `merge_slashes`
//!   (the default; Istio's default is `NONE`) | `decode_and_merge_slashes`, and
//!   `escaped_slashes` = `reject` (400, the default) | `keep`. See [`path`].
//! * AuthorizationPolicy: no `CUSTOM` action, `when` conditions, `request_principals` (JWT),
//!   `hosts`, or `remote_ip_blocks`. Header conditions live in `to` entries as
//!   `headers = { "x-env" = ["prod", "stag*"] }` (Istio: `when: request.headers[...]`), names
//!   lowercase, values with the same wildcards as principals. Principals are full SPIFFE IDs
//!   (`spiffe://mesh.internal/ns/web/svc/api`, not `cluster.local/ns/web/sa/api`); an exact one
//!   must be a valid mesh identity and a `prefix*` must start with `spiffe://`. `*` matches any
//!   authenticated peer and never a plaintext one. `namespaces` is the namespace of the peer's
//!   workload identity (other identities and plaintext peers have none, so only `not_*` fields
//!   can match them). `ip_blocks` is the connection's source address (IPv4-mapped IPv6 counts
//!   as IPv4). Paths are matched without the query string. An empty `from`, `to` or header value
//!   list, or an empty `from`/`to` entry, is refused instead of meaning "anything".
//!   On TCP, `to` entries with HTTP fields never match ALLOW/AUDIT and match DENY on their other
//!   fields, which is Istio's fail-closed behaviour.
//! * PeerAuthentication: `strict` or `permissive` only (no `DISABLE`, `UNSET`, port-level
//!   modes). Precedence: selector in the workload's namespace, then namespace-wide, then root
//!   namespace with a matching selector, then root namespace-wide, then MeshConfig. Ties go to
//!   the first name in order (Istio: the oldest).
//! * Route (Istio VirtualService): either a mesh route, for calls to one `service` (instead of
//!   `hosts`), whose destinations are subsets of that service, or a gateway route, attached to
//!   `gateways` (by name; no implicit `mesh` gateway) with optional `hostnames`, whose
//!   destinations each name a `service` (and optionally a subset of it). A destination has a
//!   `weight` (100 may be omitted for a single destination; several must sum to 100); `match` on path/headers/query with
//!   `exact`/`prefix`/`regex`, but `method` is a plain string. No redirect, rewrite, mirror or
//!   CORS. `retries` adds a Linkerd-style `budget_percent` and takes
//!   `retriable_status_codes` as a list; `retry_on` names are Envoy's. `request_headers` and
//!   `response_headers` are Istio's `headers.request`/`headers.response`.
//! * DestinationPolicy (Istio DestinationRule): the traffic policy is flat (no `trafficPolicy`,
//!   no per-subset or per-port policies); load balancing defaults to `ewma`; locality-aware
//!   routing and failover are on by default; `outlier_detection` needs at least one non-zero
//!   trigger.
//! * RateLimit and SLO have no Istio resource (Istio needs EnvoyFilter and external services).
//! * Gateway: `listeners` (Istio `servers`, Gateway API `listeners`), each with its own `bind`
//!   address instead of a port and a pod selector; the hosts that run a gateway say so in their
//!   own `meshd.toml` (`[gateway]`), not a label selector, so a policy change cannot move a
//!   gateway onto a host that did not opt in. TLS termination reads certificate files on those
//!   hosts (no Kubernetes secrets); `tls` listeners pass TLS through to one `service` by SNI.
//!   The gateway's identity is the workload identity of the service named like the Gateway.
//! * ExternalService (Istio `ServiceEntry` + the `DestinationRule` of its TLS origination, in one
//!   resource): `hosts` (exact names; no wildcards, since the mesh dials them), one `port`,
//!   `protocol` `http` | `tcp`, static `endpoints` with locality or DNS of the first host, and
//!   `tls` with a mandatory `ca_file` and a server name that is always verified (Istio lets
//!   `SIMPLE` origination skip SAN checks). `egress_gateway` names a gateway the traffic must
//!   leave through (Istio needs a Gateway, a VirtualService and a DestinationRule for that); it
//!   is authorized there by the caller's identity with AuthorizationPolicies selecting the
//!   ExternalService by name. `MeshConfig.outbound_traffic` is Istio's
//!   `outboundTrafficPolicy.mode` (`allow_any` | `registry_only`).
//! * ServiceExport (Consul's `exported-services`, Istio has none: every service behind an
//!   east-west gateway is reachable): `services` of its namespace, or `["*"]`, that other sites
//!   may call through this site's east-west gateways; nothing is exported without one.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::name::Label;

pub mod authz;
mod decode;
mod destination;
pub mod export;
pub mod external;
mod gateway;
mod parse;
pub mod path;
mod rate_limit;
pub mod revocation;
mod route;
mod security;
mod slo;
pub mod trust_bundle;
mod value;

pub use authz::MtlsMode;
pub use destination::{
    CircuitBreaker, DEFAULT_BASE_EJECTION_TIME, DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_FAILOVER_THRESHOLD, DEFAULT_LOCALITY, DEFAULT_MAX_EJECTION_PERCENT,
    DEFAULT_OUTLIER_INTERVAL, DestinationPolicy, LoadBalancer, Locality, OutlierDetection, Subset,
};
pub use export::{ExportedServices, Exports, ServiceExport};
pub use external::{
    EGRESS_SNI_SUFFIX, ExternalEndpoint, ExternalProtocol, ExternalService, TlsOrigination,
    egress_sni, parse_egress_sni,
};
pub use gateway::{
    CertificateFiles, Gateway, Hostname, Listener, ListenerProtocol, NotAttached, ProxyVersion,
    Specificity, TlsTermination, TlsVersion, attaches, best_match, normalize_host,
};
pub use rate_limit::{Limit, LimitKey, RateLimit, Unit};
pub use revocation::{
    DenyList, REVOCATION_NAME, RemovedNode, Revocation, RevokedCert, SITE_REVOCATION_PREFIX,
};
pub use route::{
    DEFAULT_RETRY_BUDGET_PERCENT, DEFAULT_RETRY_ON, Destination, Fault, FaultAbort, FaultDelay,
    HeaderOps, HttpMatch, HttpRoute, MAX_RETRY_ATTEMPTS, Retries, RetryOn, Route,
};
pub use security::{
    Action, AuthorizationPolicy, DefaultAction, MeshConfig, Operation, OutboundTraffic,
    PeerAuthentication, Rule, Selector, Source,
};
pub use slo::{
    Alerting, Calendar, DEFAULT_FAST_BURN, DEFAULT_SLOW_BURN, DEFAULT_WINDOW, Objective, Slo,
    Window,
};
pub use trust_bundle::{TRUST_BUNDLE_NAME, TrustBundle};
pub use value::{
    IpBlock, Pattern, REGEX_SIZE_LIMIT, StringMatch, compile_regex, format_duration, parse_duration,
};

/// The root namespace: AuthorizationPolicy and PeerAuthentication here apply mesh-wide, and
/// MeshConfig lives here.
pub const ROOT_NAMESPACE: &str = "mesh-system";

/// The only name a MeshConfig may have.
pub const MESH_CONFIG_NAME: &str = "default";

/// The kinds of policy resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Allow, deny or audit requests ([`AuthorizationPolicy`]).
    AuthorizationPolicy,
    /// mTLS mode ([`PeerAuthentication`]).
    PeerAuthentication,
    /// Request routing ([`Route`]).
    Route,
    /// Load balancing and resilience ([`DestinationPolicy`]).
    DestinationPolicy,
    /// Rate limits ([`RateLimit`]).
    RateLimit,
    /// Service level objectives ([`Slo`]), spelled `SLO`.
    Slo,
    /// Ingress ([`Gateway`]).
    Gateway,
    /// A destination outside the mesh ([`ExternalService`]).
    ExternalService,
    /// Services other sites may call ([`ServiceExport`]).
    ServiceExport,
    /// Mesh-wide settings ([`MeshConfig`]).
    MeshConfig,
    /// Revoked certificates and removed nodes ([`Revocation`]); written by the registry only.
    Revocation,
    /// The mesh's root certificates ([`TrustBundle`]); written by the registry only.
    TrustBundle,
}

/// A kind name that is none of [`Kind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?}; valid kinds: {list}", list = Kind::names().join(", "))]
pub struct UnknownKind(pub String);

/// Identifies a resource: kind, namespace and name. Displays as `Kind/namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    /// The kind.
    pub kind: Kind,
    /// The namespace.
    pub namespace: Label,
    /// The name, unique per kind and namespace.
    pub name: Label,
}

/// A resource's validated fields, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    /// See [`AuthorizationPolicy`].
    AuthorizationPolicy(AuthorizationPolicy),
    /// See [`PeerAuthentication`].
    PeerAuthentication(PeerAuthentication),
    /// See [`Route`].
    Route(Route),
    /// See [`DestinationPolicy`].
    DestinationPolicy(DestinationPolicy),
    /// See [`RateLimit`].
    RateLimit(RateLimit),
    /// See [`Slo`].
    Slo(Slo),
    /// See [`Gateway`].
    Gateway(Gateway),
    /// See [`ExternalService`].
    ExternalService(ExternalService),
    /// See [`ServiceExport`].
    ServiceExport(ServiceExport),
    /// See [`MeshConfig`].
    MeshConfig(MeshConfig),
    /// See [`Revocation`].
    Revocation(Revocation),
    /// See [`TrustBundle`].
    TrustBundle(TrustBundle),
}

/// A validated policy resource.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resource {
    /// Kind, namespace and name (serialised flat beside `spec`).
    #[serde(flatten)]
    pub key: ResourceKey,
    /// The kind's fields; `spec.kind() == key.kind`.
    pub spec: Spec,
}

/// One thing wrong with a policy file or resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problem {
    /// The file, or empty when the resource did not come from a file.
    pub file: String,
    /// `Kind/namespace/name`, `resource[i]` while the key is unknown, or empty for the file.
    pub resource: String,
    /// Dotted key inside the resource, e.g. `rules[0].from[1].ip_blocks[2]`; may be empty.
    pub key: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

/// The policy state a node enforces: every resource at one registry revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The mesh revision this state corresponds to (0 = none yet).
    pub revision: u64,
    /// Every resource, by key.
    pub resources: BTreeMap<ResourceKey, Resource>,
}

// === impl Kind ===

impl Kind {
    /// Every kind, in order.
    pub const ALL: [Kind; 12] = [
        Self::AuthorizationPolicy,
        Self::PeerAuthentication,
        Self::Route,
        Self::DestinationPolicy,
        Self::RateLimit,
        Self::Slo,
        Self::Gateway,
        Self::ExternalService,
        Self::ServiceExport,
        Self::MeshConfig,
        Self::Revocation,
        Self::TrustBundle,
    ];

    /// The canonical name (`AuthorizationPolicy`, …, `SLO`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::Route => "Route",
            Self::DestinationPolicy => "DestinationPolicy",
            Self::RateLimit => "RateLimit",
            Self::Slo => "SLO",
            Self::Gateway => "Gateway",
            Self::ExternalService => "ExternalService",
            Self::ServiceExport => "ServiceExport",
            Self::MeshConfig => "MeshConfig",
            Self::Revocation => "Revocation",
            Self::TrustBundle => "TrustBundle",
        }
    }

    /// Lowercase plural and short spellings accepted by [`FromStr`] besides the name itself.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Self::AuthorizationPolicy => &["authorizationpolicies", "ap"],
            Self::PeerAuthentication => &["peerauthentications", "pa"],
            Self::Route => &["routes"],
            Self::DestinationPolicy => &["destinationpolicies", "dp"],
            Self::RateLimit => &["ratelimits", "rl"],
            Self::Slo => &["slos"],
            Self::Gateway => &["gateways", "gw"],
            Self::ExternalService => &["externalservices", "es"],
            Self::ServiceExport => &["serviceexports", "exports", "se"],
            Self::MeshConfig => &["meshconfigs", "mc"],
            Self::Revocation => &["revocations"],
            Self::TrustBundle => &["trustbundles"],
        }
    }

    /// Written by the registry only (operators cannot apply or delete it).
    pub fn is_registry_owned(self) -> bool {
        matches!(self, Self::Revocation | Self::TrustBundle)
    }

    /// Exists once per mesh, in the root namespace (the namespace may be omitted).
    pub fn is_mesh_wide(self) -> bool {
        matches!(
            self,
            Self::MeshConfig | Self::Revocation | Self::TrustBundle
        )
    }

    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.as_str()).collect()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;
    /// Case-insensitive, ignoring `-` and `_`: the name, its plural or its short alias.
    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        let norm: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(&norm) || k.aliases().contains(&&*norm))
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === impl ResourceKey ===

impl ResourceKey {
    /// Builds a key from validated parts.
    pub fn new(kind: Kind, namespace: Label, name: Label) -> Self {
        Self {
            kind,
            namespace,
            name,
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

// === impl Spec ===

impl Spec {
    /// The kind of resource this spec belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::Route(_) => Kind::Route,
            Self::DestinationPolicy(_) => Kind::DestinationPolicy,
            Self::RateLimit(_) => Kind::RateLimit,
            Self::Slo(_) => Kind::Slo,
            Self::Gateway(_) => Kind::Gateway,
            Self::ExternalService(_) => Kind::ExternalService,
            Self::ServiceExport(_) => Kind::ServiceExport,
            Self::MeshConfig(_) => Kind::MeshConfig,
            Self::Revocation(_) => Kind::Revocation,
            Self::TrustBundle(_) => Kind::TrustBundle,
        }
    }

    /// Reads the fields of a `kind` resource, reporting problems to `cx`.
    fn read(kind: Kind, fields: &Map<String, Value>, cx: &mut decode::Cx) -> Option<Self> {
        match kind {
            Kind::AuthorizationPolicy => {
                security::authorization_policy(fields, cx).map(Self::AuthorizationPolicy)
            }
            Kind::PeerAuthentication => {
                security::peer_authentication(fields, cx).map(Self::PeerAuthentication)
            }
            Kind::Route => route::route(fields, cx).map(Self::Route),
            Kind::DestinationPolicy => {
                destination::destination_policy(fields, cx).map(Self::DestinationPolicy)
            }
            Kind::RateLimit => rate_limit::rate_limit(fields, cx).map(Self::RateLimit),
            Kind::Slo => slo::slo(fields, cx).map(Self::Slo),
            Kind::Gateway => gateway::gateway(fields, cx).map(Self::Gateway),
            Kind::ExternalService => {
                external::external_service(fields, cx).map(Self::ExternalService)
            }
            Kind::ServiceExport => export::service_export(fields, cx).map(Self::ServiceExport),
            Kind::MeshConfig => security::mesh_config(fields, cx).map(Self::MeshConfig),
            Kind::Revocation => revocation::revocation(fields, cx).map(Self::Revocation),
            Kind::TrustBundle => trust_bundle::trust_bundle(fields, cx).map(Self::TrustBundle),
        }
    }
}

// === impl Resource ===

impl Resource {
    /// Registry side: builds and validates a resource from the wire. `spec_json` holds the
    /// resource's fields without kind, namespace and name. An empty namespace means the default
    /// (`default`, or `mesh-system` for MeshConfig).
    pub fn from_json(
        kind: &str,
        namespace: &str,
        name: &str,
        spec_json: &str,
    ) -> Result<Resource, Vec<Problem>> {
        parse::from_json(kind, namespace, name, spec_json)
    }

    /// The spec as canonical JSON: defaults filled in, maps sorted, so equal specs give equal
    /// strings and "unchanged" is a string compare. [`Resource::from_json`] reads it back.
    pub fn spec_json(&self) -> String {
        serde_json::to_string(&self.spec).expect("policy specs serialise to JSON")
    }

    /// The resource as `meshctl apply` sends it (the registry sets revision and author).
    pub fn to_proto(&self) -> crate::proto::v1::Resource {
        crate::proto::v1::Resource {
            kind: self.key.kind.as_str().to_owned(),
            namespace: self.key.namespace.to_string(),
            name: self.key.name.to_string(),
            spec_json: self.spec_json(),
            ..Default::default()
        }
    }
}

pub(crate) fn root_namespace() -> Label {
    root_namespace_ref().clone()
}

/// The root namespace, built once (authorization reads it per request).
pub(crate) fn root_namespace_ref() -> &'static Label {
    static ROOT: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| {
        Label::new(ROOT_NAMESPACE).expect("the root namespace is a label")
    });
    &ROOT
}

// === parse_file ===

/// Parses a policy file: TOML with a `[[resource]]` array. Problems name the file, the resource
/// and the key; all of them are returned. The same kind/namespace/name twice is an error.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<Resource>, Vec<Problem>> {
    parse::parse_file(file, text)
}

// === impl Problem ===

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [&self.file, &self.resource, &self.key, &self.message];
        let mut first = true;
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            if !first {
                f.write_str(": ")?;
            }
            f.write_str(part)?;
            first = false;
        }
        Ok(())
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// A snapshot of `resources` at `revision`.
    pub fn new(revision: u64, resources: impl IntoIterator<Item = Resource>) -> Self {
        Self {
            revision,
            resources: resources.into_iter().map(|r| (r.key.clone(), r)).collect(),
        }
    }

    /// The mesh's MeshConfig, or the defaults when there is none.
    pub fn mesh_config(&self) -> MeshConfig {
        // Read on every HTTP request (path normalization): the key is built once.
        static KEY: std::sync::LazyLock<ResourceKey> = std::sync::LazyLock::new(|| {
            ResourceKey::new(
                Kind::MeshConfig,
                root_namespace(),
                Label::new(MESH_CONFIG_NAME).expect("\"default\" is a label"),
            )
        });
        match self.resources.get(&*KEY).map(|r| &r.spec) {
            Some(Spec::MeshConfig(c)) => *c,
            _ => MeshConfig::default(),
        }
    }

    /// Every resource of `kind`, in key order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Resource> {
        let least = Label::new("0").expect("\"0\" is a label");
        self.resources
            .range(ResourceKey::new(kind, least.clone(), least)..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, r)| r)
    }

    /// Every resource of `kind` in `namespace`, in key order.
    pub fn in_namespace<'s, 'n>(
        &'s self,
        kind: Kind,
        namespace: &'n Label,
    ) -> impl Iterator<Item = &'s Resource> + use<'s, 'n> {
        // Walked per request by authorization: one allocation (the range's start key).
        self.resources
            .range(ResourceKey::new(kind, namespace.clone(), Label::least())..)
            .take_while(move |(k, _)| k.kind == kind && k.namespace == *namespace)
            .map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests;
