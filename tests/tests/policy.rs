//! Policy end to end: resources applied with the real meshctl, stored by the real registry,
//! pushed to real meshd processes over the watch stream and enforced at the inbound on the
//! wire — allow/deny/audit, the mesh-wide default, closing connections a change no longer
//! allows, static stability with the registry down, and the operator's view of it all.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::Within as _;
use mesh_e2e::apps;
use mesh_e2e::{Cluster, Load, Node, NodeSpec, Registry, RegistryOpts, ServiceSpec, WAIT};
use mesh_e2e::{eventually, next_ip};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const WEB: &str = "spiffe://mesh.test/ns/default/svc/web";
const OPS: &str = "spiffe://mesh.test/ns/default/svc/ops";
const OPERATOR: &str = "spiffe://mesh.test/admin/operator";
const API: &str = "default/api";

/// How long an enforced decision may take to show on the wire once the node holds the revision.
const ENFORCE: Duration = Duration::from_secs(5);

// === test apps ===

/// An echo app that counts the connections it accepted: a denied connection must never
/// reach it.
struct CountingEcho {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingEcho {
    async fn start(ip: IpAddr) -> Self {
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// api on node `b` (and more replicas when asked), web on node `a` and ops on node `c`,
/// each caller with an upstream to api.
struct Mesh {
    cluster: Cluster,
    /// web's local port for api (on node a).
    web: SocketAddr,
    /// ops's local port for api (on node c).
    ops: SocketAddr,
    /// The api app of each replica, in the order of `api_nodes`.
    echos: Vec<CountingEcho>,
    /// api's `listen` address on each replica (mTLS, or plaintext under PERMISSIVE).
    direct: Vec<SocketAddr>,
}

/// Port of api's `listen` address on its nodes.
const DIRECT_PORT: u16 = 18443;

/// A caller node running `svc` with an upstream to api on `port`.
fn caller(cluster: &Cluster, node: &str, svc: &str, port: u16) -> (NodeSpec, SocketAddr) {
    let ip = next_ip();
    let upstream = SocketAddr::new(ip.into(), port);
    let token = cluster.registry.token(&[svc], 1).unwrap();
    let mut spec = NodeSpec::new(node, token);
    spec.ip = ip.into();
    spec.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    spec.services =
        vec![ServiceSpec::new(svc, SocketAddr::new(ip.into(), 18080)).upstream("api", upstream)];
    (spec, upstream)
}

async fn mesh(api_nodes: &[&str]) -> Mesh {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let mut echos = Vec::new();
    let mut direct = Vec::new();
    for name in api_nodes {
        let ip = next_ip();
        let echo = CountingEcho::start(ip.into()).await;
        let token = cluster.registry.token(&["api"], 1).unwrap();
        let mut spec = NodeSpec::new(name, token);
        spec.ip = ip.into();
        spec.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        let mut api = ServiceSpec::new("api", echo.addr);
        api.listen = Some(SocketAddr::new(ip.into(), DIRECT_PORT));
        direct.extend(api.listen);
        spec.services = vec![api];
        cluster.add_spec(spec).await.unwrap();
        echos.push(echo);
    }
    let (spec_a, web) = caller(&cluster, "a", "web", 19001);
    cluster.add_spec(spec_a).await.unwrap();
    let (spec_c, ops) = caller(&cluster, "c", "ops", 19002);
    cluster.add_spec(spec_c).await.unwrap();
    cluster.converge().await.unwrap();
    for n in ["a", "c"] {
        cluster
            .node(n)
            .wait_endpoints(API, api_nodes.len())
            .await
            .unwrap();
    }
    Mesh {
        cluster,
        web,
        ops,
        echos,
        direct,
    }
}

// === probes ===

/// What one connection through the mesh got (fields are read through `Debug`, in messages).
#[derive(Debug)]
#[allow(dead_code)]
enum Outcome {
    /// Exactly the payload came back.
    Echoed,
    /// Other bytes came back.
    Garbled(usize),
    /// The connection ended cleanly without the payload.
    Eof,
    /// The connection failed (reset, refused, broken pipe).
    Failed(std::io::ErrorKind, String),
    /// No answer in time.
    Hung,
}

async fn attempt(addr: SocketAddr, seed: u64) -> Outcome {
    let data = apps::payload(4096, seed);
    outcome(&data, apps::round_trip(addr, &data)).await
}

/// What a round trip of `data` got, within 5 s.
async fn outcome(
    data: &[u8],
    round_trip: impl std::future::Future<Output = anyhow::Result<Vec<u8>>>,
) -> Outcome {
    match tokio::time::timeout(Duration::from_secs(5), round_trip).await {
        Err(_) => Outcome::Hung,
        Ok(Ok(got)) if got == data => Outcome::Echoed,
        Ok(Ok(got)) if got.is_empty() => Outcome::Eof,
        Ok(Ok(got)) => Outcome::Garbled(got.len()),
        Ok(Err(e)) => {
            let kind = e
                .downcast_ref::<std::io::Error>()
                .map_or(std::io::ErrorKind::Other, std::io::Error::kind);
            Outcome::Failed(kind, format!("{e:#}"))
        }
    }
}

/// Whether the connection was refused the way a denial refuses: reset, no data.
fn is_reset(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Failed(
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe,
            _
        )
    )
}

/// Asserts that `n` connections through `addr` are echoed.
async fn assert_allowed(addr: SocketAddr, who: &str, n: u64, seed: u64) {
    for i in 0..n {
        let o = attempt(addr, seed + i).await;
        assert!(
            matches!(o, Outcome::Echoed),
            "{who}: connection {i} should be allowed: {o:?}"
        );
    }
}

/// Asserts that `n` connections through `addr` are reset without data and never reach the
/// app (`echo` must see no other traffic meanwhile).
async fn assert_denied(addr: SocketAddr, who: &str, n: u64, echos: &[CountingEcho]) {
    let before: u64 = echos.iter().map(CountingEcho::accepted).sum();
    for i in 0..n {
        let o = attempt(addr, 0xd0_0000 + i).await;
        assert!(
            is_reset(&o),
            "{who}: connection {i} should be reset with no data: {o:?}"
        );
    }
    let after: u64 = echos.iter().map(CountingEcho::accepted).sum();
    assert_eq!(before, after, "{who}: a denied connection reached the app");
}

/// Waits until `addr` gives the wanted kind of outcome (allowed or reset), then returns how
/// long that took.
async fn wait_outcome(addr: SocketAddr, who: &str, allowed: bool) -> Duration {
    let started = Instant::now();
    let what = format!("{who} to be {}", if allowed { "allowed" } else { "denied" });
    let mut seed = 0xe0_0000;
    eventually(ENFORCE, &what, || {
        seed += 1;
        let s = seed;
        async move {
            let o = attempt(addr, s).await;
            let ok = if allowed {
                matches!(o, Outcome::Echoed)
            } else {
                is_reset(&o)
            };
            ok.then_some(())
        }
    })
    .await
    .unwrap();
    started.elapsed()
}

// === meshctl ===

fn policy_file(reg: &Registry, name: &str, text: &str) -> PathBuf {
    let dir = reg.dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The revision in the last `(revision N)` of apply/delete output.
fn revision_of(out: &str) -> u64 {
    let at = out
        .rfind("(revision ")
        .unwrap_or_else(|| panic!("no revision in {out:?}"));
    out[at + "(revision ".len()..]
        .split(')')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad revision in {out:?}"))
}

/// `meshctl apply -f <file>` of `text`; returns the output and the registry's revision.
fn apply(reg: &Registry, name: &str, text: &str) -> (String, u64) {
    let path = policy_file(reg, name, text);
    let out = reg
        .meshctl_ok(&["apply", "-f", path.to_str().unwrap()])
        .unwrap();
    let rev = revision_of(&out);
    (out, rev)
}

/// `meshctl delete <kind> <name> [-n ns]`; returns the registry's revision.
fn delete(reg: &Registry, kind: &str, name: &str, ns: Option<&str>) -> u64 {
    let mut args = vec!["delete", kind, name];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let out = reg.meshctl_ok(&args).unwrap();
    assert!(out.contains("deleted "), "delete output: {out}");
    revision_of(&out)
}

/// meshctl with the read-only viewer credentials (`<registry data>/viewer`).
fn viewer(reg: &Registry, args: &[&str]) -> Output {
    Command::new(&reg.bins.meshctl)
        .arg("--credentials")
        .arg(reg.data_dir.join("viewer"))
        .arg("--registry")
        .arg(reg.addr.to_string())
        .args(args)
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `get <kind> -o json` as (revision, resources).
fn get_json(reg: &Registry, kind: &str) -> (u64, Vec<serde_json::Value>) {
    let out = reg.meshctl_ok(&["get", kind, "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["revision"].as_u64().unwrap(),
        v["resources"].as_array().unwrap().clone(),
    )
}

// === node state ===

/// Waits until `node` enforces `rev` (metric and /config_dump); returns how long that took.
async fn wait_revision(node: &Node, rev: u64) -> Duration {
    let started = Instant::now();
    let what = format!("{} to enforce policy revision {rev}", node.spec.name);
    eventually(WAIT, &what, || async {
        let r = node.metric("meshd_policy_revision", &[]).await.ok()?;
        (r as u64 == rev).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", node.log()));
    let took = started.elapsed();
    let dump = node.config_dump().await.unwrap();
    assert_eq!(
        dump["policy"]["revision"].as_u64(),
        Some(rev),
        "{}: /config_dump policy.revision",
        node.spec.name
    );
    took
}

/// A counter that may have no series yet (before readings); waits and "after" checks compare
/// it with a value the test saw move, so a renamed series cannot pass as a zero.
async fn metric(node: &Node, name: &str, labels: &[(&str, &str)]) -> f64 {
    node.metric_or_zero(name, labels).await.unwrap()
}

async fn decisions(node: &Node, decision: &str, reason: &str, policy: &str) -> f64 {
    metric(
        node,
        "meshd_authz_decisions_total",
        &[
            ("service", API),
            ("decision", decision),
            ("reason", reason),
            ("policy", policy),
        ],
    )
    .await
}

async fn denied_total(node: &Node) -> f64 {
    metric(
        node,
        "meshd_rejected_connections_total",
        &[("direction", "inbound"), ("reason", "denied_by_policy")],
    )
    .await
}

/// The log lines of `node` containing every one of `needles`.
fn log_lines(node: &Node, needles: &[&str]) -> Vec<String> {
    node.log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// The source address the kernel picks for a connection to `dst` from this network namespace
/// (what a node's outbound, which binds no address, shows up as on another host).
fn source_ip_towards(dst: SocketAddr) -> IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect(dst).unwrap();
    s.local_addr().unwrap().ip()
}

fn allow_web() -> String {
    format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow-web"
action = "allow"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ principals = ["{WEB}"] }}]
"#
    )
}

fn policy_named(name: &str) -> String {
    format!("AuthorizationPolicy/default/{name}")
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_on_the_wire() {
    let mut m = mesh(&["b"]).await;
    let reg = &m.cluster.registry;
    let (b, c) = (&m.cluster.nodes[0], &m.cluster.nodes[2]);
    assert_eq!((b.spec.name.as_str(), c.spec.name.as_str()), ("b", "c"));

    // No policy: everything passes, by the mesh default.
    assert_allowed(m.web, "web (no policy)", 3, 1).await;
    assert_allowed(m.ops, "ops (no policy)", 3, 10).await;
    assert!(decisions(b, "allow", "default_allow", "").await >= 6.0);
    assert_eq!(denied_total(b).await, 0.0);

    // ALLOW web only: web passes, ops is reset before reaching the app.
    let t0 = Instant::now();
    let (out, rev) = apply(reg, "allow.toml", &allow_web());
    let applied = t0.elapsed();
    assert!(
        out.contains("created AuthorizationPolicy/default/api-allow-web"),
        "{out}"
    );
    wait_revision(b, rev).await;
    let on_b = t0.elapsed();
    wait_outcome(m.ops, "ops", false).await;
    eprintln!(
        "ALLOW web: meshctl apply returned after {applied:?}; b held revision {rev} after \
         {on_b:?}; ops denied on the wire after {:?}",
        t0.elapsed()
    );
    assert_allowed(m.web, "web (allow web)", 3, 100).await;
    assert_denied(m.ops, "ops (allow web)", 3, &m.echos).await;
    let allow_web_key = policy_named("api-allow-web");
    assert!(decisions(b, "allow", "allow_policy", &allow_web_key).await >= 3.0);
    assert!(decisions(b, "deny", "no_allow_match", "").await >= 4.0);
    assert!(denied_total(b).await >= 4.0);
    let dump = b.config_dump().await.unwrap();
    assert_eq!(
        dump["policy"]["effective"][API],
        serde_json::json!([allow_web_key]),
        "b's effective policy for api: {}",
        dump["policy"]
    );
    // The deny log line names the caller's identity, its address and the reason.
    let src = source_ip_towards(b.inbound);
    let lines = log_lines(
        b,
        &[
            "connection denied by policy",
            &format!("src.identity={OPS}"),
            &format!("src.addr={src}:"),
            "no_allow_match",
        ],
    );
    assert!(
        !lines.is_empty(),
        "deny log line for ops from {src} on b:\n{}",
        b.log()
    );
    eprintln!("deny log line on b: {}", lines[0]);
    assert!(
        log_lines(b, &["connection denied by policy", WEB]).is_empty(),
        "web was never denied so far"
    );

    // DENY web beats ALLOW web.
    let deny_web = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-deny-web"
action = "deny"
selector = {{ service = "api" }}
rules = [{{ from = [{{ principals = ["{WEB}"] }}] }}]
"#
    );
    let (out, rev) = apply(reg, "deny.toml", &deny_web);
    assert!(
        out.contains("created AuthorizationPolicy/default/api-deny-web"),
        "{out}"
    );
    wait_revision(b, rev).await;
    let took = wait_outcome(m.web, "web", false).await;
    eprintln!("DENY web: web denied on the wire {took:?} after b held revision {rev}");
    assert_denied(m.web, "web (deny web + allow web)", 3, &m.echos).await;
    assert_denied(m.ops, "ops (deny web + allow web)", 2, &m.echos).await;
    let deny_web_key = policy_named("api-deny-web");
    assert!(decisions(b, "deny", "deny_policy", &deny_web_key).await >= 3.0);
    let lines = log_lines(
        b,
        &[
            "connection denied by policy",
            &format!("src.identity={WEB}"),
            &format!("src.addr={src}:"),
            "deny_policy",
            &deny_web_key,
        ],
    );
    assert!(!lines.is_empty(), "deny log line for web:\n{}", b.log());
    let dump = b.config_dump().await.unwrap();
    assert_eq!(
        dump["policy"]["effective"][API],
        serde_json::json!([allow_web_key, deny_web_key]),
        "{}",
        dump["policy"]
    );

    // AUDIT ops (with the ALLOW and DENY gone): logged and counted, never blocked.
    delete(reg, "ap", "api-deny-web", None);
    delete(reg, "AuthorizationPolicy", "api-allow-web", Some("default"));
    let audit = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-audit-ops"
action = "AUDIT"
selector = {{ service = "api" }}
rules = [{{ from = [{{ principals = ["{OPS}"] }}] }}]
"#
    );
    let (_, rev) = apply(reg, "audit.toml", &audit);
    wait_revision(b, rev).await;
    let denied_before = denied_total(b).await;
    assert_allowed(m.ops, "ops (audit ops)", 3, 200).await;
    assert_allowed(m.web, "web (audit ops)", 3, 300).await;
    let audit_key = policy_named("api-audit-ops");
    assert_eq!(decisions(b, "audit", "audit_policy", &audit_key).await, 3.0);
    assert_eq!(
        denied_total(b).await,
        denied_before,
        "audit blocked nothing"
    );
    let lines = log_lines(
        b,
        &[
            "connection matched an audit policy",
            &format!("src.identity={OPS}"),
            &audit_key,
        ],
    );
    assert!(lines.len() >= 3, "audit log lines for ops:\n{}", b.log());
    assert!(
        log_lines(b, &["connection matched an audit policy", WEB]).is_empty(),
        "web matches no audit rule"
    );

    // Mesh-wide default deny with no ALLOW policy: everything is denied.
    let mesh_deny = r#"
[[resource]]
kind = "MeshConfig"
name = "default"
namespace = "mesh-system"
default_authorization = "deny"
"#;
    let (out, rev) = apply(reg, "meshconfig.toml", mesh_deny);
    assert!(
        out.contains("created MeshConfig/mesh-system/default"),
        "{out}"
    );
    for n in &m.cluster.nodes {
        wait_revision(n, rev).await;
    }
    let before = decisions(b, "deny", "default_deny", "").await;
    assert_denied(m.web, "web (default deny)", 2, &m.echos).await;
    assert_denied(m.ops, "ops (default deny)", 2, &m.echos).await;
    assert_eq!(decisions(b, "deny", "default_deny", "").await, before + 4.0);
    // The audit still reports ops while it is denied.
    assert_eq!(decisions(b, "audit", "audit_policy", &audit_key).await, 5.0);

    // Deleting the MeshConfig restores the default allow.
    let rev = delete(reg, "MeshConfig", "default", None);
    wait_revision(b, rev).await;
    let took = wait_outcome(m.web, "web", true).await;
    eprintln!("MeshConfig deleted: web allowed again {took:?} after b held revision {rev}");
    assert_allowed(m.web, "web (MeshConfig deleted)", 2, 400).await;
    assert_allowed(m.ops, "ops (MeshConfig deleted)", 2, 500).await;
    for n in ["a", "b", "c"] {
        assert!(m.cluster.node(n).is_running(), "{n} still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_existing_connections_no_longer_allowed() {
    let m = mesh(&["b"]).await;
    let reg = &m.cluster.registry;
    let b = &m.cluster.nodes[0];

    // Two long-lived connections, both through the mesh and echoing.
    let mut ops_conn = TcpStream::connect(m.ops).await.unwrap();
    let mut web_conn = TcpStream::connect(m.web).await.unwrap();
    for (s, who) in [(&mut ops_conn, "ops"), (&mut web_conn, "web")] {
        s.write_all(b"hello-1").await.unwrap();
        let mut buf = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{who}: no echo"))
            .unwrap();
        assert_eq!(&buf, b"hello-1", "{who}");
    }
    assert_eq!(m.echos[0].accepted(), 2);

    // Watch the ops connection from before the change.
    let (mut ops_r, _ops_w) = ops_conn.into_split();
    let watcher = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let r = ops_r.read(&mut buf).await;
        (Instant::now(), r)
    });

    let deny_ops = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "deny-ops"
action = "deny"
[[resource.rules]]
from = [{{ principals = ["{OPS}"] }}]
"#
    );
    let t0 = Instant::now();
    let (_, rev) = apply(reg, "deny-ops.toml", &deny_ops);
    let applied = t0.elapsed();
    wait_revision(b, rev).await;
    let (closed_at, read) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the open ops connection was not closed within 10 s of the apply")
        .unwrap();
    let closed_after = closed_at - t0;
    eprintln!(
        "deny ops: meshctl apply returned after {applied:?}; \
         the open ops connection was reset {closed_after:?} after apply started"
    );
    assert!(
        closed_after < Duration::from_secs(5),
        "the open ops connection was closed only after {closed_after:?}"
    );
    match read {
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
            "the ops connection ends with a reset: {e}"
        ),
        Ok(n) => panic!("the ops connection should be reset, but read returned {n} bytes"),
    }

