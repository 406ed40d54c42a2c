//! No way around the policy, tried as an attacker would on real processes: every spelling of a
//! denied path gets 403 (or 400) and never reaches the app — from HTTP/1.1 and HTTP/2 callers
//! through the mesh and from a plaintext caller of a PERMISSIVE service; headers the mesh owns
//! never reach an app from any entry, nor come back from one; a node without a policy snapshot
//! refuses callers until the registry is back; a node fed an event it cannot read resyncs and
//! ends at the registry's revision with every readable change applied.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use mesh_e2e::Within as _;
use mesh_e2e::apps::Echo;
use mesh_e2e::http_app::HttpApp;
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, WAIT, eventually, http_get, next_ip};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WEB: &str = "spiffe://mesh.test/ns/default/svc/web";

const POLICY: &str = r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "no-admin"
namespace = "default"
action = "deny"
selector = { service = "api" }
rules = [{ to = [{ paths = ["/admin*"] }] }]

[[resource]]
kind = "PeerAuthentication"
name = "api-permissive"
namespace = "default"
mode = "permissive"
selector = { service = "api" }
"#;

const REPORT_FAST: &str = "[telemetry]\nreport_interval = \"200ms\"\n";

#[derive(Debug)]
struct Got {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Got {
    fn field(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {key} in {self:?}"))
    }
}

/// curl with the path sent exactly as written (`--path-as-is`).
async fn curl(args: Vec<String>) -> Got {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "-i", "--path-as-is", "--max-time", "10"])
            .args(&args)
            .within(mesh_e2e::CLI_TIMEOUT)
            .expect("curl runs (scripts/setup installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = (lines.next())
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
    })
    .await
    .unwrap()
}

/// api (HTTP, PERMISSIVE, with a plaintext `listen` address) on b; web on a calling it.
struct Mesh {
    cluster: Cluster,
    app: HttpApp,
    /// web's local port for api.
    upstream: SocketAddr,
    /// api's own `listen` address on b (mTLS or plaintext).
    listen: SocketAddr,
    /// web's `http_proxy` listener (requests name the service by host: `api.mesh`).
    proxy: SocketAddr,
    /// web's local port for db, a TCP echo service on b.
    db: SocketAddr,
    _echo: Echo,
}

async fn mesh() -> Mesh {
    // Reports every 200 ms, so `meshctl check` sees node warnings at once.
    let mut cluster = Cluster::new(RegistryOpts {
        extra: vec!["report_interval = \"200ms\"".to_owned()],
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let b_ip = next_ip();
    let app = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "api")
        .await
        .unwrap();
    let listen = SocketAddr::new(b_ip.into(), 19080);
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let token = cluster.registry.token(&["api", "db"], 1).unwrap();
    let mut b = NodeSpec::new("b", token);
    b.ip = b_ip.into();
    b.extra = REPORT_FAST.to_owned();
    let mut api = ServiceSpec::new("api", app.addr).protocol("http");
    api.listen = Some(listen);
    b.services = vec![api, ServiceSpec::new("db", echo.addr)];
    cluster.add_spec(b).await.unwrap();
    let a_ip = next_ip();
    let upstream = SocketAddr::new(a_ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut a = NodeSpec::new("a", token);
    a.ip = a_ip.into();
    a.extra = REPORT_FAST.to_owned();
    a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    let proxy = SocketAddr::new(a_ip.into(), 15001);
    let db = SocketAddr::new(a_ip.into(), 19003);
    let mut web = ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080))
        .protocol("http")
        .upstream("api", upstream)
        .upstream("db", db);
    web.http_proxy = Some(proxy);
    a.services = vec![web];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    let rev = cluster.registry.apply("policy.toml", POLICY).unwrap();
    for n in &cluster.nodes {
        n.wait_policy_revision(rev).await.unwrap();
    }
    cluster
        .node("a")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    Mesh {
        cluster,
        app,
        upstream,
        listen,
        proxy,
        db,
        _echo: echo,
    }
}

/// How a caller reaches api: through web's meshd (its upstream port with HTTP/1.1 or HTTP/2,
/// or its `http_proxy` listener), or plaintext straight to api's `listen` address (HTTP/1.1 or
/// HTTP/2 prior knowledge).
#[derive(Clone, Copy)]
enum Entry {
    Upstream { h2: bool },
    HttpProxy,
    Plaintext { h2: bool },
}

