//! Observability on real meshd processes: the request metrics scraped from both hops match
//! what the test sent (HTTP, gRPC, TCP), and the access log carries the caller's SPIFFE identity
//! and IP for mTLS calls and marks plaintext ones.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use mesh_e2e::apps::{self, Echo};
use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::otlp::Receiver;
use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, eventually, next_ip};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use std::time::Duration;

const WEB: &str = "default/web";
const API: &str = "default/api";
const DB: &str = "default/db";
const COLLECTOR: &str = "default/collector";

/// The access-log events (JSON lines on stdout) in a node's log.
fn access_events(node: &Node) -> Vec<serde_json::Value> {
    node.log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

async fn metric(node: &Node, name: &str, labels: &[(&str, &str)]) -> f64 {
    node.metric(name, labels).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log_match_the_traffic() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();

    // b serves api (HTTP, 20 ms per request, also on a plaintext-capable `listen` address)
    // and db (TCP echo).
    let ip_b = next_ip();
    let api = HttpApp::start(SocketAddr::new(ip_b.into(), 0), "api")
        .await
        .unwrap();
    api.behavior.delay_ms.store(20, Ordering::SeqCst);
    let db = Echo::start(SocketAddr::new(ip_b.into(), 0)).await.unwrap();
    // A gRPC service: an OTLP trace receiver (any real gRPC server would do).
    let grpc = Receiver::start(SocketAddr::new(ip_b.into(), 0))
        .await
        .unwrap();
    let listen = SocketAddr::new(ip_b.into(), 18443);
    let mut api_spec = ServiceSpec::new("api", api.addr).protocol("http");
    api_spec.listen = Some(listen);
    let mut b = NodeSpec::new(
        "b",
        cluster
            .registry
            .token(&["api", "db", "collector"], 1)
            .unwrap(),
    );
    b.ip = ip_b.into();
    b.services = vec![
        api_spec,
        ServiceSpec::new("db", db.addr),
        ServiceSpec::new("collector", grpc.addr()).protocol("grpc"),
    ];
    cluster.add_spec(b).await.unwrap();

    // a: web calls api (HTTP) and db (TCP).
    let ip_a = next_ip();
    let (to_api, to_db, to_grpc) = (
        SocketAddr::new(ip_a.into(), 19301),
        SocketAddr::new(ip_a.into(), 19302),
        SocketAddr::new(ip_a.into(), 19303),
    );
    let mut a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    a.ip = ip_a.into();
    a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(ip_a.into(), 18080))
            .protocol("http")
            .upstream("api", to_api)
            .upstream("db", to_db)
            .upstream("collector", to_grpc),
    ];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    let (node_a, node_b) = (&cluster.nodes[1], &cluster.nodes[0]);
    node_a.wait_endpoints(API, 1).await.unwrap();
    node_a.wait_endpoints(DB, 1).await.unwrap();
    node_a.wait_endpoints(COLLECTOR, 1).await.unwrap();

    // HTTP: 40 OK, 10 answered 404 by the app.
    let client = Client::new();
    for i in 0..50 {
        let path = if i < 40 { "/ok" } else { "/missing" };
        let status = if i < 40 { 0 } else { 404 };
        api.behavior.status.store(status, Ordering::SeqCst);
        let r = client.get(to_api, path, &[]).await.unwrap();
        assert_eq!(r.status, if i < 40 { 200 } else { 404 });
    }
    api.behavior.status.store(0, Ordering::SeqCst);
    // gRPC: 20 unary calls on one channel.
    let mut grpc_client = TraceServiceClient::connect(format!("http://{to_grpc}"))
        .await
        .unwrap();
    for _ in 0..20 {
        grpc_client
            .export(ExportTraceServiceRequest::default())
            .await
            .unwrap();
    }
    // TCP: 10 connections, 1000 bytes each way.
    for i in 0..10 {
        let data = apps::payload(1000, i);
        assert_eq!(apps::round_trip(to_db, &data).await.unwrap(), data);
    }

    for (node, direction) in [(node_a, "outbound"), (node_b, "inbound")] {
        let m = |code: &'static str| {
            [
                ("direction", direction),
                ("source", WEB),
                ("destination", API),
                ("code", code),
            ]
        };
        // Counted when the response is sent, so they are in place once the client has it.
        assert_eq!(
            metric(node, "meshd_requests_total", &m("200")).await,
            40.0,
            "{direction}"
        );
        assert_eq!(
            metric(node, "meshd_requests_total", &m("404")).await,
            10.0,
            "{direction}"
        );
        let d = [
            ("direction", direction),
            ("source", WEB),
            ("destination", API),
            ("class", "2xx"),
        ];
        let count = metric(node, "meshd_request_duration_seconds_count", &d).await;
        let sum = metric(node, "meshd_request_duration_seconds_sum", &d).await;
        assert_eq!(count, 40.0, "{direction}");
        // Each took the app's 20 ms at least, and no request took a second.
        assert!(
            (0.8..40.0).contains(&sum),
            "{direction}: 40 requests took {sum} s"
        );
        let fast = metric(
            node,
            "meshd_request_duration_seconds_bucket",
            &[
                ("direction", direction),
                ("destination", API),
                ("class", "2xx"),
                ("le", "0.01"),
            ],
        )
        .await;
        assert_eq!(fast, 0.0, "{direction}: none under the app's 20 ms");
    }
    // gRPC: the calls succeeded (grpc-status 0 arrives in trailers, after the headers the count
    // is taken at, so it is not a label here).
    for (node, direction) in [(node_a, "outbound"), (node_b, "inbound")] {
        let labels = [
            ("direction", direction),
            ("source", WEB),
            ("destination", COLLECTOR),
            ("code", "200"),
        ];
        assert_eq!(
            metric(node, "meshd_requests_total", &labels).await,
            20.0,
            "{direction}"
        );
    }
    // TCP connections and bytes are counted when the connection ends, just after the client saw
    // its last byte.
    for (node, direction) in [(node_a, "outbound"), (node_b, "inbound")] {
        let labels = [("direction", direction), ("service", DB)];
        eventually(Duration::from_secs(5), "tcp metrics", || async {
            let conns = metric(node, "meshd_connections_total", &labels).await;
            let to_service = metric(
                node,
                "meshd_bytes_total",
                &[
                    ("direction", direction),
                    ("service", DB),
                    ("flow", "to_service"),
                ],
            )
            .await;
            (conns == 10.0 && to_service == 10_000.0).then_some(())
        })
        .await
        .unwrap();
    }

    // Access log, outbound: one event per request, with route, status and endpoint (written
    // in batches, within a fraction of a second).
    let events_a = eventually(Duration::from_secs(5), "a's access events", || async {
        let events = access_events(node_a);
        let http = events
            .iter()
            .filter(|e| e["protocol"] == "http" && e["dst.service"] == API)
            .count();
        let tcp = events
            .iter()
            .filter(|e| e["protocol"] == "tcp" && e["dst.service"] == DB)
            .count();
        (http >= 50 && tcp >= 10).then_some(events)
    })
    .await
    .unwrap();
    let http_a: Vec<_> = events_a
        .iter()
        .filter(|e| e["protocol"] == "http" && e["dst.service"] == API)
        .collect();
    assert_eq!(http_a.len(), 50, "one event per request");
    let e = http_a[0];
    assert_eq!(e["direction"], "outbound");
    assert_eq!(e["src.service"], WEB);
    assert_eq!(e["mtls"], true);
    assert_eq!(e["http.method"], "GET");
    assert_eq!(e["http.path"], "/ok");
    assert_eq!(e["http.status"], 200);
    assert_eq!(e["dst.addr"], node_b.inbound.to_string());
    assert!(e["duration_ms"].as_f64().unwrap() >= 20.0, "{e}");
    assert!(e["timestamp"].is_string(), "{e}");
    let tcp_a = events_a
        .iter()
        .filter(|e| e["protocol"] == "tcp" && e["dst.service"] == DB)
        .count();
    assert_eq!(tcp_a, 10);

    // Inbound: the caller's identity and IP, the decision.
    let e = eventually(Duration::from_secs(5), "b's 404 event", || async {
        access_events(node_b)
            .into_iter()
            .find(|e| e["protocol"] == "http" && e["http.status"] == 404)
    })
    .await
    .unwrap();
    let e = &e;
    assert_eq!(e["src.identity"], "spiffe://mesh.test/ns/default/svc/web");
    assert_eq!(e["src.service"], WEB);
    // The address the connection came from (on loopback, meshd a dials from 127.0.0.1).
    let src_ip: std::net::IpAddr = e["src.ip"].as_str().unwrap().parse().unwrap();
    let src_addr: SocketAddr = e["src.addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(src_ip, src_addr.ip(), "{e}");
    assert_eq!(e["mtls"], true);
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["dst.addr"], api.addr.to_string());

    // A plaintext caller on api's `listen` address under PERMISSIVE: served, and marked so.
    let pa = r#"
