//! Request routing decisions, all pure: which Route entry handles a request, which weighted
//! destination (subset) it goes to, injected faults and header edits. Routes and subsets are
//! compiled once per policy revision into a [`Table`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use mesh_api::ServiceKey;
use mesh_api::policy::{
    Destination, DestinationPolicy, Fault, HeaderOps, HttpMatch, HttpRoute, ResourceKey, Snapshot,
    Spec, StringMatch, compile_regex,
};

// === compiled routes ===

/// A string condition, with its regex compiled.
#[derive(Debug)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl Matcher {
    fn new(m: &StringMatch) -> Self {
        match m {
            StringMatch::Exact(s) => Self::Exact(s.clone()),
            StringMatch::Prefix(s) => Self::Prefix(s.clone()),
            // The registry accepted it with the same compiler; should a newer registry accept
            // something this build cannot compile, the condition matches nothing.
            StringMatch::Regex(re) => match compile_regex(re) {
                Ok(r) => Self::Regex(r),
                Err(_) => Self::Regex(never()),
            },
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(s) => v == s,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(v),
        }
    }
}

fn never() -> regex::Regex {
    // `[^\s\S]` matches no character, so the anchored pattern matches no value.
    regex::Regex::new(r"^[^\s\S]$").unwrap_or_else(|_| unreachable!("a valid constant regex"))
}

#[derive(Debug)]
struct CompiledMatch {
    path: Option<Matcher>,
    method: Option<String>,
    headers: Vec<(String, Matcher)>,
    query: Vec<(String, Matcher)>,
}

impl CompiledMatch {
    fn new(m: &HttpMatch) -> Self {
        Self {
            path: m.path.as_ref().map(Matcher::new),
            method: m.method.clone(),
            headers: (m.headers.iter())
                .map(|(k, v)| (k.to_ascii_lowercase(), Matcher::new(v)))
                .collect(),
            query: (m.query.iter())
                .map(|(k, v)| (k.clone(), Matcher::new(v)))
                .collect(),
        }
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(p) = &self.path
            && !p.matches(req.path)
        {
            return false;
        }
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        let header_ok = self.headers.iter().all(|(name, m)| {
            (req.headers.get_all(name.as_str()).iter())
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        });
        header_ok
            && self
                .query
                .iter()
                .all(|(name, m)| query_pairs(req.query).any(|(k, v)| k == name && m.matches(v)))
    }
}

/// `name=value` pairs of a query string (no percent-decoding: values match as sent).
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// What route matching looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method, as sent.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Query string without `?` (empty if none).
    pub query: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// One Route resource, compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    /// The resource, for logs and error bodies.
    pub key: ResourceKey,
    entries: Vec<(HttpRoute, Vec<CompiledMatch>)>,
}

impl CompiledRoute {
    pub(crate) fn new(key: ResourceKey, http: &[HttpRoute]) -> Self {
        let entries = (http.iter())
            .map(|e| {
                (
                    e.clone(),
                    e.matches.iter().map(CompiledMatch::new).collect(),
                )
            })
            .collect();
        Self { key, entries }
    }

    /// The first entry that matches `req` (an entry without `match` matches everything), with
    /// its index; `None` when no entry does (Istio answers 404 then).
    pub fn select(&self, req: &RequestView<'_>) -> Option<(usize, &HttpRoute)> {
        self.entries.iter().enumerate().find_map(|(i, (e, ms))| {
            (ms.is_empty() || ms.iter().any(|m| m.matches(req))).then_some((i, e))
        })
    }
}

/// Routes and destination policies of one policy revision, by service.
#[derive(Debug, Default)]
pub struct Table {
    /// The revision compiled.
    pub revision: u64,
    routes: HashMap<ServiceKey, Arc<CompiledRoute>>,
    destinations: HashMap<ServiceKey, Arc<DestinationPolicy>>,
    /// Routes attached to each Gateway (keyed by the gateway's `namespace/name`), in name order.
    gateway_routes: HashMap<ServiceKey, Vec<Arc<GatewayRoute>>>,
}

/// A Route attached to a Gateway, compiled.
#[derive(Debug)]
pub struct GatewayRoute {
    /// The hosts it serves; empty = whatever its listener serves.
    pub hostnames: Vec<mesh_api::policy::Hostname>,
    /// Its entries.
    pub route: CompiledRoute,
}

