//! The OTLP/gRPC span exporter: drains the tracer's bounded queue into batches, sends them
//! with `TraceService/Export`, retries with backoff while the collector is down, counts what
//! it drops, and flushes on shutdown under a deadline.
//!
//! Plaintext HTTP/2 only: the collector is expected on the host or a trusted network
//! segment. mTLS to the collector is out of scope for now (it would take a client config
//! from the identity watch, as the proxy's does).

use std::time::Duration;

use mesh_runtime::backoff::Backoff;
use mesh_runtime::drain;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{self as proto, ResourceSpans, ScopeSpans, status};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::{Error, Finished, Kind, Metrics, Settings, Value};

/// Tries per batch before it is dropped (`export_failed`) while the collector stays down;
/// with the default backoff that is about half a minute.
pub const MAX_EXPORT_ATTEMPTS: u32 = 5;
/// Connecting to the collector (TCP + HTTP/2) may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One export RPC may take this long (the OTLP exporter default).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// W3C trace-flags "sampled" bit in OTLP `Span.flags`; every exported span is sampled.
const FLAG_SAMPLED: u32 = 0x01;
/// OTLP `Span.flags`: whether the parent is remote is known…
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// …and it is (our parents always come from a request header).
const FLAG_IS_REMOTE: u32 = 0x200;

/// Sends finished spans to the collector; runs until shutdown (see [`Exporter::run`]).
pub struct Exporter {
    /// `None` when export is off: `run` returns at once.
    inner: Option<Inner>,
}

struct Inner {
    settings: Settings,
    metrics: Metrics,
    /// The [`super::Tracer`] clones and their open spans hold the senders; closed here on
    /// shutdown so late spans are counted as dropped rather than left in the queue.
    spans_rx: mpsc::Receiver<Finished>,
    resource: Resource,
    collector: Collector,
}

/// The connection to the collector, made on first use and again after it broke.
struct Collector {
    uri: String,
    endpoint: Endpoint,
    client: Option<TraceServiceClient<Channel>>,
    /// Last known state, so the logs say "down" and "back" once each, not per batch.
    up: Option<bool>,
}

/// How the send loop ended.
enum Sent {
    Done,
    /// Shutdown was signalled; the flush must end by this instant.
    Shutdown(Instant),
}

// === impl Exporter ===

impl Exporter {
    pub(super) fn idle() -> Self {
        Self { inner: None }
    }

    pub(super) fn new(
        collector: http::Uri,
        mut settings: Settings,
        metrics: Metrics,
        spans_rx: mpsc::Receiver<Finished>,
    ) -> Self {
        // `Settings::problems` reports a zero; this only keeps the batch loop from spinning.
        settings.batch_max = settings.batch_max.max(1);
        let uri = collector.to_string();
        let endpoint = Endpoint::from(collector)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT);
        let resource = resource(&settings);
        Self {
            inner: Some(Inner {
                settings,
                metrics,
                spans_rx,
                resource,
                collector: Collector {
                    uri,
                    endpoint,
                    client: None,
                    up: None,
                },
            }),
        }
    }

    /// Exports until `shutdown_rx` turns true (or its sender is dropped) or every tracer is
    /// gone, then sends what is still queued within the flush timeout; the rest is counted as
    /// dropped (`shutdown`).
    pub async fn run(self, mut shutdown_rx: watch::Receiver<bool>) {
        let Some(mut inner) = self.inner else {
            return;
        };
        let mut batch = Vec::with_capacity(inner.settings.batch_max);
        let flush_by = inner.export_loop(&mut batch, &mut shutdown_rx).await;
        inner.spans_rx.close();
        if tokio::time::timeout_at(flush_by, inner.flush(&mut batch))
            .await
            .is_err()
        {
            let timeout = inner.settings.flush_timeout;
            warn!(?timeout, "trace flush timed out on shutdown");
        }
        let mut left = batch.len() as u64;
        while inner.spans_rx.try_recv().is_ok() {
            left += 1;
        }
        inner.metrics.drop_spans("shutdown", left);
    }
}

