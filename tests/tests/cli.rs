//! The command lines as operators meet them: config checks with exit code 64 and messages that
//! name the file and key, warnings for listeners off loopback (exit 0; the admin endpoint off
//! loopback needs `allow_remote`), init refusing to overwrite, start-up failures that say why.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use mesh_e2e::Within as _;
use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, bins, eventually, next_ip};

#[test]
fn check_config_reports_every_problem_with_file_and_key() {
    let b = bins();
    let dir = tempfile::tempdir().unwrap();
    let svc = dir.path().join("services.d");
    std::fs::create_dir_all(&svc).unwrap();
    std::fs::write(
        dir.path().join("meshd.toml"),
        "node_name = \"Bad Name\"\nservices_dir = \"services.d\"\n[registry]\naddress = \"127.0.0.1:7700\"\n[gossip]\ninterval = \"1ms\"\n",
    )
    .unwrap();
    std::fs::write(
        svc.join("web.toml"),
        "name = \"web\"\naddress = \"not-an-address\"\nprotocl = \"tcp\"\n",
    )
    .unwrap();
    let out = Command::new(&b.meshd)
        .args(["check-config", "--config"])
        .arg(dir.path().join("meshd.toml"))
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "bad config exits 64");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("meshd.toml: node_name"), "{err}");
    assert!(err.contains("meshd.toml: gossip.interval"), "{err}");
    assert!(
        err.contains("web.toml") && err.contains("protocl"),
        "unknown key named: {err}"
    );

    std::fs::write(
        dir.path().join("meshd.toml"),
        "node_name = \"n1\"\nservices_dir = \"services.d\"\n[registry]\naddress = \"127.0.0.1:7700\"\n\
         [gossip]\nbind = \"127.0.0.1:7946\"\n[inbound]\nbind = \"127.0.0.1:15008\"\n",
    )
    .unwrap();
    std::fs::write(
        svc.join("web.toml"),
        "name = \"web\"\naddress = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    let out = Command::new(&b.meshd)
        .args(["check-config", "--config"])
        .arg(dir.path().join("meshd.toml"))
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = String::from_utf8_lossy(&out.stdout);
    assert!(ok.contains("1 service"), "{ok}");

    // A candidate service file is checked against the node and the other services before it is
    // installed (Ansible's `validate:`), and problems name the file it would become.
    let check_candidate = |text: &str, as_name: Option<&str>| {
        let cand = dir.path().join("tmp-candidate");
        std::fs::write(&cand, text).unwrap();
        let mut cmd = Command::new(&b.meshd);
        cmd.args(["check-config", "--config"])
            .arg(dir.path().join("meshd.toml"))
            .arg("--service")
            .arg(&cand);
        if let Some(n) = as_name {
            cmd.args(["--as", n]);
        }
        cmd.within(mesh_e2e::CLI_TIMEOUT).unwrap()
    };
    // Its direct listener would take web's app address.
    let clash = "name = \"api\"\naddress = \"127.0.0.1:8081\"\nlisten = \"127.0.0.1:8080\"\n";
    let out = check_candidate(clash, Some("api.toml"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services.d/api.toml: listen") && err.contains("web.toml"),
        "clash with web's address named at the destination file: {err}"
    );
    // The same file replacing web.toml is fine: it is the only service then.
    let out = check_candidate(clash, Some("web.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = String::from_utf8_lossy(&out.stdout);
    assert!(ok.contains("ok as") && ok.contains("1 service"), "{ok}");
    let out = check_candidate(
        "name = \"api\"\naddress = \"127.0.0.1:8081\"\n",
        Some("api.toml"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 service"));
    let out = check_candidate("name = \"api\"\nadress = \"x\"\n", Some("api.toml"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services.d/api.toml") && err.contains("unknown field `adress`"),
        "{err}"
    );
    let out = check_candidate(clash, Some("../api.toml"));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ending in .toml"));
    // Without --as the file's own name is used, and it is not a .toml name here.
    let out = check_candidate(clash, None);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_config_warns_about_listeners_off_loopback() {
    let b = bins();
    let dir = tempfile::tempdir().unwrap();
    let svc = dir.path().join("services.d");
    std::fs::create_dir_all(&svc).unwrap();
    let node_file = dir.path().join("meshd.toml");
    let write_node = |admin: &str| {
        std::fs::write(
            &node_file,
            format!(
                "node_name = \"n1\"\nservices_dir = \"services.d\"\n\
                 [registry]\naddress = \"127.0.0.1:7700\"\n\
                 [gossip]\nbind = \"127.0.0.1:7946\"\n[inbound]\nbind = \"127.0.0.1:15008\"\n\
                 [admin]\n{admin}\n"
            ),
        )
        .unwrap();
    };
    let check = |service: Option<&std::path::Path>| {
        let mut cmd = Command::new(&b.meshd);
        cmd.args(["check-config", "--config"]).arg(&node_file);
        if let Some(s) = service {
            cmd.arg("--service").arg(s).args(["--as", "api.toml"]);
        }
        let out = cmd.within(mesh_e2e::CLI_TIMEOUT).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    write_node("bind = \"127.0.0.1:15000\"");
    std::fs::write(
        svc.join("web.toml"),
        "name = \"web\"\naddress = \"127.0.0.1:8080\"\n\
         [[upstreams]]\nservice = \"api\"\nbind = \"127.0.0.1:9001\"\n",
    )
    .unwrap();
    let (code, err) = check(None);
    assert_eq!(
        (code, err.as_str()),
        (Some(0), ""),
        "all on loopback: no warning"
    );

    // An upstream on every address: valid (exit 0), with one warning line on stderr naming the
    // file, the key and the address, and the risk.
    std::fs::write(
        svc.join("web.toml"),
        "name = \"web\"\naddress = \"127.0.0.1:8080\"\n\
         [[upstreams]]\nservice = \"api\"\nbind = \"0.0.0.0:9001\"\n",
    )
    .unwrap();
    let (code, err) = check(None);
    assert_eq!(code, Some(0), "a warning, not an error: {err}");
    let web = svc.join("web.toml");
    assert_eq!(
        err,
        format!(
            "warning: {}: upstreams[0].bind: 0.0.0.0:9001 is not on loopback (it listens on \
             every address of this host); any host that can reach it can call default/api with \
             default/web's identity\n",
            web.display()
        )
    );

    // A candidate service file (--service) with an http_proxy on a specific address: named at
    // the file it will become, beside web's warning.
    let cand = dir.path().join("candidate.toml");
    std::fs::write(
        &cand,
        "name = \"api\"\naddress = \"127.0.0.1:8081\"\nprotocol = \"http\"\n\
         http_proxy = \"10.0.0.5:15001\"\n",
    )
    .unwrap();
    let (code, err) = check(Some(&cand));
    assert_eq!(code, Some(0), "{err}");
    let api = svc.join("api.toml");
    assert!(
        err.contains(&format!(
            "warning: {}: http_proxy: 10.0.0.5:15001 is not on loopback; any host that can \
             reach it can call the mesh's HTTP services with default/api's identity\n",
            api.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");

    // The admin endpoint off loopback is refused (64) unless allow_remote, then warned about.
    std::fs::write(
        svc.join("web.toml"),
        "name = \"web\"\naddress = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    for admin in [
        "bind = \"0.0.0.0:15000\"",
        "bind = \"[::]:15000\"\nallow_remote = false",
    ] {
        write_node(admin);
        let (code, err) = check(None);
        assert_eq!(code, Some(64), "{admin}: {err}");
        assert!(
            err.contains("meshd.toml: admin.bind: ")
                && err.contains("is not a loopback address")
                && err.contains("admin.allow_remote = true"),
            "{admin}: {err}"
        );
    }
    write_node("bind = \"0.0.0.0:15000\"\nallow_remote = true");
    let (code, err) = check(None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err,
        format!(
            "warning: {}: admin.bind: 0.0.0.0:15000 is not on loopback (it listens on every \
             address of this host); the admin endpoint has no authentication: any host that \
             can reach it can read this node's configuration, metrics and members \
             (admin.allow_remote is set)\n",
            node_file.display()
        )
    );
}

/// A port nothing listens on right now, on every address (for a wildcard bind).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Lines of `log` saying a listener is off loopback.
fn off_loopback_lines(log: &str) -> Vec<&str> {
    (log.lines())
        .filter(|l| l.contains("listener bound off loopback"))
        .collect()
}

/// Runs `meshctl check` until its output holds `want`; its exit code and output.
async fn check_shows(registry: &mesh_e2e::Registry, want: String) -> (Option<i32>, String) {
    eventually(Duration::from_secs(20), "meshctl check to show it", || {
        let want = want.clone();
        async move {
            let out = registry.meshctl(&["check", "--cert-warn", "10m"]).ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(&want).then_some((out.status.code(), text))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A running node with an upstream off loopback logs it at start and reports it: `meshctl check`
/// warns (exit 2) naming node, file, key and address. A reload that adds an `http_proxy` off
/// loopback (and moves the upstream back) logs only the new one, and the check follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_off_loopback_are_logged_and_shown_by_meshctl_check() {
    let mut cluster = Cluster::new(RegistryOpts {
        extra: vec!["report_interval = \"200ms\"".to_owned()],
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let ip = next_ip();
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec = NodeSpec::new("a", token);
    spec.ip = ip.into();
    spec.extra = "[telemetry]\nreport_interval = \"200ms\"\n".to_owned();
    let upstream = SocketAddr::from(([0, 0, 0, 0], free_port()));
    let web = ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080)).upstream("api", upstream);
    spec.services = vec![web];
    cluster.add_spec(spec).await.unwrap();
    let node = cluster.node("a");
    let web_file = node.dir.join("services.d/web.toml");
    let log = node.log();
    let lines = off_loopback_lines(&log);
    assert_eq!(lines.len(), 1, "logged once at start:\n{log}");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains("upstreams[0].bind")
            && lines[0].contains(&upstream.to_string()),
        "{}",
        lines[0]
    );

    let (code, text) = check_shows(
        &cluster.registry,
        format!(
        "    a: listener_off_loopback: {}: upstreams[0].bind: {upstream} is not on loopback (it \
         listens on every address of this host); any host that can reach it can call default/api \
         with default/web's identity\n",
        web_file.display()
    ))
    .await;
    assert!(
        text.contains("! warnings       1 warning from 1 node"),
        "{text}"
    );
    // The registry's new CA (10-year root, 1-year intermediate) is far from expiry.
    assert!(
        text.contains("✓ ca             valid for more than 30d: root until "),
        "{text}"
    );
    assert_eq!(code, Some(2), "warnings only:\n{text}");

    // Reload: the upstream back on loopback, an http_proxy on every address.
    let proxy = SocketAddr::from(([0, 0, 0, 0], free_port()));
    let node = cluster.node("a");
    node.write_service_file(
        "web.toml",
        &format!(
            "name = \"web\"\naddress = \"{ip}:18080\"\nhttp_proxy = \"{proxy}\"\n\
             [[upstreams]]\nservice = \"api\"\nbind = \"{ip}:19001\"\n"
        ),
    )
    .unwrap();
    node.reload().await.unwrap().unwrap();
    let log = eventually(Duration::from_secs(10), "the new listener logged", || {
        let log = node.log();
        async move { (off_loopback_lines(&log).len() == 2).then_some(log) }
    })
    .await
    .unwrap();
    assert!(
        off_loopback_lines(&log)[1].contains("http_proxy"),
        "only the added listener is logged again:\n{log}"
    );
    let (code, text) = check_shows(
        &cluster.registry,
        format!(
            "    a: listener_off_loopback: {}: http_proxy: {proxy} is not on loopback",
            web_file.display()
        ),
    )
    .await;
    assert!(!text.contains("upstreams[0].bind"), "{text}");
    assert_eq!(code, Some(2), "{text}");
}

#[test]
fn registry_init_refuses_to_overwrite_and_check_config_works() {
    let b = bins();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("reg");
    let init = || {
        Command::new(&b.registry)
            .args(["init", "--trust-domain", "mesh.test", "--data-dir"])
            .arg(&data)
            .within(mesh_e2e::CLI_TIMEOUT)
            .unwrap()
    };
    let first = init();
    assert!(first.status.success());
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(text.contains("root CA fingerprint: sha256:"), "{text}");
    let second = init();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("refusing to overwrite"));
    let check = Command::new(&b.registry)
        .args(["check-config", "--config"])
        .arg(data.join("registry.toml"))
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap();
    assert!(check.status.success());
    std::fs::write(
        data.join("registry.toml"),
        "trust_domain = \"mesh.test\"\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let check = Command::new(&b.registry)
        .args(["check-config", "--config"])
        .arg(data.join("registry.toml"))
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap();
    assert_eq!(check.status.code(), Some(64));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(
        err.contains("registry.toml: listen") && err.contains("registry.toml: data_dir"),
        "{err}"
    );
    let bad_td = Command::new(&b.registry)
        .args(["init", "--trust-domain", "Not Valid", "--data-dir"])
        .arg(dir.path().join("x"))
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap();
    assert_eq!(bad_td.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_fails_startup_with_a_clear_error() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let ip = next_ip();
    // Something else already listens on the node's inbound port.
    let _squatter =
        std::net::TcpListener::bind(SocketAddr::new(ip.into(), mesh_e2e::INBOUND_PORT)).unwrap();
    let token = cluster.registry.token(&["api"], 1).unwrap();
    let mut spec = NodeSpec::new("n", token);
    spec.ip = ip.into();
    let mut node = mesh_e2e::Node::start(&cluster.registry, spec).unwrap();
    let code = node.exit_code().await.unwrap();
    assert_eq!(
        code,
        Some(1),
        "meshd must not start with its inbound port taken (exit 1: systemd retries)"
    );
    let log = node.log();
    assert!(
        log.contains("binding the inbound listener") && log.contains("Address already in use"),
        "{log}"
    );
    cluster.nodes.push(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_stop_finishes_in_flight_connections() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let token = cluster.registry.token(&["api"], 1).unwrap();
    let mut spec = NodeSpec::new("b", token);
    spec.ip = b_ip.into();
    spec.services = vec![ServiceSpec::new("api", echo.addr)];
    cluster.add_spec(spec).await.unwrap();
    let a_ip = next_ip();
    let up = SocketAddr::new(a_ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec = NodeSpec::new("a", token);
    spec.ip = a_ip.into();
    spec.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    spec.services =
        vec![ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080)).upstream("api", up)];
    cluster.add_spec(spec).await.unwrap();
    cluster.converge().await.unwrap();

    // A connection in flight through b when b is told to stop.
    let mut s = tokio::net::TcpStream::connect(up).await.unwrap();
    s.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    let b_node = cluster.node("b");
    let admin = b_node.admin.to_string();
    // SIGTERM b and wait for its exit in the background.
    let mut proc = b_node.proc.take().unwrap();
    let stopping = tokio::task::spawn_blocking(move || {
        let code = proc.terminate(Duration::from_secs(20));
        (code, proc.log_text())
    });
    // b is draining: readiness goes away, but the open connection still works.
    eventually(Duration::from_secs(5), "b to report not ready", || {
        let admin = admin.clone();
        async move {
            match mesh_e2e::http_get(&admin, "/ready").await {
                Ok((503, _)) | Err(_) => Some(()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();
    let data = apps::payload(256 * 1024, 9);
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(
        apps::sha256(&back),
        apps::sha256(&data),
        "in-flight connection finished intact"
    );
    // And b exits cleanly once it is done.
    let (code, log) = stopping.await.unwrap();
    assert_eq!(code.unwrap(), Some(0), "clean drain exits 0; log:\n{log}");
    assert!(log.contains("draining"), "{log}");
}

#[test]
fn registry_init_starts_a_second_site_under_the_first_sites_root() {
    let b = bins();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(&b.registry)
            .args(args)
            .within(mesh_e2e::CLI_TIMEOUT)
            .unwrap()
    };
    let path = |p: &str| dir.path().join(p).display().to_string();
    let init = ["init", "--trust-domain", "mesh.test", "--data-dir"];
    let a = run(&[&init[..], &[&path("a")]].concat());
    assert!(a.status.success());
    let fingerprint = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.lines())
            .find_map(|l| l.trim().strip_prefix("root CA fingerprint: "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no fingerprint in {text}"))
    };
    let ca_a = path("a/ca");
    let (b_dir, c_dir, d_dir, e_dir) = (path("b"), path("c"), path("d"), path("e"));
    let b_args = [
        &init[..],
        &[&b_dir, "--site", "eu-west", "--join-root", &ca_a],
    ]
    .concat();
    let site_b = run(&b_args);
    assert!(
        site_b.status.success(),
        "{}",
        String::from_utf8_lossy(&site_b.stderr)
    );
    assert_eq!(fingerprint(&site_b), fingerprint(&a), "one root");
    assert!(!dir.path().join("b/ca/root-key.pem").exists());
    let int = std::fs::read_to_string(dir.path().join("b/ca/intermediate.pem")).unwrap();
    assert_ne!(
        int,
        std::fs::read_to_string(dir.path().join("a/ca/intermediate.pem")).unwrap()
    );
    // Usage errors: a site needs a root to join, a site name is a label, the root must have its
    // key (site b's CA directory has none).
    let no_root = run(&[&init[..], &[&c_dir, "--site", "x"]].concat());
    assert_eq!(no_root.status.code(), Some(2));
    let bad_site = run(&[
        &init[..],
        &[&d_dir, "--site", "Eu West", "--join-root", &ca_a],
    ]
    .concat());
    assert_eq!(bad_site.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad_site.stderr).contains("--site"));
    let ca_b = path("b/ca");
    let keyless = run(&[&init[..], &[&e_dir, "--site", "x", "--join-root", &ca_b]].concat());
    assert!(!keyless.status.success());
    assert!(
        String::from_utf8_lossy(&keyless.stderr).contains("root"),
        "{}",
        String::from_utf8_lossy(&keyless.stderr)
    );
    assert!(!dir.path().join("e/ca/intermediate.pem").exists());
}
