//! The gateway role on real processes: a host that runs the Gateway `default/public` takes
//! requests from a client outside the mesh (curl, the test's own HTTP client) on a listener the
//! policy declares, routes them by host and path with the Routes attached to the gateway (a
//! 90/10 split at the edge included), adds the edge headers, and calls the services as the
//! gateway's identity, which an AuthorizationPolicy can single out. Listeners follow policy
//! changes, all or nothing per gateway.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;

use mesh_e2e::Within as _;
use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, WAIT, http_get, next_ip};

const GATEWAY_ID: &str = "spiffe://mesh.test/ns/default/svc/public";

/// curl's status line, headers and body, as one string.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .within(mesh_e2e::CLI_TIMEOUT)
        .expect("curl runs (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `key=value` from the app's report.
fn field<'a>(resp: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    resp.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in {resp}"))
}

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