impl Table {
    /// Compiles `snapshot`. Of several Routes (or DestinationPolicies) for one service, the
    /// first by name applies (Istio merges them unpredictably; one is what users expect).
    pub fn build(snapshot: &Snapshot) -> Self {
        let mut t = Table {
            revision: snapshot.revision,
            ..Table::default()
        };
        for r in snapshot.resources.values() {
            let svc = |name| ServiceKey::new(r.key.namespace.clone(), name);
            match &r.spec {
                Spec::Route(route) => {
                    if let Some(service) = &route.service {
                        t.routes.entry(svc(service.clone())).or_insert_with(|| {
                            Arc::new(CompiledRoute::new(r.key.clone(), &route.http))
                        });
                    }
                    if !route.gateways.is_empty() {
                        let compiled = Arc::new(GatewayRoute {
                            hostnames: route.hostnames.clone(),
                            route: CompiledRoute::new(r.key.clone(), &route.http),
                        });
                        for name in &route.gateways {
                            let routes = t.gateway_routes.entry(svc(name.clone())).or_default();
                            routes.push(compiled.clone());
                        }
                    }
                }
                Spec::DestinationPolicy(dp) => {
                    t.destinations
                        .entry(svc(dp.service.clone()))
                        .or_insert_with(|| Arc::new(dp.clone()));
                }
                _ => {}
            }
        }
        t
    }

    /// The Route of `service`, if any.
    pub fn route(&self, service: &ServiceKey) -> Option<&Arc<CompiledRoute>> {
        self.routes.get(service)
    }

    /// The Routes attached to the Gateway `gateway` (`namespace/name`), in name order.
    pub fn gateway_routes(&self, gateway: &ServiceKey) -> &[Arc<GatewayRoute>] {
        self.gateway_routes.get(gateway).map_or(&[], Vec::as_slice)
    }

    /// The DestinationPolicy of `service`, if any.
    pub fn destination(&self, service: &ServiceKey) -> Option<&Arc<DestinationPolicy>> {
        self.destinations.get(service)
    }
}

// === decisions ===

/// The destination a request goes to, given `roll` uniform in `0..100`: weights are
/// cumulative percentages in order. An entry without destinations (or weights summing to less
/// than `roll`) goes to the whole service (`None`).
pub fn pick_destination(dests: &[Destination], roll: u32) -> Option<&Destination> {
    let mut acc = 0;
    dests.iter().find(|d| {
        acc += d.weight;
        roll < acc
    })
}

/// Labels a subset requires; `None` when the subset is not defined (the request fails:
/// Istio answers 503 "no healthy upstream" for an undefined subset).
pub fn subset_labels<'p>(
    policy: Option<&'p DestinationPolicy>,
    subset: &str,
) -> Option<&'p std::collections::BTreeMap<String, String>> {
    policy?
        .subsets
        .iter()
        .find(|s| s.name.as_str() == subset)
        .map(|s| &s.labels)
}

/// What fault injection does to one request, given two rolls uniform in `0.0..100.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultAction {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer with this status instead of forwarding.
    pub abort: Option<u16>,
}

/// Decides the faults of one request.
pub fn fault_action(fault: Option<&Fault>, delay_roll: f64, abort_roll: f64) -> FaultAction {
    let Some(f) = fault else {
        return FaultAction {
            delay: None,
            abort: None,
        };
    };
    FaultAction {
        delay: (f.delay.as_ref())
            .filter(|d| delay_roll < d.percent)
            .map(|d| d.fixed),
        abort: (f.abort.as_ref())
            .filter(|a| abort_roll < a.percent)
            .map(|a| a.status),
    }
}

