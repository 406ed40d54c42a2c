//! The gateway role on real processes: a host that runs the Gateway `default/public` takes
//! requests from a client outside the mesh (curl, the test's own HTTP client) on a listener the
//! policy declares, routes them by host and path with the Routes attached to the gateway (a
//! 90/10 split at the edge included), adds the edge headers (on TCP, a PROXY header to the app
//! when asked), and calls the services as the gateway's identity, which an
//! AuthorizationPolicy can single out. Listeners follow policy changes, all or nothing per
//! gateway.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;

use mesh_e2e::Within as _;
use mesh_e2e::curl::{curl, field, status};
use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::tls::{TestCa, tls_echo};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, WAIT, http_get, next_ip};

const GATEWAY_ID: &str = "spiffe://mesh.test/ns/default/svc/public";

/// Waits until the gateway host's `/gateways` JSON satisfies `ok`.
async fn gateways_until(admin: &str, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + mesh_e2e::scaled(WAIT);
    let mut last = String::new();
    loop {
        if let Ok((_, body)) = http_get(admin, "/gateways").await {
            if ok(&body) {
                return;
            }
            last = body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: /gateways says {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn gateway_policy(http: SocketAddr, redirect: SocketAddr, extra_listener: &str) -> String {
    format!(
        r#"
[[resource]]
kind = "Gateway"
name = "public"
[[resource.listeners]]
name = "web"
bind = "{http}"
protocol = "http"
hostnames = ["*.example.com"]
[[resource.listeners]]
name = "redirect"
bind = "{redirect}"
protocol = "http"
redirect_to_https_port = 8443
{extra_listener}
[[resource]]
kind = "Route"
name = "edge"
gateways = ["public"]
hostnames = ["shop.example.com"]
[[resource.http]]
name = "api"
match = [{{ path = {{ prefix = "/api/" }} }}]
route = [{{ service = "api" }}]
[[resource.http]]
name = "site"
route = [{{ service = "web", weight = 90 }}, {{ service = "canary", weight = 10 }}]

[[resource]]
kind = "AuthorizationPolicy"
name = "api-only-from-the-gateway"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ principals = ["{GATEWAY_ID}"] }}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_gateway_routes_outside_requests_into_the_mesh() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    // Host b runs the three services.
    let b_ip = next_ip();
    let api = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "api")
        .await
        .unwrap();
    let web = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "web")
        .await
        .unwrap();
    let canary = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "canary")
        .await
        .unwrap();
    let mut b = NodeSpec::new(
        "b",
        cluster
            .registry
            .token(&["api", "web", "canary"], 1)
            .unwrap(),
    );
    b.ip = b_ip.into();
    b.services = vec![
        ServiceSpec::new("api", api.addr).protocol("http"),
        ServiceSpec::new("web", web.addr).protocol("http"),
        ServiceSpec::new("canary", canary.addr).protocol("http"),
    ];
    cluster.add_spec(b).await.unwrap();
    // Host gw runs the gateway, and a mesh service `probe` that also calls api.
    let gw_ip = next_ip();
    let probe = HttpApp::start(SocketAddr::new(gw_ip.into(), 0), "probe")
        .await
        .unwrap();
    let probe_up = SocketAddr::new(gw_ip.into(), 19001);
    let mut gw = NodeSpec::new(
        "gw",
        cluster.registry.token(&["public", "probe"], 1).unwrap(),
    );
    gw.ip = gw_ip.into();
    gw.services = vec![
        ServiceSpec::new("probe", probe.addr)
            .protocol("http")
            .upstream("api", probe_up),
    ];
    gw.extra = "[gateway]\nnames = [\"default/public\"]\n".to_owned();
    gw.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    cluster.add_spec(gw).await.unwrap();
    let gw_node = cluster.nodes.last().unwrap();
    for svc in ["api", "web", "canary"] {
        gw_node
            .wait_endpoints(&format!("default/{svc}"), 1)
            .await
            .unwrap();
    }

    let http = SocketAddr::new(gw_ip.into(), 18080);
    let redirect = SocketAddr::new(gw_ip.into(), 18081);
    let rev = cluster
        .registry
        .apply("gateway.toml", &gateway_policy(http, redirect, ""))
        .unwrap();
    gw_node.wait_policy_revision(rev).await.unwrap();
    let admin = gw_node.admin.to_string();
    gateways_until(&admin, "the gateway serves its listeners", |body| {
        body.contains("\"serving\"") && body.contains("web (http")
    })
    .await;

    // meshctl says which Route attaches to which listener, and why not.
    let wide = cluster
        .registry
        .meshctl_ok(&["get", "gateway", "public", "-o", "wide"])
        .unwrap();
    let line = |listener: &str| {
        wide.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(listener))
            .unwrap_or_else(|| panic!("no {listener} row in\n{wide}"))
            .to_owned()
    };
    assert!(
        line("web").contains("edge") && line("web").ends_with("attached"),
        "{wide}"
    );
    assert!(
        line("redirect")
            .contains("not attached: listener redirect redirects every request to https"),
        "{wide}"
    );

    // Path routing, edge headers and the gateway's identity at the app.
    let url = format!("http://{http}/api/orders?x=1");
    let resp = curl(&["-H", "Host: shop.example.com", &url]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "app"), "api");
    assert_eq!(field(&resp, "path"), "/api/orders");
    assert!(
        field(&resp, "xfcc").contains(&format!("URI={GATEWAY_ID}")),
        "{resp}"
    );
    // The client is the test process; it connected from a loopback address.
    let xff = field(&resp, "xff");
    assert!(xff.starts_with("127."), "{resp}");
    assert_eq!(field(&resp, "forwarded"), format!("for={xff};proto=http"));
    assert_eq!(field(&resp, "xfp"), "http");
    let id = field(&resp, "request_id");
    assert!(
        id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()),
        "{resp}"
    );
    // A client-chosen id and forwarded-for entries: the id is replaced, the entries kept.
    let resp = curl(&[
        "-H",
        "Host: shop.example.com",
        "-H",
        "x-request-id: mine",
        "-H",
        "x-forwarded-for: 203.0.113.9",
        &url,
    ]);
    assert_ne!(field(&resp, "request_id"), "mine");
    assert_eq!(field(&resp, "xff"), format!("203.0.113.9, {xff}"));

    // A host no Route serves, and one the listener does not serve.
    for host in ["other.example.com", "shop.example.org"] {
        let resp = curl(&["-H", &format!("Host: {host}"), &url]);
        assert_eq!(status(&resp), 404, "{host}: {resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains("x-mesh-error: gateway/no_route"),
            "{resp}"
        );
    }

    // The 90/10 split at the edge.
    let client = Client::new();
    let replies = client
        .get_many(http, "/", &[("host", "shop.example.com")], 400, 8)
        .await
        .unwrap();
    let count = |app: &str| {
        replies
            .iter()
            .filter(|r| r.status == 200 && r.app == app)
            .count()
    };
    let (to_web, to_canary) = (count("web"), count("canary"));
    assert_eq!(
        to_web + to_canary,
        400,
        "every request answered by one of the two"
    );
    // Binomial(400, 0.1): mean 40, sd 6; these bounds fail once in ~10^6 runs.
    assert!(
        (12..=75).contains(&to_canary),
        "canary got {to_canary} of 400"
    );

    // The api allows the gateway's identity and nothing else: the probe is refused.
    let resp = curl(&[&format!("http://{probe_up}/api/x")]);
    assert_eq!(status(&resp), 403, "{resp}");

    // The redirect listener answers 308 to https on the configured port.
    let resp = curl(&[
        "-H",
        "Host: shop.example.com",
        &format!("http://{redirect}/a/b?c=1"),
    ]);
    assert_eq!(status(&resp), 308, "{resp}");
    assert!(
        resp.contains("location: https://shop.example.com:8443/a/b?c=1"),
        "{resp}"
    );

    // A policy change the host cannot apply (its address is taken) leaves the gateway as it
    // was, and says why; one it can apply opens the new listener.
    let taken = std::net::TcpListener::bind(SocketAddr::new(gw_ip.into(), 18082)).unwrap();
    let extra = format!(
        "[[resource.listeners]]\nname = \"more\"\nbind = \"{}\"\nprotocol = \"http\"\n",
        taken.local_addr().unwrap()
    );
    let rev = cluster
        .registry
        .apply("gateway.toml", &gateway_policy(http, redirect, &extra))
        .unwrap();
    gw_node.wait_policy_revision(rev).await.unwrap();
    gateways_until(&admin, "the refusal is reported", |body| {
        body.contains("\"refused\"") && body.contains("18082")
    })
    .await;
    let resp = curl(&["-H", "Host: shop.example.com", &url]);
    assert_eq!(status(&resp), 200, "the old listeners still serve: {resp}");
    let registry = &cluster.registry;
    mesh_e2e::eventually(WAIT, "meshctl check reports the refusal", || async {
        let out = registry.meshctl(&["check"]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("gw: gateway_refused: gateway default/public: policy revision")
            && text.contains("18082"))
        .then_some(())
    })
    .await
    .unwrap();
    drop(taken);
    // The next revision (the same declaration again) applies once the address is free.
    let rev = cluster
        .registry
        .apply(
            "gateway.toml",
            &gateway_policy(http, redirect, &extra.replace("\"more\"", "\"more2\"")),
        )
        .unwrap();
    gw_node.wait_policy_revision(rev).await.unwrap();
    gateways_until(&admin, "the new listener opens", |body| {
        body.contains("\"serving\"") && body.contains("more2 (http")
    })
    .await;
    let more = format!("http://{}/api/more", SocketAddr::new(gw_ip.into(), 18082));
    let resp = curl(&["-H", "Host: shop.example.com", &more]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "app"), "api");
}

