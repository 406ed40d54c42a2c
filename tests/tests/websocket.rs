//! WebSocket through the mesh with a real WebSocket stack on both ends (Python `websockets`,
//! installed by scripts/setup): the upgrade crosses two meshd hosts as an extended CONNECT on
//! the pooled HTTP/2 connection; messages, a 1 MiB binary frame, subprotocol negotiation and
//! the caller's identity (XFCC) arrive intact; an upgrade a policy denies gets 403.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Output;

use mesh_e2e::py::{self, Server};
use mesh_e2e::{Cluster, PairSpec, RegistryOpts, ServiceSpec, next_ip};

const SCRIPT: &str = "ws/echo.py";

async fn client(url: String, count: usize) -> Output {
    py::run(SCRIPT, vec!["client".into(), url, count.to_string()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_cross_the_mesh() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let app_addr = SocketAddr::new(b_ip.into(), 18081);
    let _server = Server::start(SCRIPT, app_addr, "b");
    let spec = PairSpec::new(b_ip, ServiceSpec::new("api", app_addr).protocol("http"))
        .web(|w| w.protocol("http"));
    let upstream = cluster.pair(spec).await.unwrap();

    // Two sessions at once share the pooled connection between the hosts.
    let (one, two) = tokio::join!(
        client(format!("ws://{upstream}/chat/one"), 200),
        client(format!("ws://{upstream}/chat/two"), 200),
    );
    for (out, path) in [(one, "/chat/one"), (two, "/chat/two")] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "websocket client through the mesh: {stdout}\n{}\nmeshd a:\n{}\nmeshd b:\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.nodes[1].log(),
            cluster.nodes[0].log()
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["server"], "b", "{report}");
        assert_eq!(report["echoed"], 200, "{report}");
        assert_eq!(report["binary_ok"], true, "{report}");
        assert_eq!(report["path"], path, "{report}");
        assert_eq!(report["subprotocol"], "echo.v1", "{report}");
        assert_eq!(
            report["xfcc"],
            "By=spiffe://mesh.test/ns/default/svc/api;URI=spiffe://mesh.test/ns/default/svc/web",
            "the app sees who called"
        );
    }
    let switched = cluster.nodes[0]
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
    assert!(
        switched >= 2.0,
        "upgrades counted at the inbound: {switched}"
    );

    // Upgrades are authorized like the GET they are: a policy that denies the path gets 403.
    let policy = r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "no-admin-socket"
action = "deny"
selector = { service = "api" }
[[resource.rules]]
to = [{ methods = ["GET"], paths = ["/admin/*"] }]
"#;
    let rev = cluster.registry.apply("ws-deny.toml", policy).unwrap();
    cluster.nodes[0].wait_policy_revision(rev).await.unwrap();
    let out = client(format!("ws://{upstream}/admin/socket"), 1).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "denied upgrade succeeded");
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    let out = client(format!("ws://{upstream}/chat/three"), 3).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
