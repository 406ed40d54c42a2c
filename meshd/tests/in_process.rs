//! The in-process tier: two proxies in one process ([`meshd::proxy::standalone`]) with real
//! sockets and real mTLS from a real CA, but identity, policy and mesh view injected — no
//! registry, gossip or child processes. Host `a` runs `web` with an upstream to `api`; host `b`
//! serves `api` (an HTTP or TCP app in this process). Each test changes one input and watches
//! the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use mesh_api::policy::{Snapshot, parse_file};
use mesh_api::{Identity, ServiceKey, TrustDomain};
use mesh_ca::{Authority, SignRequest};
use meshd::config::{Config, Protocol, Service, Upstream};
use meshd::identity::{Certs, Workload};
use meshd::membership::{Endpoint, MeshView};
use meshd::proxy::standalone::{Inputs, Standalone};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "mesh.test";
/// Longest any one exchange may take here (a bound on waiting, not a claim).
const WAIT: Duration = Duration::from_secs(10);

fn key(name: &str) -> ServiceKey {
    ServiceKey::parse(&format!("default/{name}")).unwrap()
}

fn certs(ca: &Authority, services: &[&ServiceKey], ttl: Duration) -> Certs {
    let now = SystemTime::now();
    let workloads = (services.iter())
        .map(|svc| {
            let (issued, key_pem) = ca
                .issue(&SignRequest {
                    identity: Identity::workload(ca.trust_domain(), svc),
                    dns_names: vec![],
                    ttl,
                    now,
                })
                .unwrap();
            let w = Workload {
                key: mesh_runtime::tls::certified_key(&issued.chain_pem, &key_pem).unwrap(),
                not_before: issued.not_before,
                obtained: now,
                not_after: issued.not_after,
            };
            ((*svc).clone(), w)
        })
        .collect();
    let bundle_pem = ca.trust_bundle_pem();
    Certs {
        trust_domain: ca.trust_domain().clone(),
        roots: mesh_runtime::tls::root_store(&bundle_pem).unwrap(),
        bundle_pem,
        node_not_after: now + ttl,
        workloads,
    }
}

fn service(name: &str, address: SocketAddr, protocol: Protocol) -> Service {
    Service {
        key: key(name),
        address,
        listen: None,
        protocol,
        labels: BTreeMap::new(),
        upstreams: Vec::new(),
        http_proxy: None,
        checks: Vec::new(),
        file: format!("{name}.toml").into(),
    }
}

fn endpoint(node: &str, addr: SocketAddr, protocol: Protocol) -> Endpoint {
    Endpoint {
        node: node.to_owned(),
        addr,
        datacenter: "dc1".to_owned(),
        zone: "zone-a".to_owned(),
        site: String::new(),
        sni: None,
        site_rank: 0,
        labels: BTreeMap::new(),
        protocol,
        healthy: true,
        draining: false,
    }
}

fn view(api: &[SocketAddr], protocol: Protocol) -> MeshView {
    let eps = (api.iter().enumerate())
        .map(|(i, a)| endpoint(&format!("b{i}"), *a, protocol))
        .collect();
    MeshView {
        members: Vec::new(),
        sites: Vec::new(),
        endpoints: BTreeMap::from([(key("api"), eps)]),
    }
}

fn policy(revision: u64, text: &str) -> Snapshot {
    let resources = if text.trim().is_empty() {
        Vec::new()
    } else {
        parse_file("t.toml", text).unwrap()
    };
    Snapshot::new(revision, resources)
}

fn allow(principal: &str) -> String {
    format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow"
action = "allow"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ principals = ["spiffe://{TD}/ns/default/svc/{principal}"] }}]
"#
    )
}

fn config(dir: &Path) -> Config {
    let mut c = Config::for_test(dir);
    c.telemetry.access_log.enabled = false;
    c.outbound.connect_timeout = Duration::from_secs(2);
    c
}

/// An HTTP app that answers `hello from api` (after `delay` for `/slow`).
async fn http_app(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if buf[..n].windows(5).any(|w| w == b"/slow") {
                        tokio::time::sleep(delay).await;
                    }
                    let body = "hello from api\n";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP echo app.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Host `a` (web, upstream api) and host `b` (api at `app`), with `policy` on both.
struct Pair {
    a: Standalone,
    b: Standalone,
    upstream: SocketAddr,
    ca: Authority,
    _dir: tempfile::TempDir,
}

async fn pair(app: SocketAddr, protocol: Protocol, policy: Option<Snapshot>) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new(TD).unwrap();
    let (ca, _) = Authority::generate(&td, SystemTime::now()).unwrap();
    let (web, api) = (key("web"), key("api"));
    let mut cb = config(&dir.path().join("b"));
    cb.services = vec![service("api", app, protocol)];
    let b = Standalone::start(Inputs {
        config: cb,
        certs: certs(&ca, &[&api], Duration::from_secs(3600)),
        policy: policy.clone(),
        view: view(&[], protocol),
    })
    .await
    .unwrap();
    let mut ca_cfg = config(&dir.path().join("a"));
    let mut w = service("web", "127.0.0.1:9".parse().unwrap(), protocol);
    w.upstreams = vec![Upstream {
        service: api.clone(),
        bind: "127.0.0.1:0".parse().unwrap(),
    }];
    ca_cfg.services = vec![w];
    let a = Standalone::start(Inputs {
        config: ca_cfg,
        certs: certs(&ca, &[&web], Duration::from_secs(3600)),
        policy,
        view: view(&[b.inbound], protocol),
    })
    .await
    .unwrap();
    let upstream = a.upstream(&web, &api).unwrap();
    Pair {
        a,
        b,
        upstream,
        ca,
        _dir: dir,
    }
}

