//! Which addresses are loopback, the admin endpoint refused off loopback unless allowed, and
//! the warnings for upstream, `http_proxy` and admin listeners other hosts can reach.

use std::path::Path;

use super::*;
use crate::config::{Problem, Service};

const NODE_FILE: &str = "/etc/meshd/meshd.toml";
const WEB_FILE: &str = "/etc/meshd/services.d/web.toml";

/// A valid node file with `[admin]` set to `admin` (TOML lines).
fn node(admin: &str) -> String {
    format!(
        "node_name = \"n1\"\n[registry]\naddress = \"r:7700\"\n\
         [gossip]\nbind = \"10.0.0.5:7946\"\n[inbound]\nbind = \"10.0.0.5:15008\"\n\
         [admin]\n{admin}\n"
    )
}

fn parse_node(admin: &str) -> Result<Config, Vec<Problem>> {
    Config::from_toml_str(Path::new(NODE_FILE), &node(admin)).map_err(|e| e.problems().to_vec())
}

/// `web` with one upstream to `api` bound at `upstream` and, if given, an `http_proxy`.
fn web(upstream: &str, http_proxy: Option<&str>) -> Service {
    let proxy = http_proxy
        .map(|p| format!("http_proxy = \"{p}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "name = \"web\"\naddress = \"127.0.0.1:8080\"\nprotocol = \"http\"\n{proxy}\
         [[upstreams]]\nservice = \"api\"\nbind = \"{upstream}\"\n"
    );
    Service::from_toml_str(Path::new(WEB_FILE), &text).unwrap()
}

#[test]
fn loopback_addresses() {
    #[rustfmt::skip]
    let cases = [
        ("127.0.0.1", true),
        ("127.1.2.3", true),          // all of 127/8
        ("::1", true),
        ("::ffff:127.0.0.1", true),   // IPv4-mapped loopback
        ("0.0.0.0", false),           // every address
        ("::", false),
        ("10.0.0.5", false),
        ("192.168.1.20", false),
        ("169.254.0.1", false),       // link-local reaches the link
        ("fe80::1", false),
        ("fd00::5", false),
        ("::ffff:10.0.0.5", false),
        ("2001:db8::1", false),
    ];
    for (ip, want) in cases {
        assert_eq!(is_loopback(ip.parse().unwrap()), want, "{ip}");
    }
}

/// The admin endpoint: loopback, or anything with `allow_remote = true` explicitly.
#[test]
fn admin_off_loopback_needs_allow_remote() {
    #[rustfmt::skip]
    let cases: &[(&str, Option<bool>, bool)] = &[
        // (bind, allow_remote, accepted)
        ("127.0.0.1:15000", None, true),
        ("127.0.0.2:15000", None, true),
        ("[::1]:15000", None, true),
        ("[::ffff:127.0.0.1]:15000", None, true),
        ("0.0.0.0:15000", None, false),
        ("[::]:15000", None, false),
        ("10.0.0.5:15000", None, false),
        ("[fd00::5]:15000", None, false),
        ("10.0.0.5:15000", Some(false), false),
        ("10.0.0.5:15000", Some(true), true),
        ("0.0.0.0:15000", Some(true), true),
        ("[::]:15000", Some(true), true),
        ("127.0.0.1:15000", Some(true), true),
    ];
    for (bind, allow, accepted) in cases {
        let mut admin = format!("bind = \"{bind}\"");
        if let Some(a) = allow {
            admin += &format!("\nallow_remote = {a}");
        }
        match parse_node(&admin) {
            Ok(c) => {
                assert!(accepted, "{admin}: accepted");
                assert_eq!(c.admin.bind, bind.parse().unwrap());
                assert_eq!(c.admin.allow_remote, allow.unwrap_or(false));
            }
            Err(problems) => {
                assert!(!accepted, "{admin}: refused: {problems:?}");
                assert_eq!(problems.len(), 1, "{problems:?}");
                let p = &problems[0];
                assert_eq!(p.key, "admin.bind");
                assert!(
                    p.message
                        .starts_with(&format!("{bind} is not a loopback address"))
                );
                assert!(p.message.contains("admin.allow_remote = true"), "{p}");
                assert!(
                    p.to_string()
                        .starts_with(&format!("{NODE_FILE}: admin.bind: "))
                );
            }
        }
    }
    // The key is typed, and unknown keys beside it are still refused.
    let problems = parse_node("allow_remote = \"yes\"").unwrap_err();
    assert!(
        problems[0].message.contains("expected a boolean"),
        "{problems:?}"
    );
    let problems = parse_node("allow_remotes = true").unwrap_err();
    assert!(
        problems[0]
            .message
            .contains("unknown field `allow_remotes`"),
        "{problems:?}"
    );
}

/// Upstream and `http_proxy` listeners are valid anywhere, and warned about off loopback.
#[test]
fn listeners_off_loopback_are_warned_about() {
    #[rustfmt::skip]
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        // (upstream bind, http_proxy, keys warned about)
        ("127.0.0.1:9001", None, &[]),
        ("127.0.0.1:9001", Some("127.0.0.1:15001"), &[]),
        ("[::1]:9001", Some("[::1]:15001"), &[]),
        ("0.0.0.0:9001", None, &["upstreams[0].bind"]),
        ("[::]:9001", None, &["upstreams[0].bind"]),
        ("10.0.0.5:9001", None, &["upstreams[0].bind"]),
        ("[fd00::5]:9001", None, &["upstreams[0].bind"]),
        ("127.0.0.1:9001", Some("0.0.0.0:15001"), &["http_proxy"]),
        ("10.0.0.5:9001", Some("[::]:15001"), &["upstreams[0].bind", "http_proxy"]),
    ];
    for (upstream, proxy, want) in cases {
        let mut config = parse_node("").unwrap();
        config.services = vec![web(upstream, *proxy)];
        let found = config.listeners_off_loopback();
        let keys: Vec<&str> = found.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, *want, "upstream {upstream}, http_proxy {proxy:?}");
        assert!(
            found.iter().all(|w| w.file == Path::new(WEB_FILE)),
            "{found:?}"
        );
    }
}

#[test]
fn warnings_name_file_key_address_and_risk() {
    let mut config = parse_node("bind = \"10.0.0.5:15000\"\nallow_remote = true").unwrap();
    config.services = vec![web("0.0.0.0:9001", Some("10.0.0.5:15001"))];
    let lines: Vec<String> = (config.listeners_off_loopback().iter())
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "/etc/meshd/meshd.toml: admin.bind: 10.0.0.5:15000 is not on loopback; the admin \
             endpoint has no authentication: any host that can reach it can read this node's \
             configuration, metrics and members (admin.allow_remote is set)",
            "/etc/meshd/services.d/web.toml: upstreams[0].bind: 0.0.0.0:9001 is not on loopback \
             (it listens on every address of this host); any host that can reach it can call \
             default/api with default/web's identity",
            "/etc/meshd/services.d/web.toml: http_proxy: 10.0.0.5:15001 is not on loopback; any \
             host that can reach it can call the mesh's HTTP services with default/web's \
             identity",
        ]
    );
    assert!(lines.iter().all(|l| !l.contains('\n')));
}

#[test]
fn defaults_and_test_configs_warn_about_nothing() {
    assert_eq!(parse_node("").unwrap().listeners_off_loopback(), []);
    let c = Config::for_test(Path::new("/tmp/x"));
    assert_eq!(c.listeners_off_loopback(), []);
    assert_eq!(c.node_file, Path::new("/tmp/x/meshd.toml"));
    assert_eq!(parse_node("").unwrap().node_file, Path::new(NODE_FILE));
}
