//! HTTP through the mesh on real processes with curl as the client: HTTP/1.1 and HTTP/2 from
//! the app, HTTP/1.1 and HTTP/2 apps behind meshd, requests multiplexed on one pooled mTLS
//! connection between hosts, the caller's identity passed to the app (and not forgeable by
//! it), per-request authorization with 403 naming the policy, and mesh errors told apart from
//! the app's.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

use mesh_e2e::Within as _;
use mesh_e2e::http_app::HttpApp;
use mesh_e2e::{Cluster, Node, PairSpec, RegistryOpts, ServiceSpec, WAIT, eventually, next_ip};

const WEB: &str = "spiffe://mesh.test/ns/default/svc/web";

/// What curl got.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Got {
    /// `key=value` line of the app's report.
    fn field(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {key} in {self:?}"))
    }
}

/// Runs curl with `args`; parses the status, headers and body of the last response.
fn curl(args: &[&str]) -> Got {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .within(mesh_e2e::CLI_TIMEOUT)
        .expect("curl runs (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With several URLs, the last response is what follows the last status line (a line
    // starting with `HTTP/` and ending in CRLF; the app's report lines end in LF only).
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with("HTTP/") && line.ends_with("\r\n") {
            start = at;
        }
        at += line.len();
    }
    let (head, body) = text[start..].split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Got {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// api (`protocol`) served by an [`HttpApp`] on node b; web on node a with an upstream to api.
struct Mesh {
    cluster: Cluster,
    app: HttpApp,
    /// web's local port for api.
    upstream: SocketAddr,
    /// web's `http_proxy` listener.
    proxy: SocketAddr,
    /// web's local port for `ghost`, a service no host runs.
    ghost: SocketAddr,
}

async fn mesh(protocol: &str) -> Mesh {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let app = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "api")
        .await
        .unwrap();
    let spec = PairSpec::new(b_ip, ServiceSpec::new("api", app.addr).protocol(protocol));
    let proxy = SocketAddr::new(spec.a_ip.into(), 15001);
    let ghost = SocketAddr::new(spec.a_ip.into(), 19002);
    let spec = spec.web(|w| {
        let mut w = w.protocol("http").upstream("ghost", ghost);
        w.http_proxy = Some(proxy);
        w
    });
    let upstream = cluster.pair(spec).await.unwrap();
    Mesh {
        cluster,
        app,
        upstream,
        proxy,
        ghost,
    }
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

async fn inbound_connections(node: &Node) -> f64 {
    node.metric(
        "meshd_connections_total",
        &[("direction", "inbound"), ("service", "default/api")],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_through_the_mesh_on_pooled_connections() {
    let m = mesh("http").await;
    let (a, b) = (&m.cluster.nodes[1], &m.cluster.nodes[0]);
    let u = m.upstream;

    // HTTP/1.1 from the app, HTTP/1.1 to the app; the caller's identity reaches the app, and
    // an identity header sent by the calling app is replaced, not passed on.
    let got = tokio::task::spawn_blocking(move || {
        curl(&[
            "-H",
            "x-forwarded-client-cert: By=me;URI=spiffe://mesh.test/ns/default/svc/admin",
            &url(u, "/hello?x=1"),
        ])
    })
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.field("app"), "api");
    assert_eq!(got.field("version"), "HTTP/1.1");
    assert_eq!(got.field("method"), "GET");
    assert_eq!(got.field("path"), "/hello");
    assert_eq!(got.field("host"), u.to_string(), "Host crosses the mesh");
    assert_eq!(
        got.field("xfcc"),
        format!("By=spiffe://mesh.test/ns/default/svc/api;URI={WEB}")
    );
    assert_eq!(got.headers.get("x-app").map(String::as_str), Some("api"));
    assert!(!got.headers.contains_key("x-mesh-error"), "{got:?}");

    // HTTP/2 (prior knowledge) from the app works too; the app still gets HTTP/1.1.
    let got =
        tokio::task::spawn_blocking(move || curl(&["--http2-prior-knowledge", &url(u, "/h2")]))
            .await
            .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.field("version"), "HTTP/1.1");
    assert_eq!(got.field("path"), "/h2");

    // A 1 MiB upload arrives whole; the app's status codes pass through untouched.
    let body = mesh_e2e::apps::payload(1 << 20, 7);
    let sha = mesh_e2e::apps::sha256(&body);
    let file = m.cluster.registry.dir.join("upload.bin");
    std::fs::write(&file, &body).unwrap();
    let f = file.to_string_lossy().into_owned();
    let got = tokio::task::spawn_blocking(move || {
        curl(&["--data-binary", &format!("@{f}"), &url(u, "/status/201")])
    })
    .await
    .unwrap();
    assert_eq!(got.status, 201, "{got:?}");
    assert_eq!(got.field("method"), "POST");
    assert_eq!(got.field("body_len"), (1 << 20).to_string());
    assert_eq!(got.field("body_sha"), sha);
    assert!(
        !got.headers.contains_key("x-mesh-error"),
        "an app status is not a mesh error"
    );

    // Many requests, on many app connections, share one mTLS connection between the hosts,
    // and meshd keeps its connections to the app alive.
    let before = inbound_connections(b).await;
    let app_conns_before = m.app.connections();
    let urls: Vec<String> = (0..20).map(|i| url(u, &format!("/n/{i}"))).collect();
    for chunk in urls.chunks(5) {
        let args: Vec<String> = chunk.to_vec();
        let got = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs)
        })
        .await
        .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
    }
    let after = inbound_connections(b).await;
    assert!(
        after - before <= 1.0,
        "20 requests opened {} new mTLS connections between the hosts",
        after - before
    );
    assert!(
        m.app.connections() - app_conns_before <= 2,
        "meshd opened {} connections to the app for 20 sequential requests",
        m.app.connections() - app_conns_before
    );
    let ok = a
        .metric(
            "meshd_requests_total",
            &[
                ("direction", "outbound"),
                ("destination", "default/api"),
                ("code", "200"),
            ],
        )
        .await
        .unwrap();
    assert!(ok >= 22.0, "outbound requests counted: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_app_behind_meshd() {
    let m = mesh("http2").await;
    let u = m.upstream;
    for h2 in [false, true] {
        let got = tokio::task::spawn_blocking(move || {
            let mut args = vec![];
            if h2 {
                args.push("--http2-prior-knowledge");
            }
            let url = url(u, "/x");
            args.push(&url);
            curl(&args)
        })
        .await
        .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.field("version"), "HTTP/2.0", "the app speaks HTTP/2");
        assert_eq!(got.field("host"), "", "no Host header on HTTP/2");
        assert_eq!(
            got.field("authority"),
            u.to_string(),
            "the caller's authority reaches the app as :authority"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_requests_get_403_naming_the_policy() {
    let m = mesh("http").await;
    let b = &m.cluster.nodes[0];
    let u = m.upstream;
    let policy = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-read-only"
action = "allow"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ principals = ["{WEB}"] }}]
to = [{{ methods = ["GET"], paths = ["/public/*"] }}]

