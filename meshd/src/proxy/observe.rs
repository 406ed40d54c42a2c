//! What comes out of every hop once it is over: the access-log event, the request metrics and
//! the per-edge traffic this node reports to the registry (topology, SLOs).
//!
//! Every HTTP request and TCP connection fills one [`Record`] and hands it to [`finish`].
//! An edge is counted once in the mesh: by the caller's meshd when the caller is a mesh service
//! (so faults it injects, retries and failed connections count), and by the callee's meshd only
//! for plaintext callers from outside the mesh, which have no meshd of their own.

use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::time::Instant;

use mesh_api::observe::{BUCKETS, EXTERNAL, bucket_of};
use mesh_api::proto::v1 as pb;
use mesh_api::{Identity, ServiceKey};

use super::access_log::{Entry, Line, Sink};
use super::metrics::Metrics;
use super::metrics::{Direction, HttpRequest};

/// Where a finished hop goes: metrics, the per-edge counts and the access log, as configured.
/// The node's `Shared` is one (it holds the edge map, so this module cannot depend on it).
pub trait Env {
    /// The proxy's metrics.
    fn metrics(&self) -> &Metrics;
    /// The current configuration (the access log's settings).
    fn config(&self) -> std::sync::Arc<crate::config::Config>;
    /// Per-edge counts for the registry.
    fn edges(&self) -> &Edges;
    /// The access log's sink.
    fn access_log(&self) -> &Sink;
}

/// One finished HTTP request or TCP connection.
#[derive(Debug, Clone)]
pub struct Record {
    /// Which side of the proxy saw it.
    pub direction: Direction,
    /// When it started.
    pub started: Instant,
    /// The caller's address (the app's, outbound; the remote meshd's or plaintext client's,
    /// inbound).
    pub src_addr: SocketAddr,
    /// The calling service: the local one (outbound), the caller's identity (inbound mTLS),
    /// or `None` for a plaintext caller.
    pub src_service: Option<ServiceKey>,
    /// The caller's full identity (inbound mTLS), for the log.
    pub src_identity: Option<Identity>,
    /// Carried over mutual TLS.
    pub mtls: bool,
    /// The called service.
    pub dst_service: ServiceKey,
    /// The endpoint (outbound) or app address (inbound) it went to, if it got that far.
    pub dst_addr: Option<SocketAddr>,
    /// That endpoint's site when it is another site's instance (outbound).
    pub dst_site: Option<String>,
    /// Request or connection details.
    pub kind: Kind,
    /// The authorization decision (inbound): `allow` or `deny`, and the deciding policy.
    pub decision: Option<(&'static str, String)>,
    /// Trace id of the hop's span, if traced.
    pub trace_id: Option<crate::trace::TraceId>,
    /// Why it failed, for people (empty when it did not).
    pub error: String,
}

/// Protocol-specific part of a [`Record`].
#[derive(Debug, Clone)]
pub enum Kind {
    /// One HTTP request.
    Http {
        /// Method.
        method: String,
        /// Path (no query).
        path: String,
        /// Status returned to the caller (the mesh's own errors included).
        status: u16,
        /// `grpc-status` of a gRPC answer (headers or trailers-only), if any.
        grpc_status: Option<u32>,
        /// Route entry that matched (`""`: none).
        route: String,
        /// Subset chosen by the route.
        subset: String,
        /// Attempts made (1 + retries).
        attempts: u32,
    },
    /// One TCP connection.
    Tcp {
        /// Bytes towards the service.
        to_service: u64,
        /// Bytes back to the caller.
        to_caller: u64,
        /// It failed (refused, reset, no endpoint, denied).
        failed: bool,
    },
}

/// Traffic on one edge since the last report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EdgeKey {
    source: Option<ServiceKey>,
    destination: ServiceKey,
    site: Option<String>,
    mtls: bool,
    http: bool,
}

