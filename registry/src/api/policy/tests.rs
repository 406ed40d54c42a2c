//! Table tests of the pure parts of the policy API: request validation, change rendering and
//! get filters.

use super::*;

fn res(kind: &str, namespace: &str, name: &str, spec: &str) -> pb::Resource {
    pb::Resource {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        spec_json: spec.to_owned(),
        ..Default::default()
    }
}

/// A spec the policy model accepts for `Route`, in non-canonical spacing.
const ROUTE: &str = r#"{ "service": "web",  "http": [ {} ] }"#;

#[test]
fn validate_apply_cases() {
    // (what, request, Ok(keys) or Err(substrings that must each appear in some problem))
    type Want = Result<Vec<&'static str>, Vec<&'static str>>;
    let cases: Vec<(&str, Vec<pb::Resource>, Want)> = vec![
        ("empty request", vec![], Err(vec!["no resources"])),
        (
            "one valid resource",
            vec![res("Route", "shop", "web", ROUTE)],
            Ok(vec!["Route/shop/web"]),
        ),
        (
            "kind alias and empty namespace are canonicalised",
            vec![res("routes", "", "web", ROUTE)],
            Ok(vec!["Route/default/web"]),
        ),
        (
            "several valid resources keep request order",
            vec![
                res("Route", "shop", "web", ROUTE),
                res("Route", "shop", "api", ROUTE),
            ],
            Ok(vec!["Route/shop/web", "Route/shop/api"]),
        ),
        (
            "same name in another namespace is not a duplicate",
            vec![
                res("Route", "shop", "web", ROUTE),
                res("Route", "ops", "web", ROUTE),
            ],
            Ok(vec!["Route/shop/web", "Route/ops/web"]),
        ),
        (
            "duplicate key",
            vec![
                res("Route", "shop", "web", ROUTE),
                res("Route", "shop", "web", ROUTE),
            ],
            Err(vec!["Route/shop/web: appears more than once"]),
        ),
        (
            "duplicate key through an alias and the default namespace",
            vec![
                res("Route", "default", "web", ROUTE),
                res("routes", "", "web", ROUTE),
            ],
            Err(vec!["Route/default/web: appears more than once"]),
        ),
        (
            "bad spec json",
            vec![res("Route", "shop", "web", "{not json")],
            Err(vec!["Route/shop/web: spec is not valid JSON"]),
        ),
        (
            "spec missing a required key",
            vec![res("Route", "shop", "web", r#"{"service":"web"}"#)],
            Err(vec!["Route/shop/web: http: "]),
        ),
        (
            "unknown kind",
            vec![res("NoSuchKind", "shop", "web", ROUTE)],
            Err(vec!["NoSuchKind/shop/web: kind: unknown kind"]),
        ),
        (
            "every problem of every resource is reported",
            vec![
                res("Route", "shop", "ok", ROUTE),
                res("NoSuchKind", "shop", "a", ROUTE),
                res("Route", "shop", "b", "[]"),
                res("Route", "shop", "ok", ROUTE),
            ],
            Err(vec![
                "NoSuchKind",
                "Route/shop/b: spec must be a JSON object",
                "Route/shop/ok: appears more than once",
            ]),
        ),
    ];
    for (what, resources, want) in cases {
        let got = validate_apply(&resources);
        match (got, want) {
            (Ok(changes), Ok(keys)) => {
                let got: Vec<_> = changes.iter().map(display_key).collect();
                assert_eq!(got, keys, "{what}");
                assert!(changes.iter().all(|c| c.spec_json.is_some()), "{what}");
            }
            (Err(problems), Err(needles)) => {
                for needle in needles {
                    assert!(
                        problems.iter().any(|p| p.contains(needle)),
                        "{what}: no problem mentions {needle:?}: {problems:?}"
                    );
                }
            }
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn validate_apply_canonicalises_spec() {
    let changes = validate_apply(&[res("Route", "shop", "web", ROUTE)]).unwrap();
    let canonical = mesh_api::policy::Resource::from_json("Route", "shop", "web", ROUTE)
        .unwrap()
        .spec_json();
    assert_eq!(changes[0].spec_json.as_deref(), Some(canonical.as_str()));
}

#[test]
fn resource_keys() {
    let ok = |k: &str, ns: &str, n: &str| Ok((k.to_owned(), ns.to_owned(), n.to_owned()));
    let cases = [
        (("Route", "shop", "web"), ok("Route", "shop", "web")),
        (("routes", "", "web"), ok("Route", "default", "web")),
        (
            ("mc", "", "default"),
            ok("MeshConfig", "mesh-system", "default"),
        ),
        (("Nope", "shop", "web"), Err("unknown kind")),
        (("Route", "Shop", "web"), Err("namespace \"Shop\"")),
        (("Route", "shop", ""), Err("name \"\"")),
    ];
    for ((kind, ns, name), want) in cases {
        match (resource_key(kind, ns, name), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{kind}/{ns}/{name}"),
            (Err(got), Err(words)) => assert!(got.contains(words), "{kind}/{ns}/{name}: {got}"),
            (got, want) => panic!("{kind}/{ns}/{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn change_rendering() {
    let put = PolicyChange {
        kind: "Route".to_owned(),
        namespace: "shop".to_owned(),
        name: "web".to_owned(),
        spec_json: Some(r#"{"a":2}"#.to_owned()),
    };
    let del = PolicyChange {
        spec_json: None,
        ..put.clone()
    };
    let old = Some(r#"{"a":1}"#);
    let cases = [
        (
            &put,
            ChangeAction::Created,
            None,
            "created",
            "+ {\n+   \"a\": 2\n+ }",
        ),
        (
            &put,
            ChangeAction::Updated,
            old,
            "updated",
            "-   \"a\": 1\n+   \"a\": 2",
        ),
        (
            &put,
            ChangeAction::Unchanged,
            Some(r#"{"a":2}"#),
            "unchanged",
            "",
        ),
        (
            &del,
            ChangeAction::Deleted,
            old,
            "deleted",
            "- {\n-   \"a\": 1\n- }",
        ),
        (&del, ChangeAction::NotFound, None, "not_found", ""),
    ];
    for (change, action, previous, name, diff) in cases {
        let got = change_of(change, action, previous);
        assert_eq!(
            (got.action.as_str(), got.diff.as_str()),
            (name, diff),
            "{action:?}"
        );
        assert_eq!(
            (got.kind, got.namespace, got.name),
            ("Route".into(), "shop".into(), "web".into())
        );
    }
}

#[test]
fn get_filters() {
    let record = PolicyRecord {
        kind: "Route".to_owned(),
        namespace: "shop".to_owned(),
        name: "web".to_owned(),
        spec_json: "{}".to_owned(),
        revision: 1,
        author: String::new(),
        updated_unix: 0,
        deleted: false,
    };
    let filter = |kind: &str, namespace: &str, name: &str| pb::GetResourcesRequest {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        page_token: String::new(),
    };
    let cases = [
        (filter("", "", ""), true),
        (filter("Route", "", ""), true),
        (filter("Route", "shop", ""), true),
        (filter("Route", "shop", "web"), true),
        (filter("", "", "web"), true),
        (filter("Authorization", "", ""), false),
        (filter("Route", "ops", ""), false),
        (filter("", "shop", "api"), false),
    ];
    for (req, want) in cases {
        assert_eq!(matches_filter(&req, &record), want, "{req:?}");
    }
}
