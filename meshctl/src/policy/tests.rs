//! Reading policy files and directories, and the output formats of `get`, `history` and apply.

use std::path::PathBuf;

use mesh_api::policy::parse_file;
use mesh_api::proto::v1 as pb;

use super::*;

const A: &str = r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow-web"
namespace = "shop"
selector = { service = "api", labels = { version = "v1" } }
rules = [{ from = [{ principals = ["spiffe://mesh.internal/ns/shop/svc/web"] }], to = [{ ports = [8080] }] }]
"#;

const B: &str = r#"
[[resource]]
kind = "Route"
name = "api"
namespace = "shop"
service = "api"
[[resource.http]]
route = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
timeout = "2s"
retries = { attempts = 3 }

[[resource]]
kind = "MeshConfig"
name = "default"
default_authorization = "deny"

[[resource]]
kind = "PeerAuthentication"
name = "strict"
namespace = "mesh-system"
mode = "strict"
"#;

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn problems(e: Error) -> Vec<String> {
    match e {
        Error::Invalid(p) => p,
        other => panic!("expected invalid input, got {other}"),
    }
}

#[test]
fn a_directory_means_its_toml_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.toml", B);
    write(dir.path(), "a.toml", A);
    write(dir.path(), "notes.txt", "not policy");
    let rs = load(&[dir.path().to_owned()]).unwrap();
    let keys: Vec<String> = rs.iter().map(|r| r.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "AuthorizationPolicy/shop/api-allow-web",
            "Route/shop/api",
            "MeshConfig/mesh-system/default",
            "PeerAuthentication/mesh-system/strict",
        ]
    );
    let empty = tempfile::tempdir().unwrap();
    let p = problems(load(&[empty.path().to_owned()]).unwrap_err());
    assert!(p[0].contains("no *.toml files"), "{p:?}");
    let p = problems(load(&[dir.path().join("missing.toml")]).unwrap_err());
    assert!(p[0].contains("no such file"), "{p:?}");
}

#[test]
fn problems_name_the_file_resource_and_key_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        "[[resource]]\nkind = \"Route\"\nname = \"api\"\nnamespace = \"shop\"\nservice = \"api\"\nhttp = [{ timeout = \"soon\" }]\n",
    );
    let dup = write(dir.path(), "dup.toml", A);
    let a = write(dir.path(), "a.toml", A);
    let p = problems(load(&[bad.clone(), a, dup]).unwrap_err());
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with(&format!(
            "{}: Route/shop/api: http[0].timeout",
            bad.display()
        )),
        "{p:?}"
    );
    assert!(
        p[1].contains("dup.toml: AuthorizationPolicy/shop/api-allow-web: also defined in"),
        "{p:?}"
    );
    let e = Error::Invalid(p);
    assert_eq!(e.exit_code(), 64);
    assert!(
        e.to_string()
            .starts_with("2 problem(s), nothing applied:\n  ")
    );
}

fn stored(text: &str, revision: u64) -> Vec<pb::Resource> {
    parse_file("t.toml", text)
        .unwrap()
        .iter()
        .map(|r| pb::Resource {
            revision,
            author: "spiffe://mesh.internal/admin/ops".into(),
            updated_unix: 1_700_000_000,
            ..wire(r)
        })
        .collect()
}

