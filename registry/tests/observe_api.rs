//! In-process test of the observability API: a registry from `init::run` + `app::build` on
//! loopback port 0, driven by real tonic clients over mTLS. Nodes report edges and the topology
//! shows them; viewers read, nodes and workloads cannot read or report what is not theirs; an
//! SLO with half its requests failing fires a fast-burn alert and a webhook to a local HTTP
//! server; a restart on the same data dir keeps the alert and the traffic and does not fire
//! again. The node reports carry the CA's expiry.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_api::name::{Label, ServiceKey};
use mesh_api::observe::{BUCKETS, bucket_of};
use mesh_api::proto::v1 as pb;
use mesh_api::{Identity, NodeName};
use mesh_registry::config::Config;
use tokio::sync::mpsc;
use tonic::Code;

use common::{TIMEOUT, eventually, identity_client, metrics};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An HTTP edge with `requests` in (25, 50] ms, `errors` of them 5xx.
fn http_edge(source: &str, destination: &str, requests: u64, errors: u64) -> pb::EdgeStats {
    let mut latency_buckets = vec![0; BUCKETS];
    latency_buckets[bucket_of(40.0)] = requests;
    pb::EdgeStats {
        source: source.to_owned(),
        destination: destination.to_owned(),
        mtls: true,
        protocol: "http".to_owned(),
        requests,
        errors,
        latency_buckets,
        bytes: requests * 100,
        destination_site: String::new(),
    }
}

fn report(edges: Vec<pb::EdgeStats>) -> pb::NodeReport {
    pb::NodeReport {
        // Five seconds ahead of the registry.
        sent_unix_ms: now_ms() + 5_000,
        period_ms: 200,
        policy_revision: 0,
        keyring_revision: 1,
        config_generation: 1,
        members: 2,
        members_digest: "digest".to_owned(),
        certificates: vec![pb::CertExpiry {
            identity: "spiffe://mesh.test/node/node-1".to_owned(),
            not_after_unix: 1,
        }],
        edges,
        version: "0.1.0-test".to_owned(),
        warnings: Vec::new(),
    }
}

