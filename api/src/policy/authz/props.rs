//! Properties of authorization over generated policies and requests: adding a DENY never
//! widens access, and the decision on a path does not depend on how the caller spelled it
//! (normalization first, as the proxy does).

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::policy::path::{self, Options};
use crate::policy::{Resource, parse_file};

const SERVICES: &[&str] = &["default/api", "default/web", "shop/cart"];
const CALLERS: &[&str] = &[
    "spiffe://mesh.internal/ns/default/svc/web",
    "spiffe://mesh.internal/ns/shop/svc/cart",
    "spiffe://mesh.internal/ns/ops/svc/bot",
];
const PATHS: &[&str] = &["/admin", "/admin/users", "/api/items", "/public/x", "/"];
const PATTERNS: &[&str] = &["/admin*", "/api/*", "/public/x", "*", "/"];

/// One generated AuthorizationPolicy as TOML.
fn policy() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["allow", "deny", "audit"]),
        prop::sample::select(vec!["default", "shop", "mesh-system"]),
        prop::option::of(prop::sample::select(vec!["api", "web", "cart"])),
        prop::option::of(prop::sample::select(CALLERS.to_vec())),
        prop::option::of(prop::sample::select(vec!["default", "shop", "ops"])),
        prop::option::of(prop::sample::select(PATTERNS.to_vec())),
        prop::option::of(prop::sample::select(vec!["GET", "POST"])),
        prop::option::of(prop::sample::select(vec!["10.0.0.0/8", "192.168.0.0/16"])),
    )
        .prop_map(|(action, ns, svc, principal, from_ns, path, method, ip)| {
            let selector = svc.map_or_else(String::new, |s| {
                format!("selector = {{ service = \"{s}\" }}\n")
            });
            let mut from = Vec::new();
            if let Some(p) = principal {
                from.push(format!("principals = [\"{p}\"]"));
            }
            if let Some(n) = from_ns {
                from.push(format!("namespaces = [\"{n}\"]"));
            }
            if let Some(i) = ip {
                from.push(format!("ip_blocks = [\"{i}\"]"));
            }
            let mut to = Vec::new();
            if let Some(p) = path {
                to.push(format!("paths = [\"{p}\"]"));
            }
            if let Some(m) = method {
                to.push(format!("methods = [\"{m}\"]"));
            }
            if from.is_empty() && to.is_empty() {
                from.push("not_namespaces = [\"nowhere\"]".to_owned());
            }
            let mut rule = Vec::new();
            if !from.is_empty() {
                rule.push(format!("from = [{{ {} }}]", from.join(", ")));
            }
            if !to.is_empty() {
                rule.push(format!("to = [{{ {} }}]", to.join(", ")));
            }
            format!(
                "action = \"{action}\"\nnamespace = \"{ns}\"\n{selector}rules = [{{ {} }}]\n",
                rule.join(", ")
            )
        })
}

fn snapshot(policies: &[String], extra: Option<&str>) -> Snapshot {
    let mut text = String::new();
    for (i, p) in policies.iter().enumerate() {
        text.push_str(&format!(
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"p{i}\"\n{p}\n"
        ));
    }
    if let Some(e) = extra {
        text.push_str(&format!(
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"added\"\n{e}\n"
        ));
    }
    if text.is_empty() {
        return Snapshot::default();
    }
    let resources: Vec<Resource> = parse_file("p.toml", &text).expect("generated policies parse");
    Snapshot::new(1, resources)
}

#[derive(Debug, Clone)]
struct Req {
    caller: Option<usize>,
    ip: IpAddr,
    service: usize,
    method: &'static str,
    path: String,
    tcp: bool,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::option::of(0..CALLERS.len()),
        prop::sample::select(vec!["10.1.2.3", "192.168.7.7", "172.16.0.1"]),
        0..SERVICES.len(),
        prop::sample::select(vec!["GET", "POST"]),
        prop::sample::select(PATHS.to_vec()),
        any::<bool>(),
    )
        .prop_map(|(caller, ip, service, method, path, tcp)| Req {
            caller,
            ip: ip.parse().expect("ip"),
            service,
            method,
            path: path.to_owned(),
            tcp,
        })
}

fn decide_raw(s: &Snapshot, r: &Req, path: &str) -> bool {
    let caller = r
        .caller
        .map(|c| Identity::parse(CALLERS[c]).expect("caller"));
    let service = ServiceKey::parse(SERVICES[r.service]).expect("service");
    let labels = BTreeMap::new();
    let headers: Vec<(String, String)> = Vec::new();
    let req = Request {
        source: caller.as_ref(),
        source_ip: r.ip,
        workload: Workload {
            service: &service,
            labels: &labels,
        },
        port: 8080,
        http: (!r.tcp).then_some(Http {
            method: r.method,
            path,
            headers: &headers,
        }),
    };
    decide(s, &req).is_allowed()
}

/// What the proxy does: normalize (refusing what does not normalize), then decide.
fn mesh_allows(s: &Snapshot, r: &Req, raw_path: &str) -> bool {
    match path::normalize(raw_path, Options::default()) {
        Ok(p) => decide_raw(s, r, &p),
        Err(_) => false,
    }
}

/// Spellings of `p` that an attacker would try: dot segments, doubled slashes, escaped
/// unreserved characters, backslashes.
fn obfuscate(p: &str, tricks: &[u8]) -> String {
    let mut out = String::new();
    for (i, seg) in p.split('/').skip(1).enumerate() {
        let mut t = tricks.get(i).copied().unwrap_or(0) % 6;
        // A path must still start with '/' (a request target that does not is refused).
        if i == 0 && t == 4 {
            t = 3;
        }
        match t {
            1 => out.push_str("/."),
            2 => out.push_str("/zz/.."),
            3 => out.push('/'),
            4 => out.push('\\'),
            _ => {}
        }
        out.push('/');
        if t == 5 {
            for b in seg.bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push_str(seg);
        }
    }
    if out.is_empty() { "/".to_owned() } else { out }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn adding_a_deny_never_widens_access(
        policies in prop::collection::vec(policy(), 0..6),
        added in policy(),
        reqs in prop::collection::vec(request(), 1..8),
    ) {
        let deny = added.replacen("action = \"allow\"", "action = \"deny\"", 1)
            .replacen("action = \"audit\"", "action = \"deny\"", 1);
        let before = snapshot(&policies, None);
        let after = snapshot(&policies, Some(&deny));
        for r in &reqs {
            if decide_raw(&after, r, &r.path) {
                prop_assert!(decide_raw(&before, r, &r.path), "{:?} allowed only after adding {}", r, deny);
            }
        }
    }

    #[test]
    fn the_decision_does_not_depend_on_the_spelling(
        policies in prop::collection::vec(policy(), 0..6),
        r in request(),
        tricks in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let s = snapshot(&policies, None);
        let spelled = obfuscate(&r.path, &tricks);
        prop_assert_eq!(
            mesh_allows(&s, &r, &spelled),
            mesh_allows(&s, &r, &r.path),
            "{} vs {}", spelled, r.path
        );
    }
}