/// Applies header edits: remove, then set (replace), then add (append).
pub fn apply_header_ops(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    let parse = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in &ops.set {
        if let Some((k, v)) = parse(k, v) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let Some((k, v)) = parse(k, v) {
            headers.append(k, v);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use mesh_api::policy::parse_file;

    const ROUTES: &str = r#"
[[resource]]
kind = "Route"
name = "api"
service = "api"

[[resource.http]]
name = "canary-header"
match = [{ headers = { "x-canary" = { exact = "1" } } }]
route = [{ subset = "v2" }]

[[resource.http]]
name = "admin"
match = [{ path = { prefix = "/admin" }, method = "POST" }, { query = { debug = { regex = "1|true" } } }]
route = [{ subset = "v1" }]

[[resource.http]]
name = "versioned"
match = [{ path = { regex = "/v[0-9]+/items" } }]
route = [{ subset = "v1" }]

[[resource.http]]
name = "split"
route = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]

[[resource]]
kind = "DestinationPolicy"
name = "api"
service = "api"
subsets = [{ name = "v1", labels = { version = "v1" } }, { name = "v2", labels = { version = "v2" } }]
"#;

    fn table() -> Table {
        Table::build(&Snapshot::new(7, parse_file("t.toml", ROUTES).unwrap()))
    }

    #[test]
    fn first_matching_entry_handles_the_request() {
        let t = table();
        let api = ServiceKey::parse("default/api").unwrap();
        let route = t.route(&api).unwrap();
        assert_eq!(route.key.to_string(), "Route/default/api");
        assert!(
            t.route(&ServiceKey::parse("default/web").unwrap())
                .is_none()
        );
        assert_eq!(t.revision, 7);
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        /// (case, method, path, query, headers, the entry that should handle it)
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a str,
        );
        #[rustfmt::skip]
        let cases: &[Case<'_>] = &[
            ("header routes to canary", "GET", "/x", "", &[("x-canary", "1")], "canary-header"),
            ("header value must be exact", "GET", "/x", "", &[("x-canary", "11")], "split"),
            ("repeated header: any value", "GET", "/x", "", &[("x-canary", "0"), ("x-canary", "1")], "canary-header"),
            ("path prefix and method", "POST", "/admin/users", "", &[], "admin"),
            ("method must match too", "GET", "/admin/users", "", &[], "split"),
            ("second match of an entry", "GET", "/x", "a=b&debug=true", &[], "admin"),
            ("regex is anchored", "GET", "/x", "debug=yes1", &[], "split"),
            ("path regex", "GET", "/v12/items", "", &[], "versioned"),
            ("path regex is anchored", "GET", "/v12/items/3", "", &[], "split"),
            ("no match: catch-all", "DELETE", "/", "", &[], "split"),
        ];
        for (case, method, path, query, headers, want) in cases {
            let headers = h(headers);
            let req = RequestView {
                method,
                path,
                query,
                headers: &headers,
            };
            let got = route
                .select(&req)
                .map(|(_, e)| e.name.as_ref().unwrap().to_string());
            assert_eq!(got.as_deref(), Some(*want), "{case}");
        }
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let text = "[[resource]]\nkind = \"Route\"\nname = \"r\"\nservice = \"api\"\n\
                    [[resource.http]]\nmatch = [{ path = { exact = \"/only\" } }]\n";
        let t = Table::build(&Snapshot::new(1, parse_file("t.toml", text).unwrap()));
        let route = t.route(&ServiceKey::parse("default/api").unwrap()).unwrap();
        let headers = HeaderMap::new();
        let req = |path| RequestView {
            method: "GET",
            path,
            query: "",
            headers: &headers,
        };
        assert_eq!(route.select(&req("/only")).map(|(i, _)| i), Some(0));
        assert!(route.select(&req("/other")).is_none());
    }

    #[test]
    fn weighted_destinations() {
        let t = table();
        let route = t.route(&ServiceKey::parse("default/api").unwrap()).unwrap();
        let headers = HeaderMap::new();
        let req = RequestView {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
        };
        let (_, split) = route.select(&req).unwrap();
        let subset = |roll| {
            pick_destination(&split.route, roll)
                .and_then(|d| d.subset.as_ref())
                .map(ToString::to_string)
        };
        assert_eq!(subset(0).as_deref(), Some("v1"));
        assert_eq!(subset(89).as_deref(), Some("v1"));
        assert_eq!(subset(90).as_deref(), Some("v2"));
        assert_eq!(subset(99).as_deref(), Some("v2"));
        let v2 = (0..100)
            .filter(|r| subset(*r).as_deref() == Some("v2"))
            .count();
        assert_eq!(v2, 10, "exactly 10 of 100 rolls");
        assert!(
            pick_destination(&[], 5).is_none(),
            "no destinations: whole service"
        );

        let dp = t.destination(&ServiceKey::parse("default/api").unwrap());
        let v2 = subset_labels(dp.map(|d| &**d), "v2").unwrap();
        assert_eq!(v2["version"], "v2");
        assert!(subset_labels(dp.map(|d| &**d), "v3").is_none());
        assert!(subset_labels(None, "v1").is_none());
    }

    #[test]
    fn faults_by_percent() {
        let text = "[[resource]]\nkind = \"Route\"\nname = \"r\"\nservice = \"api\"\n\
                    [[resource.http]]\nfault = { delay = { fixed = \"50ms\", percent = 30 }, abort = { status = 503, percent = 10 } }\n";
        let rs = parse_file("t.toml", text).unwrap();
        let Spec::Route(r) = &rs[0].spec else {
            panic!("a route")
        };
        let f = r.http[0].fault.as_ref();
        let a = fault_action(f, 29.9, 9.9);
        assert_eq!(a.delay, Some(Duration::from_millis(50)));
        assert_eq!(a.abort, Some(503));
        let a = fault_action(f, 30.0, 10.0);
        assert_eq!((a.delay, a.abort), (None, None));
        let a = fault_action(None, 0.0, 0.0);
        assert_eq!((a.delay, a.abort), (None, None));
    }

    #[test]
    fn header_edits() {
        let mut h = HeaderMap::new();
        h.insert("x-old", HeaderValue::from_static("1"));
        h.insert("x-env", HeaderValue::from_static("dev"));
        h.insert("x-list", HeaderValue::from_static("a"));
        let ops = HeaderOps {
            set: [("x-env".to_owned(), "prod".to_owned())].into(),
            add: [("x-list".to_owned(), "b".to_owned())].into(),
            remove: vec!["x-old".to_owned()],
        };
        apply_header_ops(&ops, &mut h);
        assert!(!h.contains_key("x-old"));
        assert_eq!(h["x-env"], "prod");
        let list: Vec<_> = h.get_all("x-list").iter().collect();
        assert_eq!(list, ["a", "b"]);
    }
}
