//! Tests for configuration parsing, validation and loading.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const NODE_FILE: &str = "/etc/meshd/meshd.toml";

/// The smallest valid node file with the default (wildcard) binds.
const MINIMAL_NODE: &str = r#"
node_name = "node-1"
[registry]
address = "registry.mesh.internal:7700"
[gossip]
advertise = "10.0.0.5:7946"
[inbound]
advertise = "10.0.0.5:15008"
"#;

fn node_path() -> &'static Path {
    Path::new(NODE_FILE)
}

/// `MINIMAL_NODE` with `overrides` merged in key by key (tables merged, values replaced).
fn node_text(overrides: &str) -> String {
    fn merge(base: &mut toml::Table, over: toml::Table) {
        for (k, v) in over {
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
    }
    let mut base: toml::Table = toml::from_str(MINIMAL_NODE).unwrap();
    merge(&mut base, toml::from_str(overrides).unwrap());
    toml::to_string(&base).unwrap()
}

fn node_problems(text: &str) -> Vec<Problem> {
    match Config::from_toml_str(node_path(), text) {
        Ok(c) => panic!("expected problems, got {c:#?}\nfrom:\n{text}"),
        Err(e) => e.problems().to_vec(),
    }
}

fn assert_one_problem(problems: &[Problem], key: &str, fragment: &str, input: &str) {
    assert_eq!(
        problems.len(),
        1,
        "input:\n{input}\nproblems: {problems:#?}"
    );
    assert_eq!(
        problems[0].key, key,
        "input:\n{input}\nproblem: {}",
        problems[0]
    );
    assert!(
        problems[0].message.contains(fragment),
        "input:\n{input}\nproblem {:?} lacks {fragment:?}",
        problems[0].message
    );
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// === node file ===

/// Pins every default and prints the fully populated default config (pingora's
/// `not_a_test_i_cannot_write_yaml_by_hand`): `cargo test -p meshd default_node -- --nocapture`.
#[test]
fn default_node_config() {
    let config = Config::from_toml_str(node_path(), MINIMAL_NODE).unwrap();
    assert_eq!(config.node_name.as_str(), "node-1");
    assert_eq!(config.datacenter.as_str(), DEFAULT_DATACENTER);
    assert_eq!(config.zone.as_str(), DEFAULT_ZONE);
    assert_eq!(config.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(config.services_dir, Path::new(DEFAULT_SERVICES_DIR));
    assert_eq!(
        config.registry,
        RegistryConfig {
            address: "registry.mesh.internal:7700".to_owned(),
            join_token_file: DEFAULT_JOIN_TOKEN_FILE.into(),
            connect_timeout: DEFAULT_REGISTRY_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REGISTRY_REQUEST_TIMEOUT,
        }
    );
    assert_eq!(
        config.gossip,
        GossipConfig {
            bind: DEFAULT_GOSSIP_BIND,
            advertise: addr("10.0.0.5:7946"),
            seeds: vec![],
            interval: DEFAULT_GOSSIP_INTERVAL,
            cluster_id: None,
            legacy_peers: DEFAULT_GOSSIP_LEGACY_PEERS,
            protocol: GossipProtocol::V2,
        }
    );
    assert!(
        !config.gossip.legacy_peers,
        "version-1 gossip is refused unless asked for"
    );
    assert_eq!(
        config.inbound,
        InboundConfig {
            bind: DEFAULT_INBOUND_BIND,
            advertise: addr("10.0.0.5:15008"),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    );
    assert_eq!(
        config.outbound.connect_timeout,
        DEFAULT_OUTBOUND_CONNECT_TIMEOUT
    );
    assert_eq!(config.admin.bind, DEFAULT_ADMIN_BIND);
    assert_eq!(config.drain.grace_period, DEFAULT_DRAIN_GRACE_PERIOD);
    assert!(config.services.is_empty());

    let dump = toml::to_string_pretty(&config).unwrap();
    println!("{dump}");
    assert!(dump.contains("interval = \"200ms\""), "{dump}");
    assert!(dump.contains("grace_period = \"15s\""), "{dump}");
}

/// The shipped sample parses and sets every defaulted key to its default.
#[test]
fn example_node_matches_defaults() {
    let example = Config::from_toml_str(node_path(), EXAMPLE_NODE_TOML).unwrap();
    let minimal = Config::from_toml_str(node_path(), MINIMAL_NODE).unwrap();
    assert_eq!(example, minimal);
}

#[test]
fn advertise_defaults_to_specific_bind() {
    let text = r#"
        node_name = "node-1"
        [registry]
        address = "10.0.0.1:7700"
        [gossip]
        bind = "10.0.0.5:7946"
        [inbound]
        bind = "[fd00::5]:15008"
    "#;
    let config = Config::from_toml_str(node_path(), text).unwrap();
    assert_eq!(config.gossip.advertise, addr("10.0.0.5:7946"));
    assert_eq!(config.inbound.advertise, addr("[fd00::5]:15008"));
}

#[test]
fn node_values_accepted() {
    let text = node_text(
        r#"
        node_name = "web-01.dc1.example"
        [registry]
        address = "[fd00::1]:7700"
        [gossip]
        seeds = ["10.0.0.2:7946", "node-2.dc1.example:7946", "[fd00::2]:7946"]
        interval = "1s 500ms"
        cluster_id = "prod"
        legacy_peers = true
        protocol = 1
        "#,
    );
    let config = Config::from_toml_str(node_path(), &text).unwrap();
    assert_eq!(config.registry.address, "[fd00::1]:7700");
    assert_eq!(config.gossip.seeds.len(), 3);
    assert_eq!(config.gossip.interval, Duration::from_millis(1500));
    assert_eq!(config.gossip.cluster_id.as_deref(), Some("prod"));
    assert!(config.gossip.legacy_peers);
    assert_eq!(config.gossip.protocol, GossipProtocol::V1);
}

#[test]
fn bad_node_values() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("node_name = \"Node_1\"", "node_name", "\"Node_1\" is invalid: character 'N'"),
        ("node_name = \"\"", "node_name", "must not be empty"),
        ("datacenter = \"DC1\"", "datacenter", "is invalid"),
        ("zone = \"\"", "zone", "must not be empty"),
        ("data_dir = \"\"", "data_dir", "must not be empty"),
        ("services_dir = \"\"", "services_dir", "must not be empty"),
        ("[registry]\naddress = \"registry\"", "registry.address", "missing \":port\""),
        ("[registry]\naddress = \"r:0\"", "registry.address", "port 0 is not allowed"),
        ("[registry]\naddress = \"r:99999\"", "registry.address", "not a number from 1 to 65535"),
        ("[registry]\naddress = \"::1:7700\"", "registry.address", "brackets"),
        ("[registry]\naddress = \"bad_host:7700\"", "registry.address", "not a valid IP address or DNS name"),
        ("[registry]\naddress = \":7700\"", "registry.address", "missing host"),
        ("[registry]\njoin_token_file = \"\"", "registry.join_token_file", "must not be empty"),
        ("[registry]\nconnect_timeout = \"5 sex\"", "registry.connect_timeout", "\"5 sex\" is not a duration"),
        ("[registry]\nrequest_timeout = \"0s\"", "registry.request_timeout", "greater than zero"),
        ("[gossip]\nbind = \"0.0.0.0\"", "gossip.bind", "not an IP address and port"),
        ("[gossip]\nadvertise = \"0.0.0.0:7946\"", "gossip.advertise", "wildcard"),
        ("[gossip]\nadvertise = \"node-1:7946\"", "gossip.advertise", "not an IP address and port"),
        ("[gossip]\nseeds = [\"ok:1\", \"bad\"]", "gossip.seeds[1]", "\"bad\" is not a valid host:port"),
        ("[gossip]\ninterval = \"5ms\"", "gossip.interval", "must be between 10ms and 10s"),
        ("[gossip]\ninterval = \"11s\"", "gossip.interval", "out of range"),
        ("[gossip]\ncluster_id = \"\"", "gossip.cluster_id", "must not be empty"),
        ("[inbound]\nbind = \"[::]:15008\"\nadvertise = \"[::]:15008\"", "inbound.advertise", "wildcard"),
        ("[inbound]\nhandshake_timeout = \"10\"", "inbound.handshake_timeout", "not a duration"),
        ("[inbound]\nmax_connections = 0", "inbound.max_connections", "greater than 0"),
        ("[outbound]\nconnect_timeout = \"soon\"", "outbound.connect_timeout", "not a duration"),
        ("[admin]\nbind = \"localhost:15000\"", "admin.bind", "not an IP address and port"),
        ("[drain]\ngrace_period = \"forever\"", "drain.grace_period", "not a duration"),
        ("site = \"EU\"", "site", "is invalid"),
        ("[east_west]\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"wan.key\"", "east_west.bind", "missing"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_key_file = \"wan.key\"", "east_west.wan_bind", "missing"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"10.0.0.5:7947\"", "east_west.wan_key_file", "missing"),
        ("[east_west]\nbind = \"0.0.0.0:15443\"\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"k\"", "east_west.advertise", "wildcard address 0.0.0.0:15443"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"0.0.0.0:7947\"\nwan_key_file = \"k\"", "east_west.wan_advertise", "east_west.wan_bind is the wildcard"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"k\"\nwan_interval = \"20s\"", "east_west.wan_interval", "between 100ms and 10s"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"k\"\nwan_seeds = [\"nope\"]", "east_west.wan_seeds[0]", "host:port"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"k\"\nmax_connections = 0", "east_west.max_connections", "greater than 0"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"k\"\nhello_timeout = \"0s\"", "east_west.hello_timeout", "greater than zero"),
        ("[east_west]\nbind = \"10.0.0.5:15443\"\nwan_bind = \"10.0.0.5:7947\"\nwan_key_file = \"k\"\nwan_seed = []", "", "unknown field `wan_seed`"),
        // Unknown keys, type errors: one whole-file problem with the toml crate's message.
        ("colour = \"red\"", "", "unknown field `colour`"),
        ("[gossip]\nintervall = \"1s\"", "", "unknown field `intervall`"),
        ("[tls]\nenabled = true", "", "unknown field `tls`"),
        ("datacenter = 1", "", "invalid type: integer `1`, expected a string"),
        ("[gossip]\nlegacy_peers = \"yes\"", "", "invalid type: string \"yes\", expected a boolean"),
        ("[gossip]\nlegacy_peerss = true", "", "unknown field `legacy_peerss`"),
        ("[gossip]\nprotocol = 3", "gossip.protocol", "3 is not a gossip protocol: 2 (the default), or 1 only while upgrading"),
        ("[gossip]\nprotocol = 0", "gossip.protocol", "0 is not a gossip protocol"),
        ("[gossip]\nprotocol = \"2\"", "", "invalid type: string \"2\", expected u8"),
        ("[gossip]\nprotocol = 256", "", "protocol = 256"),
        ("[inbound]\nmax_connections = -1", "", "max_connections = -1"),
    ];
    for (overrides, key, fragment) in cases {
        let text = node_text(overrides);
        assert_one_problem(&node_problems(&text), key, fragment, &text);
    }
}

#[test]
fn east_west_role() {
    let text = node_text(
        "site = \"eu-west\"\n[east_west]\nbind = \"0.0.0.0:15443\"\nadvertise = \"198.51.100.7:15443\"\n\
         wan_bind = \"10.0.0.5:7947\"\nwan_seeds = [\"gw.us-east.example:7947\"]\nwan_key_file = \"wan.key\"\n",
    );
    let c = Config::from_toml_str(node_path(), &text).unwrap();
    assert_eq!(c.site.as_str(), "eu-west");
    let e = c.east_west.unwrap();
    assert_eq!(e.advertise, addr("198.51.100.7:15443"));
    assert_eq!(
        e.wan_advertise,
        addr("10.0.0.5:7947"),
        "a specific wan_bind is advertised"
    );
    assert_eq!(e.wan_seeds, ["gw.us-east.example:7947"]);
    assert_eq!(e.wan_key_file, Path::new("/etc/meshd/wan.key"));
    assert_eq!(e.wan_interval, east_west::DEFAULT_WAN_INTERVAL);
    assert_eq!(e.hello_timeout, east_west::DEFAULT_HELLO_TIMEOUT);
    assert_eq!(e.max_connections, DEFAULT_MAX_CONNECTIONS);
    let plain = Config::from_toml_str(node_path(), MINIMAL_NODE).unwrap();
    assert_eq!((plain.site.as_str(), plain.east_west), (DEFAULT_SITE, None));
}

#[test]
fn missing_and_unparsable_node_files() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("[registry]\naddress = \"r:1\"\n[gossip]\nadvertise = \"10.0.0.5:1\"\n[inbound]\nadvertise = \"10.0.0.5:2\"",
            "node_name", "missing required key"),
        ("node_name = \"n\"\n[gossip]\nadvertise = \"10.0.0.5:1\"\n[inbound]\nadvertise = \"10.0.0.5:2\"",
            "registry.address", "missing required key"),
        ("node_name = \"n\"\n[registry]\naddress = \"r:1\"\n[gossip]\nadvertise = \"10.0.0.5:1\"",
            "inbound.advertise", "required because inbound.bind is the wildcard address 0.0.0.0:15008"),
        ("node_name = \"n\"\nnode_name = \"m\"", "", "line 2"),
        ("node_name = ", "", "line 1, column"),
    ];
    for (text, key, fragment) in cases {
        assert_one_problem(&node_problems(text), key, fragment, text);
    }
}

