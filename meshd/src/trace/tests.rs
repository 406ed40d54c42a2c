//! Tracer and exporter tests: spans recorded at two hops reach a real OTLP/gRPC server on
//! loopback with the right ids, kinds and attributes; a full queue drops and counts; a
//! collector that comes up late gets later spans; shutdown flushes. Plus the small tables.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1 as proto;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use super::*;

/// Longest any condition is waited for; generous for a loaded CI machine.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";

/// A span as the test collector got it, with its resource's `meshd.node`.
#[derive(Debug, Clone)]
struct Got {
    node: String,
    span: proto::Span,
}

/// Minimal OTLP/gRPC trace collector on loopback; stops when dropped.
struct TestCollector {
    addr: SocketAddr,
    spans_rx: watch::Receiver<Vec<Got>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Sink(Arc<watch::Sender<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let node = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "meshd.node")
                .and_then(|kv| str_value(kv.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|span| Got {
                    node: node.clone(),
                    span,
                }));
            }
        }
        self.0.send_modify(|v| v.extend(got));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl TestCollector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let (tx, spans_rx) = watch::channel(Vec::new());
        let svc = TraceServiceServer::new(Sink(Arc::new(tx)));
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Self {
            addr,
            spans_rx,
            task,
        }
    }

    fn uri(&self) -> http::Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    /// Waits until at least `n` spans arrived; returns all so far.
    async fn wait_spans(&self, n: usize) -> Vec<Got> {
        let mut rx = self.spans_rx.clone();
        tokio::time::timeout(WAIT, rx.wait_for(|v| v.len() >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} spans"))
            .unwrap()
            .clone()
    }

    /// Waits for a span of `trace_id`.
    async fn wait_trace(&self, trace_id: TraceId) -> Got {
        let id = trace_id.to_bytes().to_vec();
        let mut rx = self.spans_rx.clone();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|v| v.iter().any(|g| g.span.trace_id == id)),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for a span of trace {trace_id}"))
        .unwrap()
        .iter()
        .find(|g| g.span.trace_id == id)
        .cloned()
        .unwrap()
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn str_value(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> Option<String> {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn attr_of<'a>(span: &'a proto::Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn settings(collector: Option<http::Uri>) -> Settings {
    Settings {
        collector,
        export_interval: Duration::from_millis(20),
        flush_timeout: Duration::from_secs(2),
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        ..Settings::new("node-a")
    }
}

fn metrics() -> Metrics {
    Metrics::new(&mut Registry::default())
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {WAIT:?} waiting for {what}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn two_hops_export_linked_spans() {
    let collector = TestCollector::start().await;
    let m = metrics();
    let (tracer, exporter) = Tracer::new(settings(Some(collector.uri())), m.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(exporter.run(shutdown_rx));

    // Outbound hop: the app sent a sampled W3C context and B3 multi.
    let app = headers(&[
        ("traceparent", &format!("00-{T}-{S}-01")),
        ("tracestate", "vendor=1"),
        ("x-b3-traceid", T),
        ("x-b3-spanid", S),
        ("x-b3-sampled", "1"),
    ]);
    let mut client = tracer.span(&app, Kind::Client, "GET");
    assert!(client.is_recording());
    assert_eq!(client.trace_id().unwrap().to_string(), T);
    let mut wire = app.clone();
    client.inject(&mut wire);
    let client_id = client.span_id().unwrap();
    assert_eq!(
        wire.get("traceparent").unwrap(),
        &format!("00-{T}-{client_id}-01")
    );
    assert_eq!(wire.get("tracestate").unwrap(), "vendor=1");
    assert_eq!(wire.get("x-b3-spanid").unwrap(), &client_id.to_string());

    // Inbound hop on the other node: continues the outbound span.
    let mut server = tracer.span(&wire, Kind::Server, "GET");
    let mut to_app = wire.clone();
    server.inject(&mut to_app);
    let server_id = server.span_id().unwrap();
    server.attr(attr::HTTP_REQUEST_METHOD, "GET");
    server.attr(attr::URL_PATH, "/a");
    server.attr("meshd.retries", 2u32);
    server.attr("meshd.tls", true);
    server.attr("meshd.ratio", 0.5);
    server.response_status(StatusCode::NOT_FOUND);
    server.end();
    client.response_status(StatusCode::NOT_FOUND);
    client.end();

    // A new root, and a span dropped without end (cancelled request).
    let root = tracer.span(&HeaderMap::new(), Kind::Server, "POST");
    let root_trace = root.trace_id().unwrap();
    root.end();
    let cancelled = tracer.span(&HeaderMap::new(), Kind::Client, "GET");
    let cancelled_trace = cancelled.trace_id().unwrap();
    drop(cancelled);

    // Not sampled upstream: context continues with flag 00, nothing is recorded.
    let unsampled = tracer.span(
        &headers(&[("traceparent", &format!("00-{T}-{S}-00"))]),
        Kind::Client,
        "GET",
    );
    assert!(!unsampled.is_recording() && !unsampled.sampled());
    let mut h = HeaderMap::new();
    unsampled.inject(&mut h);
    assert!(
        h.get("traceparent")
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-00")
    );
    unsampled.end();

    let got = collector.wait_spans(4).await;
    assert_eq!(got.len(), 4, "{got:#?}");
    let find = |id: SpanId| {
        got.iter()
            .find(|g| g.span.span_id == id.to_bytes())
            .unwrap_or_else(|| panic!("span {id} not exported"))
    };
    let (c, s) = (find(client_id), find(server_id));
    assert_eq!(c.node, "node-a");
    assert_eq!(c.span.trace_id, tid_bytes(T));
    assert_eq!(s.span.trace_id, tid_bytes(T));
    assert_eq!(
        c.span.parent_span_id,
        SpanId::from_hex(S).unwrap().to_bytes()
    );
    assert_eq!(s.span.parent_span_id, client_id.to_bytes());
    assert_eq!(c.span.kind, proto::span::SpanKind::Client as i32);
    assert_eq!(s.span.kind, proto::span::SpanKind::Server as i32);
    assert_eq!(c.span.trace_state, "vendor=1");
    assert!(c.span.start_time_unix_nano > 0);
    assert!(c.span.end_time_unix_nano >= c.span.start_time_unix_nano);
    // 404: an error for the client side only.
    let status = |g: &Got| g.span.status.clone().map(|s| s.code);
    assert_eq!(status(c), Some(proto::status::StatusCode::Error as i32));
    assert_eq!(status(s), None);
    assert_eq!(
        attr_of(&s.span, attr::HTTP_RESPONSE_STATUS_CODE),
        Some(&any_value::Value::IntValue(404))
    );
    assert_eq!(
        attr_of(&s.span, attr::URL_PATH),
        Some(&any_value::Value::StringValue("/a".into()))
    );
    assert_eq!(
        attr_of(&s.span, "meshd.retries"),
        Some(&any_value::Value::IntValue(2))
    );
    assert_eq!(
        attr_of(&s.span, "meshd.tls"),
        Some(&any_value::Value::BoolValue(true))
    );
    assert_eq!(
        attr_of(&s.span, "meshd.ratio"),
        Some(&any_value::Value::DoubleValue(0.5))
    );
    let r = got
        .iter()
        .find(|g| g.span.trace_id == root_trace.to_bytes())
        .unwrap();
    assert!(r.span.parent_span_id.is_empty());
    let x = got
        .iter()
        .find(|g| g.span.trace_id == cancelled_trace.to_bytes())
        .unwrap();
    assert_eq!(
        attr_of(&x.span, attr::ERROR_TYPE),
        Some(&any_value::Value::StringValue("cancelled".into()))
    );

    eventually("4 spans counted as exported", || m.exported() == 4).await;
    shutdown_tx.send_replace(true);
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(m.dropped("shutdown"), 0);
}

fn tid_bytes(hex: &str) -> Vec<u8> {
    TraceId::from_hex(hex).unwrap().to_bytes().to_vec()
}

#[tokio::test(flavor = "current_thread")]
async fn full_queue_drops_and_counts() {
    let collector = TestCollector::start().await;
    let m = metrics();
    let s = Settings {
        queue_max: 2,
        ..settings(Some(collector.uri()))
    };
    // The exporter is not running yet, so nothing drains the queue.
    let (tracer, exporter) = Tracer::new(s, m.clone());
    let traces: Vec<TraceId> = (0..5)
        .map(|_| {
            let span = tracer.span(&HeaderMap::new(), Kind::Client, "GET");
            let id = span.trace_id().unwrap();
            span.end();
            id
        })
        .collect();
    assert_eq!(m.dropped("queue_full"), 3);

    let (_shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(exporter.run(shutdown_rx));
    let got = collector.wait_spans(2).await;
    let ids: Vec<Vec<u8>> = got.iter().map(|g| g.span.trace_id.clone()).collect();
    // The first two were queued; the later three were the ones dropped.
    assert_eq!(
        ids,
        traces[..2]
            .iter()
            .map(|t| t.to_bytes().to_vec())
            .collect::<Vec<_>>()
    );
    eventually("2 spans counted as exported", || m.exported() == 2).await;
}

/// A loopback socket that is bound but not listening: connecting is refused until
/// [`listen`] — a collector that is down, on an address no one else can take meanwhile.
fn bound_not_listening() -> (socket2::Socket, SocketAddr) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    (sock, addr)
}

fn listen(sock: socket2::Socket) -> tokio::net::TcpListener {
    sock.listen(128).unwrap();
    sock.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(sock.into()).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn collector_down_then_up_gets_later_spans() {
    let (sock, addr) = bound_not_listening();
    let m = metrics();
    let uri: http::Uri = format!("http://{addr}").parse().unwrap();
    let (tracer, exporter) = Tracer::new(settings(Some(uri)), m.clone());
    let (_shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(exporter.run(shutdown_rx));

    // While the collector is down: ending a span never waits, the batch is retried and
    // finally dropped and counted.
    tracer.span(&HeaderMap::new(), Kind::Client, "GET").end();
    eventually("the batch to be given up", || {
        m.dropped("export_failed") == 1
    })
    .await;
    assert_eq!(m.exported(), 0);

    let collector = TestCollector::serve(listen(sock));
    let later = tracer.span(&HeaderMap::new(), Kind::Server, "GET");
    let trace_id = later.trace_id().unwrap();
    later.end();
    let got = collector.wait_trace(trace_id).await;
    assert_eq!(got.span.kind, proto::span::SpanKind::Server as i32);
    eventually("the later span counted as exported", || m.exported() == 1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_flushes_what_is_queued() {
    let collector = TestCollector::start().await;
    let m = metrics();
    let s = Settings {
        // Nothing would be sent before shutdown without the flush.
        export_interval: Duration::from_secs(3600),
        batch_max: 2,
        ..settings(Some(collector.uri()))
    };
    let (tracer, exporter) = Tracer::new(s, m.clone());
    for _ in 0..5 {
        tracer.span(&HeaderMap::new(), Kind::Client, "GET").end();
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(exporter.run(shutdown_rx));
    // Two full batches go out at once; the fifth span waits for the interval.
    collector.wait_spans(4).await;
    shutdown_tx.send_replace(true);
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(collector.wait_spans(5).await.len(), 5);
    assert_eq!(m.exported(), 5);
    // After the exporter stopped, spans are dropped and counted, not queued forever.
    tracer.span(&HeaderMap::new(), Kind::Client, "GET").end();
    assert_eq!(m.dropped("shutdown"), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_with_collector_down_is_bounded() {
    let (_sock, addr) = bound_not_listening();
    let m = metrics();
    let s = Settings {
        collector: Some(format!("http://{addr}").parse().unwrap()),
        export_interval: Duration::from_secs(3600),
        ..settings(None)
    };
    let (tracer, exporter) = Tracer::new(s, m.clone());
    for _ in 0..3 {
        tracer.span(&HeaderMap::new(), Kind::Client, "GET").end();
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(exporter.run(shutdown_rx));
    shutdown_tx.send_replace(true);
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(m.dropped("shutdown") + m.dropped("export_failed"), 3);
    assert_eq!(m.exported(), 0);
}

#[test]
fn disabled_tracer_passes_context_through() {
    let tracer = Tracer::disabled();
    assert!(!tracer.is_enabled());
    let incoming = headers(&[
        ("b3", &format!("{T}-{S}-1")),
        ("tracestate", "x=y"),
        ("x-app", "1"),
    ]);
    let span = tracer.span(&incoming, Kind::Server, "GET");
    assert_eq!(span.trace_id().unwrap().to_string(), T);
    assert_eq!(span.span_id().unwrap().to_string(), S);
    assert!(span.sampled() && !span.is_recording());
    let mut out = incoming.clone();
    span.inject(&mut out);
    assert_eq!(out, incoming);
    span.end();

    let none = tracer.span(&HeaderMap::new(), Kind::Client, "GET");
    assert_eq!(none.trace_id(), None);
    let mut out = HeaderMap::new();
    none.inject(&mut out);
    assert!(out.is_empty());

    // No collector configured is the same as disabled.
    let (t, _exporter) = Tracer::new(Settings::new("n"), metrics());
    assert!(!t.is_enabled());
}

#[test]
fn enabled_tracer_follows_parent_and_ratio() {
    let uri: http::Uri = "http://127.0.0.1:1".parse().unwrap();
    let never = Settings {
        sampling: 0.0,
        ..settings(Some(uri))
    };
    let (tracer, _exporter) = Tracer::new(never, metrics());

    // New root with ratio 0: not recorded, but context goes on with flag 00.
    let root = tracer.span(&HeaderMap::new(), Kind::Client, "GET");
    assert!(!root.sampled() && !root.is_recording());
    let mut h = HeaderMap::new();
    root.inject(&mut h);
    let tp = h.get("traceparent").unwrap().to_str().unwrap().to_owned();
    assert_eq!(
        tp,
        format_traceparent(root.trace_id().unwrap(), root.span_id().unwrap(), false)
    );
    assert!(h.get("b3").is_none());

    // A sampled parent wins over ratio 0; B3 single comes back as B3 single.
    let child = tracer.span(
        &headers(&[("b3", &format!("{T}-{S}-1"))]),
        Kind::Server,
        "GET",
    );
    assert!(child.sampled() && child.is_recording());
    let mut h = headers(&[("b3", "stale"), ("x-b3-sampled", "1")]);
    child.inject(&mut h);
    let id = child.span_id().unwrap();
    assert_ne!(id.to_string(), S);
    assert_eq!(h.get("b3").unwrap(), &format!("{T}-{id}-1"));
    assert!(h.get("x-b3-sampled").is_none());
    assert_eq!(h.get("traceparent").unwrap(), &format!("00-{T}-{id}-01"));

    // `b3: 0` denies even with ratio 1.
    let (always, _exporter) = Tracer::new(
        settings(Some("http://127.0.0.1:1".parse().unwrap())),
        metrics(),
    );
    let denied = always.span(&headers(&[("b3", "0")]), Kind::Server, "GET");
    assert!(!denied.sampled());
    let mut h = HeaderMap::new();
    denied.inject(&mut h);
    assert!(h.get("b3").unwrap().to_str().unwrap().ends_with("-0"));
}

#[test]
fn attribute_limit() {
    let (tracer, _exporter) = Tracer::new(
        settings(Some("http://127.0.0.1:1".parse().unwrap())),
        metrics(),
    );
    let mut span = tracer.span(&HeaderMap::new(), Kind::Client, "GET");
    span.attr("a", 1i64);
    span.attr("a", 2i64);
    let rec = span.recording.as_ref().unwrap();
    assert_eq!(rec.span.attributes, vec![("a", Value::Int(2))]);
    // Setting a key again replaces its value and never counts as dropped.
    for _ in 0..MAX_ATTRIBUTES + 5 {
        span.attr("b", "x");
    }
    assert_eq!(span.recording.as_ref().unwrap().span.dropped_attributes, 0);
    let rec = span.recording.as_mut().unwrap();
    rec.span
        .attributes
        .resize(MAX_ATTRIBUTES, ("z", Value::Bool(true)));
    span.attr("c", 1i64);
    assert_eq!(span.recording.as_ref().unwrap().span.dropped_attributes, 1);
}

#[test]
fn settings_problems() {
    let ok = Settings {
        collector: Some("http://127.0.0.1:4317".parse().unwrap()),
        ..Settings::new("n")
    };
    assert!(ok.problems().is_empty());
    let cases: Vec<(Settings, Vec<&str>)> = vec![
        (
            Settings {
                sampling: 1.5,
                ..ok.clone()
            },
            vec!["sampling 1.5"],
        ),
        (
            Settings {
                sampling: -0.1,
                ..ok.clone()
            },
            vec!["sampling -0.1"],
        ),
        (
            Settings {
                sampling: f64::NAN,
                ..ok.clone()
            },
            vec!["sampling NaN"],
        ),
        (
            Settings {
                collector: Some("https://c:4317".parse().unwrap()),
                ..ok.clone()
            },
            vec!["https://c:4317"],
        ),
        (
            Settings {
                collector: Some("/just/a/path".parse().unwrap()),
                ..ok.clone()
            },
            vec!["/just/a/path"],
        ),
        (
            Settings {
                batch_max: 0,
                queue_max: 0,
                export_interval: Duration::ZERO,
                ..ok
            },
            vec!["batch_max", "queue_max", "export_interval"],
        ),
    ];
    for (s, want) in cases {
        let got: Vec<String> = s.problems().iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(g.contains(w), "{g:?} should mention {w:?}");
        }
    }
}

#[test]
fn error_status_by_kind() {
    let cases = [
        (Kind::Client, 200, false),
        (Kind::Client, 302, false),
        (Kind::Client, 404, true),
        (Kind::Client, 503, true),
        (Kind::Server, 200, false),
        (Kind::Server, 404, false),
        (Kind::Server, 500, true),
        (Kind::Server, 504, true),
    ];
    for (kind, code, want) in cases {
        let status = StatusCode::from_u16(code).unwrap();
        assert_eq!(is_error_status(kind, status), want, "{kind:?} {code}");
    }
}

#[test]
fn retryable_codes() {
    use tonic::Code;
    let cases = [
        (Code::Unavailable, true),
        (Code::DeadlineExceeded, true),
        (Code::ResourceExhausted, true),
        (Code::Aborted, true),
        (Code::Cancelled, true),
        (Code::OutOfRange, true),
        (Code::DataLoss, true),
        (Code::InvalidArgument, false),
        (Code::Unauthenticated, false),
        (Code::PermissionDenied, false),
        (Code::Unimplemented, false),
        (Code::Internal, false),
        (Code::NotFound, false),
    ];
    for (code, want) in cases {
        assert_eq!(export::is_retryable(code), want, "{code:?}");
    }
}

#[test]
fn request_carries_resource_and_scope() {
    let s = Settings::new("node-b");
    let finished = Finished {
        trace_id: TraceId::from_hex(T).unwrap(),
        span_id: SpanId::from_hex(S).unwrap(),
        parent: None,
        trace_state: None,
        name: "GET".into(),
        kind: Kind::Server,
        start_unix_nanos: 10,
        end_unix_nanos: 20,
        attributes: vec![],
        dropped_attributes: 0,
        error: Some("boom".into()),
    };
    let req = export::request(&export::resource(&s), &[finished]);
    let rs = &req.resource_spans[0];
    let attrs: Vec<(String, Option<String>)> = rs
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.as_ref().and_then(str_value)))
        .collect();
    assert_eq!(
        attrs,
        vec![
            ("service.name".into(), Some("meshd".into())),
            ("host.name".into(), Some("node-b".into())),
            ("meshd.node".into(), Some("node-b".into())),
        ]
    );
    let ss = &rs.scope_spans[0];
    assert_eq!(ss.scope.as_ref().unwrap().name, "meshd");
    let span = &ss.spans[0];
    assert_eq!(
        (span.start_time_unix_nano, span.end_time_unix_nano),
        (10, 20)
    );
    assert!(span.parent_span_id.is_empty());
    // Sampled, parent-is-remote known (and false for a root).
    assert_eq!(span.flags, 0x101);
    assert_eq!(span.status.as_ref().unwrap().message, "boom");
}
