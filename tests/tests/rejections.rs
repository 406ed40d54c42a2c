//! Refusals: every way a connection or an operation must be turned down is turned down, the
//! client sees it, the refusing side logs a line naming the reason, and the reason's counter
//! goes up.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use mesh_api::{Identity, ServiceKey, TrustDomain};
use mesh_ca::{Authority, SignRequest};
use mesh_e2e::Within as _;
use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{
    Cluster, Node, NodeSpec, Registry, RegistryOpts, ServiceSpec, WAIT, eventually, http_get,
    metric_sum, metric_sum_or_zero, next_ip,
};
use mesh_runtime::tls::{self as mtls, ALPN_MESH_TCP, CertSlot, SpiffeVerifier};
use rustls::{AlertDescription, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const REJECTED: &str = "meshd_rejected_connections_total";
const REGISTRY_CALLS: &str = "mesh_registry_calls_total";

fn td() -> TrustDomain {
    TrustDomain::new("mesh.test").unwrap()
}

fn workload(svc: &str) -> Identity {
    Identity::workload(&td(), &ServiceKey::parse(svc).unwrap())
}

/// A certificate chain (PEM, leaf first) and its key, issued by `ca` for service `svc`.
fn issue(ca: &Authority, svc: &str, now: SystemTime, ttl: Duration) -> (String, String) {
    let (issued, key) = ca
        .issue(&SignRequest {
            identity: workload(svc),
            dns_names: Vec::new(),
            ttl,
            now,
        })
        .unwrap();
    (issued.chain_pem, key)
}

/// The real mesh roots, as every meshd trusts them.
fn mesh_roots(registry: &Registry) -> Arc<RootCertStore> {
    mtls::root_store(&registry.authority().unwrap().trust_bundle_pem()).unwrap()
}

/// Finds a log line carrying `msg` and `reason=<reason>` (quoted or not).
fn line_with<'a>(log: &'a str, msg: &str, reason: &str) -> Option<&'a str> {
    let plain = format!("reason={reason}");
    let quoted = format!("reason=\"{reason}\"");
    log.lines()
        .find(|l| l.contains(msg) && (l.contains(&plain) || l.contains(&quoted)))
}

/// Waits until `log()` has a line with `msg` and `reason`; returns it.
async fn wait_log(what: &str, log: impl Fn() -> String, msg: &str, reason: &str) -> String {
    let found = eventually(
        WAIT,
        &format!("{what} log: {msg:?} with reason {reason}"),
        || {
            let text = log();
            std::future::ready(line_with(&text, msg, reason).map(str::to_owned))
        },
    )
    .await;
    match found {
        Ok(line) => line,
        Err(e) => panic!("{e}\n--- {what} log ---\n{}", log()),
    }
}

/// Waits until the node's counter for `reason` in `direction` exceeds `above`; returns it.
async fn wait_rejected(node: &Node, direction: &str, reason: &str, above: f64) -> f64 {
    let labels = [("direction", direction), ("reason", reason)];
    eventually(
        WAIT,
        &format!("{REJECTED}{{direction={direction},reason={reason}}} > {above}"),
        || async {
            let v = node.metric(REJECTED, &labels).await.ok()?;
            (v > above).then_some(v)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- metrics ---\n{}", metrics_text(node)))
}

fn metrics_text(node: &Node) -> String {
    let admin = node.admin.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(http_get(&admin, "/metrics"))
            .map(|(_, b)| b)
            .unwrap_or_else(|e| e.to_string())
    })
    .join()
    .unwrap()
}

async fn rejected(node: &Node, direction: &str, reason: &str) -> f64 {
    node.metric_or_zero(REJECTED, &[("direction", direction), ("reason", reason)])
        .await
        .unwrap()
}