#[test]
fn toml_errors_are_one_readable_line() {
    let problems = node_problems("node_name = \"n\"\n\n[gossip]\nintervall = \"1s\"\n");
    let message = &problems[0].message;
    assert!(!message.contains('\n'), "{message}");
    assert!(
        message.starts_with("line 4, column 1: unknown field `intervall`"),
        "{message}"
    );
    assert!(message.ends_with("(in `intervall = \"1s\"`)"), "{message}");
    let shown = problems[0].to_string();
    assert!(
        shown.starts_with("/etc/meshd/meshd.toml: line 4"),
        "{shown}"
    );
}

#[test]
fn all_node_problems_reported_at_once() {
    let text = r#"
        node_name = "Bad Name"
        zone = "Zone A"
        [gossip]
        interval = "1h"
        seeds = ["a", "b:1", "c"]
        [inbound]
        max_connections = 0
    "#;
    let err = Config::from_toml_str(node_path(), text).unwrap_err();
    let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "node_name",
            "zone",
            "registry.address",
            "gossip.advertise",
            "gossip.seeds[0]",
            "gossip.seeds[2]",
            "gossip.interval",
            "inbound.advertise",
            "inbound.max_connections",
        ]
    );
    // Display: one problem per line, each naming file and key.
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), keys.len(), "{shown}");
    assert!(
        shown
            .lines()
            .all(|l| l.starts_with("/etc/meshd/meshd.toml: ")),
        "{shown}"
    );
    assert!(shown.contains("/etc/meshd/meshd.toml: zone: \"Zone A\" is invalid"));
}

