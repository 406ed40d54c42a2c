//! A real OTLP/gRPC trace receiver for e2e tests: serves `TraceService/Export` on a loopback
//! address, keeps every span it gets (with its resource's node) for the test to wait on and
//! inspect — trace ids, parent links, kinds, attributes. Stops when dropped.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1 as proto;
use tokio::sync::{oneshot, watch};
use tonic::transport::server::TcpIncoming;

pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

/// A running OTLP/gRPC trace receiver; stops serving when dropped.
pub struct Receiver {
    addr: SocketAddr,
    /// Every span received so far, in arrival order; the server task holds the sender.
    spans_rx: watch::Receiver<Vec<Span>>,
    /// Dropping it (with the receiver) ends the server's graceful shutdown future.
    _stop_tx: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// One received span, flattened with its resource's attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// The parent's span id, `None` for a root.
    pub parent_span_id: Option<String>,
    /// Span name.
    pub name: String,
    /// CLIENT, SERVER, ... (`Unspecified` when the sender sent an unknown value).
    pub kind: SpanKind,
    /// Resource `meshd.node` (else `host.name`): which node recorded the span.
    pub node: Option<String>,
    /// Resource `service.name`.
    pub service: Option<String>,
    /// Span attributes.
    pub attributes: BTreeMap<String, Value>,
    /// Status code (UNSET unless the span failed, for meshd).
    pub status: StatusCode,
    /// Status message.
    pub status_message: String,
    /// W3C `tracestate` the span carried.
    pub trace_state: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// String.
    Str(String),
    /// Integer.
    Int(i64),
    /// Boolean.
    Bool(bool),
    /// Float.
    F64(f64),
    /// Arrays, maps, bytes: not used by meshd, shown as debug text.
    Other(String),
}

#[derive(Clone)]
struct Sink {
    spans_tx: std::sync::Arc<watch::Sender<Vec<Span>>>,
}

// === impl Receiver ===