/// Sum of the registry's `mesh_registry_calls_total{rpc, outcome}`.
async fn registry_calls(registry: &Registry, rpc: &str, outcome: &str) -> f64 {
    let (code, body) = http_get(&registry.admin.to_string(), "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200, "registry /metrics");
    metric_sum_or_zero(&body, REGISTRY_CALLS, &[("rpc", rpc), ("outcome", outcome)]).unwrap()
}

async fn wait_registry_calls(registry: &Registry, rpc: &str, outcome: &str, above: f64) -> f64 {
    eventually(
        WAIT,
        &format!("{REGISTRY_CALLS}{{rpc={rpc},outcome={outcome}}} > {above}"),
        || async {
            let v = registry_calls(registry, rpc, outcome).await;
            (v > above).then_some(v)
        },
    )
    .await
    .unwrap()
}

/// Connects with mTLS the way a meshd would: SNI of `svc`, server verified against `roots`
/// for `svc`'s workload identity, presenting `client` (if any). Writes `data` and reads as
/// many bytes back. With TLS 1.3 the server judges our certificate after the client
/// considers the handshake done, so a refusal shows up on the first read.
async fn mesh_exchange(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    client: Option<(String, String)>,
    svc: &str,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    let expect_td = td();
    let verifier = SpiffeVerifier::new(
        roots,
        Box::new(move |name| match name {
            ServerName::DnsName(d) => {
                ServiceKey::from_sni(d.as_ref()).map(|k| Identity::workload(&expect_td, &k))
            }
            _ => None,
        }),
    );
    let resolver = client.map(|(chain, key)| {
        CertSlot::new(Some(mtls::certified_key(&chain, &key).unwrap()))
            as Arc<dyn rustls::client::ResolvesClientCert>
    });
    let cfg = mtls::client_config(Arc::new(verifier), resolver, &[ALPN_MESH_TCP]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let sni = ServerName::try_from(ServiceKey::parse(svc).unwrap().sni()).unwrap();
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut s = connector.connect(sni, tcp).await?;
        s.write_all(data).await?;
        s.flush().await?;
        let mut out = vec![0u8; data.len()];
        s.read_exact(&mut out).await?;
        Ok(out)
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "mesh exchange timed out",
        )),
    }
}