#[test]
fn relative_paths_resolve_against_the_config_file() {
    let overrides = r#"
        data_dir = "state"
        services_dir = "services.d"
        [registry]
        join_token_file = "../secrets/join-token"
    "#;
    let text = node_text(overrides);
    let config = Config::from_toml_str(Path::new("/opt/mesh/etc/meshd.toml"), &text).unwrap();
    assert_eq!(config.data_dir, Path::new("/opt/mesh/etc/state"));
    assert_eq!(config.services_dir, Path::new("/opt/mesh/etc/services.d"));
    assert_eq!(
        config.registry.join_token_file,
        Path::new("/opt/mesh/etc/../secrets/join-token")
    );

    // A bare file name: relative to the working directory, as the file itself is.
    let config = Config::from_toml_str(Path::new("meshd.toml"), &text).unwrap();
    assert_eq!(config.data_dir, Path::new("state"));

    // Absolute paths stay as they are.
    let text = node_text("data_dir = \"/srv/meshd\"");
    let config = Config::from_toml_str(Path::new("conf/meshd.toml"), &text).unwrap();
    assert_eq!(config.data_dir, Path::new("/srv/meshd"));
}

#[test]
fn for_test_is_loopback_port_zero() {
    let config = Config::for_test(Path::new("/tmp/x"));
    for bind in [
        config.gossip.bind,
        config.inbound.bind,
        config.admin.bind,
        config.gossip.advertise,
        config.inbound.advertise,
    ] {
        assert_eq!(bind, addr("127.0.0.1:0"));
    }
    assert_eq!(config.data_dir, Path::new("/tmp/x"));
    assert!(config.services_dir.starts_with("/tmp/x"));
    assert!(config.registry.join_token_file.starts_with("/tmp/x"));
}