impl Receiver {
    /// Binds `addr` (port 0 for any) and serves until dropped.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the OTLP receiver on {addr}"))?;
        let addr = listener.local_addr()?;
        let (spans_tx, spans_rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let sink = Sink {
            spans_tx: std::sync::Arc::new(spans_tx),
        };
        let task = tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                    // Err means the Receiver was dropped: stop either way.
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = res {
                eprintln!("otlp receiver on {addr} failed: {e}");
            }
        });
        Ok(Self {
            addr,
            spans_rx,
            _stop_tx: stop_tx,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The collector URI to configure in meshd: `http://<addr>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans_rx.borrow().clone()
    }

    /// Spans of one trace received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans_rx
            .borrow()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for the spans received so far; returns them.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Span]) -> bool,
    ) -> anyhow::Result<Vec<Span>> {
        let mut rx = self.spans_rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|s| done(s))).await {
            Ok(Ok(spans)) => Ok(spans.clone()),
            Ok(Err(_)) => anyhow::bail!("the OTLP receiver stopped while waiting for {what}"),
            Err(_) => anyhow::bail!(
                "timed out after {timeout:?} waiting for {what}; received:\n{}",
                dump(&self.spans())
            ),
        }
    }

    /// Waits until at least `n` spans arrived in total.
    pub async fn wait_spans(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Span>> {
        self.wait_for(timeout, &format!("{n} spans"), |s| s.len() >= n)
            .await
    }

    /// Waits until at least `n` spans of `trace_id` arrived; returns that trace's spans.
    pub async fn wait_trace(
        &self,
        trace_id: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Span>> {
        let what = format!("{n} spans of trace {trace_id}");
        let spans = self
            .wait_for(timeout, &what, |s| {
                s.iter().filter(|s| s.trace_id == trace_id).count() >= n
            })
            .await?;
        Ok(spans
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // The graceful shutdown waits for open connections (meshd keeps its channel open);
        // a test is done with the receiver, so end it now.
        self.task.abort();
    }
}

// === impl Span ===

impl Span {
    /// Whether `parent` is this span's parent.
    pub fn is_child_of(&self, parent: &Span) -> bool {
        self.trace_id == parent.trace_id
            && self.parent_span_id.as_deref() == Some(parent.span_id.as_str())
    }

    /// A string attribute.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute.
    pub fn attr_int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key)? {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn from_proto(span: proto::Span, node: Option<String>, service: Option<String>) -> Self {
        let (status, status_message) = match span.status {
            Some(s) => (
                StatusCode::try_from(s.code).unwrap_or(StatusCode::Unset),
                s.message,
            ),
            None => (StatusCode::Unset, String::new()),
        };
        Self {
            trace_id: hex(&span.trace_id),
            span_id: hex(&span.span_id),
            parent_span_id: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
            name: span.name,
            kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
            node,
            service,
            attributes: span
                .attributes
                .into_iter()
                .map(|kv| (kv.key, Value::from(kv.value)))
                .collect(),
            status,
            status_message,
            trace_state: span.trace_state,
            start_unix_nanos: span.start_time_unix_nano,
            end_unix_nanos: span.end_time_unix_nano,
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} parent={} {:?} {:?} node={}",
            self.name,
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-"),
            self.kind,
            self.status,
            self.node.as_deref().unwrap_or("-"),
        )
    }
}

// === impl Value ===

impl From<Option<AnyValue>> for Value {
    fn from(v: Option<AnyValue>) -> Self {
        match v.and_then(|v| v.value) {
            Some(any_value::Value::StringValue(s)) => Self::Str(s),
            Some(any_value::Value::IntValue(i)) => Self::Int(i),
            Some(any_value::Value::BoolValue(b)) => Self::Bool(b),
            Some(any_value::Value::DoubleValue(d)) => Self::F64(d),
            other => Self::Other(format!("{other:?}")),
        }
    }
}

// === impl Sink ===

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let node =
                string_attr(&attrs, "meshd.node").or_else(|| string_attr(&attrs, "host.name"));
            let service = string_attr(&attrs, "service.name");
            for ss in rs.scope_spans {
                got.extend(
                    ss.spans
                        .into_iter()
                        .map(|s| Span::from_proto(s, node.clone(), service.clone())),
                );
            }
        }
        self.spans_tx.send_modify(|all| all.extend(got));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dump(spans: &[Span]) -> String {
    spans.iter().map(|s| format!("  {s}\n")).collect::<String>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn receives_and_links_spans() {
        let rx = Receiver::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut client = TraceServiceClient::connect(rx.endpoint()).await.unwrap();
        let trace = vec![0xab; 16];
        let parent = proto::Span {
            trace_id: trace.clone(),
            span_id: vec![1; 8],
            name: "GET".into(),
            kind: SpanKind::Client as i32,
            ..Default::default()
        };
        let child = proto::Span {
            trace_id: trace.clone(),
            span_id: vec![2; 8],
            parent_span_id: vec![1; 8],
            name: "GET".into(),
            kind: SpanKind::Server as i32,
            attributes: vec![kv(
                "http.response.status_code",
                any_value::Value::IntValue(200),
            )],
            status: Some(proto::Status {
                message: "boom".into(),
                code: StatusCode::Error as i32,
            }),
            ..Default::default()
        };
        client
            .export(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![
                            kv(
                                "service.name",
                                any_value::Value::StringValue("meshd".into()),
                            ),
                            kv("meshd.node", any_value::Value::StringValue("a".into())),
                        ],
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![parent, child],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
        let id = "ab".repeat(16);
        let spans = rx
            .wait_trace(&id, 2, Duration::from_secs(10))
            .await
            .unwrap();
        let (p, c) = (&spans[0], &spans[1]);
        assert!(c.is_child_of(p) && !p.is_child_of(c));
        assert_eq!(p.parent_span_id, None);
        assert_eq!((p.kind, c.kind), (SpanKind::Client, SpanKind::Server));
        assert_eq!(c.node.as_deref(), Some("a"));
        assert_eq!(c.service.as_deref(), Some("meshd"));
        assert_eq!(c.attr_int("http.response.status_code"), Some(200));
        assert_eq!(
            (c.status, c.status_message.as_str()),
            (StatusCode::Error, "boom")
        );
        assert!(
            rx.wait_spans(3, Duration::from_millis(50)).await.is_err(),
            "only two spans were sent"
        );
        let addr = rx.addr();
        drop(rx);
        // Stopped: the port no longer accepts.
        let mut refused = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(refused, "receiver still accepting after drop");
    }
}
