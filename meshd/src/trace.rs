//! Distributed tracing of meshd's HTTP hops: continue the caller's trace context (W3C or B3),
//! record one span per hop, pass the context on, and export sampled spans over OTLP/gRPC.
//!
//! The proxy calls, per request and hop:
//!
//! ```text
//! let mut span = tracer.span(req.headers(), trace::Kind::Client, "GET");  // extract + sample
//! span.inject(req.headers_mut());          // the next hop sees this span as its parent
//! span.attr(trace::attr::HTTP_REQUEST_METHOD, "GET");
//! span.response_status(resp.status());    // or span.error("upstream reset")
//! span.end();                              // queues it (never blocks) if sampled
//! ```
//!
//! * Context in: a valid `traceparent` wins (its `tracestate` is kept), then `b3`, then
//!   `x-b3-*`; anything malformed is ignored and the hop starts a new trace.
//! * Context out: `traceparent` always, `tracestate` when continued, and B3 in the encoding
//!   the request arrived with; every other incoming context header is removed.
//! * Sampling is parent-based: a caller's sampled / not-sampled (or B3 debug / deny) decides;
//!   a new trace (or B3 ids without a decision) is sampled with probability
//!   [`Settings::sampling`]. Not-sampled requests still carry context (flag `00`).
//! * [`Tracer::disabled`] (and a tracer without a collector) records nothing and leaves the
//!   context headers as they arrived, so a trace passing through a meshd without tracing stays
//!   connected; its spans only report the caller's ids, if any. That is why
//!   [`Span::trace_id`] is an `Option`.
//! * Export runs in [`Exporter::run`]: a bounded queue (span end is a `try_send`), batches of
//!   [`Settings::batch_max`] or every [`Settings::export_interval`], retries with backoff while
//!   the collector is down, counts what it drops, and flushes within
//!   [`Settings::flush_timeout`] on shutdown. Plaintext HTTP/2 only: mTLS to the collector is
//!   out of scope.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, info_span};

mod context;
mod export;
#[cfg(test)]
mod tests;

pub use context::{
    B3Format, Extracted, Outgoing, Parent, Sampling, SpanId, TraceId, decide, extract,
    format_b3_single, format_traceparent, parse_b3_multi, parse_b3_single, parse_traceparent,
};
pub use export::Exporter;