// === impl Inner ===

impl Inner {
    /// Fill a batch (full, or the export interval passed), send it, repeat; on shutdown
    /// returns when the flush must be done.
    async fn export_loop(
        &mut self,
        batch: &mut Vec<Finished>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Instant {
        let flush_by = |timeout| Instant::now() + timeout;
        let flush_timeout = self.settings.flush_timeout;
        let interval = self.settings.export_interval;
        let mut backoff = Backoff::new(self.settings.retry_base, self.settings.retry_max);
        // Armed when a span enters an empty batch: no span waits longer than the interval.
        let due = tokio::time::sleep(interval);
        tokio::pin!(due);
        loop {
            while batch.len() < self.settings.batch_max {
                tokio::select! {
                    biased;
                    _ = drain::until_true(shutdown) => return flush_by(flush_timeout),
                    span = self.spans_rx.recv() => match span {
                        Some(s) => {
                            if batch.is_empty() {
                                due.as_mut().reset(Instant::now() + interval);
                            }
                            batch.push(s);
                        }
                        None => return flush_by(flush_timeout),
                    },
                    () = &mut due, if !batch.is_empty() => break,
                }
            }
            if let Sent::Shutdown(by) = self.send(batch, &mut backoff, shutdown).await {
                return by;
            }
        }
    }

    /// Sends `batch`, retrying retryable failures with backoff; empties it unless shutdown
    /// came first (then the flush gets another try).
    async fn send(
        &mut self,
        batch: &mut Vec<Finished>,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Sent {
        let flush_timeout = self.settings.flush_timeout;
        let mut attempts = 0;
        loop {
            let (res, stop) = {
                let rpc = self.collector.export(&self.resource, batch);
                tokio::pin!(rpc);
                tokio::select! {
                    biased;
                    r = &mut rpc => (Some(r), None),
                    _ = drain::until_true(shutdown) => {
                        // The collector may already hold these spans: finish this RPC within
                        // the flush deadline rather than abandon it and send them twice.
                        let by = Instant::now() + flush_timeout;
                        (tokio::time::timeout_at(by, rpc).await.ok(), Some(by))
                    }
                }
            };
            attempts += 1;
            let Some(res) = res else {
                return Sent::Shutdown(stop.unwrap_or_else(Instant::now));
            };
            match (res, stop) {
                (Ok(rejected), stop) => {
                    backoff.reset();
                    self.count_sent(batch.len(), rejected);
                    batch.clear();
                    return stop.map_or(Sent::Done, Sent::Shutdown);
                }
                (Err(_), Some(by)) => return Sent::Shutdown(by),
                (Err(e), None) if e.is_retryable() && attempts < MAX_EXPORT_ATTEMPTS => {
                    let delay = backoff.next_delay();
                    debug!(error = %e, attempts, retry_in = ?delay, "trace export failed");
                    tokio::select! {
                        biased;
                        _ = drain::until_true(shutdown) => {
                            return Sent::Shutdown(Instant::now() + flush_timeout);
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                (Err(e), None) => {
                    debug!(error = %e, spans = batch.len(), "trace batch dropped");
                    self.metrics.drop_spans("export_failed", batch.len() as u64);
                    batch.clear();
                    return Sent::Done;
                }
            }
        }
    }

    /// Shutdown: one try per batch for what is held and queued (the deadline is the caller's).
    async fn flush(&mut self, batch: &mut Vec<Finished>) {
        loop {
            while batch.len() < self.settings.batch_max {
                match self.spans_rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            match self.collector.export(&self.resource, batch).await {
                Ok(rejected) => {
                    self.count_sent(batch.len(), rejected);
                    batch.clear();
                }
                // What is left is counted as dropped by `run`.
                Err(_) => return,
            }
        }
    }

    fn count_sent(&self, n: usize, rejected: u64) {
        let n = n as u64;
        let rejected = rejected.min(n);
        self.metrics.exported.inc_by(n - rejected);
        self.metrics.drop_spans("rejected", rejected);
    }
}

// === impl Collector ===

impl Collector {
    /// One export of `spans`; returns how many the collector rejected (partial success).
    async fn export(&mut self, resource: &Resource, spans: &[Finished]) -> Result<u64, Error> {
        let res = self.try_export(request(resource, spans)).await;
        match (&res, self.up) {
            (Ok(_), Some(true)) | (Err(_), Some(false)) => {}
            (Ok(_), _) => info!(collector = %self.uri, "exporting spans to the trace collector"),
            (Err(e), _) => warn!(
                collector = %self.uri,
                error = %e,
                "trace export failing; spans are retried, then dropped and counted"
            ),
        }
        self.up = Some(res.is_ok());
        res
    }

    async fn try_export(&mut self, req: ExportTraceServiceRequest) -> Result<u64, Error> {
        let client = match &mut self.client {
            Some(c) => c,
            None => {
                // Bounded by CONNECT_TIMEOUT twice over: a peer that accepts TCP but never
                // answers the HTTP/2 handshake must not stall the exporter either.
                let channel = tokio::time::timeout(CONNECT_TIMEOUT * 2, self.endpoint.connect())
                    .await
                    .map_err(|_| Error::ExportTimedOut)?
                    .map_err(|source| Error::CollectorUnreachable {
                        uri: self.uri.clone(),
                        source,
                    })?;
                self.client.insert(TraceServiceClient::new(channel))
            }
        };
        let res = tokio::time::timeout(EXPORT_TIMEOUT, client.export(req)).await;
        let status = match res {
            Ok(Ok(resp)) => {
                let rejected = resp
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                return Ok(rejected);
            }
            Ok(Err(status)) => status,
            Err(_) => {
                self.client = None;
                return Err(Error::ExportTimedOut);
            }
        };
        // Start from a fresh connection next time, at our backoff's pace.
        if is_retryable(status.code()) {
            self.client = None;
        }
        Err(Error::ExportFailed(status))
    }
}

/// OTLP's retryable gRPC codes (the spec's "Failures" table); everything else drops the batch.
pub fn is_retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The resource every span of this node shares.
pub(super) fn resource(settings: &Settings) -> Resource {
    Resource {
        attributes: vec![
            key_value("service.name", &Value::Str(settings.service_name.clone())),
            key_value("host.name", &Value::Str(settings.node.clone())),
            key_value("meshd.node", &Value::Str(settings.node.clone())),
        ],
        ..Default::default()
    }
}

/// One export request: one resource, one scope (`meshd`), the spans.
pub(super) fn request(resource: &Resource, spans: &[Finished]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "meshd".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans: spans.iter().map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn span(s: &Finished) -> proto::Span {
    let remote = if s.parent.is_some() {
        FLAG_IS_REMOTE
    } else {
        0
    };
    proto::Span {
        trace_id: s.trace_id.to_bytes().to_vec(),
        span_id: s.span_id.to_bytes().to_vec(),
        trace_state: s.trace_state.clone().unwrap_or_default(),
        parent_span_id: s.parent.map(|p| p.to_bytes().to_vec()).unwrap_or_default(),
        flags: FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | remote,
        name: s.name.clone(),
        kind: match s.kind {
            Kind::Client => proto::span::SpanKind::Client,
            Kind::Server => proto::span::SpanKind::Server,
        } as i32,
        start_time_unix_nano: s.start_unix_nanos,
        end_time_unix_nano: s.end_unix_nanos,
        attributes: s.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
        dropped_attributes_count: s.dropped_attributes,
        status: s.error.as_ref().map(|message| proto::Status {
            message: message.clone(),
            code: status::StatusCode::Error as i32,
        }),
        ..Default::default()
    }
}

fn key_value(key: &str, value: &Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s.clone()),
        Value::Int(i) => any_value::Value::IntValue(*i),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::F64(f) => any_value::Value::DoubleValue(*f),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}