#[test]
fn toml_output_applies_back_unchanged() {
    let mut all = stored(A, 3);
    all.extend(stored(B, 4));
    let text = toml_of(&all);
    assert!(text.contains("# Route/shop/api: revision 4 by spiffe://mesh.internal/admin/ops at 2023-11-14T22:13:20Z"), "{text}");
    assert!(
        text.contains("[[resource]]\nkind = \"Route\"\nname = \"api\"\nnamespace = \"shop\"\n"),
        "{text}"
    );
    let back = parse_file("out.toml", &text).unwrap_or_else(|p| panic!("{text}\n{p:?}"));
    let again: Vec<pb::Resource> = back.iter().map(wire).collect();
    let spec = |v: &[pb::Resource]| {
        v.iter()
            .map(|r| (r.kind.clone(), r.spec_json.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(spec(&again), spec(&all));
}

#[test]
fn table_and_json_output() {
    let rs = stored(B, 4);
    let t = table(&rs);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with("KIND"), "{t}");
    let fields = |l: &str| l.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
    assert_eq!(fields(lines[1]), "Route shop api 4", "{t}");
    assert_eq!(fields(lines[2]), "MeshConfig mesh-system default 4", "{t}");
    // Columns line up.
    assert_eq!(
        lines[0].find("NAMESPACE"),
        lines[3].find("mesh-system"),
        "{t}"
    );
    assert!(table(&[]).is_empty());
    let j = json_of(&rs[0]);
    assert_eq!(j["spec"]["service"], "api");
    assert_eq!(j["revision"], 4);
}

#[test]
fn history_actions_and_apply_lines() {
    let live = stored(A, 1).remove(0);
    let versions = vec![
        pb::Resource {
            revision: 1,
            ..live.clone()
        },
        pb::Resource {
            revision: 5,
            ..live.clone()
        },
        pb::Resource {
            revision: 7,
            deleted: true,
            spec_json: String::new(),
            ..live.clone()
        },
        pb::Resource {
            revision: 9,
            ..live
        },
    ];
    assert_eq!(
        actions(&versions),
        ["created", "updated", "deleted", "created"]
    );
    let t = history_table(&versions);
    assert!(t.lines().nth(3).unwrap().ends_with("deleted"), "{t}");
    let j = history_json(&versions);
    assert!(j[2]["spec"].is_null());
    assert_eq!(j[3]["spec"]["selector"]["service"], "api");

    let resp = pb::ApplyResponse {
        revision: 12,
        changes: vec![
            pb::Change {
                kind: "Route".into(),
                namespace: "shop".into(),
                name: "api".into(),
                action: "updated".into(),
                diff: "-   \"timeout\": \"1s\"\n+   \"timeout\": \"2s\"".into(),
            },
            pb::Change {
                kind: "MeshConfig".into(),
                namespace: "mesh-system".into(),
                name: "default".into(),
                action: "unchanged".into(),
                diff: String::new(),
            },
        ],
    };
    assert_eq!(
        changes(&resp, false),
        "updated Route/shop/api (revision 12)\nunchanged MeshConfig/mesh-system/default (revision 12)\n"
    );
    assert_eq!(
        changes(&resp, true),
        "updated Route/shop/api (dry run)\n    -   \"timeout\": \"1s\"\n    +   \"timeout\": \"2s\"\nunchanged MeshConfig/mesh-system/default (dry run)\n"
    );
}

#[test]
fn kind_arguments() {
    assert_eq!("all".parse::<KindArg>().unwrap(), KindArg::All);
    assert_eq!(
        "ap".parse::<KindArg>().unwrap(),
        KindArg::One(Kind::AuthorizationPolicy)
    );
    assert_eq!(
        "routes".parse::<KindArg>().unwrap(),
        KindArg::One(Kind::Route)
    );
    let e = "nope".parse::<KindArg>().unwrap_err();
    assert!(
        e.contains("valid kinds") && e.ends_with("or \"all\""),
        "{e}"
    );
}

#[test]
fn wide_gateways_say_which_routes_attach_and_why_not() {
    let stored = stored(
        r#"
[[resource]]
kind = "Gateway"
name = "public"
[[resource.listeners]]
name = "web"
bind = "0.0.0.0:443"
protocol = "https"
hostnames = ["*.example.com"]
tls = { certificates = [{ cert_file = "/a.crt", key_file = "/a.key" }] }
[[resource.listeners]]
name = "db"
bind = "0.0.0.0:5432"
protocol = "tcp"
service = "db"

[[resource]]
kind = "Route"
name = "shop"
gateways = ["public"]
hostnames = ["shop.example.com"]
[[resource.http]]
route = [{ service = "web" }]

[[resource]]
kind = "Route"
name = "stray"
gateways = ["public"]
hostnames = ["shop.example.org"]
[[resource.http]]
route = [{ service = "web" }]

[[resource]]
kind = "Route"
name = "other-gateway"
gateways = ["private"]
[[resource.http]]
route = [{ service = "web" }]
"#,
        4,
    );
    let (gateways, routes): (Vec<_>, Vec<_>) =
        stored.into_iter().partition(|r| r.kind == "Gateway");
    let refs: Vec<&pb::Resource> = gateways.iter().collect();
    let out = gateway_wide(&refs, &routes);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0][..7],
        [
            "GATEWAY",
            "LISTENER",
            "PROTOCOL",
            "BIND",
            "HOSTNAMES",
            "ROUTE",
            "STATUS"
        ]
    );
    let row = |listener: &str, route: &str| {
        out.lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&listener) && f.get(5) == Some(&route)
            })
            .unwrap_or_else(|| panic!("no row {listener} {route} in\n{out}"))
            .to_owned()
    };
    assert!(row("web", "shop").ends_with("attached"), "{out}");
    assert!(
        row("web", "stray").contains("not attached: no host name of the route (shop.example.org) overlaps listener web's (*.example.com)"),
        "{out}"
    );
    assert!(!out.contains("other-gateway"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("db") && l.contains("service db")),
        "{out}"
    );
}