    // The web connection opened before the change stays open and keeps working.
    for i in 0..5 {
        let msg = format!("still-here-{i}");
        web_conn.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), web_conn.read_exact(&mut buf))
            .await
            .expect("web echo after the change")
            .unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    // New ops connections are denied, new web connections allowed.
    assert_denied(m.ops, "ops (deny ops)", 2, &m.echos).await;
    assert_allowed(m.web, "web (deny ops)", 2, 1).await;

    let deny_ops_key = policy_named("deny-ops");
    assert_eq!(
        decisions(b, "deny", "policy_changed", &deny_ops_key).await,
        1.0,
        "exactly the ops connection was revoked"
    );
    let lines = log_lines(
        b,
        &[
            "connection closed: no longer allowed by policy",
            &format!("src.identity={OPS}"),
            "policy_changed",
        ],
    );
    assert_eq!(lines.len(), 1, "one revocation logged:\n{}", b.log());
    assert!(
        log_lines(b, &["no longer allowed by policy", WEB]).is_empty(),
        "web was never revoked"
    );

    // Finish the web connection cleanly: half-close, EOF comes back.
    web_conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), web_conn.read_to_end(&mut rest))
        .await
        .expect("EOF after half-close")
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_stability() {
    // Two api replicas, so web has somewhere to go while b restarts.
    let mut m = mesh(&["b", "b2"]).await;
    let (_, rev1) = apply(&m.cluster.registry, "allow.toml", &allow_web());
    for n in &m.cluster.nodes {
        wait_revision(n, rev1).await;
    }
    wait_outcome(m.ops, "ops", false).await;
    assert_denied(m.ops, "ops (allow web)", 4, &m.echos).await;
    assert_allowed(m.web, "web (allow web)", 4, 1).await;

    let load = Load::start(m.web, 2, 8 * 1024, Duration::from_secs(10));
    load.progress(30, WAIT).await.unwrap();

    // Registry gone; every node notices (its watch fails and it retries), and b restarts
    // from its persisted snapshot.
    let mut reconnects = Vec::new();
    for n in &m.cluster.nodes {
        reconnects.push(metric(n, "meshd_policy_stream_reconnects_total", &[]).await);
    }
    m.cluster.registry.kill9();
    let outage = Instant::now();
    for (n, before) in m.cluster.nodes.iter().zip(reconnects) {
        let what = format!("{} to retry its policy watch", n.spec.name);
        eventually(WAIT, &what, || async {
            let now = n
                .metric("meshd_policy_stream_reconnects_total", &[])
                .await
                .ok()?;
            (now > before).then_some(())
        })
        .await
        .unwrap();
    }
    load.progress(30, WAIT).await.unwrap();
    let b = m.cluster.node("b");
    assert!(b.dir.join("data").join("policy.json").exists());
    assert_eq!(b.stop(Duration::from_secs(15)).unwrap(), Some(0));
    b.run().unwrap();
    b.wait_ready().await.unwrap();
    let b = m.cluster.node("b");
    assert_eq!(
        b.metric("meshd_policy_revision", &[]).await.unwrap() as u64,
        rev1,
        "b enforces the persisted revision with the registry down"
    );
    assert!(
        b.log().contains("loaded the persisted policy snapshot"),
        "b loaded its snapshot from disk"
    );
    for n in ["a", "c"] {
        m.cluster.node(n).wait_endpoints(API, 2).await.unwrap();
    }
    // b itself denies ops and allows web: ops round-robins over both replicas until b has
    // refused it; every ops attempt must fail meanwhile.
    let b = &*m.cluster.node("b");
    let mut ops_tries = 0;
    while decisions(b, "deny", "no_allow_match", "").await < 2.0 {
        ops_tries += 1;
        assert!(ops_tries <= 20, "b never saw ops after its restart");
        let o = attempt(m.ops, 0xab_0000 + ops_tries).await;
        assert!(is_reset(&o), "ops through the restarted b: {o:?}");
    }
    let allow_web_key = policy_named("api-allow-web");
    eventually(WAIT, "web to be allowed by the restarted b", || async {
        (decisions(b, "allow", "allow_policy", &allow_web_key).await >= 5.0).then_some(())
    })
    .await
    .unwrap();
    load.progress(30, WAIT).await.unwrap();

    // Registry back: every node resumes with the revision it holds, no full snapshot.
    let down = outage.elapsed();
    m.cluster.registry.run().await.unwrap();
    let reg = &m.cluster.registry;
    let nodes = m.cluster.nodes.len() as f64;
    let starts = |kind: &'static str| async move {
        reg.metric_or_zero(
            "mesh_registry_policy_watch_starts_total",
            &[("snapshot", kind)],
        )
        .await
        .unwrap()
    };
    let resumed = Instant::now();
    eventually(
        Duration::from_secs(45),
        "every node to resume its policy watch",
        || async { (starts("current").await + starts("incremental").await >= nodes).then_some(()) },
    )
    .await
    .unwrap();
    eprintln!(
        "registry down {down:?}; all {nodes} nodes resumed their watch {:?} after it came back",
        resumed.elapsed()
    );
    assert_eq!(starts("full").await, 0.0, "no node needed a full snapshot");

    // A new apply reaches every node over the resumed streams.
    let both = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow-web"