// === service files ===

fn service_path() -> &'static Path {
    Path::new("/etc/meshd/services.d/web.toml")
}

fn service_problems(text: &str) -> Vec<Problem> {
    match Service::from_toml_str(service_path(), text) {
        Ok(s) => panic!("expected problems, got {s:#?}\nfrom:\n{text}"),
        Err(problems) => problems,
    }
}

#[test]
fn example_service_parses() {
    let service = Service::from_toml_str(service_path(), EXAMPLE_SERVICE_TOML).unwrap();
    assert_eq!(service.key.to_string(), "default/web");
    assert_eq!(service.address, addr("127.0.0.1:8080"));
    assert_eq!(service.protocol, Protocol::Tcp);
    assert_eq!(service.labels["version"], "v1");
    assert_eq!(service.file, service_path());
    let upstreams: Vec<(String, SocketAddr)> = (service.upstreams.iter())
        .map(|u| (u.service.to_string(), u.bind))
        .collect();
    assert_eq!(
        upstreams,
        [
            ("default/api".to_owned(), addr("127.0.0.1:9001")),
            ("payments/checkout".to_owned(), addr("127.0.0.1:9002")),
        ]
    );
    let json = serde_json::to_value(&service).unwrap();
    assert_eq!(json["key"], "default/web");
    assert_eq!(json["protocol"], "tcp");
    assert_eq!(json["upstreams"][1]["service"], "payments/checkout");
}

#[test]
fn minimal_service_gets_defaults() {
    let text = "name = \"web\"\naddress = \"[::1]:8080\"\n";
    let service = Service::from_toml_str(service_path(), text).unwrap();
    assert_eq!(
        service.key,
        mesh_api::name::ServiceKey::parse("web").unwrap()
    );
    assert_eq!(service.protocol, Protocol::Tcp);
    assert!(service.labels.is_empty());
    assert!(service.upstreams.is_empty());
    assert!(service.checks.is_empty());
}

#[test]
fn bad_service_values() {
    let base = "name = \"web\"\naddress = \"127.0.0.1:8080\"\n";
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("address = \"127.0.0.1:8080\"", "name", "missing required key"),
        ("name = \"Web\"\naddress = \"127.0.0.1:8080\"", "name", "\"Web\" is invalid"),
        ("name = \"web\"", "address", "missing required key"),
        ("name = \"web\"\naddress = \"localhost:8080\"", "address", "not an IP address and port"),
        ("name = \"web\"\naddress = \"0.0.0.0:8080\"", "address", "not an address meshd can connect to"),
        ("name = \"web\"\naddress = \"127.0.0.1:0\"", "address", "not an address meshd can connect to"),
        ("name = \"web\"\naddress = \"127.0.0.1:8080\"\nnamespace = \"\"", "namespace", "must not be empty"),
        ("nmae = \"web\"", "", "unknown field `nmae`"),
        ("name = \"web\"\naddress = 8080", "", "invalid type"),
    ];
    for (text, key, fragment) in cases {
        assert_one_problem(&service_problems(text), key, fragment, text);
    }

    #[rustfmt::skip]
    let with_base: &[(&str, &str, &str)] = &[
        ("protocol = \"udp\"", "protocol", "unknown protocol \"udp\" (valid: tcp, http, http2, grpc)"),
        ("protocol = \"HTTP\"", "protocol", "unknown protocol \"HTTP\" (valid: tcp, http, http2, grpc)"),
        ("[labels]\nversion = \"v 1\"", "labels.version", "\"v 1\" is invalid: character ' '"),
        ("[labels]\nversion = \"\"", "labels.version", "must not be empty"),
        ("[labels]\n\"team name\" = \"a\"", "labels", "label name \"team name\" is invalid"),
        ("[labels]\n\"a.b\" = \"a b\"", "labels.\"a.b\"", "\"a b\" is invalid"),
        ("[labels]\nx = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "labels.x", "64 characters"),
        ("[[upstreams]]\nbind = \"127.0.0.1:9001\"", "upstreams[0].service", "missing required key"),
        ("[[upstreams]]\nservice = \"api\"", "upstreams[0].bind", "missing required key"),
        ("[[upstreams]]\nservice = \"api\"\nbind = \"127.0.0.1:9001\"\n[[upstreams]]\nservice = \"A/b\"\nbind = \"127.0.0.1:9002\"",
            "upstreams[1].service", "\"A/b\" is invalid"),
        ("[[upstreams]]\nservice = \"a/b/c\"\nbind = \"127.0.0.1:9002\"", "upstreams[0].service", "namespace/name"),
        ("[[upstreams]]\nservice = \"api\"\nbind = \"9001\"", "upstreams[0].bind", "not an IP address and port"),
        ("[[upstreams]]\nservice = \"api\"\nbind = \"127.0.0.1:0\"", "upstreams[0].bind", "port 0 is not allowed"),
        ("[[upstreams]]\nservice = \"api\"\nbind = \"127.0.0.1:9001\"\nport = 1", "", "unknown field `port`"),
        ("http_proxy = \"127.0.0.1:0\"", "http_proxy", "port 0 is not allowed"),
        ("http_proxy = \"proxy\"", "http_proxy", "not an IP address and port"),
        ("listen = \"10.0.0.5\"", "listen", "not an IP address and port"),
        ("listen = \"10.0.0.5:0\"", "listen", "port 0 is not allowed"),
        ("listen = 8080", "", "invalid type"),
    ];
    for (extra, key, fragment) in with_base {
        let text = format!("{base}{extra}\n");
        assert_one_problem(&service_problems(&text), key, fragment, &text);
    }
}