fn entries() -> [(&'static str, Entry); 5] {
    [
        ("mesh http/1.1", Entry::Upstream { h2: false }),
        ("mesh http/2", Entry::Upstream { h2: true }),
        ("mesh http_proxy", Entry::HttpProxy),
        ("plaintext http/1.1", Entry::Plaintext { h2: false }),
        ("plaintext http/2", Entry::Plaintext { h2: true }),
    ]
}

/// curl arguments for `path` through `entry`, after `extra`.
fn via(m: &Mesh, entry: Entry, path: &str, extra: &[&str]) -> Vec<String> {
    let (addr, h2) = match entry {
        Entry::Upstream { h2 } => (m.upstream, h2),
        Entry::Plaintext { h2 } => (m.listen, h2),
        Entry::HttpProxy => {
            let mut a: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
            a.extend(["-x".to_owned(), format!("http://{}", m.proxy)]);
            a.push(format!("http://api.mesh{path}"));
            return a;
        }
    };
    args(addr, h2, path, extra)
}

fn args(addr: SocketAddr, h2: bool, path: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    if h2 {
        a.push("--http2-prior-knowledge".into());
    }
    a.push(format!("http://{addr}{path}"));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_denied_path_reaches_the_app() {
    let m = mesh().await;
    let bypasses: &[(&str, u16)] = &[
        ("/admin", 403),
        ("//admin", 403),
        ("/./admin", 403),
        ("/x/../admin", 403),
        ("/%61dmin", 403),
        ("/%61%64%6D%69%6E/panel", 403),
        ("/%2e%2e/admin", 403),
        ("/x/%2E%2E/admin", 403),
        ("/.//x/..//admin?x=1", 403),
        ("/admin%2Fpanel", 400),
        ("/x%2F..%2Fadmin", 400),
        ("/x%5C..%5Cadmin", 400),
        ("/%zzadmin", 400),
    ];
    for (entry, how) in entries() {
        let before = m.app.requests();
        for (path, want) in bypasses {
            let got = curl(via(&m, how, path, &[])).await;
            assert_eq!(got.status, *want, "{entry} {path}: {got:?}");
            let err = got.headers.get("x-mesh-error").map(String::as_str);
            let hop_reason = err.unwrap_or_else(|| panic!("{entry} {path}: no x-mesh-error"));
            if *want == 403 {
                assert_eq!(hop_reason, "inbound/denied", "{entry} {path}");
            } else {
                // Through web's meshd the outbound refuses it first; plaintext, the inbound.
                assert!(
                    hop_reason.ends_with("escaped_slash") || hop_reason.ends_with("bad_escape"),
                    "{entry} {path}: {hop_reason}"
                );
            }
        }
        assert_eq!(
            m.app.requests(),
            before,
            "{entry}: a denied spelling reached the app"
        );
        // What is allowed arrives with the path that was authorized, the query untouched.
        let got = curl(via(&m, how, "/public//a/./b/../c?q=%2F..&r=1", &[])).await;
        assert_eq!(got.status, 200, "{entry}: {got:?}");
        assert_eq!(got.field("path"), "/public/a/c", "{entry}");
        assert_eq!(got.field("query"), "q=%2F..&r=1", "{entry}");
        assert_eq!(m.app.requests(), before + 1, "{entry}");
    }
    // The plaintext callers were served request by request (counted as plaintext), not as a
    // byte stream.
    let b = &m.cluster.nodes[0];
    let plain = b
        .metric(
            "meshd_plaintext_connections_total",
            &[("service", "default/api")],
        )
        .await
        .unwrap();
    assert!(plain >= 2.0, "plaintext connections: {plain}");
    let denied = b
        .metric(
            "meshd_requests_total",
            &[("direction", "inbound"), ("code", "403")],
        )
        .await
        .unwrap();
    assert!(denied >= 45.0, "inbound 403s counted: {denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_the_mesh_owns_never_come_from_an_app() {
    let m = mesh().await;
    let forged = [
        "-H",
        "x-forwarded-client-cert: By=me;URI=spiffe://mesh.test/ns/default/svc/admin",
        "-H",
        "x-mesh-error: outbound/forged",
        "-H",
        "x-mesh-identity: spiffe://mesh.test/ns/default/svc/admin",
    ];
    for (entry, how) in entries() {
        let plaintext = entry.starts_with("plaintext");
        let got = curl(via(&m, how, "/who", &forged)).await;
        assert_eq!(got.status, 200, "{entry}: {got:?}");
        assert_eq!(
            got.field("mesh_headers"),
            "",
            "{entry}: x-mesh-* reached the app"
        );
        let want_xfcc = if plaintext {
            // A plaintext caller has no identity to pass on, and cannot claim one.
            String::new()
        } else {
            format!("By=spiffe://mesh.test/ns/default/svc/api;URI={WEB}")
        };
        assert_eq!(got.field("xfcc"), want_xfcc, "{entry}");

        // An app's response cannot speak for the mesh or name a caller.
        let got = curl(via(&m, how, "/forge", &[])).await;
        assert_eq!(got.status, 200, "{entry}: {got:?}");
        assert_eq!(got.headers.get("x-app").map(String::as_str), Some("api"));
        for h in ["x-mesh-error", "x-mesh-anything", "x-forwarded-client-cert"] {
            assert!(
                !got.headers.contains_key(h),
                "{entry}: {h} came back: {got:?}"
            );
        }
    }

    // A plaintext caller is rate-limited per request like any other (one bucket per calling
    // identity: all plaintext callers share `plaintext`), and logged with its address.
    let rev = m
        .cluster
        .registry
        .apply(
            "limit.toml",
            r#"
[[resource]]
kind = "RateLimit"
name = "api"
service = "api"
limits = [{ key = "source_identity", requests_per_unit = 2, unit = "minute", burst = 2 }]
"#,
        )
        .unwrap();
    m.cluster.nodes[0].wait_policy_revision(rev).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let got = curl(via(&m, Entry::Plaintext { h2: false }, "/limited", &[])).await;
        statuses.push(got.status);
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    // web has its own bucket: the plaintext callers did not use it up.
    let got = curl(via(&m, Entry::Upstream { h2: false }, "/limited", &[])).await;
    assert_eq!(got.status, 200, "{got:?}");
    let b = &m.cluster.nodes[0];
    let e = eventually(
        Duration::from_secs(5),
        "b's access event of the 429",
        || async {
            b.log()
                .lines()
                .filter(|l| l.starts_with('{'))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|e| e["target"] == "access" && e["http.status"] == 429)
        },
    )
    .await
    .unwrap();
    assert_eq!(e["src.identity"], "plaintext", "{e}");
    assert_eq!(e["mtls"], false, "{e}");
    assert_eq!(e["http.path"], "/limited", "{e}");
}

/// A mesh workload's own client: mTLS to b's inbound port as `default/web` (a certificate from
/// the mesh CA), SNI `api`, ALPN for a byte stream (not meshd's HTTP/2), then a raw HTTP/1.1
/// request. Returns the raw response.
async fn mtls_http1(m: &Mesh, request: &str) -> String {
    use mesh_runtime::tls::{self as mtls, ALPN_MESH_TCP, CertSlot, SpiffeVerifier};
    use rustls_pki_types::ServerName;
    let td = mesh_api::TrustDomain::new("mesh.test").unwrap();
    let ca = m.cluster.registry.authority().unwrap();
    let web = mesh_api::ServiceKey::parse("default/web").unwrap();
    let (issued, key) = ca
        .issue(&mesh_ca::SignRequest {
            identity: mesh_api::Identity::workload(&td, &web),
            dns_names: Vec::new(),
            ttl: Duration::from_secs(3600),
            now: std::time::SystemTime::now(),
        })
        .unwrap();
    let roots = mtls::root_store(&ca.trust_bundle_pem()).unwrap();
    let verifier = SpiffeVerifier::new(
        roots,
        Box::new(move |name| match name {
            ServerName::DnsName(d) => mesh_api::ServiceKey::from_sni(d.as_ref())
                .map(|k| mesh_api::Identity::workload(&td, &k)),
            _ => None,
        }),
    );
    let resolver = CertSlot::new(Some(mtls::certified_key(&issued.chain_pem, &key).unwrap()));
    let cfg = mtls::client_config(
        std::sync::Arc::new(verifier),
        Some(resolver as std::sync::Arc<dyn rustls::client::ResolvesClientCert>),
        &[ALPN_MESH_TCP],
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let sni =
        ServerName::try_from(mesh_api::ServiceKey::parse("default/api").unwrap().sni()).unwrap();
    let inbound = SocketAddr::new(m.cluster.nodes[0].spec.ip, mesh_e2e::INBOUND_PORT);
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(inbound).await?;
        let mut s = connector.connect(sni, tcp).await?;
        s.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: timed out".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_client_speaking_http1_over_mtls_is_held_to_the_same_rules() {
    let m = mesh().await;
    let before = m.app.requests();
    // A denied spelling: refused per request, never relayed as bytes.
    let got = mtls_http1(
        &m,
        "GET /x/../admin HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(
        got.to_ascii_lowercase()
            .contains("x-mesh-error: inbound/denied"),
        "{got}"
    );
    assert_eq!(m.app.requests(), before);
    // An identity header written by the caller is replaced by the one its certificate proves.
    let got = mtls_http1(
        &m,
        "GET /who HTTP/1.1\r\nhost: api\r\nx-forwarded-client-cert: By=x;URI=spiffe://mesh.test/ns/default/svc/admin\r\nx-mesh-role: admin\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.contains(&format!(
            "xfcc=By=spiffe://mesh.test/ns/default/svc/api;URI={WEB}\n"
        )),
        "{got}"
    );
    assert!(got.contains("mesh_headers=\n"), "{got}");
    assert!(got.contains("path=/who\n"), "{got}");
}

/// Whether a TCP connection through `addr` echoes what it is sent.
async fn echoes(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(&buf == b"ping")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_policy_snapshot_refuses_until_the_registry_is_back() {
    let mut m = mesh().await;
    let (upstream, listen, db) = (m.upstream, m.listen, m.db);
    m.cluster
        .node("a")
        .wait_endpoints("default/db", 1)
        .await
        .unwrap();
    assert_eq!(
        curl(args(upstream, false, "/before", &[])).await.status,
        200
    );
    assert!(echoes(db).await, "db echoes before the restart");

    // b restarts with the registry down and its snapshot corrupt (as after a disk error, or a
    // file written by a newer version).
    m.cluster.nodes[0].stop(Duration::from_secs(10)).unwrap();
    m.cluster.registry.kill9();
    let data = m.cluster.nodes[0].dir.join("data");
    std::fs::write(
        data.join("policy.json"),
        "{\"format\": 1, \"revision\": 7, \"res",
    )
    .unwrap();
    m.cluster.nodes[0].run().unwrap();
    let admin = m.cluster.nodes[0].admin.to_string();
    let why = eventually(WAIT, "b's /ready to say why it is not ready", || {
        let admin = admin.clone();
        async move {
            let (code, body) = http_get(&admin, "/ready").await.ok()?;
            (code == 503 && body.contains("no policy snapshot")).then_some(body)
        }
    })
    .await
    .unwrap();
    assert!(why.contains("waiting for the registry"), "{why}");
    // The corrupt file is set aside for the operator, not deleted and not used.
    let aside: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("policy.json.unusable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(!data.join("policy.json").exists());

    // Every entry is refused: HTTP callers get 503 inbound/no_policy, nothing reaches the app.
    let before = m.app.requests();
    let got = eventually(
        WAIT,
        "b's inbound to answer no_policy through the mesh",
        || async {
            let got = curl(args(upstream, false, "/public", &[])).await;
            (got.headers.get("x-mesh-error").map(String::as_str) == Some("inbound/no_policy"))
                .then_some(got)
        },
    )
    .await
    .unwrap();
    assert_eq!(got.status, 503, "{got:?}");
    for h2 in [false, true] {
        let got = curl(args(listen, h2, "/public", &[])).await;
        assert_eq!(got.status, 503, "plaintext h2={h2}: {got:?}");
        assert_eq!(
            got.headers.get("x-mesh-error").map(String::as_str),
            Some("inbound/no_policy")
        );
    }
    assert_eq!(
        m.app.requests(),
        before,
        "a request reached the app with no policy in force"
    );
    // A TCP caller is reset before anything reaches the app.
    assert!(
        !echoes(db).await,
        "a TCP connection was served with no policy in force"
    );
    let refused = m.cluster.nodes[0]
        .metric(
            "meshd_rejected_connections_total",
            &[("direction", "inbound"), ("reason", "no_policy")],
        )
        .await
        .unwrap();
    assert!(refused >= 4.0, "no_policy refusals counted: {refused}");
    let snapshots_aside = m.cluster.nodes[0]
        .metric("meshd_policy_snapshots_set_aside_total", &[])
        .await
        .unwrap();
    assert_eq!(snapshots_aside, 1.0);

    // The registry comes back: b takes its snapshot, is ready, and serves — with the DENY.
    m.cluster.registry.run().await.unwrap();
    m.cluster.nodes[0].wait_ready().await.unwrap();
    let got = eventually(WAIT, "b to serve again", || async {
        let got = curl(args(upstream, false, "/after", &[])).await;
        (got.status == 200).then_some(got)
    })
    .await
    .unwrap();
    assert_eq!(got.field("path"), "/after");
    assert!(echoes(db).await, "db echoes once the policy is back");
    assert_eq!(curl(args(listen, false, "/admin", &[])).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fed_an_unreadable_event_resyncs_and_keeps_every_readable_change() {
    let mut m = mesh().await;
    let upstream = m.upstream;
    let r1 = m
        .cluster
        .registry
        .metric("mesh_registry_policy_revision", &[])
        .await
        .unwrap() as u64;
    assert_eq!(
        curl(args(upstream, false, "/blocked", &[])).await.status,
        200
    );

    // While the registry is stopped, its store gets one revision holding a readable change (a
    // DENY on /blocked), an AuthorizationPolicy of a newer format, and a kind this version does
    // not know — as a registry upgraded before its nodes would send.
    m.cluster.registry.kill9();
    let r2 = {
        use mesh_registry::store::{PolicyChange, SledStore, Store as _};
        let store = SledStore::open(&mesh_registry::init::store_dir(
            &m.cluster.registry.data_dir,
        ))
        .unwrap();
        let change = |kind: &str, ns: &str, name: &str, spec: &str| PolicyChange {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            spec_json: Some(spec.into()),
        };
        let out = store
            .apply_policies(
                &[
                    change(
                        "AuthorizationPolicy",
                        "default",
                        "no-blocked",
                        r#"{"action":"deny","selector":{"service":"api"},"rules":[{"to":[{"paths":["/blocked"]}]}]}"#,
                    ),
                    change(
                        "AuthorizationPolicy",
                        "billing",
                        "from-the-future",
                        r#"{"action":"allow","rules":[],"when":[{"key":"request.auth.claims[iss]","values":["x"]}]}"#,
                    ),
                    change("TrafficMirror", "default", "m", r#"{"service":"api"}"#),
                ],
                "admin:test",
                0,
                false,
            )
            .unwrap();
        store.flush().unwrap();
        out.0
    };
    assert!(r2 > r1);
    m.cluster.registry.run().await.unwrap();

    // a asks for the changes since r1, cannot read them, never applies them in part, asks for a
    // full snapshot and reads it resource by resource.
    let a = &m.cluster.nodes[1];
    a.wait_policy_revision(r2).await.unwrap();
    assert!(a.metric("meshd_policy_resyncs_total", &[]).await.unwrap() >= 1.0);
    assert_eq!(
        a.metric("meshd_policy_unreadable_resources", &[])
            .await
            .unwrap(),
        2.0
    );
    let b = &m.cluster.nodes[0];
    b.wait_policy_revision(r2).await.unwrap();
    // The readable change is enforced; the earlier policy still is.
    let got = curl(args(upstream, false, "/blocked", &[])).await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(curl(args(upstream, false, "/admin", &[])).await.status, 403);
    assert_eq!(curl(args(upstream, false, "/ok", &[])).await.status, 200);
    // /config_dump says what could not be read and what stands in for it.
    let dump = a.config_dump().await.unwrap();
    let unreadable = dump["policy"]["unreadable"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = unreadable
        .iter()
        .filter_map(|u| u["resource"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "AuthorizationPolicy/billing/from-the-future",
            "TrafficMirror/default/m"
        ],
        "{dump}"
    );
    assert_eq!(
        unreadable[0]["stand_in"],
        "deny every caller in its namespace"
    );
    let log = b.log();
    assert!(
        log.contains("policy resource unreadable by this meshd version"),
        "{log}"
    );
    // ...and reported: `meshctl check` names each node's unreadable resources.
    let registry = &m.cluster.registry;
    let text = eventually(
        WAIT,
        "meshctl check to report the unreadable policy",
        || async {
            let out = registry.meshctl(&["check"]).ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text.contains("a: policy_unreadable: AuthorizationPolicy/billing/from-the-future")
                && text.contains("b: policy_unreadable: TrafficMirror/default/m"))
            .then_some(text)
        },
    )
    .await
    .unwrap();
    assert!(
        text.contains("deny every caller in its namespace"),
        "{text}"
    );
}
