//! ExternalService parsing: a full and a minimal resource, every bad input naming its key, the
//! JSON round trip and the egress server names.

use super::super::{Kind, Resource, Spec, parse_file};
use super::*;

fn one(body: &str) -> Result<Resource, Vec<String>> {
    let text = format!(
        "[[resource]]\nkind = \"ExternalService\"\nname = \"pay\"\nnamespace = \"shop\"\n{body}\n"
    );
    parse_file("es.toml", &text)
        .map(|mut v| v.remove(0))
        .map_err(|ps| ps.iter().map(ToString::to_string).collect())
}

fn spec(body: &str) -> ExternalService {
    match one(body)
        .unwrap_or_else(|e| panic!("{body}\n{}", e.join("\n")))
        .spec
    {
        Spec::ExternalService(s) => s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn full_and_minimal() {
    let s = spec(
        r#"hosts = ["api.pay.example", "pay.example"]
port = 443
protocol = "http"
endpoints = [{ address = "203.0.113.7:443", datacenter = "dc1", zone = "a" }, { address = "[2001:db8::7]:8443" }]
egress_gateway = "egress"
[resource.tls]
ca_file = "/etc/meshd/ext/pay-ca.pem"
server_name = "api.pay.example"
cert_file = "/etc/meshd/ext/client.pem"
key_file = "/etc/meshd/ext/client.key"
"#,
    );
    assert_eq!(s.port, 443);
    assert_eq!(s.protocol, ExternalProtocol::Http);
    assert_eq!(s.endpoints.len(), 2);
    assert_eq!(s.endpoints[0].datacenter, "dc1");
    assert_eq!(s.endpoints[1].zone, "");
    assert_eq!(s.egress_gateway.as_ref().map(Label::as_str), Some("egress"));
    assert_eq!(s.server_name(), "api.pay.example");
    assert!(s.has_host("pay.example") && !s.has_host("example"));

    let s = spec("hosts = [\"db.example\"]\nport = 5432\nprotocol = \"tcp\"");
    assert!(s.endpoints.is_empty() && s.tls.is_none() && s.egress_gateway.is_none());
    assert_eq!(s.server_name(), "db.example");
}

#[test]
fn json_round_trip() {
    let r = one(
        "hosts = [\"a.example\"]\nport = 8443\nprotocol = \"http\"\ntls = { ca_file = \"/ca.pem\" }",
    )
    .unwrap();
    let back = Resource::from_json("ExternalService", "shop", "pay", &r.spec_json()).unwrap();
    assert_eq!(back, r);
    assert_eq!(r.key.kind, Kind::ExternalService);
}

#[rustfmt::skip]
#[test]
fn bad_inputs_name_the_key() {
    const OK: &str = "hosts = [\"a.example\"]\nport = 443\nprotocol = \"http\"\n";
    let cases: &[(&str, String, &str, &str)] = &[
        ("no hosts", "port = 443\nprotocol = \"http\"".into(), "hosts", "missing"),
        ("empty hosts", "hosts = []\nport = 443\nprotocol = \"http\"".into(), "hosts", "empty list"),
        ("wildcard host", "hosts = [\"*.example\"]\nport = 443\nprotocol = \"http\"".into(), "hosts[0]", "wildcard"),
        ("mesh host", "hosts = [\"api.mesh\"]\nport = 443\nprotocol = \"http\"".into(), "hosts[0]", "reserved"),
        ("duplicate host", "hosts = [\"a.example\", \"a.example\"]\nport = 443\nprotocol = \"http\"".into(), "hosts[1]", "already used"),
        ("upper host", "hosts = [\"A.example\"]\nport = 443\nprotocol = \"http\"".into(), "hosts[0]", "lowercase"),
        ("port 0", "hosts = [\"a.example\"]\nport = 0\nprotocol = \"http\"".into(), "port", "from 1 to 65535"),
        ("protocol", "hosts = [\"a.example\"]\nport = 443\nprotocol = \"https\"".into(), "protocol", "http, tcp"),
        ("no protocol", "hosts = [\"a.example\"]\nport = 443".into(), "protocol", "missing"),
        ("endpoint no port", format!("{OK}endpoints = [{{ address = \"10.0.0.1\" }}]"), "endpoints[0].address", "IP address with a port"),
        ("endpoint name", format!("{OK}endpoints = [{{ address = \"a.example:443\" }}]"), "endpoints[0].address", "IP address with a port"),
        ("endpoint unspecified", format!("{OK}endpoints = [{{ address = \"0.0.0.0:443\" }}]"), "endpoints[0].address", "IP address with a port"),
        ("endpoint dup", format!("{OK}endpoints = [{{ address = \"10.0.0.1:1\" }}, {{ address = \"10.0.0.1:1\" }}]"), "endpoints[1]", "already used"),
        ("endpoint key", format!("{OK}endpoints = [{{ address = \"10.0.0.1:1\", weight = 2 }}]"), "endpoints[0].weight", "unknown key"),
        ("endpoints empty", format!("{OK}endpoints = []"), "endpoints", "resolve the first host by DNS"),
        ("tls no ca", format!("{OK}tls = {{ server_name = \"a.example\" }}"), "tls.ca_file", "missing"),
        ("tls relative ca", format!("{OK}tls = {{ ca_file = \"ca.pem\" }}"), "tls.ca_file", "absolute path"),
        ("tls cert without key", format!("{OK}tls = {{ ca_file = \"/ca.pem\", cert_file = \"/c.pem\" }}"), "tls.key_file", "both cert_file and key_file"),
        ("tls key without cert", format!("{OK}tls = {{ ca_file = \"/ca.pem\", key_file = \"/k.pem\" }}"), "tls.cert_file", "both cert_file and key_file"),
        ("tls server name", format!("{OK}tls = {{ ca_file = \"/ca.pem\", server_name = \"*.a.example\" }}"), "tls.server_name", "not a server name"),
        ("tls unknown", format!("{OK}tls = {{ ca_file = \"/ca.pem\", insecure_skip_verify = true }}"), "tls.insecure_skip_verify", "unknown key"),
        ("gateway", format!("{OK}egress_gateway = \"Egress\""), "egress_gateway", ""),
        ("unknown key", format!("{OK}resolution = \"dns\""), "resolution", "unknown key"),
    ];
    let mut failures = Vec::new();
    for (case, body, key, words) in cases {
        let text = format!("[[resource]]\nkind = \"ExternalService\"\nname = \"x\"\n{body}\n");
        let Err(problems) = parse_file("bad.toml", &text) else {
            failures.push(format!("{case}: parsed"));
            continue;
        };
        if !problems.iter().any(|p| p.key == *key && p.message.contains(words)) {
            let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
            failures.push(format!("{case}: want {key:?} ~ {words:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn egress_server_names() {
    let l = |s: &str| Label::new(s).unwrap();
    let sni = egress_sni(&l("pay"), &l("egress"), &l("shop"));
    assert_eq!(sni, "pay.egress.shop.egress.mesh");
    assert_eq!(
        parse_egress_sni(&sni),
        Some((l("pay"), l("egress"), l("shop")))
    );
    for bad in [
        "pay.shop.egress.mesh",
        "a.b.c.d.egress.mesh",
        "pay.egress.shop.svc.mesh",
        "Pay.egress.shop.egress.mesh",
        ".egress.shop.egress.mesh",
        "egress.mesh",
    ] {
        assert_eq!(parse_egress_sni(bad), None, "{bad}");
    }
}