action = "allow"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ principals = ["{WEB}", "{OPS}"] }}]
"#
    );
    let applied = Instant::now();
    let (out, rev2) = apply(reg, "allow.toml", &both);
    assert!(
        out.contains("updated AuthorizationPolicy/default/api-allow-web"),
        "{out}"
    );
    assert!(rev2 > rev1);
    for n in &m.cluster.nodes {
        wait_revision(n, rev2).await;
    }
    eprintln!(
        "revision {rev2} on every node {:?} after apply started",
        applied.elapsed()
    );
    assert_eq!(starts("full").await, 0.0, "the update came incrementally");
    wait_outcome(m.ops, "ops", true).await;
    assert_allowed(m.ops, "ops (allow web and ops)", 4, 1000).await;

    let report = load.stop().await;
    eprintln!(
        "web load: {} round trips, {} failed",
        report.ok, report.failed
    );
    assert_eq!(
        report.failed, 0,
        "failed web round trips: {:?}",
        report.errors
    );
    for n in ["a", "b", "b2", "c"] {
        assert!(m.cluster.node(n).is_running(), "{n} still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_experience() {
    let c = Cluster::new(RegistryOpts::default()).await.unwrap();
    let reg = &c.registry;

    let (out, rev1) = apply(reg, "allow.toml", &allow_web());
    assert_eq!(
        out.trim(),
        format!("created AuthorizationPolicy/default/api-allow-web (revision {rev1})")
    );
    let (rev, before) = get_json(reg, "ap");
    assert_eq!(rev, rev1);
    assert_eq!(before.len(), 1);
    assert_eq!(before[0]["author"], OPERATOR);

    // Dry run: the diff of the update and the creation, nothing stored.
    let both = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow-web"
action = "allow"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ principals = ["{WEB}", "{OPS}"] }}]