/// [`EdgeKey`] borrowed from a finished hop: looked up without allocating.
#[derive(Debug, Clone, Copy)]
struct EdgeRef<'a> {
    source: Option<&'a ServiceKey>,
    destination: &'a ServiceKey,
    site: Option<&'a str>,
    mtls: bool,
    http: bool,
}

// Both forms hash the same tuple, so a borrowed edge finds its owned key.
impl std::hash::Hash for EdgeKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (
            self.source.as_ref(),
            &self.destination,
            self.site.as_deref(),
            self.mtls,
            self.http,
        )
            .hash(h);
    }
}

impl std::hash::Hash for EdgeRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (
            self.source,
            self.destination,
            self.site,
            self.mtls,
            self.http,
        )
            .hash(h);
    }
}

impl hashbrown::Equivalent<EdgeKey> for EdgeRef<'_> {
    fn equivalent(&self, k: &EdgeKey) -> bool {
        self.source == k.source.as_ref()
            && *self.destination == k.destination
            && self.site == k.site.as_deref()
            && (self.mtls, self.http) == (k.mtls, k.http)
    }
}

#[derive(Debug, Clone, Default)]
struct EdgeAcc {
    requests: u64,
    errors: u64,
    buckets: Vec<u64>,
    bytes: u64,
}

/// Per-edge traffic waiting for the next report.
#[derive(Debug, Default)]
pub struct Edges {
    map: Mutex<hashbrown::HashMap<EdgeKey, EdgeAcc>>,
}

impl Edges {
    /// Takes what was counted since the last call.
    pub fn take(&self) -> Vec<pb::EdgeStats> {
        let map = std::mem::take(&mut *self.map.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<pb::EdgeStats> = map
            .into_iter()
            .map(|(k, a)| pb::EdgeStats {
                source: source_name(k.source.as_ref()),
                destination: k.destination.to_string(),
                mtls: k.mtls,
                protocol: if k.http { "http" } else { "tcp" }.to_owned(),
                requests: a.requests,
                errors: a.errors,
                latency_buckets: a.buckets,
                bytes: a.bytes,
                destination_site: k.site.unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.source, &a.destination, &a.destination_site).cmp(&(
                &b.source,
                &b.destination,
                &b.destination_site,
            ))
        });
        out
    }

    fn add(&self, key: EdgeRef<'_>, failed: bool, ms: Option<f64>, bytes: u64) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let acc = match map.get_mut(&key) {
            Some(acc) => acc,
            None => {
                let owned = EdgeKey {
                    source: key.source.cloned(),
                    destination: key.destination.clone(),
                    site: key.site.map(str::to_owned),
                    mtls: key.mtls,
                    http: key.http,
                };
                map.entry(owned).or_default()
            }
        };
        acc.requests += 1;
        acc.errors += u64::from(failed);
        acc.bytes += bytes;
        if let Some(ms) = ms {
            if acc.buckets.len() < BUCKETS {
                acc.buckets.resize(BUCKETS, 0);
            }
            acc.buckets[bucket_of(ms)] += 1;
        }
    }
}

/// `namespace/name` of a caller, or `external` for a plaintext one.
fn source_name(source: Option<&ServiceKey>) -> String {
    source.map_or_else(|| EXTERNAL.to_owned(), ToString::to_string)
}

/// Whether a finished hop is this node's to report as an edge (see the module docs).
pub fn reports_edge(direction: Direction, caller_in_mesh: bool) -> bool {
    match direction {
        Direction::Outbound => true,
        Direction::Inbound => !caller_in_mesh,
    }
}

impl Record {
    fn failed(&self) -> bool {
        match &self.kind {
            Kind::Http { status, .. } => *status >= 500,
            Kind::Tcp { failed, .. } => *failed,
        }
    }
}