/// New traces sampled when no parent decided: all of them, like Envoy's default; a collector
/// is opt-in, and whoever turns it on wants to see traces. Busy meshes lower it.
pub const DEFAULT_SAMPLING: f64 = 1.0;
/// Resource `service.name` of meshd's spans.
pub const DEFAULT_SERVICE_NAME: &str = "meshd";
/// Spans per export request (the OpenTelemetry SDK's batch default).
pub const DEFAULT_BATCH_MAX: usize = 512;
/// Longest a finished span waits for its batch (the OpenTelemetry SDK's schedule delay).
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Finished spans queued for export; beyond it new spans are dropped and counted (the
/// OpenTelemetry SDK's queue default).
pub const DEFAULT_QUEUE_MAX: usize = 2048;
/// Time the exporter gets on shutdown to send what it holds; short because `app` gives its
/// tasks one second after the shutdown signal before aborting them.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);
/// First delay before retrying a failed export.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest delay between retries while the collector is down.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);
/// Attributes kept per span; more are counted in `dropped_attributes_count`.
pub const MAX_ATTRIBUTES: usize = 64;

/// Attribute keys the proxy uses (OpenTelemetry semantic conventions where one exists).
pub mod attr {
    /// `GET`, `POST`, ...
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    /// Response status code (int).
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    /// Request path.
    pub const URL_PATH: &str = "url.path";
    /// Host the client asked for (the `:authority` / `Host`).
    pub const SERVER_ADDRESS: &str = "server.address";
    /// Address of the other end of the connection (the remote meshd or the local app).
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    /// `h2`, `1.1`.
    pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
    /// Why a request failed, when it did (`timeout`, `no_endpoints`, `cancelled`, ...).
    pub const ERROR_TYPE: &str = "error.type";
    /// Mesh service called, `namespace/name`.
    pub const MESH_SERVICE: &str = "meshd.service";
    /// Identity of the peer (SPIFFE URI) as the mTLS handshake proved it.
    pub const MESH_PEER_IDENTITY: &str = "meshd.peer.identity";
}

/// Everything the tracer needs from configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// OTLP/gRPC collector, `http://host:port` (plaintext HTTP/2); `None` turns export and
    /// recording off (context headers then pass through untouched).
    pub collector: Option<http::Uri>,
    /// Probability (0.0..=1.0) that a trace without a parent decision is sampled.
    pub sampling: f64,
    /// Resource `service.name`.
    pub service_name: String,
    /// This node's name: resource `host.name` and `meshd.node`.
    pub node: String,
    /// Spans per export request.
    pub batch_max: usize,
    /// Longest a finished span waits before its (partial) batch is sent.
    pub export_interval: Duration,
    /// Finished spans waiting for export; beyond it spans are dropped and counted.
    pub queue_max: usize,
    /// Time to send what is queued once shutdown is signalled.
    pub flush_timeout: Duration,
    /// First retry delay after a failed export; doubles up to `retry_max` (with jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// Configuration problems (from [`Settings::problems`]) and export failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `sampling` is not a probability.
    #[error("trace sampling {0} is outside 0.0..=1.0")]
    SamplingOutOfRange(f64),
    /// Only plaintext OTLP/gRPC is implemented.
    #[error(
        "trace collector {0} is not an http://host:port address (OTLP/gRPC over plaintext \
         HTTP/2; TLS to the collector is not supported)"
    )]
    UnsupportedCollector(String),
    /// A size or interval that must be positive is zero.
    #[error("trace setting {0} must be greater than zero")]
    ZeroSetting(&'static str),
    /// Connecting failed.
    #[error("cannot connect to the trace collector {uri}, maybe it is not running")]
    CollectorUnreachable {
        /// The collector.
        uri: String,
        /// Transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The export RPC failed.
    #[error("the trace collector did not accept the export ({})", .0.code())]
    ExportFailed(#[source] tonic::Status),
    /// The export RPC did not finish in time.
    #[error("the trace export timed out, maybe the collector is overloaded")]
    ExportTimedOut,
}

/// Span kind: which side of a hop the span describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Outbound hop: meshd sends the request on (app → local meshd → remote meshd).
    Client,
    /// Inbound hop: meshd receives the request for a local app (remote meshd → app).
    Server,
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
}

/// Records spans and hands them to the exporter. Cheap to clone; all clones feed one queue.
/// `Default` is [`Tracer::disabled`].
#[derive(Clone, Default)]
pub struct Tracer {
    /// `None`: disabled (nothing recorded, headers untouched).
    inner: Option<Shared>,
}

#[derive(Clone)]
struct Shared {
    sampling: f64,
    /// The exporter owns the receiver; once it has stopped, sends fail and count as dropped.
    spans_tx: mpsc::Sender<Finished>,
    metrics: Metrics,
}

/// One hop of one request. Ends (and is queued, if sampled) on [`Span::end`]; a span dropped
/// without `end` (the request future was cancelled) ends too, with `error.type=cancelled`.
pub struct Span {
    /// Ids and decision: ours when the tracer is enabled, the caller's when it is disabled.
    context: Option<Outgoing>,
    /// Whether [`Span::inject`] writes `context` (false for a disabled tracer).
    propagate: bool,
    /// Present while a sampled span of an enabled tracer is open.
    recording: Option<Box<Recording>>,
}

struct Recording {
    span: Finished,
    started: tokio::time::Instant,
    spans_tx: mpsc::Sender<Finished>,
    metrics: Metrics,
}

/// A span as the exporter gets it.
#[derive(Debug, Clone, PartialEq)]
struct Finished {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    trace_state: Option<String>,
    name: String,
    kind: Kind,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    attributes: Vec<(&'static str, Value)>,
    dropped_attributes: u32,
    /// `Some(message)`: status ERROR; `None`: UNSET (OpenTelemetry's advice for success).
    error: Option<String>,
}

/// Tracing metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `meshd_trace_spans_exported_total`: spans the collector accepted.
    exported: Counter,
    /// `meshd_trace_spans_dropped_total{reason}`: `queue_full`, `export_failed` (retries
    /// exhausted or a permanent error), `rejected` (the collector refused some), `shutdown`.
    dropped: Family<DropLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

// === impl Settings ===

impl Settings {
    /// Defaults for `node`, export off.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            collector: None,
            sampling: DEFAULT_SAMPLING,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            node: node.into(),
            batch_max: DEFAULT_BATCH_MAX,
            export_interval: DEFAULT_EXPORT_INTERVAL,
            queue_max: DEFAULT_QUEUE_MAX,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            retry_base: DEFAULT_RETRY_BASE,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }

    /// Every problem, for the config layer to report together with its own.
    pub fn problems(&self) -> Vec<Error> {
        let mut out = Vec::new();
        if !(0.0..=1.0).contains(&self.sampling) {
            out.push(Error::SamplingOutOfRange(self.sampling));
        }
        if let Some(uri) = &self.collector
            && (uri.scheme_str() != Some("http") || uri.authority().is_none())
        {
            out.push(Error::UnsupportedCollector(uri.to_string()));
        }
        for (name, zero) in [
            ("batch_max", self.batch_max == 0),
            ("queue_max", self.queue_max == 0),
            ("export_interval", self.export_interval.is_zero()),
        ] {
            if zero {
                out.push(Error::ZeroSetting(name));
            }
        }
        out
    }
}

// === impl Error ===

impl Error {
    /// Whether the same export may succeed later (OTLP's retryable gRPC codes; connection
    /// failures and timeouts are).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::CollectorUnreachable { .. } | Self::ExportTimedOut => true,
            Self::ExportFailed(status) => export::is_retryable(status.code()),
            Self::SamplingOutOfRange(_) | Self::UnsupportedCollector(_) | Self::ZeroSetting(_) => {
                false
            }
        }
    }
}