#[test]
fn all_service_problems_reported_at_once() {
    let text = r#"
        name = "Web"
        protocol = "udp"
        [labels]
        version = ""
        [[upstreams]]
        service = "api"
        [[upstreams]]
        service = ""
        bind = "127.0.0.1:9002"
    "#;
    let keys: Vec<String> = service_problems(text).into_iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "name",
            "address",
            "protocol",
            "labels.version",
            "upstreams[0].bind",
            "upstreams[1].service"
        ]
    );
}

#[test]
fn upstream_may_be_the_service_itself() {
    let text = "name = \"web\"\naddress = \"127.0.0.1:8080\"\n\
                [[upstreams]]\nservice = \"default/web\"\nbind = \"127.0.0.1:9001\"\n";
    Service::from_toml_str(service_path(), text).unwrap();
}

// === loading from disk ===

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir(files.path("services.d")).unwrap();
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, text).unwrap();
        path
    }

    /// A node file whose services_dir is the relative `services.d`.
    fn node(&self, overrides: &str) -> PathBuf {
        let text = node_text(&format!("services_dir = \"services.d\"\n{overrides}"));
        self.write("meshd.toml", &text)
    }

    fn services_dir(&self) -> PathBuf {
        self.path("services.d")
    }
}

fn service_text(name: &str, address: &str, upstream_binds: &[&str]) -> String {
    let mut text = format!("name = \"{name}\"\naddress = \"{address}\"\n");
    for (i, bind) in upstream_binds.iter().enumerate() {
        text += &format!("[[upstreams]]\nservice = \"up-{i}\"\nbind = \"{bind}\"\n");
    }
    text
}

#[test]
fn load_reads_node_and_service_files() {
    let files = Files::new();
    let node = files.node("");
    files.write("services.d/web.toml", EXAMPLE_SERVICE_TOML);
    files.write(
        "services.d/api.toml",
        &service_text("api", "127.0.0.1:8081", &[]),
    );
    // Ignored: other extensions, editor leftovers, directories named *.toml.
    files.write("services.d/README.md", "not toml at all");
    files.write("services.d/web.toml.bak", "name = ");
    files.write("services.d/.web.toml.swp", "name = ");
    fs::create_dir(files.path("services.d/old.toml")).unwrap();

    let config = Config::load(&node).unwrap();
    assert_eq!(config.services_dir, files.services_dir());
    let names: Vec<String> = config.services.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(names, ["default/api", "default/web"], "sorted by file name");
    assert_eq!(config.services[1].file, files.path("services.d/web.toml"));

    assert_eq!(
        load_services(&files.services_dir()).unwrap(),
        config.services
    );
}

#[test]
fn empty_services_dir_is_fine() {
    let files = Files::new();
    let config = Config::load(&files.node("")).unwrap();
    assert!(config.services.is_empty());
    assert!(load_services(&files.services_dir()).unwrap().is_empty());
}

#[test]
fn missing_services_dir_is_named() {
    let files = Files::new();
    let missing = files.path("nope.d");

    let err = load_services(&missing).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );

    let node = files.write("meshd.toml", &node_text("services_dir = \"nope.d\""));
    let err = Config::load(&node).unwrap_err();
    assert_one_problem(err.problems(), "services_dir", "does not exist", "");
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );
}

#[test]
fn missing_node_file_is_io_error() {
    let files = Files::new();
    let err = Config::load(&files.path("absent.toml")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.toml"), "{err}");
}

#[test]
fn duplicate_service_names_both_files() {
    let files = Files::new();
    let a = files.write(
        "services.d/a.toml",
        &service_text("web", "127.0.0.1:8080", &[]),
    );
    let b = files.write(
        "services.d/b.toml",
        &service_text("web", "127.0.0.1:8081", &[]),
    );
    // Same name in another namespace is a different service.
    files.write(
        "services.d/c.toml",
        "name = \"web\"\nnamespace = \"shop\"\naddress = \"127.0.0.1:8082\"\n",
    );
    let err = load_services(&files.services_dir()).unwrap_err();
    let problems = err.problems();
    assert_one_problem(
        problems,
        "name",
        "service default/web is also declared in",
        "",
    );
    assert_eq!(problems[0].file, b);
    assert!(problems[0].message.contains(&*a.to_string_lossy()));
    let shown = err.to_string();
    assert!(
        shown.contains("a.toml") && shown.contains("b.toml"),
        "{shown}"
    );
}

#[test]
fn duplicate_upstream_binds() {
    let files = Files::new();
    let a = files.write(
        "services.d/a.toml",
        &service_text("a", "127.0.0.1:8080", &["127.0.0.1:9001"]),
    );
    let b = files.write(
        "services.d/b.toml",
        &service_text("b", "127.0.0.1:8081", &["127.0.0.1:9002", "127.0.0.1:9001"]),
    );
    let problems = load_services(&files.services_dir())
        .unwrap_err()
        .problems()
        .to_vec();
    assert_one_problem(
        &problems,
        "upstreams[1].bind",
        "127.0.0.1:9001 is already used by upstreams[0].bind in",
        "",
    );
    assert_eq!(problems[0].file, b);
    assert!(problems[0].message.contains(&*a.to_string_lossy()));
}

#[test]
fn upstream_binds_clash_with_wildcards_and_apps() {
    let files = Files::new();
    files.write(
        "services.d/a.toml",
        &service_text("a", "127.0.0.1:8080", &["0.0.0.0:9001", "127.0.0.1:8080"]),
    );
    files.write(
        "services.d/b.toml",
        &service_text("b", "127.0.0.1:8081", &["127.0.0.1:9001"]),
    );
    let problems = load_services(&files.services_dir())
        .unwrap_err()
        .problems()
        .to_vec();
    let found: Vec<(&str, &str)> = (problems.iter())
        .map(|p| (p.key.as_str(), p.message.split(" in ").next().unwrap()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "upstreams[1].bind",
                "127.0.0.1:8080 is already used by address"
            ),
            (
                "upstreams[0].bind",
                "127.0.0.1:9001 is already used by upstreams[0].bind"
            ),
        ]
    );
}