[[resource]]
kind = "AuthorizationPolicy"
name = "api-deny-lab"
action = "deny"
selector = {{ service = "api" }}
rules = [{{ from = [{{ ip_blocks = ["10.66.0.0/16"] }}] }}]
"#
    );
    let path = policy_file(reg, "both.toml", &both);
    let out = reg
        .meshctl_ok(&["apply", "--dry-run", "-f", path.to_str().unwrap()])
        .unwrap();
    assert!(
        out.contains("updated AuthorizationPolicy/default/api-allow-web (dry run)"),
        "{out}"
    );
    assert!(
        out.contains("created AuthorizationPolicy/default/api-deny-lab (dry run)"),
        "{out}"
    );
    let diff_adds_ops = out
        .lines()
        .any(|l| l.trim_start().starts_with("+ ") && l.contains(OPS));
    assert!(diff_adds_ops, "the diff shows ops added:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("+ ") && l.contains("10.66.0.0/16")),
        "the diff shows the new resource:\n{out}"
    );
    assert!(!out.contains("(revision"), "{out}");
    assert_eq!(
        get_json(reg, "ap"),
        (rev1, before.clone()),
        "dry run stored nothing"
    );
    let table = reg.meshctl_ok(&["get", "ap"]).unwrap();
    assert!(!table.contains("api-deny-lab"), "{table}");

    // Invalid: a bad CIDR and an unknown key, beside a valid resource; nothing is applied.
    let bad = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "fine"
