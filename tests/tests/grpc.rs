//! gRPC through the mesh with a real gRPC stack on both ends (Python grpcio, installed by
//! scripts/setup): unary, server streaming, client streaming and bidirectional calls, trailers,
//! error statuses and a 1 MiB message pass intact between two meshd hosts.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use mesh_e2e::py::{self, Server};
use mesh_e2e::{Cluster, PairSpec, RegistryOpts, ServiceSpec, next_ip};

const SCRIPT: &str = "grpc/echo.py";

/// Host b runs the gRPC server as `api`; host a's `web` reaches it on `upstream`.
async fn mesh() -> (Cluster, Server, SocketAddr) {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let app_addr = SocketAddr::new(b_ip.into(), 50051);
    let server = Server::start(SCRIPT, app_addr, "b");
    let spec = PairSpec::new(b_ip, ServiceSpec::new("api", app_addr).protocol("grpc"))
        .web(|w| w.protocol("grpc"));
    let upstream = cluster.pair(spec).await.unwrap();
    (cluster, server, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_kinds_trailers_and_statuses_cross_the_mesh() {
    let (cluster, _server, upstream) = mesh().await;
    let out = py::run(SCRIPT, vec!["call".into(), upstream.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpc client through the mesh: {stdout}\n{}\nmeshd a:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.nodes[1].log()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["served_by"], "b", "{report}");
    assert_eq!(report["fail status"], "FAILED_PRECONDITION");

    // Every call went through both meshd hosts as HTTP requests.
    let requests = cluster.nodes[0]
        .metric(
            "meshd_requests_total",
            &[
                ("direction", "inbound"),
                ("destination", "default/api"),
                ("code", "200"),
            ],
        )
        .await
        .unwrap();
    assert!(requests >= 6.0, "inbound requests counted: {requests}");
}

async fn flaky(upstream: SocketAddr, n: usize) -> serde_json::Value {
    let out = py::run(
        SCRIPT,
        vec!["flaky".into(), upstream.to_string(), n.to_string()],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_by_status() {
    let (cluster, _server, upstream) = mesh().await;
    // Every second call fails with UNAVAILABLE (HTTP 200, grpc-status 14 in the headers).
    let t = flaky(upstream, 100).await;
    assert_eq!(t["ok"], 50, "without retries half fail: {t}");
    assert_eq!(t["unavailable"], 50, "{t}");

    // A 5xx retry policy does not see gRPC failures (they are HTTP 200)...
    let route = |on: &str| {
        format!(
            r#"
[[resource]]
kind = "Route"
name = "api"
service = "api"
[[resource.http]]
retries = {{ attempts = 2, retry_on = ["{on}"], budget_percent = 100 }}
"#
        )
    };
    let rev = cluster
        .registry
        .apply("grpc-retry.toml", &route("5xx"))
        .unwrap();
    cluster.nodes[1].wait_policy_revision(rev).await.unwrap();
    let t = flaky(upstream, 100).await;
    assert_eq!(
        t["unavailable"], 50,
        "5xx does not match a gRPC status: {t}"
    );

    // ...`unavailable` does: every failed call is sent again and succeeds.
    let rev = (cluster.registry)
        .apply("grpc-retry.toml", &route("unavailable"))
        .unwrap();
    cluster.nodes[1].wait_policy_revision(rev).await.unwrap();
    let t = flaky(upstream, 100).await;
    assert_eq!(t["ok"], 100, "retries hide UNAVAILABLE: {t}");
    let retried = cluster.nodes[1]
        .metric("meshd_retries_total", &[("destination", "default/api")])
        .await
        .unwrap();
    // One call at a time against every-second-call failures: each call after the first
    // lands on a failure once and succeeds on its retry; never a second retry.
    assert!(
        (90.0..=100.0).contains(&retried),
        "one retry per call: {retried}"
    );
}