#[test]
fn upstream_bind_clashes_with_node_listeners() {
    let files = Files::new();
    let node = files.node("[inbound]\nbind = \"127.0.0.1:15008\"");
    let web = files.write(
        "services.d/web.toml",
        &service_text(
            "web",
            "127.0.0.1:8080",
            &[
                "127.0.0.1:15008",
                "127.0.0.1:15000",
                "127.0.0.1:7946",
                "127.0.0.1:9001",
            ],
        ),
    );
    let err = Config::load(&node).unwrap_err();
    let found: Vec<(&str, &str)> = (err.problems().iter())
        .map(|p| (p.key.as_str(), p.message.as_str()))
        .collect();
    let node_file = node.display();
    assert_eq!(
        found,
        [
            (
                "upstreams[0].bind",
                &*format!("127.0.0.1:15008 is already used by inbound.bind in {node_file}")
            ),
            (
                "upstreams[1].bind",
                &*format!("127.0.0.1:15000 is already used by admin.bind in {node_file}")
            ),
            // gossip.bind is the default 0.0.0.0:7946, which covers 127.0.0.1:7946.
            (
                "upstreams[2].bind",
                &*format!("127.0.0.1:7946 is already used by gossip.bind in {node_file}")
            ),
        ]
    );
    assert!(err.problems().iter().all(|p| p.file == web));
}

#[test]
fn load_reports_node_and_service_problems_together() {
    let files = Files::new();
    let node = files.node("zone = \"Zone A\"");
    files.write(
        "services.d/a.toml",
        "name = \"a\"\naddress = \"127.0.0.1:8080\"\nprotocol = \"udp\"\n",
    );
    files.write(
        "services.d/b.toml",
        "name = \"b\"\naddress = \"127.0.0.1:8081\"\nbogus = 1\n",
    );
    let err = Config::load(&node).unwrap_err();
    let found: Vec<(PathBuf, &str)> = (err.problems().iter())
        .map(|p| (p.file.clone(), p.key.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (node, "zone"),
            (files.path("services.d/a.toml"), "protocol"),
            (files.path("services.d/b.toml"), ""),
        ]
    );
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 3, "{shown}");
    assert!(
        shown.contains("b.toml: line 3, column 1: unknown field `bogus`"),
        "{shown}"
    );
}

#[test]
fn every_protocol_parses() {
    for p in Protocol::ALL {
        let text = format!("name = \"web\"\naddress = \"127.0.0.1:8080\"\nprotocol = \"{p}\"\n");
        let service = Service::from_toml_str(service_path(), &text).unwrap();
        assert_eq!(service.protocol, *p);
        assert_eq!(service.protocol.is_http(), *p != Protocol::Tcp);
    }
}

#[test]
fn listen_is_optional_and_may_be_a_wildcard() {
    let text = "name = \"web\"\naddress = \"127.0.0.1:8080\"\n";
    assert_eq!(
        Service::from_toml_str(service_path(), text).unwrap().listen,
        None
    );
    let text = "name = \"web\"\naddress = \"127.0.0.1:8080\"\nlisten = \"0.0.0.0:18080\"\n";
    let service = Service::from_toml_str(service_path(), text).unwrap();
    assert_eq!(service.listen, Some(addr("0.0.0.0:18080")));
}

#[test]
fn listen_clashes_with_apps_upstreams_and_node_listeners() {
    let files = Files::new();
    let node = files.node("[inbound]\nbind = \"127.0.0.1:15008\"");
    files.write(
        "services.d/a.toml",
        &("listen = \"0.0.0.0:8080\"\n".to_owned()
            + &service_text("a", "127.0.0.1:8080", &["127.0.0.1:9001"])),
    );
    files.write(
        "services.d/b.toml",
        &("listen = \"127.0.0.1:9001\"\n".to_owned() + &service_text("b", "127.0.0.1:8081", &[])),
    );
    files.write(
        "services.d/c.toml",
        &("listen = \"127.0.0.1:15008\"\n".to_owned() + &service_text("c", "127.0.0.1:8082", &[])),
    );
    let err = Config::load(&node).unwrap_err();
    let found: Vec<(String, &str, &str)> = (err.problems().iter())
        .map(|p| {
            let file = p.file.file_name().unwrap().to_string_lossy().into_owned();
            (
                file,
                p.key.as_str(),
                p.message.split(" in ").next().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "a.toml".to_owned(),
                "listen",
                "0.0.0.0:8080 is already used by address"
            ),
            (
                "b.toml".to_owned(),
                "listen",
                "127.0.0.1:9001 is already used by upstreams[0].bind"
            ),
            (
                "c.toml".to_owned(),
                "listen",
                "127.0.0.1:15008 is already used by inbound.bind"
            ),
        ]
    );
}

// === health checks ===

const CHECKED_SERVICE: &str = "name = \"web\"\naddress = \"127.0.0.1:8080\"\n";

fn checks_of(text: &str) -> Vec<crate::health::Check> {
    match Service::from_toml_str(service_path(), text) {
        Ok(s) => s.checks,
        Err(problems) => panic!("{problems:#?}\nfrom:\n{text}"),
    }
}

