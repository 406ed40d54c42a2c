//! Distributed tracing on real processes: a request crossing three services (web → api → db,
//! the api app forwarding the context it was given, as instrumented apps do) arrives at a real
//! OTLP/gRPC receiver as one trace with correct parent links — one CLIENT span per outbound hop,
//! one SERVER span per inbound hop. At 0% sampling, a caller's sampled W3C or B3 context is
//! still continued; an unsampled one produces no spans but is still propagated.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_e2e::http_app::HttpApp;
use mesh_e2e::otlp::{Receiver, SpanKind};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, next_ip};

const WAIT: Duration = Duration::from_secs(20);
const CONTEXT_HEADERS: [&str; 3] = ["traceparent", "tracestate", "b3"];

/// The api app: answers each request by calling db through its meshd upstream, passing on the
/// trace headers it received (what an instrumented app does), and returns what it saw.
async fn forwarding_app(listen: SocketAddr, upstream: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        while let Ok((s, _)) = l.accept().await {
            let client = client.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let client = client.clone();
                    async move {
                        let mut out = Request::get(format!("http://{upstream}/from-api"));
                        for h in CONTEXT_HEADERS {
                            if let Some(v) = req.headers().get(h) {
                                out = out.header(h, v);
                            }
                        }
                        let seen = req
                            .headers()
                            .get("traceparent")
                            .map(|v| v.to_str().unwrap_or_default().to_owned())
                            .unwrap_or_default();
                        let resp = client
                            .request(out.body(Full::new(Bytes::new())).unwrap())
                            .await;
                        let status = resp.as_ref().map_or(502, |r| r.status().as_u16());
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .header("x-seen-traceparent", seen)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}

/// GET through web's upstream with `headers`; returns (status, the traceparent api saw).
async fn get(addr: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = Request::get(format!("http://{addr}/"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let seen = resp
        .headers()
        .get("x-seen-traceparent")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    resp.into_body().collect().await.unwrap();
    (status, seen)
}

struct Mesh {
    _cluster: Cluster,
    _apps: (HttpApp, tokio::task::JoinHandle<()>),
    web_to_api: SocketAddr,
}

/// web (a) → api (b) → db (c), every node exporting to `collector` at `sampling`.
async fn mesh(collector: &str, sampling: f64) -> Mesh {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let tracing = format!("[tracing]\ncollector = \"{collector}\"\nsampling = {sampling:?}\n");

    let ip_c = next_ip();
    let db = HttpApp::start(SocketAddr::new(ip_c.into(), 0), "db")
        .await
        .unwrap();
    let mut c = NodeSpec::new("c", cluster.registry.token(&["db"], 1).unwrap());
    c.ip = ip_c.into();
    c.services = vec![ServiceSpec::new("db", db.addr).protocol("http")];
    c.extra = tracing.clone();
    cluster.add_spec(c).await.unwrap();

    let ip_b = next_ip();
    let api_addr = SocketAddr::new(ip_b.into(), 18081);
    let api_to_db = SocketAddr::new(ip_b.into(), 19502);
    let api = forwarding_app(api_addr, api_to_db).await;
    let mut b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    b.ip = ip_b.into();
    b.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    b.services = vec![
        ServiceSpec::new("api", api_addr)
            .protocol("http")
            .upstream("db", api_to_db),
    ];
    b.extra = tracing.clone();
    cluster.add_spec(b).await.unwrap();

    let ip_a = next_ip();
    let web_to_api = SocketAddr::new(ip_a.into(), 19501);
    let mut a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    a.ip = ip_a.into();
    a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(ip_a.into(), 18080))
            .protocol("http")
            .upstream("api", web_to_api),
    ];
    a.extra = tracing;
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster.nodes[2]
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    cluster.nodes[1]
        .wait_endpoints("default/db", 1)
        .await
        .unwrap();
    Mesh {
        _cluster: cluster,
        _apps: (db, api),
        web_to_api,
    }
}

/// The trace id in a `traceparent`.
fn trace_id_of(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_across_three_services_is_one_trace() {
    let rx = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let m = mesh(&rx.endpoint(), 1.0).await;

    // The app sends no context: web's meshd starts the trace.
    let (status, seen) = get(m.web_to_api, &[]).await;
    assert_eq!(status, 200);
    let trace = trace_id_of(&seen);
    assert_eq!(
        trace.len(),
        32,
        "api got a traceparent from its meshd: {seen:?}"
    );
    let spans = rx.wait_trace(&trace, 4, WAIT).await.unwrap();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |node: &str, kind: SpanKind| {
        spans
            .iter()
            .find(|s| s.node.as_deref() == Some(node) && s.kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} span from {node}: {spans:#?}"))
    };
    let a_out = find("a", SpanKind::Client);
    let b_in = find("b", SpanKind::Server);
    let b_out = find("b", SpanKind::Client);
    let c_in = find("c", SpanKind::Server);
    assert_eq!(a_out.parent_span_id, None, "the root: {a_out:?}");
    assert!(b_in.is_child_of(a_out), "{b_in:?} under {a_out:?}");
    assert!(
        b_out.is_child_of(b_in),
        "api passed b's context on: {b_out:?}"
    );
    assert!(c_in.is_child_of(b_out), "{c_in:?} under {b_out:?}");
    // The app saw b's SERVER span as its parent.
    assert!(
        seen.contains(&b_in.span_id),
        "{seen} names {}",
        b_in.span_id
    );
    assert_eq!(
        c_in.attr_str("meshd.peer.identity"),
        Some("spiffe://mesh.test/ns/default/svc/api")
    );
    assert_eq!(a_out.attr_int("http.response.status_code"), Some(200));
    assert_eq!(c_in.attr_str("meshd.service"), Some("default/db"));
    for s in &spans {
        assert!(s.end_unix_nanos >= s.start_unix_nanos, "{s:?}");
    }
    // Children start after, and end before, their parents.
    assert!(
        c_in.start_unix_nanos >= b_out.start_unix_nanos
            && c_in.end_unix_nanos <= b_out.end_unix_nanos
    );
    assert!(
        b_in.start_unix_nanos >= a_out.start_unix_nanos
            && b_in.end_unix_nanos <= a_out.end_unix_nanos
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_decisions_are_kept_at_zero_percent_sampling() {
    let rx = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let m = mesh(&rx.endpoint(), 0.0).await;

    // No context: nothing sampled, nothing exported, but api still gets a context (flag 00).
    let (status, seen) = get(m.web_to_api, &[]).await;
    assert_eq!(status, 200);
    assert!(
        seen.ends_with("-00"),
        "unsampled context propagated: {seen:?}"
    );

    // A sampled W3C parent from the app: continued on every hop.
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (_, seen) = get(
        m.web_to_api,
        &[("traceparent", &format!("00-{tid}-{parent}-01"))],
    )
    .await;
    assert_eq!(trace_id_of(&seen), tid);
    let spans = rx.wait_trace(tid, 4, WAIT).await.unwrap();
    let root = spans
        .iter()
        .find(|s| s.node.as_deref() == Some("a"))
        .unwrap();
    assert_eq!(
        root.parent_span_id.as_deref(),
        Some(parent),
        "the app's span is the parent"
    );

    // A sampled B3 parent (single header, 64-bit trace id): continued too.
    let (_, seen) = get(
        m.web_to_api,
        &[("b3", "a3ce929d0e0e4736-00f067aa0ba902b8-1")],
    )
    .await;
    let b3_trace = trace_id_of(&seen);
    assert!(b3_trace.ends_with("a3ce929d0e0e4736"), "{seen}");
    rx.wait_trace(&b3_trace, 4, WAIT).await.unwrap();

    // Only the sampled requests were exported: 8 spans, none from the unsampled one.
    assert_eq!(rx.spans().len(), 8, "{:#?}", rx.spans());
}