/// The TLS alert the peer sent, if that is what ended the connection.
fn alert(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// One node "b" serving `api` (an echo app).
struct Single {
    cluster: Cluster,
    _echo: Echo,
}

impl Single {
    async fn start() -> Self {
        let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
        let ip = next_ip();
        let echo = Echo::start(SocketAddr::new(ip.into(), 0)).await.unwrap();
        let token = cluster.registry.token(&["api"], 1).unwrap();
        let mut spec = NodeSpec::new("b", token);
        spec.ip = ip.into();
        spec.services = vec![ServiceSpec::new("api", echo.addr)];
        cluster.add_spec(spec).await.unwrap();
        Self {
            cluster,
            _echo: echo,
        }
    }

    fn node(&self) -> &Node {
        &self.cluster.nodes[0]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_the_inbound_port_is_closed_without_an_answer() {
    let s = Single::start().await;
    let b = s.node();
    let before = rejected(b, "inbound", "not_tls").await;

    let mut tcp = TcpStream::connect(b.inbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: api.default.svc.mesh\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the inbound port closes a plaintext connection instead of waiting");
    // Closed (EOF or reset) with no answer from the app or an HTTP server: at most one fatal
    // TLS alert record (type 21, TLS 1.2 record version, length 2, level fatal).
    assert!(
        !apps::contains(&answer, b"HTTP/"),
        "an HTTP answer came back: {answer:?}"
    );
    assert!(
        answer.is_empty() || (answer.len() == 7 && answer[..6] == [0x15, 3, 3, 0, 2, 2]),
        "only a fatal TLS alert may come back, got {answer:?} ({read:?})"
    );

    let after = wait_rejected(b, "inbound", "not_tls", before).await;
    assert_eq!(after, before + 1.0, "exactly one not_tls rejection");
    let line = wait_log("b", || b.log(), "inbound connection rejected", "not_tls").await;
    assert!(line.contains("WARN"), "rejections are warnings: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_untrusted() {
    let s = Single::start().await;
    let b = s.node();
    let registry = &s.cluster.registry;
    let roots = mesh_roots(registry);

    // Control: the same client with a certificate of the real mesh CA gets through.
    let good = issue(
        &registry.authority().unwrap(),
        "web",
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let echoed = mesh_exchange(b.inbound, roots.clone(), Some(good), "api", b"hello")
        .await
        .unwrap();
    assert_eq!(echoed, b"hello");

    // Another CA with the same trust domain and the same names: its certificates must not be
    // trusted just because the identity and issuer names look right.
    let (foreign, _) = Authority::generate(&td(), SystemTime::now()).unwrap();
    let forged = issue(
        &foreign,
        "web",
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let before = rejected(b, "inbound", "untrusted_cert").await;
    let err = mesh_exchange(b.inbound, roots, Some(forged), "api", b"hello")
        .await
        .expect_err("a certificate from another CA must be refused");
    assert!(
        matches!(
            alert(&err),
            Some(AlertDescription::UnknownCA | AlertDescription::DecryptError)
        ),
        "the client is told the CA is not trusted, got: {err:?}"
    );

    let after = wait_rejected(b, "inbound", "untrusted_cert", before).await;
    assert_eq!(after, before + 1.0);
    wait_log(
        "b",
        || b.log(),
        "inbound connection rejected",
        "untrusted_cert",
    )
    .await;
    // Nothing reached the app: only the control connection was proxied.
    let conns = b
        .metric("meshd_connections_total", &[("direction", "inbound")])
        .await
        .unwrap();
    assert_eq!(conns, 1.0, "only the control connection reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() {
    let s = Single::start().await;
    let b = s.node();
    let registry = &s.cluster.registry;
    let roots = mesh_roots(registry);
    let ca = registry.authority().unwrap();

    // A well-formed certificate of the real CA that has already expired: issued as of the
    // intermediate's own notBefore, valid for one second. (Issuing "as of two days ago" is no
    // good here: the CA clamps notBefore to its intermediate's notBefore, which would produce a
    // certificate with notAfter before notBefore rather than an expired one.)
    let int_pem =
        std::fs::read_to_string(registry.data_dir.join("ca").join("intermediate.pem")).unwrap();
    let (int_not_before, _) =
        mtls::validity(&mtls::parse_certs(&int_pem, "intermediate").unwrap()[0]).unwrap();
    let (chain, key) = issue(&ca, "web", int_not_before, Duration::from_secs(1));
    let (not_before, not_after) =
        mtls::validity(&mtls::parse_certs(&chain, "leaf").unwrap()[0]).unwrap();
    assert!(
        not_before <= not_after,
        "the test certificate is well formed"
    );
    eventually(WAIT, "the test certificate to be past its notAfter", || {
        std::future::ready((SystemTime::now() > not_after + Duration::from_secs(1)).then_some(()))
    })
    .await
    .unwrap();

    // Control: a current certificate from the same CA works.
    let good = issue(&ca, "web", SystemTime::now(), Duration::from_secs(3600));
    assert_eq!(
        mesh_exchange(b.inbound, roots.clone(), Some(good), "api", b"ping")
            .await
            .unwrap(),
        b"ping"
    );

    let before = rejected(b, "inbound", "cert_expired").await;
    let err = mesh_exchange(b.inbound, roots, Some((chain, key)), "api", b"ping")
        .await
        .expect_err("an expired certificate must be refused");
    assert_eq!(
        alert(&err),
        Some(AlertDescription::CertificateExpired),
        "client told why: {err:?}"
    );

    let after = wait_rejected(b, "inbound", "cert_expired", before).await;
    assert_eq!(after, before + 1.0);
    wait_log(
        "b",
        || b.log(),
        "inbound connection rejected",
        "cert_expired",
    )
    .await;
    assert_eq!(
        rejected(b, "inbound", "untrusted_cert").await,
        0.0,
        "expiry is not reported as an untrusted CA"
    );
}

/// A TLS server presenting a real mesh certificate of `svc`, requiring a client certificate.
/// Counts accepted TCP connections.
struct Impostor {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Impostor {
    async fn start(ip: std::net::IpAddr, ca: &Authority, svc: &str) -> Self {
        let roots = mtls::root_store(&ca.trust_bundle_pem()).unwrap();
        let (chain, key) = issue(ca, svc, SystemTime::now(), Duration::from_secs(3600));
        let slot = CertSlot::new(Some(mtls::certified_key(&chain, &key).unwrap()));
        let cfg = mtls::server_config(roots, slot, false, &[ALPN_MESH_TCP]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(tcp).await {
                        let _ = s.write_all(b"IMPOSTOR").await;
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_the_wrong_identity_is_refused_and_not_retried() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let ca = cluster.registry.authority().unwrap();
    let b_ip = next_ip();
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    // b serves api but advertises an impostor that proves a real, but different, identity.
    let impostor = Impostor::start(b_ip.into(), &ca, "db").await;
    let token = cluster.registry.token(&["api"], 1).unwrap();
    let mut spec_b = NodeSpec::new("b", token);
    spec_b.ip = b_ip.into();
    spec_b.services = vec![ServiceSpec::new("api", echo.addr)];
    spec_b.inbound_advertise = Some(impostor.addr);
    cluster.add_spec(spec_b).await.unwrap();
    let a_ip = next_ip();
    let upstream = SocketAddr::new(a_ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec_a = NodeSpec::new("a", token);
    spec_a.ip = a_ip.into();
    spec_a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    spec_a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080)).upstream("api", upstream),
    ];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    let (a, b) = (&cluster.nodes[1], &cluster.nodes[0]);

    // Wait until a routes api to the impostor (a usable endpoint), so the one connection
    // below is decided by the handshake, not by discovery.
    let admin = a.admin.to_string();
    let want = impostor.addr.to_string();
    eventually(
        WAIT,
        "a to see a usable api endpoint at the impostor",
        || {
            let (admin, want) = (admin.clone(), want.clone());
            async move {
                let (_, body) = http_get(&admin, "/members").await.ok()?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let eps = v["endpoints"]["default/api"].as_array()?;
                eps.iter()
                    .any(|e| {
                        e["addr"] == want.as_str() && e["healthy"] == true && e["draining"] == false
                    })
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();

    let before = rejected(a, "outbound", "identity_mismatch").await;
    let got = apps::round_trip(upstream, b"secret request for api").await;
    match &got {
        Ok(data) => assert!(
            data.is_empty(),
            "the app got data from an impostor: {data:?}"
        ),
        Err(e) => assert!(
            matches!(
                e.downcast_ref::<std::io::Error>().map(std::io::Error::kind),
                Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
            ),
            "closed or reset, got {e:?}"
        ),
    }

    let after = wait_rejected(a, "outbound", "identity_mismatch", before).await;
    assert_eq!(after, before + 1.0, "one handshake, one rejection");
    let line = wait_log(
        "a",
        || a.log(),
        "outbound connection failed",
        "identity_mismatch",
    )
    .await;
    assert!(
        line.contains("default/api") && line.contains("spiffe://mesh.test/ns/default/svc/db"),
        "the log names the service meant to be reached and the identity presented: {line}"
    );
    // No retry, neither to the same endpoint nor elsewhere: the impostor saw exactly one
    // connection, a counted no other outbound failure, and b's real inbound port saw nothing.
    assert_eq!(
        impostor.accepted.load(Ordering::SeqCst),
        1,
        "exactly one connection attempt"
    );
    let all_outbound = a
        .metric(REJECTED, &[("direction", "outbound")])
        .await
        .unwrap();
    assert_eq!(
        all_outbound, after,
        "no other outbound failure was recorded"
    );
    let b_inbound = b
        .metric("meshd_tls_handshakes_total", &[("direction", "inbound")])
        .await
        .unwrap()
        + b.metric(REJECTED, &[("direction", "inbound")])
            .await
            .unwrap();
    assert_eq!(b_inbound, 0.0, "nothing went to b's real inbound port");
    let handshakes = a
        .metric("meshd_tls_handshakes_total", &[("direction", "outbound")])
        .await
        .unwrap();
    assert_eq!(handshakes, 0.0, "no outbound handshake completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_gets_no_certificate_for_a_service_its_token_does_not_allow() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let ip = next_ip();
    let web = Echo::start(SocketAddr::new(ip.into(), 0)).await.unwrap();
    let api = Echo::start(SocketAddr::new(ip.into(), 0)).await.unwrap();
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec = NodeSpec::new("n", token);
    spec.ip = ip.into();
    spec.services = vec![
        ServiceSpec::new("web", web.addr),
        ServiceSpec::new("api", api.addr),
    ];
    cluster.add_spec(spec).await.unwrap();
    let registry = &cluster.registry;
    let n = &cluster.nodes[0];

    // The registry refused api, and said why.
    let refused = wait_registry_calls(registry, "sign_workload", "service_not_allowed", 0.0).await;
    assert!(refused >= 1.0);
    let line = wait_log(
        "registry",
        || registry.log(),
        "registry call rejected",
        "service_not_allowed",
    )
    .await;
    assert!(
        line.contains("default/api"),
        "the refusal names the service: {line}"
    );
    assert!(
        !line.contains("may not host default/web"),
        "web is allowed: {line}"
    );
    assert!(
        registry_calls(registry, "sign_workload", "ok").await >= 1.0,
        "web was signed"
    );

    // The node says it could not get the certificate.
    let log = eventually(WAIT, "n to log the missing api certificate", || {
        let log = n.log();
        std::future::ready(
            log.lines()
                .find(|l| {
                    l.contains("could not get a workload certificate") && l.contains("default/api")
                })
                .map(str::to_owned),
        )
    })
    .await;
    assert!(log.is_ok(), "{log:?}\n--- n log ---\n{}", n.log());

    // Only web has an identity.
    let (code, body) = http_get(&n.admin.to_string(), "/config_dump")
        .await
        .unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let services: Vec<&str> = dump["identity"]["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["default/web"], "config_dump: {body}");

    // web works through the mesh; api cannot be reached (n has no certificate to prove it).
    let roots = mesh_roots(registry);
    let client = issue(
        &registry.authority().unwrap(),
        "frontend",
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let echoed = mesh_exchange(
        n.inbound,
        roots.clone(),
        Some(client.clone()),
        "web",
        b"to web",
    )
    .await
    .unwrap();
    assert_eq!(echoed, b"to web");
    let before = rejected(n, "inbound", "unknown_service").await;
    let err = mesh_exchange(n.inbound, roots, Some(client), "api", b"to api")
        .await
        .expect_err("n cannot serve api without its certificate");
    assert_ne!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "refused, not hung: {err:?}"
    );
    wait_rejected(n, "inbound", "unknown_service", before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_single_use_token_and_garbage_token_stop_the_node() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let x_ip = next_ip();
    let echo = Echo::start(SocketAddr::new(x_ip.into(), 0)).await.unwrap();
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec_x = NodeSpec::new("x", token.clone());
    spec_x.ip = x_ip.into();
    spec_x.services = vec![ServiceSpec::new("web", echo.addr)];
    cluster.add_spec(spec_x).await.unwrap();
    assert_eq!(
        registry_calls(&cluster.registry, "join", "ok").await,
        1.0,
        "x joined"
    );
    let before = registry_calls(&cluster.registry, "join", "token_used_up").await;

    // y presents the same single-use token.
    let y_ip = next_ip();
    let echo_y = Echo::start(SocketAddr::new(y_ip.into(), 0)).await.unwrap();
    let mut spec_y = NodeSpec::new("y", token);
    spec_y.ip = y_ip.into();
    spec_y.services = vec![ServiceSpec::new("web", echo_y.addr)];
    spec_y.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    let mut y = Node::start(&cluster.registry, spec_y).unwrap();
    let code = y.exit_code().await.unwrap();
    assert_eq!(code, Some(1), "y exits 1\n{}", y.log());
    let log = y.log();
    assert!(
        log.contains("already been used"),
        "y's log says the token was used:\n{log}"
    );
    let after = wait_registry_calls(&cluster.registry, "join", "token_used_up", before).await;
    assert!(after >= 1.0);
    wait_log(
        "registry",
        || cluster.registry.log(),
        "registry call rejected",
        "token_used_up",
    )
    .await;
    assert_eq!(
        registry_calls(&cluster.registry, "join", "ok").await,
        1.0,
        "y did not join"
    );

    // z has garbage in its token file.
    let z_ip = next_ip();
    let mut spec_z = NodeSpec::new("z", "this is not a join token".to_owned());
    spec_z.ip = z_ip.into();
    spec_z.services = vec![ServiceSpec::new("web", echo_y.addr)];
    let mut z = Node::start(&cluster.registry, spec_z).unwrap();
    let code = z.exit_code().await.unwrap();
    assert_eq!(code, Some(1), "z exits 1\n{}", z.log());
    let log = z.log();
    let token_file = z.dir.join("token");
    assert!(
        log.contains(&format!("join token file {}", token_file.display())),
        "z's log names the token file {}:\n{log}",
        token_file.display()
    );
    // It never got as far as the registry.
    let join_calls: f64 = {
        let (_, body) = http_get(&cluster.registry.admin.to_string(), "/metrics")
            .await
            .unwrap();
        metric_sum(&body, REGISTRY_CALLS, &[("rpc", "join")]).unwrap()
    };
    assert_eq!(
        join_calls,
        1.0 + after,
        "the garbage token was refused locally"
    );
}

/// One `openssl s_client` session against `addr`: sends "hello", keeps the connection a second
/// for the echo, then closes. Returns (stdout, stderr).
fn s_client(addr: SocketAddr, dir: &std::path::Path, args: &[&str]) -> (String, String) {
    let script = format!(
        "(printf hello; sleep 1) | openssl s_client -connect {addr} -quiet -no_ign_eof \
         -servername api.default.svc.mesh -CAfile {ca} -verify_return_error {args}",
        ca = dir.join("ca.pem").display(),
        args = args.join(" "),
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .within(Duration::from_secs(20))
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The inbound port probed with OpenSSL, a TLS stack meshd shares no code with: the same
/// certificate that gets a mesh client through gets `s_client` through (the control), and every
/// refusal our own client sees, OpenSSL sees too — with the alert that names why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_is_refused_where_our_client_is() {
    let s = Single::start().await;
    let b = s.node();
    let registry = &s.cluster.registry;
    let ca = registry.authority().unwrap();
    let dir = registry.dir.join("openssl");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, (chain, key): (String, String)| {
        std::fs::write(dir.join(format!("{name}.pem")), chain).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key).unwrap();
    };
    std::fs::write(dir.join("ca.pem"), ca.trust_bundle_pem()).unwrap();
    let hour = Duration::from_secs(3600);
    write("good", issue(&ca, "web", SystemTime::now(), hour));
    let (foreign, _) = Authority::generate(&td(), SystemTime::now()).unwrap();
    write("foreign", issue(&foreign, "web", SystemTime::now(), hour));
    // Expired: issued as of the intermediate's notBefore for one second (see
    // expired_client_certificate_is_refused), and used once that second is past.
    let int_pem =
        std::fs::read_to_string(registry.data_dir.join("ca").join("intermediate.pem")).unwrap();
    let (int_not_before, _) =
        mtls::validity(&mtls::parse_certs(&int_pem, "intermediate").unwrap()[0]).unwrap();
    write(
        "expired",
        issue(&ca, "web", int_not_before, Duration::from_secs(1)),
    );
    eventually(
        WAIT,
        "the expired certificate to be past its notAfter",
        || {
            std::future::ready(
                (SystemTime::now() > int_not_before + Duration::from_secs(2)).then_some(()),
            )
        },
    )
    .await
    .unwrap();
    // `-cert` sends only the file's first certificate: the intermediate goes in `-cert_chain`.
    let cert = |name: &str| {
        format!(
            "-cert {d}/{name}.pem -cert_chain {d}/{name}.pem -key {d}/{name}-key.pem",
            d = dir.display()
        )
    };
    let alpn = "-alpn meshd/tcp/1";
    let probe = |args: Vec<String>| {
        let dir = dir.clone();
        let inbound = b.inbound;
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            s_client(inbound, &dir, &refs)
        })
    };

    // Control: a mesh certificate gets through, the server's chain verifies against the mesh
    // CA, and the app's echo comes back.
    let (out, err) = probe(vec![cert("good"), alpn.into()]).await.unwrap();
    assert_eq!(out, "hello", "the control session echoes; stderr: {err}");

    // Refusals, each with the TLS alert that says why, and nothing from the app. (A chain
    // from another CA with the mesh CA's names fails on the intermediate's signature: rustls
    // sends decrypt_error for a bad signature, unknown_ca for an unknown issuer.)
    let cases: [(&str, Vec<String>, &[&str]); 4] = [
        (
            "no client certificate",
            vec![alpn.into()],
            &["certificate required"],
        ),
        (
            "another CA",
            vec![cert("foreign"), alpn.into()],
            &["unknown ca", "decrypt error"],
        ),
        (
            "an expired certificate",
            vec![cert("expired"), alpn.into()],
            &["certificate expired"],
        ),
        (
            "TLS 1.2",
            vec![cert("good"), alpn.into(), "-tls1_2".into()],
            &["protocol version"],
        ),
    ];
    for (what, args, alerts) in cases {
        let (out, err) = probe(args).await.unwrap();
        assert!(
            out.is_empty(),
            "{what}: the app answered through meshd: {out:?}"
        );
        assert!(
            alerts.iter().any(|a| err.contains(&format!("alert {a}"))),
            "{what}: OpenSSL was told one of {alerts:?}; stderr: {err}"
        );
    }
}