#[test]
fn check_defaults() {
    use crate::health::{Check, CheckKind};
    let text = format!("{CHECKED_SERVICE}[[checks]]\nhttp = \"/healthz\"\n");
    let checks = checks_of(&text);
    let expected = Check {
        name: "http".to_owned(),
        kind: CheckKind::Http {
            url: "http://127.0.0.1:8080/healthz".parse().unwrap(),
            expect_status: DEFAULT_CHECK_EXPECT_STATUS,
        },
        interval: DEFAULT_CHECK_INTERVAL,
        timeout: DEFAULT_CHECK_TIMEOUT,
        unhealthy_threshold: DEFAULT_CHECK_UNHEALTHY_THRESHOLD.try_into().unwrap(),
        healthy_threshold: DEFAULT_CHECK_HEALTHY_THRESHOLD.try_into().unwrap(),
    };
    assert_eq!(checks, [expected]);
    assert_eq!(DEFAULT_CHECK_EXPECT_STATUS.to_string(), "200-399");
    assert!(DEFAULT_CHECK_TIMEOUT < DEFAULT_CHECK_INTERVAL);

    let service = Service::from_toml_str(service_path(), &text).unwrap();
    let json = serde_json::to_value(&service).unwrap();
    assert_eq!(
        json["checks"][0]["kind"]["http"]["url"],
        "http://127.0.0.1:8080/healthz"
    );
    assert_eq!(json["checks"][0]["interval"], "10s");
}

#[test]
fn every_check_kind_parses() {
    use crate::health::CheckKind;
    let text = r#"
        name = "web"
        address = "[::1]:8080"

        [[checks]]
        name = "ready"
        http = "/healthz?deep=1"
        expect_status = 204
        interval = "5s"
        timeout = "2s"
        unhealthy_threshold = 1
        healthy_threshold = 5

        [[checks]]
        name = "admin"
        http = "http://localhost:9090/status"
        expect_status = "200-299"

        [[checks]]
        tcp = true

        [[checks]]
        name = "db-port"
        tcp = "db.internal:5432"

        [[checks]]
        grpc = ""

        [[checks]]
        name = "grpc-web"
        grpc = "web.v1.Web"

        [[checks]]
        command = ["/usr/local/bin/check-db", "--quick"]
    "#;
    let checks = checks_of(text);
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ready", "admin", "tcp", "db-port", "grpc", "grpc-web", "command"
        ]
    );
    let http = |url: &str, status: &str| CheckKind::Http {
        url: url.parse().unwrap(),
        expect_status: status.parse().unwrap(),
    };
    let kinds: Vec<&CheckKind> = checks.iter().map(|c| &c.kind).collect();
    assert_eq!(
        kinds,
        [
            &http("http://[::1]:8080/healthz?deep=1", "204"),
            &http("http://localhost:9090/status", "200-299"),
            &CheckKind::Tcp {
                address: "[::1]:8080".to_owned()
            },
            &CheckKind::Tcp {
                address: "db.internal:5432".to_owned()
            },
            &CheckKind::Grpc {
                address: addr("[::1]:8080"),
                service: String::new()
            },
            &CheckKind::Grpc {
                address: addr("[::1]:8080"),
                service: "web.v1.Web".to_owned()
            },
            &CheckKind::Command {
                argv: vec!["/usr/local/bin/check-db".to_owned(), "--quick".to_owned()]
            },
        ]
    );
    let ready = &checks[0];
    assert_eq!(ready.interval, Duration::from_secs(5));
    assert_eq!(ready.timeout, Duration::from_secs(2));
    assert_eq!(ready.unhealthy_threshold.get(), 1);
    assert_eq!(ready.healthy_threshold.get(), 5);
}

#[test]
fn bad_check_values() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("name = \"x\"", "checks[0]", "no check kind: set exactly one of http, tcp, grpc or command"),
        ("http = \"/\"\ntcp = true", "checks[0]", "sets http and tcp: set exactly one of"),
        ("http = \"/\"\ngrpc = \"\"\ncommand = [\"true\"]", "checks[0]", "sets http and grpc and command"),
        ("http = \"healthz\"", "checks[0].http", "\"healthz\" is neither a path nor an http URL; write a path such as \"/healthz\""),
        ("http = \"https://127.0.0.1:8443/healthz\"", "checks[0].http", "https is not supported"),
        ("http = \"http://127.0.0.1:0/healthz\"", "checks[0].http", "port 0 is not allowed"),
        ("http = \"/health z\"", "checks[0].http", "\"/health z\" is invalid"),
        ("http = \"/\"\nexpect_status = \"600\"", "checks[0].expect_status", "\"600\" is invalid: 600 is not an HTTP status code (100 to 599)"),
        ("http = \"/\"\nexpect_status = 99", "checks[0].expect_status", "99 is not an HTTP status code"),
        ("http = \"/\"\nexpect_status = \"399-200\"", "checks[0].expect_status", "399 is greater than 200"),
        ("http = \"/\"\nexpect_status = \"2xx\"", "checks[0].expect_status", "write a code such as \"200\" or a range such as \"200-399\""),
        ("http = \"/\"\nexpect_status = true", "", "expected a status code such as 200"),
        ("tcp = true\nexpect_status = 200", "checks[0].expect_status", "only applies to http checks"),
        ("tcp = false", "checks[0].tcp", "false is not valid: write true for the service's address"),
        ("tcp = \"db\"", "checks[0].tcp", "missing \":port\""),
        ("tcp = 5432", "", "expected true or an address such as"),
        ("command = []", "checks[0].command", "must start with a program"),
        ("command = [\"\", \"--quick\"]", "checks[0].command", "must start with a program"),
        ("command = \"check-db --quick\"", "", "invalid type: string"),
        ("tcp = true\ninterval = \"5\"", "checks[0].interval", "\"5\" is not a duration"),
        ("tcp = true\ninterval = \"0s\"", "checks[0].interval", "greater than zero"),
        ("tcp = true\ntimeout = \"0s\"", "checks[0].timeout", "greater than zero"),
        ("tcp = true\ntimeout = \"10s\"", "checks[0].timeout", "10s is not shorter than interval (10s)"),
        ("tcp = true\ninterval = \"500ms\"", "checks[0].timeout", "1s is not shorter than interval (500ms)"),
        ("tcp = true\nunhealthy_threshold = 0", "checks[0].unhealthy_threshold", "must be at least 1"),
        ("tcp = true\nhealthy_threshold = 0", "checks[0].healthy_threshold", "must be at least 1"),
        ("tcp = true\nhealthy_threshold = -1", "", "healthy_threshold = -1"),
        ("tcp = true\nname = \"Ready!\"", "checks[0].name", "\"Ready!\" is invalid: character '!'"),
        ("tcp = true\nname = \"\"", "checks[0].name", "must not be empty"),
        ("tcp = true\nhtpp = \"/\"", "", "unknown field `htpp`"),
    ];
    for (check, key, fragment) in cases {
        let text = format!("{CHECKED_SERVICE}[[checks]]\n{check}\n");
        assert_one_problem(&service_problems(&text), key, fragment, &text);
    }

    // The index names the entry.
    let text = format!("{CHECKED_SERVICE}[[checks]]\ntcp = true\n[[checks]]\ncommand = []\n");
    assert_one_problem(
        &service_problems(&text),
        "checks[1].command",
        "must start with a program",
        &text,
    );
}