selector = {{ service = "api" }}
rules = [{{ from = [{{ principals = ["{WEB}"] }}] }}]

[[resource]]
kind = "AuthorizationPolicy"
name = "broken"
action = "deny"
colour = "blue"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ ip_blocks = ["10.1.0.0/16", "10.0.0.300/8"] }}]
"#
    );
    let bad_path = policy_file(reg, "bad.toml", &bad);
    let bad_name = bad_path.display().to_string();
    for args in [
        vec!["apply", "-f", bad_name.as_str()],
        vec!["apply", "--dry-run", "-f", bad_name.as_str()],
        // A directory with a valid file and the invalid one.
        vec!["apply", "-f", path.parent().unwrap().to_str().unwrap()],
    ] {
        let o = reg.meshctl(&args).unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {err}");
        let cidr = err
            .lines()
            .find(|l| l.contains("ip_blocks[1]"))
            .unwrap_or_else(|| panic!("{args:?}: the bad CIDR is named:\n{err}"));
        assert!(
            cidr.contains(&bad_name) && cidr.contains("AuthorizationPolicy/default/broken"),
            "{args:?}: file and resource named: {cidr}"
        );
        assert!(
            cidr.contains("rules[0].from[0].ip_blocks[1]"),
            "{args:?}: the full key: {cidr}"
        );
        assert!(
            err.lines()
                .any(|l| l.contains(&bad_name) && l.contains("broken") && l.contains("colour")),
            "{args:?}: the unknown key is named with file and resource:\n{err}"
        );
        assert!(
            !err.contains("ip_blocks[0]"),
            "the good CIDR is fine: {err}"
        );
        assert!(text(&o.stdout).is_empty(), "{}", text(&o.stdout));
    }
    assert_eq!(get_json(reg, "ap"), (rev1, before), "nothing applied");

    // `get -o toml` re-applies as unchanged.
    let (out, rev2) = apply(reg, "both.toml", &both);
    assert!(out.contains("updated AuthorizationPolicy/default/api-allow-web"));
    assert!(out.contains("created AuthorizationPolicy/default/api-deny-lab"));
    assert_eq!(rev2, rev1 + 1, "one apply is one revision");
    let exported = reg.meshctl_ok(&["get", "ap", "-o", "toml"]).unwrap();
    let (out, rev) = apply(reg, "exported.toml", &exported);
    assert_eq!(rev, rev2, "no new revision:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in lines {
        assert!(
            l.starts_with("unchanged AuthorizationPolicy/default/"),
            "{out}"
        );
    }
    let (_, now) = get_json(reg, "ap");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|r| r["revision"].as_u64() == Some(rev2)));
    let toml_all = reg.meshctl_ok(&["get", "all", "-o", "toml"]).unwrap();
    assert_eq!(toml_all, exported, "get all shows the same resources");

    // History: every revision with its author, the delete included.
    let rev3 = delete(reg, "ap", "api-allow-web", None);
    assert_eq!(rev3, rev2 + 1);
    let o = reg.meshctl(&["get", "ap", "api-allow-web"]).unwrap();
    assert!(!o.status.success(), "a deleted resource is gone");
    let (out, rev4) = apply(reg, "allow.toml", &allow_web());
    assert!(out.contains("created AuthorizationPolicy/default/api-allow-web"));
    let hist = reg
        .meshctl_ok(&["history", "ap", "api-allow-web", "-n", "default"])
        .unwrap();
    let rows: Vec<Vec<&str>> = hist
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let got: Vec<(u64, &str, &str)> = rows
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1], *r.last().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (rev1, OPERATOR, "created"),
            (rev2, OPERATOR, "updated"),
            (rev3, OPERATOR, "deleted"),
            (rev4, OPERATOR, "created"),
        ],
        "history:\n{hist}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &reg.meshctl_ok(&["history", "ap", "api-allow-web", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let versions = json.as_array().unwrap();
    assert_eq!(versions.len(), 4);
    assert!(versions[2]["spec"].is_null(), "the deletion has no spec");
    assert_eq!(
        versions[1]["spec"]["rules"][0]["from"][0]["principals"][1],
        OPS
    );

    // The viewer reads but cannot write.
    let o = viewer(reg, &["get", "ap"]);
    assert!(o.status.success(), "viewer get: {}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("api-allow-web") && table.contains("api-deny-lab"),
        "{table}"
    );
    let o = viewer(reg, &["history", "ap", "api-allow-web"]);
    assert!(o.status.success(), "viewer history: {}", text(&o.stderr));
    let fresh = policy_file(
        reg,
        "viewer.toml",
        r#"
[[resource]]
kind = "MeshConfig"
name = "default"
default_authorization = "deny"
"#,
    );
    for args in [
        vec!["apply", "-f", fresh.to_str().unwrap()],
        vec!["delete", "ap", "api-deny-lab"],
    ] {
        let o = viewer(reg, &args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "viewer {args:?} must be refused");
        assert_ne!(o.status.code(), Some(64), "not a usage error: {err}");
        assert!(err.contains("read-only"), "viewer {args:?}: {err}");
    }
    let (rev, after) = get_json(reg, "all");
    assert_eq!(rev, rev4, "the viewer changed nothing");
    assert_eq!(after.len(), 2);
}