fn fast(config: &mut Config) {
    config.report_interval = Duration::from_millis(200);
    config.slo_eval_interval = Duration::from_millis(300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_build_the_topology_for_readers_only() {
    let common::Running {
        _dir,
        td,
        data,
        addr,
        admin_addr,
        stop_tx,
        running,
        mut admin,
        mut viewer,
        mut node,
        ..
    } = common::start_with(fast).await;
    // Nodes report only edges of their own services (or plaintext callers of them).
    common::join(&mut admin, &td, "node-1", &["shop/web", "shop/db"]).await;
    common::join(&mut admin, &td, "node-2", &["shop/web", "shop/db"]).await;
    // Reports may name only destinations some node may host.
    common::join(&mut admin, &td, "node-api", &["shop/api"]).await;
    let not_mine = node
        .report(report(vec![http_edge("shop/api", "shop/db", 1, 1)]))
        .await
        .unwrap_err();
    assert_eq!(not_mine.code(), tonic::Code::PermissionDenied, "{not_mine}");
    assert!(
        not_mine
            .message()
            .contains("shop/api is not a service of this node"),
        "{not_mine}"
    );
    let mut node2 = identity_client(
        addr,
        &td,
        &data,
        Identity::node(&td, &NodeName::new("node-2").unwrap()),
    );

    // Two nodes report the same edge (and one a plaintext TCP edge): the registry answers the
    // configured interval.
    let answer = node
        .report(report(vec![http_edge("shop/web", "shop/api", 10, 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.interval_ms, 200);
    let tcp = pb::EdgeStats {
        source: "external".to_owned(),
        destination: "shop/db".to_owned(),
        mtls: false,
        protocol: "tcp".to_owned(),
        requests: 3,
        errors: 1,
        latency_buckets: Vec::new(),
        bytes: 42,
        destination_site: String::new(),
    };
    node2
        .report(report(vec![http_edge("shop/web", "shop/api", 30, 0), tcp]))
        .await
        .unwrap();

    // Calls to a service no node may host are dropped (the rest of the report is kept): a
    // node cannot invent services, nor grow the store with them.
    node2
        .report(report(vec![http_edge("shop/web", "shop/ghost", 5, 5)]))
        .await
        .unwrap();

    // Readers see both edges, merged, in the default window.
    for reader in [&mut admin, &mut viewer] {
        let topo = reader
            .get_topology(pb::TopologyRequest { window_seconds: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(topo.window_seconds, 300);
        let rows: Vec<_> = topo
            .edges
            .iter()
            .map(|e| {
                let who = (e.source.as_str(), e.destination.as_str(), e.mtls);
                (who, e.protocol.as_str(), e.requests, e.errors, e.bytes)
            })
            .collect();
        assert_eq!(
            rows,
            [
                (("external", "shop/db", false), "tcp", 3, 1, 42),
                (("shop/web", "shop/api", true), "http", 40, 1, 4_000),
            ]
        );
        let api = &topo.edges[1];
        assert!((api.requests_per_second - 40.0 / 300.0).abs() < 1e-9);
        assert!((api.error_rate - 0.025).abs() < 1e-9);
        assert!(api.p50_ms > 25.0 && api.p99_ms <= 50.0, "{api:?}");
    }

    // Every node's last report, its skew (five seconds ahead, less the trip) and the mesh's
    // revisions.
    let reports = viewer
        .get_node_reports(pb::NodeReportsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reports.policy_revision, reports.keyring_revision), (0, 1));
    assert!(reports.now_unix_ms > 0);
    let nodes: Vec<_> = reports.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, ["node-1", "node-2"]);
    for n in &reports.nodes {
        assert!((4_000..=5_000).contains(&n.clock_skew_ms), "{n:?}");
        let r = n.report.as_ref().unwrap();
        assert_eq!((r.version.as_str(), r.members), ("0.1.0-test", 2));
        assert!(r.edges.is_empty(), "edges live in the topology");
    }

    // Nodes read nothing of the mesh; workloads and viewers cannot report.
    let denied = node
        .get_topology(pb::TopologyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = node
        .get_node_reports(pb::NodeReportsRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = node
        .get_slo_status(pb::SloStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let web = ServiceKey::new(Label::new("shop").unwrap(), Label::new("web").unwrap());
    let mut workload = identity_client(addr, &td, &data, Identity::workload(&td, &web));
    let denied = workload.report(report(Vec::new())).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = viewer.report(report(Vec::new())).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // A report with a bad field is refused whole, naming the field.
    let mut bad = http_edge("shop/web", "shop/api", 1000, 0);
    bad.protocol = "udp".to_owned();
    let refused = node.report(report(vec![bad])).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("edges[0].protocol"),
        "{refused:?}"
    );
    let topo = viewer
        .get_topology(pb::TopologyRequest { window_seconds: 60 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topo.edges[1].requests, 40, "nothing of the refused report");

    let text = metrics(admin_addr).await;
    for line in [
        "mesh_registry_calls_total{rpc=\"report\",outcome=\"ok\"} 3",
        "mesh_registry_report_edges_dropped_total 1",
        "mesh_registry_calls_total{rpc=\"report\",outcome=\"bad_report\"} 1",
        "mesh_registry_calls_total{rpc=\"report\",outcome=\"wrong_identity\"} 2",
        "mesh_registry_calls_total{rpc=\"get_topology\",outcome=\"not_admin\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_warnings_are_kept_with_the_last_report() {
    let common::Running {
        _dir,
        td,
        stop_tx,
        running,
        mut admin,
        mut viewer,
        mut node,
        ..
    } = common::start().await;
    common::join(&mut admin, &td, "node-1", &["shop/web"]).await;
    let warning = |code: &str, message: &str| pb::NodeWarning {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    let off_loopback = warning(
        "listener_off_loopback",
        "/etc/meshd/services.d/web.toml: upstreams[0].bind: 0.0.0.0:9001 is not a loopback \
         address; any host that can reach it can call shop/api as shop/web",
    );
    let read = |viewer: &mut mesh_api::proto::v1::registry_client::RegistryClient<_>| {
        let mut viewer = viewer.clone();
        async move {
            let reports = viewer
                .get_node_reports(pb::NodeReportsRequest {})
                .await
                .unwrap()
                .into_inner();
            reports.nodes[0].report.clone().unwrap().warnings
        }
    };
    node.report(pb::NodeReport {
        warnings: vec![off_loopback.clone()],
        ..report(Vec::new())
    })
    .await
    .unwrap();
    assert_eq!(read(&mut viewer).await, std::slice::from_ref(&off_loopback));

    // A report with a warning the registry cannot show is refused whole; the last one stays.
    let refused = node
        .report(pb::NodeReport {
            warnings: vec![warning("x", "clear the screen \u{1b}[2J")],
            ..report(Vec::new())
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("warnings[0].message"),
        "{refused:?}"
    );
    assert_eq!(read(&mut viewer).await, [off_loopback]);

    // Fixed on the node: its next report carries none, and none are shown.
    node.report(report(Vec::new())).await.unwrap();
    assert_eq!(read(&mut viewer).await, []);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap();
}

/// The CA's expiry, read from the certificates on disk, is in every `GetNodeReports` answer (for
/// `meshctl check`) and in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reports_and_metrics_carry_the_ca_expiry() {
    let common::Running {
        _dir,
        data,
        admin_addr,
        stop_tx,
        running,
        mut viewer,
        ..
    } = common::start().await;
    let files = mesh_registry::init::CaPaths::new(&data).read().unwrap();
    let unix = |pem: &str| {
        (mesh_ca::cert_not_after(pem).unwrap())
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let (root, intermediate) = (
        unix(&files.root_cert_pem),
        unix(&files.intermediate_cert_pem),
    );
    assert!(intermediate < root, "{intermediate} {root}");

    let reports = viewer
        .get_node_reports(pb::NodeReportsRequest {})
        .await
        .unwrap()
        .into_inner();
    let ca = |kind: &str, not_after_unix| pb::CaCertExpiry {
        kind: kind.to_owned(),
        not_after_unix,
    };
    assert_eq!(
        reports.ca_certificates,
        [ca("root", root), ca("intermediate", intermediate)]
    );

    let scraped = metrics(admin_addr).await;
    for line in [
        format!("mesh_registry_ca_not_after_seconds{{cert=\"root\"}} {root}"),
        format!("mesh_registry_ca_not_after_seconds{{cert=\"intermediate\"}} {intermediate}"),
    ] {
        assert!(scraped.contains(&line), "{line} in {scraped}");
    }
    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap();
}

/// A webhook receiver on loopback: every POST body, as JSON, into the returned channel.
async fn webhook_server() -> (String, mpsc::UnboundedReceiver<serde_json::Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/slo", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let tx = Arc::new(Mutex::new(tx));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let json = serde_json::from_slice(&body).unwrap();
                        let _ = tx.lock().unwrap().send(json);
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (url, rx)
}

const SLO_NAME: &str = "SLO/shop/api-availability";

fn slo_resource(webhook: &str) -> pb::Resource {
    pb::Resource {
        kind: "SLO".to_owned(),
        namespace: "shop".to_owned(),
        name: "api-availability".to_owned(),
        spec_json: serde_json::json!({
            "service": "api",
            "objective": "availability",
            "goal": 99.0,
            "window": "30d",
            "alerting": { "webhook": webhook },
        })
        .to_string(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_fast_burn_fires_once_across_a_restart() {
    let (url, mut hooks) = webhook_server().await;
    let mut reg = common::start_with(fast).await;
    common::join(&mut reg.admin, &reg.td, "node-1", &["shop/web"]).await;
    common::join(&mut reg.admin, &reg.td, "node-api", &["shop/api"]).await;
    reg.admin
        .apply(pb::ApplyRequest {
            resources: vec![slo_resource(&url)],
            dry_run: false,
        })
        .await
        .unwrap();

    // Before any traffic: known, untouched, ok.
    let status = reg
        .viewer
        .get_slo_status(pb::SloStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.slos.len(), 1);
    let s = &status.slos[0];
    assert_eq!(
        (s.slo.as_str(), s.service.as_str(), s.alert.as_str()),
        (SLO_NAME, "shop/api", "ok")
    );
    assert_eq!((s.sli, s.budget_remaining, s.total), (100.0, 1.0, 0));
    assert_eq!(
        (s.objective.as_str(), s.window.as_str(), s.goal),
        ("availability", "30d", 99.0)
    );

    // Half of the requests to shop/api fail: a fast burn (50× the 1% allowed).
    reg.node
        .report(report(vec![http_edge("shop/web", "shop/api", 100, 50)]))
        .await
        .unwrap();
    let hook = tokio::time::timeout(TIMEOUT, hooks.recv())
        .await
        .expect("webhook within the timeout")
        .unwrap();
    assert_eq!(hook["slo"], SLO_NAME);
    assert_eq!(hook["service"], "shop/api");
    assert_eq!(hook["severity"], "fast_burn");
    assert_eq!(hook["sli"], 50.0);
    assert!(
        (hook["burn_rates"]["5m"].as_f64().unwrap() - 50.0).abs() < 1e-6,
        "{hook}"
    );
    assert!(hook["budget_remaining"].as_f64().unwrap() < 0.0, "{hook}");
    let since = hook["since_unix"].as_i64().unwrap();
    assert!(since > 0);

    let status = reg
        .viewer
        .get_slo_status(pb::SloStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let s = &status.slos[0];
    assert_eq!((s.alert.as_str(), s.alert_since_unix), ("fast_burn", since));
    assert_eq!((s.total, s.good), (100, 50));
    assert!(
        (s.burn_5m - 50.0).abs() < 1e-6 && (s.burn_1h - 50.0).abs() < 1e-6,
        "{s:?}"
    );
    let text = metrics(reg.admin_addr).await;
    for line in [
        format!("mesh_registry_slo_alerts_total{{slo=\"{SLO_NAME}\",severity=\"fast_burn\"}} 1"),
        format!("mesh_registry_slo_alerting{{slo=\"{SLO_NAME}\",severity=\"fast_burn\"}} 1"),
        format!("mesh_registry_slo_sli{{slo=\"{SLO_NAME}\"}} 50.0"),
        "mesh_registry_slo_webhook_deliveries_total{outcome=\"delivered\"} 1".to_owned(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }

    // Restart on the same data dir: the first evaluation finds the alert persisted and the
    // traffic still there, so it exports the alert without firing it again.
    let mut reg = common::restart(reg, fast).await;
    let alerting =
        format!("mesh_registry_slo_alerting{{slo=\"{SLO_NAME}\",severity=\"fast_burn\"}} 1");
    let text = eventually("the first evaluation after the restart", || async {
        let text = metrics(reg.admin_addr).await;
        text.contains(&alerting).then_some(text)
    })
    .await;
    assert!(
        !text.contains("mesh_registry_slo_alerts_total{"),
        "fired again after the restart:\n{text}"
    );
    let status = reg
        .viewer
        .get_slo_status(pb::SloStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let s = &status.slos[0];
    assert_eq!((s.alert.as_str(), s.alert_since_unix), ("fast_burn", since));
    assert_eq!((s.total, s.good), (100, 50), "traffic survived the restart");
    let topo = reg
        .viewer
        .get_topology(pb::TopologyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topo.edges.len(), 1);
    assert_eq!((topo.edges[0].requests, topo.edges[0].errors), (100, 50));
    assert!(hooks.try_recv().is_err(), "no second webhook");

    reg.stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, reg.running)
        .await
        .unwrap()
        .unwrap();
}