/// One HTTP/1.1 GET on a new connection: the status and the `x-mesh-error` header.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let once = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: api.mesh\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = (text.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let error = (text.lines())
            .find_map(|l| l.strip_prefix("x-mesh-error: "))
            .unwrap_or_default()
            .to_owned();
        (status, error)
    };
    tokio::time::timeout(WAIT, once).await.expect("answered")
}

fn metric(p: &Standalone, what: &str) -> u64 {
    let m = &p.shared.metrics;
    match what {
        "failovers" => (m.failovers.get_or_create(&one("default/api"))).get(),
        "unreachable" => (m.unreachable.get_or_create(&one("default/api"))).get(),
        _ => unreachable!("{what}"),
    }
}

fn one(service: &str) -> meshd::proxy::metrics::OneService {
    meshd::proxy::metrics::OneService {
        service: service.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_on_the_wire_follow_the_injected_policy() {
    let app = http_app(Duration::ZERO).await;
    let p = pair(app, Protocol::Http, Some(policy(1, &allow("web")))).await;
    assert_eq!(get(p.upstream, "/").await, (200, String::new()));
    // Only `ops` is allowed now: web's request is denied by b, and says so.
    p.b.set_policy(policy(2, &allow("ops")));
    p.b.settled().await;
    let (status, error) = get(p.upstream, "/").await;
    assert_eq!(status, 403);
    assert!(error.starts_with("inbound/"), "{error:?}");
    p.b.set_policy(policy(3, &allow("web")));
    p.b.settled().await;
    assert_eq!(get(p.upstream, "/").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_the_inbound_fails_closed() {
    let app = http_app(Duration::ZERO).await;
    let p = pair(app, Protocol::Http, None).await;
    let (status, error) = get(p.upstream, "/").await;
    assert_eq!((status, error.as_str()), (503, "inbound/no_policy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tcp_connection_is_closed_when_policy_revokes_it() {
    let app = echo_app().await;
    let p = pair(app, Protocol::Tcp, Some(policy(1, &allow("web")))).await;
    let mut s = TcpStream::connect(p.upstream).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    p.b.set_policy(policy(2, &allow("ops")));
    // The connection is reset: reads end (error or EOF) within the wait.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the revoked connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_the_request_in_flight() {
    let app = http_app(Duration::from_millis(800)).await;
    let p = pair(app, Protocol::Http, Some(policy(1, &allow("web")))).await;
    let upstream = p.upstream;
    let slow = tokio::spawn(async move { get(upstream, "/slow").await });
    // Let the request reach b's app, then drain b with time to spare.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    p.b.drain(Duration::from_secs(5)).await;
    let drained_in = started.elapsed();
    assert_eq!(
        slow.await.unwrap(),
        (200, String::new()),
        "the request in flight finished"
    );
    assert!(
        drained_in >= Duration::from_millis(300),
        "the drain returned before the request was answered ({drained_in:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_endpoint_and_skipped() {
    for protocol in [Protocol::Http, Protocol::Tcp] {
        let app = match protocol {
            Protocol::Http => http_app(Duration::ZERO).await,
            _ => echo_app().await,
        };
        // Round robin, so the dead endpoint is certainly picked (the default balancers
        // would prefer b once it has answered).
        let rr = "[[resource]]\nkind = \"DestinationPolicy\"\nname = \"api\"\nservice = \"api\"\nload_balancer = \"round_robin\"\n";
        let text = format!("{}{rr}", allow("web"));
        let p = pair(app, protocol, Some(policy(1, &text))).await;
        // A dead endpoint first in the view: a port nothing listens on.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        p.a.set_view(view(&[dead, p.b.inbound], protocol));
        p.a.settled().await;
        for i in 0..20 {
            match protocol {
                Protocol::Http => assert_eq!(
                    get(p.upstream, "/").await,
                    (200, String::new()),
                    "request {i}"
                ),
                _ => {
                    let mut s = TcpStream::connect(p.upstream).await.unwrap();
                    s.write_all(b"x").await.unwrap();
                    let mut buf = [0u8; 1];
                    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
                        .await
                        .unwrap()
                        .unwrap();
                }
            }
        }
        // The dead endpoint cost one failover, then was skipped for the rest.
        assert_eq!(metric(&p.a, "unreachable"), 1, "{protocol:?}");
        assert_eq!(metric(&p.a, "failovers"), 1, "{protocol:?}");
        drop(p.ca);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resumption_after_a_rotation_costs_the_caller_nothing() {
    let app = echo_app().await;
    let p = pair(app, Protocol::Tcp, Some(policy(1, &allow("web")))).await;
    // b serves a certificate that expires in 2 s; a resumes sessions of it.
    p.b.set_certs(certs(&p.ca, &[&key("api")], Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let round_trip = |addr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"y").await.unwrap();
        let mut buf = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
    };
    round_trip(p.upstream).await;
    round_trip(p.upstream).await;
    // Rotate to a long-lived certificate, and let the old one expire.
    p.b.set_certs(certs(&p.ca, &[&key("api")], Duration::from_secs(3600)));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stale = |p: &Standalone| {
        (p.shared.metrics.rejected)
            .get_or_create(&meshd::proxy::metrics::ReasonLabels {
                direction: meshd::proxy::metrics::Direction::Outbound,
                reason: "stale_resumption",
            })
            .get()
    };
    let before = stale(&p.a);
    // The resumed session carries the expired certificate: refused, retried with a full
    // handshake, and the app never notices.
    round_trip(p.upstream).await;
    round_trip(p.upstream).await;
    assert_eq!(
        stale(&p.a) - before,
        1,
        "one stale resumption, then fresh tickets"
    );
}
