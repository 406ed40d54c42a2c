//! Table tests for authorization and mTLS decisions. Policies are written as TOML, as operators
//! write them; every case runs and all failures are reported together.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::policy::parse_file;

const WEB: &str = "spiffe://mesh.internal/ns/default/svc/web";
const OPS_BOT: &str = "spiffe://mesh.internal/ns/ops/svc/bot";
const TEAM_A: &str = "spiffe://mesh.internal/ns/team-a/svc/x";
const NODE: &str = "spiffe://mesh.internal/node/host-1";

type HttpParts = (String, String, Vec<(String, String)>);

/// A request, built fluently from a default: `web` calling `default/api` (labels
/// `version=v1`) on port 8080 with `GET /api/items`, from 10.1.2.3.
#[derive(Clone)]
struct Req {
    source: Option<Identity>,
    ip: IpAddr,
    service: ServiceKey,
    labels: BTreeMap<String, String>,
    port: u16,
    /// Method, path and headers; `None` for TCP.
    http: Option<HttpParts>,
}

impl Req {
    fn new() -> Self {
        Self {
            source: Some(Identity::parse(WEB).unwrap()),
            ip: "10.1.2.3".parse().unwrap(),
            service: ServiceKey::parse("default/api").unwrap(),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            port: 8080,
            http: Some(("GET".into(), "/api/items".into(), vec![])),
        }
    }
    fn from(mut self, uri: &str) -> Self {
        self.source = Some(Identity::parse(uri).unwrap());
        self
    }
    fn plaintext(mut self) -> Self {
        self.source = None;
        self
    }
    fn ip(mut self, ip: &str) -> Self {
        self.ip = ip.parse().unwrap();
        self
    }
    fn to(mut self, service: &str) -> Self {
        self.service = ServiceKey::parse(service).unwrap();
        self
    }
    fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn tcp(mut self) -> Self {
        self.http = None;
        self
    }
    fn http(mut self, method: &str, path: &str) -> Self {
        let headers = self.http.take().map(|h| h.2).unwrap_or_default();
        self.http = Some((method.into(), path.into(), headers));
        self
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        if let Some(h) = &mut self.http {
            h.2.push((name.into(), value.into()));
        }
        self
    }

    fn decide(&self, snapshot: &Snapshot) -> Decision {
        let req = Request {
            source: self.source.as_ref(),
            source_ip: self.ip,
            workload: Workload {
                service: &self.service,
                labels: &self.labels,
            },
            port: self.port,
            http: self.http.as_ref().map(|(m, p, h)| Http {
                method: m,
                path: p,
                headers: h,
            }),
        };
        authorize(snapshot, &req)
    }
}

fn snapshot(toml: &str) -> Snapshot {
    let resources = parse_file("test.toml", toml).unwrap_or_else(|problems| {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        panic!("test policy does not parse:\n{}\n{toml}", lines.join("\n"))
    });
    Snapshot::new(1, resources)
}

/// `allow <policy name>`, `allow default`, `deny <policy name>` or `deny <reason>`.
fn summary(d: &Decision) -> String {
    match d {
        Decision::Allow {
            policy: Some(k), ..
        } => format!("allow {}", k.name),
        Decision::Allow { policy: None, .. } => "allow default".to_owned(),
        Decision::Deny {
            policy: Some(k),
            reason,
            ..
        } => {
            assert_eq!(*reason, REASON_DENY_POLICY);
            format!("deny {}", k.name)
        }
        Decision::Deny { reason, .. } => format!("deny {reason}"),
    }
}