/// Metrics, the access-log event (as configured) and the edge count of one finished hop.
/// Names are formatted only for the access log: metrics and edges are found by reference.
pub fn finish(shared: &impl Env, rec: Record) {
    let elapsed = rec.started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    let config = shared.config();
    match &rec.kind {
        Kind::Http {
            status,
            grpc_status,
            route,
            attempts,
            ..
        } => {
            let req = HttpRequest {
                direction: rec.direction,
                source: rec.src_service.as_ref(),
                destination: &rec.dst_service,
                route,
                code: *status,
                grpc_status: *grpc_status,
            };
            (shared.metrics()).record_http(&req, elapsed, attempts.saturating_sub(1));
        }
        Kind::Tcp {
            to_service,
            to_caller,
            ..
        } => {
            let dst = rec.dst_service.to_string();
            (shared.metrics()).record_bytes(rec.direction, &dst, *to_service, *to_caller);
        }
    }
    if reports_edge(rec.direction, rec.src_service.is_some()) {
        let (http, bytes) = match &rec.kind {
            Kind::Http { .. } => (true, 0),
            Kind::Tcp {
                to_service,
                to_caller,
                ..
            } => (false, to_service + to_caller),
        };
        let key = EdgeRef {
            source: rec.src_service.as_ref(),
            destination: &rec.dst_service,
            site: rec.dst_site.as_deref(),
            mtls: rec.mtls,
            http,
        };
        (shared.edges()).add(key, rec.failed(), http.then_some(ms), bytes);
    }
    let access = &config.telemetry.access_log;
    let logged = match &rec.kind {
        Kind::Http { path, status, .. } => access.logs_request(path, *status),
        Kind::Tcp { failed, .. } => access.logs_connection(*failed),
    };
    if logged {
        log(shared.access_log(), &rec, ms);
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

/// A field value of an access-log event.
pub enum Val<'a> {
    /// Text.
    Str(&'a str),
    /// Text written by its `Display` (formatted straight into the event).
    Disp(&'a dyn std::fmt::Display),
    /// [`Val::Disp`] of a value whose text never needs JSON escaping (addresses, ids):
    /// written without scanning it.
    Plain(&'a dyn std::fmt::Display),
    /// Integer.
    Int(i64),
    /// Number.
    Float(f64),
    /// Flag.
    Bool(bool),
}

/// The event's message and every field, in order: one list for both sinks, so the journal and
/// the JSON lines always carry the same fields.
pub fn fields(rec: &Record, ms: f64, f: &mut dyn FnMut(&'static str, Val<'_>)) {
    use Val::{Bool, Disp, Float, Int, Plain, Str};
    f("direction", Str(direction_name(rec.direction)));
    f(
        "protocol",
        Str(if matches!(rec.kind, Kind::Http { .. }) {
            "http"
        } else {
            "tcp"
        }),
    );
    f("src.addr", Plain(&rec.src_addr));
    f("src.ip", Plain(&rec.src_addr.ip()));
    match &rec.src_service {
        Some(s) => f("src.service", Disp(s)),
        None => f("src.service", Str(EXTERNAL)),
    }
    match (&rec.src_identity, rec.mtls) {
        (Some(id), _) => f("src.identity", Disp(id)),
        (None, true) => f("src.identity", Str("")),
        (None, false) => f("src.identity", Str("plaintext")),
    }
    f("mtls", Bool(rec.mtls));
    f("dst.service", Disp(&rec.dst_service));
    match &rec.dst_addr {
        Some(a) => f("dst.addr", Plain(a)),
        None => f("dst.addr", Str("")),
    }
    match &rec.kind {
        Kind::Http {
            method,
            path,
            status,
            grpc_status,
            route,
            subset,
            attempts,
        } => {
            f("route", Str(route));
            f("subset", Str(subset));
            f("http.method", Str(method));
            f("http.path", Str(path));
            f("http.status", Int(i64::from(*status)));
            f("grpc.status", Int(grpc_status.map_or(-1, i64::from)));
            f("retries", Int(i64::from(attempts.saturating_sub(1))));
        }
        Kind::Tcp {
            to_service,
            to_caller,
            failed,
        } => {
            f("bytes.to_service", Int(*to_service as i64));
            f("bytes.to_caller", Int(*to_caller as i64));
            f("failed", Bool(*failed));
        }
    }
    let (decision, policy) = rec
        .decision
        .as_ref()
        .map_or(("", ""), |(d, p)| (*d, p.as_str()));
    f("decision", Str(decision));
    f("policy", Str(policy));
    match &rec.trace_id {
        Some(id) => f("trace_id", Plain(id)),
        None => f("trace_id", Str("")),
    }
    f("duration_ms", Float(ms));
    f("error", Str(&rec.error));
}

fn message(rec: &Record) -> &'static str {
    match rec.kind {
        Kind::Http { .. } => "request",
        Kind::Tcp { .. } => "connection",
    }
}

/// Formats the event for `sink` and hands it over.
fn log(sink: &Sink, rec: &Record, ms: f64) {
    match sink {
        Sink::Json(json) => {
            let mut l = Line::new(message(rec));
            fields(rec, ms, &mut |k, v| {
                match v {
                    Val::Str(s) => l.str(k, s),
                    Val::Disp(d) => l.disp(k, d),
                    Val::Plain(d) => l.plain(k, d),
                    Val::Int(i) => l.int(k, i),
                    Val::Float(x) => l.float(k, x),
                    Val::Bool(b) => l.bool(k, b),
                };
            });
            json.push(&l.finish());
        }
        Sink::Journal(journal) => {
            let mut e = Entry::new(message(rec));
            fields(rec, ms, &mut |k, v| {
                match v {
                    Val::Str(s) => e.field(k, s),
                    Val::Disp(d) | Val::Plain(d) => e.field_disp(k, d),
                    Val::Int(i) => e.field(k, &i.to_string()),
                    Val::Float(x) => e.field(k, &x.to_string()),
                    Val::Bool(b) => e.field(k, if b { "true" } else { "false" }),
                };
            });
            journal.push(e.finish());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_reports_an_edge() {
        // (direction, caller in mesh, reported here)
        for (d, in_mesh, want) in [
            (Direction::Outbound, true, true),
            (Direction::Inbound, true, false),
            (Direction::Inbound, false, true),
        ] {
            assert_eq!(reports_edge(d, in_mesh), want, "{d:?} {in_mesh}");
        }
    }

    #[test]
    fn edges_accumulate_and_drain() {
        let e = Edges::default();
        let (web, api) = (
            ServiceKey::parse("web").unwrap(),
            ServiceKey::parse("api").unwrap(),
        );
        let key = |source| EdgeRef {
            source,
            destination: &api,
            site: None,
            mtls: true,
            http: true,
        };
        e.add(key(Some(&web)), false, Some(3.0), 0);
        e.add(key(Some(&web)), true, Some(40.0), 0);
        e.add(key(None), false, None, 100);
        let got = e.take();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].source, "default/web");
        assert_eq!((got[0].requests, got[0].errors), (2, 1));
        assert_eq!(got[0].latency_buckets.iter().sum::<u64>(), 2);
        assert_eq!(got[0].latency_buckets[bucket_of(3.0)], 1);
        assert_eq!(got[1].bytes, 100);
        assert!(got[1].latency_buckets.is_empty());
        assert!(e.take().is_empty(), "taken means gone");
    }

    #[test]
    fn an_edge_to_another_site_is_counted_apart() {
        let e = Edges::default();
        let (web, api) = (
            ServiceKey::parse("web").unwrap(),
            ServiceKey::parse("api").unwrap(),
        );
        let key = |site| EdgeRef {
            source: Some(&web),
            destination: &api,
            site,
            mtls: true,
            http: true,
        };
        e.add(key(Some("b")), false, Some(30.0), 0);
        e.add(key(None), false, Some(1.0), 0);
        e.add(key(Some("b")), true, Some(30.0), 0);
        e.add(key(Some("c")), false, Some(60.0), 0);
        let got: Vec<_> = (e.take().into_iter())
            .map(|s| (s.destination_site, s.requests, s.errors))
            .collect();
        assert_eq!(
            got,
            [
                (String::new(), 1, 0),
                ("b".to_owned(), 2, 1),
                ("c".to_owned(), 1, 0)
            ]
        );
    }
}