/// Writes `text` to `path` the way certificate tools do: a new file renamed over the old one.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// curl over https to `host` at `addr` (resolved there), trusting `ca`; (exit code, stdout,
/// stderr) so failed handshakes can be asserted on.
fn curl_tls(
    ca: &std::path::Path,
    host: &str,
    addr: SocketAddr,
    path: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let resolve = format!("{host}:{}:{}", addr.port(), addr.ip());
    let url = format!("https://{host}:{}{path}", addr.port());
    let ca = ca.to_str().unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-i",
            "-v",
            "--max-time",
            "10",
            "--cacert",
            ca,
            "--resolve",
            &resolve,
        ])
        .args(extra)
        .arg(&url)
        .within(mesh_e2e::CLI_TIMEOUT)
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_ingress_terminates_tls_from_files_and_reloads_them_without_failing_a_request() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let api = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "api")
        .await
        .unwrap();
    let mut b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    b.ip = b_ip.into();
    b.services = vec![ServiceSpec::new("api", api.addr).protocol("http")];
    cluster.add_spec(b).await.unwrap();
    let gw_ip = next_ip();
    let mut gw = NodeSpec::new("gw", cluster.registry.token(&["public"], 1).unwrap());
    gw.ip = gw_ip.into();
    gw.extra = "[gateway]\nnames = [\"default/public\"]\n".to_owned();
    gw.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    cluster.add_spec(gw).await.unwrap();
    let gw_node = cluster.nodes.last().unwrap();
    gw_node.wait_endpoints("default/api", 1).await.unwrap();

    // Two certificates on the gateway host: SNI picks between them.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (shop_cert, shop_key) = ca.leaf(&["shop.example.com"], "shop-one");
    let (net_cert, net_key) = ca.leaf(&["*.example.net"], "net");
    let file = |name: &str| dir.path().join(name);
    for (name, text) in [
        ("shop.crt", &shop_cert),
        ("shop.key", &shop_key),
        ("net.crt", &net_cert),
        ("net.key", &net_key),
    ] {
        std::fs::write(file(name), text).unwrap();
    }
    let https = SocketAddr::new(gw_ip.into(), 18443);
    let strict = SocketAddr::new(gw_ip.into(), 18444);
    let clients = SocketAddr::new(gw_ip.into(), 18448);
    let certs = |shop_crt: &std::path::Path| {
        format!(
            "[{{ cert_file = {:?}, key_file = {:?} }}, {{ cert_file = {:?}, key_file = {:?} }}]",
            shop_crt,
            file("shop.key"),
            file("net.crt"),
            file("net.key")
        )
    };
    let policy = |shop_crt: &std::path::Path| {
        format!(
            r#"
[[resource]]
kind = "Gateway"
name = "public"
[[resource.listeners]]
name = "edge"
bind = "{https}"
protocol = "https"
tls = {{ certificates = {certs} }}
[[resource.listeners]]
name = "strict"
bind = "{strict}"
protocol = "https"
tls = {{ certificates = {certs}, min_version = "1.3" }}
[[resource.listeners]]
name = "clients"
bind = "{clients}"
protocol = "https"
tls = {{ certificates = {certs}, client_ca_file = {ca_file:?} }}

[[resource]]
kind = "Route"
name = "all"
gateways = ["public"]
[[resource.http]]
route = [{{ service = "api" }}]
"#,
            certs = certs(shop_crt)
        )
    };
    let rev = cluster
        .registry
        .apply("gw.toml", &policy(&file("shop.crt")))
        .unwrap();
    gw_node.wait_policy_revision(rev).await.unwrap();
    let admin = gw_node.admin.to_string();
    gateways_until(&admin, "https listeners open", |b| {
        b.contains("clients (https") && b.contains("edge (https") && b.contains("strict (https")
    })
    .await;

    // Each name gets its own certificate (curl checks the name against it).
    for host in ["shop.example.com", "api.example.net"] {
        let (code, out, err) = curl_tls(&ca_file, host, https, "/x", &[]);
        assert_eq!(code, 0, "{host}: {err}");
        assert_eq!(status(&out), 200, "{out}");
        assert_eq!(field(&out, "xfp"), "https");
        assert_eq!(field(&out, "app"), "api");
    }
    // HTTP/2 is offered by ALPN.
    let (code, out, err) = curl_tls(&ca_file, "shop.example.com", https, "/x", &["--http2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    // TLS 1.2 is accepted on one listener and refused on the one set to 1.3.
    let tls12 = ["--tlsv1.2", "--tls-max", "1.2"];
    assert_eq!(
        curl_tls(&ca_file, "shop.example.com", https, "/x", &tls12).0,
        0
    );
    let (code, _, err) = curl_tls(&ca_file, "shop.example.com", strict, "/x", &tls12);
    assert_ne!(
        code, 0,
        "TLS 1.2 must be refused by a 1.3-only listener: {err}"
    );

    // Client certificates: required where a CA file is set, and only that CA's.
    let (client_cert, client_key) = ca.leaf(&["client.example.com"], "client");
    let (stranger_cert, stranger_key) = TestCa::new().leaf(&["client.example.com"], "stranger");
    for (name, text) in [
        ("client.crt", &client_cert),
        ("client.key", &client_key),
        ("stranger.crt", &stranger_cert),
        ("stranger.key", &stranger_key),
    ] {
        std::fs::write(file(name), text).unwrap();
    }
    let with = |c: &str, k: &str| {
        let (c, k) = (file(c), file(k));
        curl_tls(
            &ca_file,
            "shop.example.com",
            clients,
            "/x",
            &["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()],
        )
    };
    let (code, out, err) = with("client.crt", "client.key");
    assert_eq!((code, status(&out)), (0, 200), "{err}");
    assert_ne!(
        with("stranger.crt", "stranger.key").0,
        0,
        "a client certificate from another CA"
    );
    assert_ne!(
        curl_tls(&ca_file, "shop.example.com", clients, "/x", &[]).0,
        0,
        "no client certificate"
    );

    // Renewal on disk under steady traffic: new connections throughout, none may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, ca_file) = (stop.clone(), ca_file.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed, mut subjects) =
                (0, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (code, out, err) = curl_tls(&ca_file, "shop.example.com", https, "/x", &[]);
                if code == 0 && status(&out) == 200 {
                    ok += 1;
                    if let Some(s) = err.lines().find(|l| l.contains("subject:")) {
                        subjects.insert(s.trim().to_owned());
                    }
                } else {
                    failed.push(format!("{code} {err}"));
                }
            }
            (ok, failed, subjects)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (new_cert, new_key) = ca.leaf(&["shop.example.com"], "shop-two");
    // Key first, then certificate: for a moment the pair does not match, and the gateway
    // must keep serving the old one rather than fail handshakes.
    replace_file(&file("shop.key"), &new_key);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    replace_file(&file("shop.crt"), &new_cert);
    let deadline = tokio::time::Instant::now() + mesh_e2e::scaled(WAIT);
    loop {
        let (_, _, err) = curl_tls(&ca_file, "shop.example.com", https, "/x", &[]);
        if err.contains("CN=shop-two") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate is never served: {err}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, subjects) = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the renewal: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    assert!(ok >= 5, "steady traffic ran ({ok} requests)");
    assert!(
        subjects.iter().any(|s| s.contains("shop-one"))
            && subjects.iter().any(|s| s.contains("shop-two")),
        "{subjects:?}"
    );

    // A revision naming a certificate the host cannot read is refused; the listeners stay.
    let rev = cluster
        .registry
        .apply("gw.toml", &policy(&file("missing.crt")))
        .unwrap();
    gw_node.wait_policy_revision(rev).await.unwrap();
    gateways_until(&admin, "the unreadable certificate is reported", |b| {
        b.contains("\"refused\"") && b.contains("cannot read") && b.contains("missing.crt")
    })
    .await;
    let (code, out, err) = curl_tls(&ca_file, "shop.example.com", https, "/x", &[]);
    assert_eq!((code, status(&out)), (0, 200), "{err}");
}

/// Connects over TLS to `addr` with SNI `host`, trusting `ca_pem`; sends `data` and reads as
/// many bytes back.
async fn tls_round_trip(
    addr: SocketAddr,
    host: &str,
    ca_pem: &str,
    data: &[u8],
) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let roots = mesh_runtime::tls::root_store(ca_pem)?;
    let config = rustls::ClientConfig::builder_with_provider(mesh_runtime::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    tls.read_exact(&mut back).await?;
    Ok(back)
}

/// Sends raw `bytes` to `addr` and reads until the server closes or 2 s pass.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passes_through_by_sni_tcp_is_relayed_and_proxy_protocol_names_the_client() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let ca = TestCa::new();
    let ca_pem = ca.pem();
    let (cert, key) = ca.leaf(&["secure.example.com"], "secure");
    let b_ip = next_ip();
    let secure = tls_echo(SocketAddr::new(b_ip.into(), 0), &cert, &key).await;
    let echo = mesh_e2e::apps::Echo::start(SocketAddr::new(b_ip.into(), 0))
        .await
        .unwrap();
    let api = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "api")
        .await
        .unwrap();
    let mut b = NodeSpec::new(
        "b",
        cluster
            .registry
            .token(&["secure", "echo", "api"], 1)
            .unwrap(),
    );
    b.ip = b_ip.into();
    b.services = vec![
        ServiceSpec::new("secure", secure).protocol("tcp"),
        ServiceSpec::new("echo", echo.addr).protocol("tcp"),
        ServiceSpec::new("api", api.addr).protocol("http"),
    ];
    cluster.add_spec(b).await.unwrap();
    let gw_ip = next_ip();
    let mut gw = NodeSpec::new("gw", cluster.registry.token(&["public"], 1).unwrap());
    gw.ip = gw_ip.into();
    gw.extra = "[gateway]\nnames = [\"default/public\"]\n".to_owned();
    gw.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    cluster.add_spec(gw).await.unwrap();
    let gw_node = cluster.nodes.last().unwrap();
    for svc in ["secure", "echo", "api"] {
        gw_node
            .wait_endpoints(&format!("default/{svc}"), 1)
            .await
            .unwrap();
    }
    let at = |port: u16| SocketAddr::new(gw_ip.into(), port);
    let (tls, tcp, proxied, tells) = (at(18445), at(18446), at(18447), at(18448));
    let policy = format!(
        r#"
[[resource]]
kind = "Gateway"
name = "public"
[[resource.listeners]]
name = "tls"
bind = "{tls}"
protocol = "tls"
hostnames = ["secure.example.com"]
service = "secure"
[[resource.listeners]]
name = "tcp"
bind = "{tcp}"
protocol = "tcp"
service = "echo"
[[resource.listeners]]
name = "behind-lb"
bind = "{proxied}"
protocol = "http"
proxy_protocol = true
[[resource.listeners]]
name = "tells-the-app"
bind = "{tells}"
protocol = "tcp"
service = "echo"
send_proxy_protocol = "v1"

[[resource]]
kind = "Route"
name = "all"
gateways = ["public"]
[[resource.http]]
route = [{{ service = "api" }}]
"#
    );
    let rev = cluster.registry.apply("gw.toml", &policy).unwrap();
    gw_node.wait_policy_revision(rev).await.unwrap();
    let admin = gw_node.admin.to_string();
    gateways_until(&admin, "four listeners open", |b| {
        b.contains("tls (tls")
            && b.contains("tcp (tcp")
            && b.contains("behind-lb (http")
            && b.contains("tells-the-app (tcp")
    })
    .await;

    // TLS end to end: the app's certificate, verified by the client, through the gateway
    // that holds no key for the name.
    let back = tls_round_trip(tls, "secure.example.com", &ca_pem, b"through the gateway")
        .await
        .unwrap();
    assert_eq!(back, b"through the gateway");
    // A name the listener does not serve is refused before anything is relayed.
    assert!(
        tls_round_trip(tls, "other.example.com", &ca_pem, b"x")
            .await
            .is_err()
    );
    // Not TLS at all: refused too.
    assert_eq!(raw_exchange(tls, b"GET / HTTP/1.1\r\n\r\n").await, "");

    // TCP relayed byte for byte.
    let data = mesh_e2e::apps::payload(64 * 1024, 7);
    let back = mesh_e2e::apps::round_trip(tcp, &data).await.unwrap();
    assert_eq!(back, data);

    // PROXY protocol out: the app (an echo) first receives the line naming the client, which
    // is this test process on loopback, and the listener it reached.
    let mut s = tokio::net::TcpStream::connect(tells).await.unwrap();
    let me = s.local_addr().unwrap();
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        s.write_all(b"after the header").await.unwrap();
        let want = format!(
            "PROXY TCP4 {} {} {} {}\r\nafter the header",
            me.ip(),
            tells.ip(),
            me.port(),
            tells.port()
        );
        let mut back = vec![0u8; want.len()];
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&back), want);
    }

    // Behind a load balancer: the PROXY header's client is the one the app is told about.
    for header in [
        b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n".to_vec(),
        [
            b"\r\n\r\n\0\r\nQUIT\n".as_slice(),
            &[
                0x21, 0x11, 0, 12, 203, 0, 113, 7, 192, 0, 2, 1, 0x15, 0xb3, 0, 80,
            ],
        ]
        .concat(),
    ] {
        let req = [
            header.as_slice(),
            b"GET /x HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
        ]
        .concat();
        let resp = raw_exchange(proxied, &req).await;
        assert_eq!(status(&resp), 200, "{resp}");
        assert_eq!(field(&resp, "xff"), "203.0.113.7");
    }
    // Without the header the connection is refused: nobody reaching the listener directly
    // can pass for another client.
    let resp = raw_exchange(
        proxied,
        b"GET /x HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp, "", "a request without a PROXY header got an answer");
}