// === impl Value ===

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}

impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Self::Int(v.into())
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Self::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::F64(v)
    }
}

// === impl Tracer ===

impl Tracer {
    /// A tracer that records nothing and leaves context headers as they are.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// A tracer and its exporter; the caller runs [`Exporter::run`] (in the task set it
    /// waits for at shutdown, so the flush is not cut short). Without a collector the tracer
    /// is [`Tracer::disabled`] and the exporter returns at once.
    pub fn new(settings: Settings, metrics: Metrics) -> (Self, Exporter) {
        let Some(collector) = settings.collector.clone() else {
            return (Self::disabled(), Exporter::idle());
        };
        let (spans_tx, spans_rx) = mpsc::channel(settings.queue_max.max(1));
        let tracer = Self {
            inner: Some(Shared {
                sampling: settings.sampling,
                spans_tx,
                metrics: metrics.clone(),
            }),
        };
        (
            tracer,
            Exporter::new(collector, settings, metrics, spans_rx),
        )
    }

    /// [`Tracer::new`] with the exporter spawned on the current runtime, fire-and-forget: it
    /// flushes and stops when `shutdown_rx` turns true (or its sender is dropped).
    pub fn start(settings: Settings, metrics: Metrics, shutdown_rx: watch::Receiver<bool>) -> Self {
        let (tracer, exporter) = Self::new(settings, metrics);
        tokio::spawn(exporter.run(shutdown_rx).instrument(info_span!("trace")));
        tracer
    }

    /// Whether spans can be recorded (a collector is configured).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts the span of one hop: reads the request's context, decides sampling, and (when
    /// enabled) picks a new span id, parented to the caller's span if there is one.
    pub fn span(&self, headers: &HeaderMap, kind: Kind, name: impl Into<String>) -> Span {
        self.span_named(headers, kind, || name.into())
    }

    /// [`Tracer::span`] with the name made only if the span is recorded (most requests are
    /// not sampled; the proxy's names are formatted).
    pub fn span_named(
        &self,
        headers: &HeaderMap,
        kind: Kind,
        name: impl FnOnce() -> String,
    ) -> Span {
        let incoming = extract(headers);
        let Some(shared) = &self.inner else {
            return Span::passthrough(&incoming);
        };
        let trace_id = incoming.parent.map_or_else(TraceId::random, |p| p.trace_id);
        let sampled = decide(incoming.sampling, trace_id, shared.sampling);
        let context = Outgoing {
            trace_id,
            span_id: SpanId::random(),
            sampled,
            debug: incoming.sampling == Sampling::Debug,
            trace_state: incoming.trace_state,
            b3: incoming.b3,
        };
        let recording = sampled.then(|| {
            Box::new(Recording {
                span: Finished {
                    trace_id,
                    span_id: context.span_id,
                    parent: incoming.parent.map(|p| p.span_id),
                    trace_state: context.trace_state.clone(),
                    name: name(),
                    kind,
                    start_unix_nanos: unix_nanos(SystemTime::now()),
                    end_unix_nanos: 0,
                    attributes: Vec::new(),
                    dropped_attributes: 0,
                    error: None,
                },
                started: tokio::time::Instant::now(),
                spans_tx: shared.spans_tx.clone(),
                metrics: shared.metrics.clone(),
            })
        });
        Span {
            context: Some(context),
            propagate: true,
            recording,
        }
    }
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.is_enabled())
            .field("sampling", &self.inner.as_ref().map(|s| s.sampling))
            .finish()
    }
}

// === impl Span ===

impl Span {
    /// A span of a disabled tracer: the caller's ids, nothing written, nothing recorded.
    fn passthrough(incoming: &Extracted) -> Self {
        let context = incoming.parent.map(|p| Outgoing {
            trace_id: p.trace_id,
            span_id: p.span_id,
            sampled: matches!(incoming.sampling, Sampling::Sampled | Sampling::Debug),
            debug: incoming.sampling == Sampling::Debug,
            trace_state: None,
            b3: incoming.b3,
        });
        Self {
            context,
            propagate: false,
            recording: None,
        }
    }