/// A plaintext client (not in the mesh) at `src` sending to `addr`.
async fn plain_attempt(src: IpAddr, addr: SocketAddr, seed: u64) -> Outcome {
    let data = apps::payload(4096, seed);
    outcome(&data, apps::round_trip_from(src, addr, &data)).await
}

fn peer_authentication(mode: &str) -> String {
    format!(
        r#"
[[resource]]
kind = "PeerAuthentication"
name = "api-migration"
mode = "{mode}"
selector = {{ service = "api" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_admits_plaintext_on_the_listen_address_until_strict() {
    let m = mesh(&["b"]).await;
    let reg = &m.cluster.registry;
    let b = &m.cluster.nodes[0];
    let direct = m.direct[0];
    // Two clients outside the mesh, on hosts of their own.
    let (lan, other) = (IpAddr::from(next_ip()), IpAddr::from(next_ip()));
    let rejected = |reason: &'static str| async move {
        metric(
            b,
            "meshd_rejected_connections_total",
            &[("direction", "inbound"), ("reason", reason)],
        )
        .await
    };
    let accepted_before = m.echos[0].accepted();

    // STRICT by default: plaintext on the listen address is reset before reaching the app.
    let dump = b.config_dump().await.unwrap();
    assert_eq!(dump["policy"]["mtls"][API], "strict", "{dump}");
    for i in 0..3 {
        let o = plain_attempt(lan, direct, i).await;
        assert!(is_reset(&o), "plaintext under STRICT: {o:?}");
    }
    assert_eq!(
        m.echos[0].accepted(),
        accepted_before,
        "plaintext reached the app"
    );
    assert_eq!(rejected("mtls_required").await, 3.0);
    assert_eq!(
        decisions(b, "deny", "mtls_required", "").await,
        3.0,
        "counted as decisions too"
    );
    assert_allowed(m.web, "web over mTLS (strict)", 2, 1).await;

    // PERMISSIVE for api: plaintext clients get through; mTLS callers are unaffected.
    let (_, rev) = apply(reg, "pa.toml", &peer_authentication("permissive"));
    wait_revision(b, rev).await;
    let dump = b.config_dump().await.unwrap();
    assert_eq!(dump["policy"]["mtls"][API], "permissive", "{dump}");
    for i in 0..3 {
        let o = plain_attempt(lan, direct, 100 + i).await;
        assert!(
            matches!(o, Outcome::Echoed),
            "plaintext under PERMISSIVE: {o:?}"
        );
    }
    assert_allowed(m.web, "web over mTLS (permissive)", 2, 10).await;
    let plain = metric(
        b,
        "meshd_plaintext_connections_total",
        &[("direction", "inbound"), ("service", API)],
    )
    .await;
    assert_eq!(
        plain, 3.0,
        "only the plaintext connections are counted as such"
    );
    assert!(
        !log_lines(b, &["src.identity=plaintext", &format!("src.addr={lan}:")]).is_empty(),
        "plaintext connections are logged as such:\n{}",
        b.log()
    );

    // A TLS ClientHello is never taken for plaintext: bytes starting a TLS record go to the
    // handshake (and fail here), not to the app.
    let before = m.echos[0].accepted();
    let mut s = apps::connect_from(lan, direct).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 1, 2, 3, 4])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert_eq!(
        m.echos[0].accepted(),
        before,
        "a TLS record reached the app as plaintext"
    );

    // ALLOW by principal: a plaintext caller has no identity, so it is denied...
    let (_, rev) = apply(reg, "allow.toml", &allow_web());
    wait_revision(b, rev).await;
    assert!(is_reset(&plain_attempt(lan, direct, 200).await));
    assert_allowed(m.web, "web (allow web)", 2, 20).await;
    // ...unless an ALLOW rule admits its address.
    let allow_lan = format!(
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "api-allow-lan"
action = "allow"
selector = {{ service = "api" }}
[[resource.rules]]
from = [{{ ip_blocks = ["{lan}/32"] }}]
"#
    );
    let (_, rev) = apply(reg, "allow-lan.toml", &allow_lan);
    wait_revision(b, rev).await;
    let o = plain_attempt(lan, direct, 300).await;
    assert!(
        matches!(o, Outcome::Echoed),
        "plaintext from the allowed block: {o:?}"
    );
    let o = plain_attempt(other, direct, 301).await;
    assert!(is_reset(&o), "plaintext from elsewhere: {o:?}");
    assert!(decisions(b, "allow", "allow_policy", &policy_named("api-allow-lan")).await >= 1.0);

    // Back to STRICT: the open plaintext connection is closed, new ones are refused.
    let mut open = apps::connect_from(lan, direct).await.unwrap();
    open.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut got))
        .await
        .expect("echo on the open plaintext connection")
        .unwrap();
    let (_, rev) = apply(reg, "pa.toml", &peer_authentication("strict"));
    wait_revision(b, rev).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(ENFORCE, open.read(&mut buf))
        .await
        .expect("the open plaintext connection was not closed by STRICT");
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the open plaintext connection ends with a reset: {read:?}"
    );
    assert!(is_reset(&plain_attempt(lan, direct, 400).await));
    assert_eq!(
        decisions(b, "deny", "policy_changed", "").await,
        1.0,
        "the plaintext connection was revoked"
    );
    assert_allowed(m.web, "web (strict again)", 2, 30).await;
}