/// Runs `(case, request, expected summary)` rows against `snap`; reports every failure.
fn check(snap: &Snapshot, rows: &[(&str, Req, &str)]) {
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|(case, req, want)| {
            let got = summary(&req.decide(snap));
            (got != *want).then(|| format!("{case}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// One ALLOW policy `p` selecting every workload in `default`, with one rule.
fn allow_rule(rule: &str) -> Snapshot {
    snapshot(&format!(
        "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"p\"\n[[resource.rules]]\n{rule}\n"
    ))
}

const NO: &str = "deny no_allow_match";
const YES: &str = "allow p";

#[test]
fn principals() {
    let exact = allow_rule(&format!("from = [{{ principals = [{WEB:?}] }}]"));
    check(
        &exact,
        &[
            ("exact match", Req::new(), YES),
            ("exact other", Req::new().from(OPS_BOT), NO),
            ("exact plaintext", Req::new().plaintext(), NO),
        ],
    );
    let prefix = allow_rule(r#"from = [{ principals = ["spiffe://mesh.internal/ns/default/*"] }]"#);
    check(
        &prefix,
        &[
            ("prefix match", Req::new(), YES),
            ("prefix other namespace", Req::new().from(OPS_BOT), NO),
        ],
    );
    let suffix = allow_rule(r#"from = [{ principals = ["*/svc/web"] }]"#);
    check(
        &suffix,
        &[
            ("suffix match", Req::new(), YES),
            ("suffix other", Req::new().from(OPS_BOT), NO),
        ],
    );
    let any = allow_rule(r#"from = [{ principals = ["*"] }]"#);
    check(
        &any,
        &[
            ("any workload", Req::new(), YES),
            ("any node identity", Req::new().from(NODE), YES),
            ("any plaintext", Req::new().plaintext(), NO),
        ],
    );
    let not = allow_rule(r#"from = [{ not_principals = ["*/svc/web"] }]"#);
    check(
        &not,
        &[
            ("not_principals listed", Req::new(), NO),
            ("not_principals other", Req::new().from(OPS_BOT), YES),
            ("not_principals plaintext", Req::new().plaintext(), YES),
        ],
    );
    let not_any = allow_rule(r#"from = [{ not_principals = ["*"] }]"#);
    check(
        &not_any,
        &[
            ("not any: authenticated", Req::new(), NO),
            ("not any: plaintext", Req::new().plaintext(), YES),
        ],
    );
}

#[test]
fn namespaces() {
    let ns = allow_rule(r#"from = [{ namespaces = ["default"] }]"#);
    check(
        &ns,
        &[
            ("same namespace", Req::new(), YES),
            ("other namespace", Req::new().from(OPS_BOT), NO),
            ("plaintext has none", Req::new().plaintext(), NO),
            ("node identity has none", Req::new().from(NODE), NO),
        ],
    );
    let prefix = allow_rule(r#"from = [{ namespaces = ["team-*"] }]"#);
    check(
        &prefix,
        &[
            ("prefix match", Req::new().from(TEAM_A), YES),
            ("prefix other", Req::new(), NO),
        ],
    );
    let not = allow_rule(r#"from = [{ not_namespaces = ["ops"] }]"#);
    check(
        &not,
        &[
            ("not_namespaces listed", Req::new().from(OPS_BOT), NO),
            ("not_namespaces other", Req::new(), YES),
            ("not_namespaces plaintext", Req::new().plaintext(), YES),
        ],
    );
}

#[test]
fn ip_blocks() {
    let v4 = allow_rule(r#"from = [{ ip_blocks = ["10.0.0.0/8"] }]"#);
    check(
        &v4,
        &[
            ("v4 inside", Req::new(), YES),
            ("v4 outside", Req::new().ip("192.168.1.1"), NO),
            ("v4-mapped v6 inside", Req::new().ip("::ffff:10.9.9.9"), YES),
            ("v6 never in a v4 block", Req::new().ip("fd00::1"), NO),
        ],
    );
    let v6 = allow_rule(r#"from = [{ ip_blocks = ["fd00::/8"] }]"#);
    check(
        &v6,
        &[
            ("v6 inside", Req::new().ip("fd12:3456::1"), YES),
            ("v6 outside", Req::new().ip("fe80::1"), NO),
            ("v4 never in a v6 block", Req::new(), NO),
        ],
    );
    let bare = allow_rule(r#"from = [{ ip_blocks = ["10.1.2.3", "2001:db8::7"] }]"#);
    check(
        &bare,
        &[
            ("bare v4 same", Req::new(), YES),
            ("bare v4 neighbour", Req::new().ip("10.1.2.4"), NO),
            ("bare v6 same", Req::new().ip("2001:db8::7"), YES),
        ],
    );
    let not = allow_rule(r#"from = [{ not_ip_blocks = ["10.0.0.0/8"] }]"#);
    check(
        &not,
        &[
            ("not_ip_blocks inside", Req::new(), NO),
            ("not_ip_blocks outside", Req::new().ip("192.168.1.1"), YES),
        ],
    );
    let all = allow_rule(r#"from = [{ ip_blocks = ["0.0.0.0/0"] }]"#);
    check(
        &all,
        &[(
            "/0 holds every v4 address",
            Req::new().ip("203.0.113.9"),
            YES,
        )],
    );
}

#[test]
fn ports_and_methods() {
    let ports = allow_rule("to = [{ ports = [8080, 8443] }]");
    check(
        &ports,
        &[
            ("port listed", Req::new(), YES),
            ("port other", Req::new().port(9090), NO),
            ("port on tcp", Req::new().tcp(), YES),
        ],
    );
    let not_ports = allow_rule("to = [{ not_ports = [9090] }]");
    check(
        &not_ports,
        &[
            ("not_ports listed", Req::new().port(9090), NO),
            ("not_ports other", Req::new(), YES),
        ],
    );
    let methods = allow_rule(r#"to = [{ methods = ["GET", "HEAD"] }]"#);
    check(
        &methods,
        &[
            ("method listed", Req::new(), YES),
            ("method other", Req::new().http("POST", "/api/items"), NO),
            (
                "method case-sensitive",
                Req::new().http("get", "/api/items"),
                NO,
            ),
        ],
    );
    let not_methods = allow_rule(r#"to = [{ not_methods = ["DELETE"] }]"#);
    check(
        &not_methods,
        &[
            ("not_methods listed", Req::new().http("DELETE", "/x"), NO),
            ("not_methods other", Req::new(), YES),
        ],
    );
}

#[test]
fn paths_and_headers() {
    let paths = allow_rule(r#"to = [{ paths = ["/health", "/api/*", "*.json"] }]"#);
    check(
        &paths,
        &[
            ("exact", Req::new().http("GET", "/health"), YES),
            (
                "exact is not a prefix",
                Req::new().http("GET", "/health/deep"),
                NO,
            ),
            ("prefix", Req::new(), YES),
            (
                "prefix needs the slash",
                Req::new().http("GET", "/apix"),
                NO,
            ),
            ("suffix", Req::new().http("GET", "/v1/spec.json"), YES),
            (
                "query ignored",
                Req::new().http("GET", "/health?verbose=1"),
                YES,
            ),
            ("other", Req::new().http("GET", "/admin"), NO),
        ],
    );
    let not_paths = allow_rule(r#"to = [{ not_paths = ["/admin/*"] }]"#);
    check(
        &not_paths,
        &[
            (
                "not_paths listed",
                Req::new().http("GET", "/admin/users"),
                NO,
            ),
            ("not_paths other", Req::new(), YES),
        ],
    );
    let headers = allow_rule(r#"to = [{ headers = { "x-env" = ["prod", "stag*"] } }]"#);
    check(
        &headers,
        &[
            ("header exact", Req::new().header("x-env", "prod"), YES),
            ("header prefix", Req::new().header("x-env", "staging"), YES),
            ("header other value", Req::new().header("x-env", "dev"), NO),
            ("header missing", Req::new(), NO),
            ("header other name", Req::new().header("x-envy", "prod"), NO),
            (
                "header repeated, one matches",
                Req::new().header("x-env", "dev").header("x-env", "prod"),
                YES,
            ),
            ("header name case", Req::new().header("X-Env", "prod"), YES),
        ],
    );
    let present = allow_rule(r#"to = [{ headers = { "x-token" = ["*"] } }]"#);
    check(
        &present,
        &[
            ("header present", Req::new().header("x-token", "abc"), YES),
            ("header absent", Req::new(), NO),
        ],
    );
}

#[test]
fn entries_and_rules_combine() {
    let or_sources = allow_rule(&format!(
        "from = [{{ principals = [{WEB:?}] }}, {{ namespaces = [\"ops\"] }}]"
    ));
    let and_fields = allow_rule(&format!(
        "from = [{{ principals = [{WEB:?}], ip_blocks = [\"192.168.0.0/16\"] }}]"
    ));
    let from_and_to = allow_rule(&format!(
        "from = [{{ principals = [{WEB:?}] }}]\nto = [{{ methods = [\"GET\"] }}, {{ ports = [9090] }}]"
    ));
    let two_rules = snapshot(&format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "p"
[[resource.rules]]
from = [{{ principals = [{WEB:?}] }}]
[[resource.rules]]
to = [{{ paths = ["/public/*"] }}]
"#
    ));
    check(
        &or_sources,
        &[
            ("first entry", Req::new(), YES),
            ("second entry", Req::new().from(OPS_BOT), YES),
            ("neither", Req::new().from(TEAM_A), NO),
        ],
    );
    check(
        &and_fields,
        &[
            ("one field of two", Req::new(), NO),
            ("both fields", Req::new().ip("192.168.3.4"), YES),
        ],
    );
    check(
        &from_and_to,
        &[
            ("from and first to", Req::new(), YES),
            (
                "from and second to",
                Req::new().http("POST", "/").port(9090),
                YES,
            ),
            ("from without to", Req::new().http("POST", "/"), NO),
            ("to without from", Req::new().from(OPS_BOT), NO),
        ],
    );
    check(
        &two_rules,
        &[
            ("first rule", Req::new().http("GET", "/private"), YES),
            (
                "second rule",
                Req::new().from(OPS_BOT).http("GET", "/public/x"),
                YES,
            ),
            ("no rule", Req::new().from(OPS_BOT), NO),
        ],
    );
}

#[test]
fn tcp_requests_and_http_fields() {
    let allow_http = allow_rule(r#"to = [{ methods = ["GET"] }]"#);
    let allow_mixed = allow_rule(r#"to = [{ methods = ["GET"] }, { ports = [5432] }]"#);
    let deny = |to: &str| {
        snapshot(&format!(
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"d\"\naction = \"deny\"\n\
             [[resource.rules]]\nto = [{to}]\n"
        ))
    };
    check(
        &allow_http,
        &[
            ("allow http rule, http request", Req::new(), YES),
            ("allow http rule never matches tcp", Req::new().tcp(), NO),
        ],
    );
    check(
        &allow_mixed,
        &[
            (
                "allow tcp entry matches tcp",
                Req::new().tcp().port(5432),
                YES,
            ),
            ("allow http entry skipped on tcp", Req::new().tcp(), NO),
        ],
    );
    check(
        &deny(r#"{ methods = ["DELETE"] }"#),
        &[
            ("deny http rule, other method", Req::new(), "allow default"),
            ("deny http rule matches tcp", Req::new().tcp(), "deny d"),
        ],
    );
    check(
        &deny(r#"{ ports = [9090], paths = ["/admin/*"] }"#),
        &[
            (
                "deny keeps port check on tcp",
                Req::new().tcp(),
                "allow default",
            ),
            (
                "deny port matches on tcp",
                Req::new().tcp().port(9090),
                "deny d",
            ),
        ],
    );
}

#[test]
fn selectors_and_scope() {
    let deny_all = |ns: &str, selector: &str| {
        snapshot(&format!(
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"d\"\nnamespace = \"{ns}\"\n\
             action = \"deny\"\nrules = [{{}}]\n{selector}\n"
        ))
    };
    check(
        &deny_all("default", ""),
        &[
            (
                "no selector: whole namespace",
                Req::new().to("default/db"),
                "deny d",
            ),
            (
                "no selector: not other namespaces",
                Req::new().to("shop/api"),
                "allow default",
            ),
        ],
    );
    check(
        &deny_all("default", "[resource.selector]\nservice = \"api\""),
        &[
            ("service selected", Req::new(), "deny d"),
            (
                "service not selected",
                Req::new().to("default/db"),
                "allow default",
            ),
            (
                "same name, other namespace",
                Req::new().to("shop/api"),
                "allow default",
            ),
        ],
    );
    check(
        &deny_all(
            "default",
            "[resource.selector]\nlabels = { version = \"v1\", track = \"stable\" }",
        ),
        &[
            (
                "all labels",
                Req::new().labels(&[("version", "v1"), ("track", "stable"), ("x", "y")]),
                "deny d",
            ),
            ("some labels", Req::new(), "allow default"),
            (
                "label value differs",
                Req::new().labels(&[("version", "v2"), ("track", "stable")]),
                "allow default",
            ),
            ("no labels", Req::new().labels(&[]), "allow default"),
        ],
    );
    check(
        &deny_all(ROOT_NAMESPACE, ""),
        &[
            ("root: default namespace", Req::new(), "deny d"),
            ("root: any namespace", Req::new().to("shop/db"), "deny d"),
            ("root: zzz namespace", Req::new().to("zzz/db"), "deny d"),
            ("root: itself", Req::new().to("mesh-system/x"), "deny d"),
        ],
    );
    check(
        &deny_all(ROOT_NAMESPACE, "[resource.selector]\nservice = \"api\""),
        &[
            (
                "root selector: service in any namespace",
                Req::new().to("shop/api"),
                "deny d",
            ),
            (
                "root selector: other service",
                Req::new().to("shop/db"),
                "allow default",
            ),
        ],
    );
}

#[test]
fn the_deciding_policy_is_the_first_match_in_key_order_across_both_scopes() {
    // An ALLOW for everything in `default`, in `zzz`, and mesh-wide in the root namespace: the
    // 403 body, log line and metric name the first matching policy in key order (namespace,
    // then name), whichever side of the root namespace the workload's namespace sorts.
    let allow_all = |ns: &str, name: &str| {
        format!(
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"{name}\"\n\
             namespace = \"{ns}\"\nrules = [{{}}]\n"
        )
    };
    let snap = snapshot(&format!(
        "{}{}{}",
        allow_all("default", "own"),
        allow_all("zzz", "own"),
        allow_all(ROOT_NAMESPACE, "root")
    ));
    check(
        &snap,
        &[
            (
                "default sorts before the root namespace",
                Req::new(),
                "allow own",
            ),
            ("zzz sorts after it", Req::new().to("zzz/db"), "allow root"),
            (
                "no policy of its own",
                Req::new().to("shop/db"),
                "allow root",
            ),
            (
                "the root namespace itself",
                Req::new().to("mesh-system/x"),
                "allow root",
            ),
        ],
    );
}

const MESH_DENY: &str = r#"
[[resource]]
kind = "MeshConfig"
name = "default"
default_authorization = "deny"
"#;

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"{name}\"\naction = \"{action}\"\n{rules}\n"
    )
}

#[test]
fn evaluation_order() {
    let web_only = format!("[[resource.rules]]\nfrom = [{{ principals = [{WEB:?}] }}]");
    let ops_only = format!("[[resource.rules]]\nfrom = [{{ principals = [{OPS_BOT:?}] }}]");
    let cases: &[(&str, String, Req, &str)] = &[
        (
            "deny beats allow",
            policy("a", "allow", &web_only) + &policy("d", "deny", &web_only),
            Req::new(),
            "deny d",
        ),
        (
            "allow present, unmatched",
            policy("a", "allow", &ops_only),
            Req::new(),
            "deny no_allow_match",
        ),
        (
            "one of several allows",
            policy("a", "allow", &ops_only) + &policy("b", "allow", &web_only),
            Req::new(),
            "allow b",
        ),
        (
            "allow in root and namespace: either",
            policy("a", "allow", &ops_only)
                + &policy("r", "allow", &web_only)
                    .replace("name = \"r\"", "name = \"r\"\nnamespace = \"mesh-system\""),
            Req::new(),
            "allow r",
        ),
        (
            "deny unmatched, no allow: default allow",
            policy("d", "deny", &ops_only),
            Req::new(),
            "allow default",
        ),
        (
            "nothing: default allow",
            String::new(),
            Req::new(),
            "allow default",
        ),
        (
            "nothing, mesh default deny",
            MESH_DENY.to_owned(),
            Req::new(),
            "deny default_deny",
        ),
        (
            "mesh default deny, allow matches",
            MESH_DENY.to_owned() + &policy("a", "allow", &web_only),
            Req::new(),
            "allow a",
        ),
        (
            "audit never allows under default deny",
            MESH_DENY.to_owned() + &policy("au", "audit", &web_only),
            Req::new(),
            "deny default_deny",
        ),
        (
            "audit never blocks",
            policy("au", "audit", &web_only),
            Req::new(),
            "allow default",
        ),
        (
            "allow with zero rules denies everything",
            policy("a", "allow", ""),
            Req::new(),
            "deny no_allow_match",
        ),
        (
            "deny with zero rules denies nothing",
            policy("d", "deny", ""),
            Req::new(),
            "allow default",
        ),
        (
            "allow with one empty rule allows everything",
            policy("a", "allow", "rules = [{}]"),
            Req::new().plaintext(),
            "allow a",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(case, toml, req, want)| {
            let snap = if toml.is_empty() {
                Snapshot::default()
            } else {
                snapshot(toml)
            };
            let got = summary(&req.decide(&snap));
            (got != *want).then(|| format!("{case}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn audit_is_reported() {
    let web_only = format!("[[resource.rules]]\nfrom = [{{ principals = [{WEB:?}] }}]");
    let snap = snapshot(
        &(policy("au1", "audit", &web_only)
            + &policy("au2", "audit", "rules = [{}]")
            + &policy("au3", "audit", "")
            + &policy("d", "deny", &web_only)),
    );
    let names =
        |d: &Decision| -> Vec<String> { d.audit().iter().map(|k| k.name.to_string()).collect() };
    let d = Req::new().decide(&snap);
    assert!(!d.is_allowed());
    assert_eq!(names(&d), ["au1", "au2"], "audit listed when denied");
    let d = Req::new().from(OPS_BOT).decide(&snap);
    assert!(d.is_allowed());
    assert_eq!(names(&d), ["au2"], "audit listed when allowed");
    assert_eq!(
        d,
        Decision::Allow {
            policy: None,
            audit: vec![ResourceKey::new(
                Kind::AuthorizationPolicy,
                "default".parse().unwrap(),
                "au2".parse().unwrap()
            )],
        }
    );
}

#[test]
fn peer_authentication_precedence() {
    let pa = |name: &str, ns: &str, mode: &str, selector: &str| {
        format!(
            "[[resource]]\nkind = \"PeerAuthentication\"\nname = \"{name}\"\nnamespace = \"{ns}\"\n\
             mode = \"{mode}\"\n{selector}\n"
        )
    };
    let svc_api = "[resource.selector]\nservice = \"api\"";
    let v2 = "[resource.selector]\nlabels = { version = \"v2\" }";
    let mesh_permissive =
        "[[resource]]\nkind = \"MeshConfig\"\nname = \"default\"\ndefault_mtls = \"permissive\"\n";
    let cases: Vec<(&str, String, Req, MtlsMode)> = vec![
        (
            "nothing: strict",
            String::new(),
            Req::new(),
            MtlsMode::Strict,
        ),
        (
            "mesh default",
            mesh_permissive.to_owned(),
            Req::new(),
            MtlsMode::Permissive,
        ),
        (
            "root beats mesh default",
            mesh_permissive.to_owned() + &pa("r", ROOT_NAMESPACE, "strict", ""),
            Req::new(),
            MtlsMode::Strict,
        ),
        (
            "namespace beats root",
            pa("r", ROOT_NAMESPACE, "permissive", "") + &pa("n", "default", "strict", ""),
            Req::new(),
            MtlsMode::Strict,
        ),
        (
            "service beats namespace",
            pa("n", "default", "strict", "") + &pa("s", "default", "permissive", svc_api),
            Req::new(),
            MtlsMode::Permissive,
        ),
        (
            "labels select like a service",
            pa("n", "default", "strict", "") + &pa("s", "default", "permissive", v2),
            Req::new().labels(&[("version", "v2")]),
            MtlsMode::Permissive,
        ),
        (
            "selector for another workload ignored",
            pa("n", "default", "strict", "") + &pa("s", "default", "permissive", v2),
            Req::new(),
            MtlsMode::Strict,
        ),
        (
            "other namespace ignored",
            pa("n", "shop", "permissive", ""),
            Req::new(),
            MtlsMode::Strict,
        ),
        (
            "root selector beats root namespace-wide",
            pa("a", ROOT_NAMESPACE, "strict", "") + &pa("b", ROOT_NAMESPACE, "permissive", svc_api),
            Req::new().to("shop/api"),
            MtlsMode::Permissive,
        ),
        (
            "namespace-wide beats root selector",
            pa("b", ROOT_NAMESPACE, "permissive", svc_api) + &pa("n", "shop", "strict", ""),
            Req::new().to("shop/api"),
            MtlsMode::Strict,
        ),
        (
            "namespace after root in order still wins",
            pa("r", ROOT_NAMESPACE, "strict", "") + &pa("n", "zoo", "permissive", ""),
            Req::new().to("zoo/api"),
            MtlsMode::Permissive,
        ),
        (
            "same rank: the first in key order wins",
            pa("a", "default", "strict", svc_api) + &pa("b", "default", "permissive", svc_api),
            Req::new(),
            MtlsMode::Strict,
        ),
        (
            "same rank, the other way round",
            pa("a", "default", "permissive", svc_api) + &pa("b", "default", "strict", svc_api),
            Req::new(),
            MtlsMode::Permissive,
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(case, toml, req, want)| {
            let snap = if toml.is_empty() {
                Snapshot::default()
            } else {
                snapshot(toml)
            };
            let workload = Workload {
                service: &req.service,
                labels: &req.labels,
            };
            let got = mtls_mode(&snap, &workload);
            (got != *want).then(|| format!("{case}: got {got}, want {want}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn plaintext_needs_permissive_then_authorization() {
    let permissive =
        "[[resource]]\nkind = \"PeerAuthentication\"\nname = \"p\"\nmode = \"permissive\"\n";
    let strict_api = "[[resource]]\nkind = \"PeerAuthentication\"\nname = \"s\"\nmode = \"strict\"\n\
                      [resource.selector]\nservice = \"api\"\n";
    let web_only = policy(
        "web",
        "allow",
        &format!("[[resource.rules]]\nfrom = [{{ principals = [{WEB:?}] }}]"),
    );
    let from_lan = policy(
        "lan",
        "allow",
        "[[resource.rules]]\nfrom = [{ ip_blocks = [\"10.1.0.0/16\"] }]",
    );
    let deny_lan = policy(
        "nolan",
        "deny",
        "[[resource.rules]]\nfrom = [{ ip_blocks = [\"10.1.0.0/16\"] }]",
    );
    let cases: &[(&str, String, Req, &str)] = &[
        (
            "strict by default",
            String::new(),
            Req::new().plaintext(),
            "deny mtls_required",
        ),
        (
            "mTLS unaffected by strict",
            String::new(),
            Req::new(),
            "allow default",
        ),
        (
            "permissive: plaintext allowed",
            permissive.to_owned(),
            Req::new().plaintext(),
            "allow default",
        ),
        (
            "strict for the service beats namespace permissive",
            permissive.to_owned() + strict_api,
            Req::new().plaintext(),
            "deny mtls_required",
        ),
        (
            "strict refuses before deny policies are looked at",
            deny_lan.clone(),
            Req::new().plaintext(),
            "deny mtls_required",
        ),
        (
            "permissive: principal rules never match plaintext",
            permissive.to_owned() + &web_only,
            Req::new().plaintext(),
            "deny no_allow_match",
        ),
        (
            "permissive: ip_blocks admit plaintext",
            permissive.to_owned() + &web_only + &from_lan,
            Req::new().plaintext(),
            "allow lan",
        ),
        (
            "permissive: ip_blocks from elsewhere",
            permissive.to_owned() + &from_lan,
            Req::new().plaintext().ip("192.168.1.1"),
            "deny no_allow_match",
        ),
        (
            "permissive: deny by ip_blocks",
            permissive.to_owned() + &deny_lan,
            Req::new().plaintext(),
            "deny nolan",
        ),
        (
            "permissive: mesh default deny still applies",
            permissive.to_owned() + MESH_DENY,
            Req::new().plaintext(),
            "deny default_deny",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(case, toml, req, want)| {
            let snap = if toml.is_empty() {
                Snapshot::default()
            } else {
                snapshot(toml)
            };
            let r = Request {
                source: req.source.as_ref(),
                source_ip: req.ip,
                workload: Workload {
                    service: &req.service,
                    labels: &req.labels,
                },
                port: req.port,
                http: None,
            };
            let got = summary(&decide(&snap, &r));
            (got != *want).then(|| format!("{case}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