[[resource]]
kind = "AuthorizationPolicy"
name = "no-secrets"
action = "deny"
selector = {{ service = "api" }}
[[resource.rules]]
to = [{{ paths = ["/public/secret"] }}]
"#
    );
    let rev = m.cluster.registry.apply("read-only.toml", &policy).unwrap();
    b.wait_policy_revision(rev).await.unwrap();
    let seen_before = m.app.requests();

    let get = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs)
        })
        .await
        .unwrap()
    };
    let got = get(vec![url(u, "/public/items")]).await;
    assert_eq!(got.status, 200, "GET /public/items is allowed: {got:?}");
    let allowed_seen = m.app.requests();
    assert_eq!(allowed_seen, seen_before + 1);

    // Not matched by the ALLOW policy: 403 from the callee's meshd, saying why.
    let got = get(vec!["-X".into(), "POST".into(), url(u, "/public/items")]).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.headers["x-mesh-error"], "inbound/denied");
    assert!(
        got.body.contains("RBAC: access denied")
            && got.body.contains(WEB)
            && got.body.contains("POST /public/items")
            && got.body.contains("no_allow_match"),
        "{got:?}"
    );
    let got = get(vec![url(u, "/private")]).await;
    assert_eq!(got.status, 403, "{got:?}");

    // Matched by the DENY policy: the body names it.
    let got = get(vec![url(u, "/public/secret")]).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert!(
        got.body.contains("AuthorizationPolicy/default/no-secrets"),
        "{got:?}"
    );
    assert_eq!(
        m.app.requests(),
        allowed_seen,
        "a denied request reached the app"
    );

    // Counted and logged with the caller's identity and address.
    let denied = b
        .metric(
            "meshd_authz_decisions_total",
            &[
                ("service", "default/api"),
                ("decision", "deny"),
                ("reason", "deny_policy"),
                ("policy", "AuthorizationPolicy/default/no-secrets"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(denied, 1.0);
    let forbidden = b
        .metric(
            "meshd_requests_total",
            &[
                ("direction", "inbound"),
                ("destination", "default/api"),
                ("code", "403"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(forbidden, 3.0);
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("request denied by policy") && l.contains("/public/secret"))
        .unwrap_or_else(|| panic!("no denial logged:\n{log}"));
    assert!(line.contains(WEB) && line.contains("src.addr="), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_errors_are_told_apart_from_the_app() {
    let m = mesh("http").await;
    let u = m.upstream;
    // A declared upstream nobody runs: the caller's meshd answers 503 (not a reset), by name.
    let ghost = m.ghost;
    let got = tokio::task::spawn_blocking(move || curl(&[&url(ghost, "/")]))
        .await
        .unwrap();
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.headers["x-mesh-error"], "outbound/no_endpoints");
    assert!(got.body.contains("default/ghost"), "{got:?}");
    let Mesh { cluster, app, .. } = m;
    // The app goes away: the callee's meshd answers 502 and says it was the hop to the app.
    drop(app);
    let got = eventually(WAIT, "the app to be gone", || async move {
        let got = tokio::task::spawn_blocking(move || curl(&[&url(u, "/gone")]))
            .await
            .ok()?;
        (got.status != 200).then_some(got)
    })
    .await
    .unwrap();
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(got.headers["x-mesh-error"], "inbound/app_unreachable");
    assert!(got.body.contains("default/api"), "{got:?}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_http_service_by_host_name_through_http_proxy() {
    let m = mesh("http").await;
    let proxy = format!("http://{}", m.proxy);
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs)
        })
        .await
        .unwrap()
    };
    // As the app's HTTP proxy: no per-upstream port, no DNS for .mesh names.
    for host in ["api.mesh", "api.default.mesh", "api.default.svc.mesh"] {
        let got = run(vec!["-x".into(), proxy.clone(), format!("http://{host}/p")]).await;
        assert_eq!(got.status, 200, "{host}: {got:?}");
        assert_eq!(got.field("path"), "/p");
        assert_eq!(
            got.field("host"),
            host,
            "the app sees the name the caller used"
        );
        assert_eq!(
            got.field("xfcc"),
            format!("By=spiffe://mesh.test/ns/default/svc/api;URI={WEB}")
        );
    }
    // Or addressed directly, with the name in Host.
    let got = run(vec![
        "-H".into(),
        "Host: api.mesh".into(),
        format!("http://{}/direct", m.proxy),
    ])
    .await;
    assert_eq!((got.status, got.field("path")), (200, "/direct"), "{got:?}");

    let got = run(vec![
        "-x".into(),
        proxy.clone(),
        "http://nothing.mesh/".into(),
    ])
    .await;
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.headers["x-mesh-error"], "outbound/no_endpoints");
    // A name under .mesh that names no service is the mesh's to refuse.
    let got = run(vec![
        "-x".into(),
        proxy.clone(),
        "http://a.b.c.mesh/".into(),
    ])
    .await;
    assert_eq!(got.status, 400, "{got:?}");
    assert_eq!(got.headers["x-mesh-error"], "outbound/unknown_host");
    // Any other host goes out as it is under `allow_any` (the default; egress.rs has the
    // rest): nothing listens on port 1, so the passthrough fails to connect.
    let got = run(vec!["-x".into(), proxy, "http://127.0.0.1:1/".into()]).await;
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(got.headers["x-mesh-error"], "outbound/passthrough_connect");
}
