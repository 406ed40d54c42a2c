//! Tests of the registry configuration: defaults, limits, follow and peers, and every problem named.

use super::*;

#[test]
fn rendered_config_parses() {
    let td = TrustDomain::new("mesh.internal").unwrap();
    let text = Config::render(
        &td,
        Path::new("/var/lib/mesh-registry"),
        DEFAULT_LISTEN.parse().unwrap(),
        DEFAULT_ADMIN_LISTEN.parse().unwrap(),
    );
    let c = Config::from_toml_str(Path::new("/etc/mesh/registry.toml"), &text).unwrap();
    assert_eq!(c.trust_domain, td);
    assert_eq!(c.workload_cert_ttl, DEFAULT_WORKLOAD_CERT_TTL);
    assert_eq!(c.advertise, vec![DEFAULT_LISTEN.to_owned()]);
    assert_eq!(c.report_interval, DEFAULT_REPORT_INTERVAL);
    assert_eq!(c.slo_eval_interval, DEFAULT_SLO_EVAL_INTERVAL);
}

#[test]
fn observability_intervals() {
    let base = "trust_domain = \"mesh.test\"\ndata_dir = \"d\"\n";
    let parse = |extra: &str| Config::from_toml_str(Path::new("r.toml"), &format!("{base}{extra}"));
    let c = parse("report_interval = \"500ms\"\nslo_eval_interval = \"1s\"\n").unwrap();
    assert_eq!(c.report_interval, Duration::from_millis(500));
    assert_eq!(c.slo_eval_interval, Duration::from_secs(1));
    for (extra, want) in [
        (
            "report_interval = \"10ms\"",
            "r.toml: report_interval: 10ms is out of range; expected 100ms to 1m",
        ),
        (
            "report_interval = \"2m\"",
            "r.toml: report_interval: 2m is out of range",
        ),
        (
            "slo_eval_interval = \"0s\"",
            "r.toml: slo_eval_interval: must be greater than zero",
        ),
        (
            "slo_eval_interval = \"1h\"",
            "r.toml: slo_eval_interval: 1h is out of range; expected 100ms to 5m",
        ),
        (
            "slo_eval_interval = \"often\"",
            "r.toml: slo_eval_interval: \"often\" is not a duration",
        ),
    ] {
        let err = parse(extra).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    }
}