[[resource]]
kind = "PeerAuthentication"
name = "api-migration"
mode = "PERMISSIVE"
selector = { service = "api" }
"#;
    let rev = cluster.registry.apply("pa.toml", pa).unwrap();
    let node_b = &cluster.nodes[0];
    node_b.wait_policy_revision(rev).await.unwrap();
    let outsider = next_ip();
    let mut s = apps::connect_from(outsider.into(), listen).await.unwrap();
    let r = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        s.write_all(b"GET /legacy HTTP/1.0\r\nHost: api\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        // The connection (and its event) ends when both sides have closed.
        drop(s);
        String::from_utf8_lossy(&buf).into_owned()
    };
    assert!(
        r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
        "{r}"
    );
    let plain = eventually(Duration::from_secs(5), "the plaintext event", || async {
        access_events(node_b)
            .into_iter()
            .find(|e| e["mtls"] == false && e["src.ip"] == outsider.to_string())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            node_b
                .log()
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert_eq!(plain["src.identity"], "plaintext", "{plain}");
    assert_eq!(plain["src.service"], "external", "{plain}");
    assert_eq!(plain["dst.service"], API, "{plain}");
    // The plaintext connection is an edge from outside the mesh in b's metrics too.
    assert_eq!(
        metric(
            node_b,
            "meshd_plaintext_connections_total",
            &[("direction", "inbound"), ("service", API)]
        )
        .await,
        1.0
    );
}