#[test]
fn check_names_are_unique_per_service() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("http = \"/a\"", "http = \"/b\"",
            "\"http\" (the default name of http checks) is already the name of checks[0]; set a unique name"),
        ("name = \"ready\"\ntcp = true", "name = \"ready\"\nhttp = \"/\"",
            "\"ready\" is already the name of checks[0]"),
        ("name = \"tcp\"\nhttp = \"/\"", "tcp = true",
            "\"tcp\" (the default name of tcp checks) is already the name of checks[0]"),
    ];
    for (first, second, fragment) in cases {
        let text = format!("{CHECKED_SERVICE}[[checks]]\n{first}\n[[checks]]\n{second}\n");
        assert_one_problem(&service_problems(&text), "checks[1].name", fragment, &text);
    }
    // Distinct names, same kind: fine.
    let text = format!(
        "{CHECKED_SERVICE}[[checks]]\nhttp = \"/a\"\n[[checks]]\nname = \"deep\"\nhttp = \"/b\"\n"
    );
    assert_eq!(checks_of(&text).len(), 2);
}

#[test]
fn all_check_problems_reported_at_once() {
    let text = r#"
        name = "web"
        address = "127.0.0.1:8080"
        [[checks]]
        http = "/"
        expect_status = "0"
        timeout = "20s"
        [[checks]]
        [[checks]]
        name = "db"
        command = []
        healthy_threshold = 0
        [[checks]]
        tcp = true
        [[checks]]
        tcp = "localhost:5432"
    "#;
    let problems = service_problems(text);
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "checks[0].expect_status",
            "checks[0].timeout",
            "checks[1]",
            "checks[2].command",
            "checks[2].healthy_threshold",
            "checks[4].name",
        ]
    );
    let shown = problems[0].to_string();
    assert!(
        shown.starts_with("/etc/meshd/services.d/web.toml: checks[0].expect_status: \"0\""),
        "{shown}"
    );
}

#[test]
fn checks_on_an_invalid_address_add_no_problems() {
    let text = r#"
        name = "web"
        address = "localhost:8080"
        [[checks]]
        http = "/healthz"
        [[checks]]
        tcp = true
        [[checks]]
        grpc = ""
        [[checks]]
        command = ["true"]
    "#;
    assert_one_problem(
        &service_problems(text),
        "address",
        "not an IP address and port",
        text,
    );
}

/// The packages ship a default node config that validates and a copy of the sample service
/// file that must not drift from the one in the code.
#[test]
fn packaged_config_files_parse_and_match() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/meshd");
    let web = std::fs::read_to_string(dir.join("examples/web.toml")).unwrap();
    assert_eq!(
        web, EXAMPLE_SERVICE_TOML,
        "packaging/meshd/examples/web.toml drifted"
    );
    let node = std::fs::read_to_string(dir.join("meshd.toml")).unwrap();
    let cfg = Config::from_toml_str(Path::new("/etc/meshd/meshd.toml"), &node).unwrap();
    assert_eq!(cfg.data_dir, Path::new("/var/lib/meshd"));
}

#[test]
fn gateway_names() {
    let parse = |names: &str| {
        let text = format!(
            "node_name = \"n\"\n[registry]\naddress = \"127.0.0.1:7700\"\n\
             [gossip]\nbind = \"127.0.0.1:7946\"\n[inbound]\nbind = \"127.0.0.1:15008\"\n\
             [gateway]\nnames = {names}\n"
        );
        Config::from_toml_str(node_path(), &text)
    };
    let ok = parse(r#"["shop/public", "default/edge"]"#).unwrap();
    let names: Vec<String> = ok.gateway.names.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["shop/public", "default/edge"]);
    for (bad, words) in [
        (r#"["public"]"#, "expected the Gateway's \"namespace/name\""),
        (r#"["shop/Public"]"#, "gateway.names[0]"),
        (r#"["a/b", "a/b"]"#, "listed twice"),
    ] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains(words), "{bad}: {err}");
    }
}