#[test]
fn connection_and_call_limits() {
    let base = "trust_domain = \"mesh.test\"\ndata_dir = \"d\"\n";
    let parse = |extra: &str| Config::from_toml_str(Path::new("r.toml"), &format!("{base}{extra}"));
    let c = parse("").unwrap();
    assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS as usize);
    assert_eq!(
        c.max_connections_per_ip,
        DEFAULT_MAX_CONNECTIONS_PER_IP as usize
    );
    assert_eq!(
        c.max_unauthenticated_connections,
        DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS as usize
    );
    assert_eq!(
        c.max_concurrent_streams,
        DEFAULT_MAX_CONCURRENT_STREAMS as u32
    );
    assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
    assert_eq!(c.http2_keepalive_interval, DEFAULT_HTTP2_KEEPALIVE_INTERVAL);
    assert_eq!(c.http2_keepalive_timeout, DEFAULT_HTTP2_KEEPALIVE_TIMEOUT);
    assert_eq!(c.max_request_message_size, 4 << 20);
    assert_eq!(c.max_response_message_size, 4 << 20);
    assert_eq!(c.http2_max_pending_accept_reset_streams, 20);
    assert_eq!(c.http2_max_local_error_reset_streams, 1024);

    let c = parse(
        "max_connections = 100\nmax_connections_per_ip = 4\n\
         max_unauthenticated_connections = 10\nmax_concurrent_streams = 8\n\
         request_timeout = \"2s\"\nhttp2_keepalive_interval = \"5s\"\n\
         http2_keepalive_timeout = \"1s\"\nmax_request_message_size = 65536\n\
         max_response_message_size = 1048576\nhttp2_max_pending_accept_reset_streams = 5\n\
         http2_max_local_error_reset_streams = 50\n",
    )
    .unwrap();
    assert_eq!(
        (c.max_connections, c.max_connections_per_ip),
        (100, 4),
        "{c:?}"
    );
    assert_eq!(c.max_unauthenticated_connections, 10);
    assert_eq!(c.max_concurrent_streams, 8);
    assert_eq!(c.request_timeout, Duration::from_secs(2));
    assert_eq!(c.http2_keepalive_interval, Duration::from_secs(5));
    assert_eq!(c.http2_keepalive_timeout, Duration::from_secs(1));
    assert_eq!(c.max_request_message_size, 65536);
    assert_eq!(c.max_response_message_size, 1 << 20);
    assert_eq!(c.http2_max_pending_accept_reset_streams, 5);
    assert_eq!(c.http2_max_local_error_reset_streams, 50);

    for (extra, want) in [
        (
            "max_connections = 0",
            "r.toml: max_connections: must be greater than zero",
        ),
        (
            "max_connections = 10\nmax_connections_per_ip = 11",
            "r.toml: max_connections_per_ip: 11 is larger than 10",
        ),
        (
            "max_connections = 10\nmax_connections_per_ip = 2\n\
             max_unauthenticated_connections = 20",
            "r.toml: max_unauthenticated_connections: 20 is larger than 10",
        ),
        (
            "max_concurrent_streams = 4294967296",
            "r.toml: max_concurrent_streams: 4294967296 is larger than 4294967295",
        ),
        (
            "http2_max_pending_accept_reset_streams = 0",
            "r.toml: http2_max_pending_accept_reset_streams: must be greater than zero",
        ),
        (
            "request_timeout = \"0s\"",
            "r.toml: request_timeout: must be greater than zero",
        ),
        (
            "http2_keepalive_timeout = \"never\"",
            "r.toml: http2_keepalive_timeout: \"never\" is not a duration",
        ),
        (
            "max_request_message_size = 1000",
            "r.toml: max_request_message_size: 1000 is out of range; \
             expected 65536 to 268435456 bytes",
        ),
        (
            "max_response_message_size = 1000000000",
            "r.toml: max_response_message_size: 1000000000 is out of range",
        ),
        (
            "max_connections = -1",
            "expected u64 (line 3: `max_connections = -1`)",
        ),
        (
            "max_connections = \"10\"",
            "(line 3: `max_connections = \"10\"`)",
        ),
    ] {
        let err = parse(extra).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    }
}

/// The limits' keys and defaults are documented in README.md ("Registry limits"), so the
/// table stays honest.
#[test]
fn limits_are_documented_with_their_defaults() {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split_once("### Registry limits")
        .expect("README.md has a \"Registry limits\" section")
        .1;
    let h = |d: Duration| humantime::format_duration(d).to_string();
    for (key, default) in [
        ("max_connections", DEFAULT_MAX_CONNECTIONS.to_string()),
        (
            "max_connections_per_ip",
            DEFAULT_MAX_CONNECTIONS_PER_IP.to_string(),
        ),
        (
            "max_unauthenticated_connections",
            DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS.to_string(),
        ),
        (
            "handshake_timeout",
            format!("\"{}\"", h(DEFAULT_HANDSHAKE_TIMEOUT)),
        ),
        (
            "max_concurrent_streams",
            DEFAULT_MAX_CONCURRENT_STREAMS.to_string(),
        ),
        (
            "request_timeout",
            format!("\"{}\"", h(DEFAULT_REQUEST_TIMEOUT)),
        ),
        (
            "http2_keepalive_interval",
            format!("\"{}\"", h(DEFAULT_HTTP2_KEEPALIVE_INTERVAL)),
        ),
        (
            "http2_keepalive_timeout",
            format!("\"{}\"", h(DEFAULT_HTTP2_KEEPALIVE_TIMEOUT)),
        ),
        (
            "max_request_message_size",
            DEFAULT_MAX_REQUEST_MESSAGE_SIZE.to_string(),
        ),
        (
            "max_response_message_size",
            DEFAULT_MAX_RESPONSE_MESSAGE_SIZE.to_string(),
        ),
        (
            "http2_max_pending_accept_reset_streams",
            DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS.to_string(),
        ),
        (
            "http2_max_local_error_reset_streams",
            DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS.to_string(),
        ),
    ] {
        let row = format!("| `{key}` | `{default}` |");
        assert!(section.contains(&row), "README.md lacks the row {row:?}");
    }
}