    /// The trace (for logs); `None` only for a disabled tracer and a request without context.
    pub fn trace_id(&self) -> Option<TraceId> {
        self.context.as_ref().map(|c| c.trace_id)
    }

    /// This hop's span id (the caller's for a disabled tracer).
    pub fn span_id(&self) -> Option<SpanId> {
        self.context.as_ref().map(|c| c.span_id)
    }

    /// Whether the trace is sampled (what the next hop is told).
    pub fn sampled(&self) -> bool {
        self.context.as_ref().is_some_and(|c| c.sampled)
    }

    /// Whether this span is being recorded; skip building costly attributes when not.
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Writes the context for the next hop, with this span as the parent, replacing every
    /// context header the request came with. A disabled tracer's span writes nothing.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let (true, Some(context)) = (self.propagate, &self.context) {
            context.inject(headers);
        }
    }

    /// Sets an attribute (last value for a key wins); no-op unless recording.
    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        let Some(rec) = &mut self.recording else {
            return;
        };
        let attrs = &mut rec.span.attributes;
        if let Some(slot) = attrs.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value.into();
        } else if attrs.len() < MAX_ATTRIBUTES {
            attrs.push((key, value.into()));
        } else {
            rec.span.dropped_attributes = rec.span.dropped_attributes.saturating_add(1);
        }
    }

    /// Marks the span failed (status ERROR with `message`).
    pub fn error(&mut self, message: impl Into<String>) {
        if let Some(rec) = &mut self.recording {
            rec.span.error = Some(message.into());
        }
    }

    /// Records the response status and, per the HTTP semantic conventions, marks the span
    /// failed for 5xx (and, on the client side, 4xx).
    pub fn response_status(&mut self, status: http::StatusCode) {
        if !self.is_recording() {
            return;
        }
        self.attr(attr::HTTP_RESPONSE_STATUS_CODE, status.as_u16());
        let kind = self.recording.as_ref().map(|r| r.span.kind);
        if kind.is_some_and(|k| is_error_status(k, status)) {
            self.error(status.to_string());
        }
    }

    /// Ends the span now; a sampled one is queued for export without waiting (if the queue
    /// is full it is dropped and counted).
    pub fn end(mut self) {
        if let Some(rec) = self.recording.take() {
            (*rec).finish();
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut rec) = self.recording.take() {
            // Dropped without `end`: the request future was cancelled (client went away).
            rec.span
                .attributes
                .push((attr::ERROR_TYPE, Value::Str("cancelled".to_owned())));
            (*rec).finish();
        }
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Span")
            .field("trace_id", &self.trace_id())
            .field("span_id", &self.span_id())
            .field("sampled", &self.sampled())
            .field("recording", &self.is_recording())
            .finish()
    }
}

// === impl Recording ===

impl Recording {
    fn finish(self) {
        let Self {
            mut span,
            started,
            spans_tx,
            metrics,
        } = self;
        // Wall clock at the start plus monotonic elapsed: a clock step mid-request cannot
        // give a span a negative duration.
        let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        span.end_unix_nanos = span.start_unix_nanos.saturating_add(elapsed);
        match spans_tx.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => metrics.drop_spans("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => metrics.drop_spans("shutdown", 1),
        }
    }
}

// === impl Metrics ===

impl Metrics {
    /// Registers `meshd_trace_spans_exported_total` and `meshd_trace_spans_dropped_total`.
    pub fn new(reg: &mut Registry) -> Self {
        let m = Self {
            exported: Counter::default(),
            dropped: Family::default(),
        };
        reg.register(
            "meshd_trace_spans_exported",
            "Spans the trace collector accepted",
            m.exported.clone(),
        );
        reg.register(
            "meshd_trace_spans_dropped",
            "Spans not exported, by reason (queue_full, export_failed, rejected, shutdown)",
            m.dropped.clone(),
        );
        m
    }

    /// Spans exported so far.
    pub fn exported(&self) -> u64 {
        self.exported.get()
    }

    /// Spans dropped so far for `reason`.
    pub fn dropped(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }

    fn drop_spans(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
        }
    }
}

/// HTTP semantic conventions: a server span fails on 5xx only (a 4xx is the client's
/// fault, not the server's); a client span fails on 4xx and 5xx.
pub fn is_error_status(kind: Kind, status: http::StatusCode) -> bool {
    match kind {
        Kind::Server => status.is_server_error(),
        Kind::Client => status.is_client_error() || status.is_server_error(),
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
