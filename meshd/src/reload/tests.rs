//! Table tests of the reload decisions: what needs a restart, what changed.

use std::time::Duration;

use super::*;

fn base() -> Config {
    Config::for_test(std::path::Path::new("/var/lib/meshd-test"))
}

fn service(name: &str, text: &str) -> Service {
    let file = std::path::PathBuf::from(format!("/etc/meshd/services.d/{name}.toml"));
    Service::from_toml_str(&file, &format!("name = \"{name}\"\n{text}")).unwrap()
}

#[test]
fn restart_only_keys_are_named() {
    type Edit = fn(&mut Config);
    let cases: &[(&str, Edit, &[&str])] = &[
        ("nothing", |_| {}, &[]),
        (
            "timeouts reload",
            |c| {
                c.inbound.handshake_timeout = Duration::from_secs(3);
                c.outbound.connect_timeout = Duration::from_secs(2);
                c.drain.grace_period = Duration::from_secs(60);
            },
            &[],
        ),
        (
            "services reload",
            |c| {
                c.services
                    .push(service("web", "address = \"127.0.0.1:8080\""))
            },
            &[],
        ),
        (
            "node name",
            |c| c.node_name = mesh_api::name::NodeName::new("other").unwrap(),
            &["node_name"],
        ),
        (
            "gossip and inbound addresses",
            |c| {
                c.gossip.bind = "127.0.0.1:7947".parse().unwrap();
                c.inbound.bind = "127.0.0.1:15009".parse().unwrap();
            },
            &["gossip.bind", "inbound.bind"],
        ),
        (
            "registry",
            |c| c.registry.address = "10.0.0.1:7700".into(),
            &["registry.address"],
        ),
        (
            "connection limit (a semaphore sized at start)",
            |c| c.inbound.max_connections = 5,
            &["inbound.max_connections"],
        ),
        (
            "gossip interval and seeds",
            |c| {
                c.gossip.interval = Duration::from_secs(1);
                c.gossip.seeds = vec!["10.0.0.2:7946".into()];
            },
            &["gossip.seeds", "gossip.interval"],
        ),
        (
            "admin, data dir, locality",
            |c| {
                c.admin.bind = "127.0.0.1:1".parse().unwrap();
                c.data_dir = "/elsewhere".into();
                c.zone = mesh_api::name::Label::new("b").unwrap();
            },
            &["zone", "data_dir", "admin.bind"],
        ),
    ];
    for (case, edit, want) in cases {
        let old = base();
        let mut new = old.clone();
        edit(&mut new);
        assert_eq!(restart_only_changes(&old, &new), *want, "{case}");
    }
}

#[test]
fn refusal_names_the_keys() {
    let one = Refusal::RestartOnly(vec!["gossip.bind"]).to_string();
    assert_eq!(
        one,
        "gossip.bind only takes effect when meshd starts (systemctl restart meshd); the reload changed it"
    );
    let two = Refusal::RestartOnly(vec!["node_name", "zone"]).to_string();
    assert!(two.starts_with("node_name, zone only take effect"), "{two}");
}

#[test]
fn settings_that_reload() {
    let old = base();
    let mut new = old.clone();
    assert!(!settings_changed(&old, &new));
    new.drain.grace_period = Duration::from_secs(1);
    assert!(settings_changed(&old, &new));
    let mut new = old.clone();
    new.services
        .push(service("web", "address = \"127.0.0.1:8080\""));
    assert!(!settings_changed(&old, &new), "services are not settings");
}

#[test]
fn service_diff_table() {
    let web = service("web", "address = \"127.0.0.1:8080\"");
    let web_moved = service("web", "address = \"127.0.0.1:8081\"");
    let web_labelled = service(
        "web",
        "address = \"127.0.0.1:8080\"\n[labels]\nversion = \"v2\"",
    );
    let api = service("api", "address = \"127.0.0.1:9090\"");
    let db = service("db", "address = \"127.0.0.1:5432\"");
    let keys = |v: &[ServiceKey]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    // (case, old, new, added, removed, changed)
    type Case<'a> = (
        &'a str,
        Vec<Service>,
        Vec<Service>,
        &'a [&'a str],
        &'a [&'a str],
        &'a [&'a str],
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "same",
            vec![web.clone(), api.clone()],
            vec![api.clone(), web.clone()],
            &[],
            &[],
            &[],
        ),
        (
            "added",
            vec![web.clone()],
            vec![web.clone(), api.clone()],
            &["default/api"],
            &[],
            &[],
        ),
        (
            "removed",
            vec![web.clone(), api.clone()],
            vec![api.clone()],
            &[],
            &["default/web"],
            &[],
        ),
        (
            "app moved",
            vec![web.clone()],
            vec![web_moved],
            &[],
            &[],
            &["default/web"],
        ),
        (
            "labels",
            vec![web.clone()],
            vec![web_labelled],
            &[],
            &[],
            &["default/web"],
        ),
        (
            "all at once",
            vec![web.clone(), api],
            vec![service("web", "address = \"127.0.0.1:1\""), db],
            &["default/db"],
            &["default/api"],
            &["default/web"],
        ),
        (
            "from nothing",
            vec![],
            vec![web],
            &["default/web"],
            &[],
            &[],
        ),
    ];
    for (case, old, new, added, removed, changed) in cases {
        let d = diff_services(&old, &new);
        assert_eq!(keys(&d.added), *added, "{case}: added");
        assert_eq!(keys(&d.removed), *removed, "{case}: removed");
        assert_eq!(keys(&d.changed), *changed, "{case}: changed");
    }
}

#[test]
fn summary_reads_well() {
    let s = Summary {
        added: vec!["default/api".into()],
        removed: vec![],
        changed: vec!["default/web".into()],
        listeners: [1, 2, 0],
        settings: true,
    };
    assert_eq!(
        s.to_string(),
        "services added: default/api; removed: none; changed: default/web; listeners bound 1, updated 2, closed 0; settings changed"
    );
}