#[test]
fn every_problem_is_reported_with_file_and_key() {
    let text = "trust_domain = \"Bad\"\nlisten = \"nope\"\nworkload_cert_ttl = \"soon\"\nadvertise = [\"x\"]\n";
    let err = Config::from_toml_str(Path::new("r.toml"), text)
        .unwrap_err()
        .to_string();
    for want in [
        "r.toml: trust_domain",
        "r.toml: listen",
        "r.toml: workload_cert_ttl",
        "r.toml: data_dir",
        "r.toml: advertise[0]",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    let err = Config::from_toml_str(Path::new("r.toml"), "trust_domian = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown field") && err.contains("trust_domian"),
        "{err}"
    );
}

#[test]
fn follow_section() {
    let base = "trust_domain = \"mesh.test\"\ndata_dir = \"d\"\n";
    let parse =
        |extra: &str| Config::from_toml_str(Path::new("/etc/r/r.toml"), &format!("{base}{extra}"));
    let c =
        parse("[follow]\nprimary = \"reg-a.example:7700\"\ncredentials = \"primary\"\n").unwrap();
    let f = c.follow.unwrap();
    assert_eq!(f.primary, "reg-a.example:7700");
    assert_eq!(f.credentials, Path::new("/etc/r/primary"));
    assert!(parse("").unwrap().follow.is_none());
    let c = parse(
        "[follow]\nprimary = \"reg-a:7700\"\n[[peers]]\nsite = \"a\"\naddress = \"reg-a:7700\"\n",
    )
    .unwrap();
    let viewer = Path::new("/etc/r/d/viewer");
    assert_eq!(
        c.follow.unwrap().credentials,
        viewer,
        "this registry's viewer/ by default"
    );
    assert_eq!(c.peers[0].credentials, viewer);
    assert_eq!(c.peers[0].site.as_str(), "a");
    for (extra, want) in [
        (
            "[follow]\ncredentials = \"p\"\n",
            "r.toml: follow.primary: required",
        ),
        (
            "[follow]\nprimary = \"reg-a\"\ncredentials = \"p\"\n",
            "follow.primary: \"reg-a\" is not host:port",
        ),
        (
            "[follow]\nprimary = \"reg-a:7700\"\ncredentials = \"\"\n",
            "follow.credentials: must not be empty",
        ),
        (
            "[[peers]]\naddress = \"reg-b:7700\"\n",
            "peers[0].site: required",
        ),
        (
            "[[peers]]\nsite = \"B\"\naddress = \"reg-b:7700\"\n",
            "peers[0].site",
        ),
        (
            "[[peers]]\nsite = \"b\"\naddress = \"reg-b\"\n",
            "peers[0].address: \"reg-b\" is not host:port",
        ),
        (
            "[[peers]]\nsite = \"b\"\naddress = \"r:1\"\n[[peers]]\nsite = \"b\"\naddress = \"r:2\"\n",
            "peers[1].site: \"b\" is listed twice",
        ),
        (
            "[follow]\nprimary = \"reg-a:7700\"\ncredentials = \"p\"\nevery = \"1s\"\n",
            "unknown field `every`",
        ),
    ] {
        let err = parse(extra).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    }
}
