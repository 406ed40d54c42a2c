//! The registry's TLS front and its limits: accepts TCP, refuses connections over the total,
//! per-source and unauthenticated limits, runs each TLS handshake in its own task under a
//! timeout, records who the peer is, and hands finished connections to tonic, whose HTTP/2
//! limits (streams, request timeout, keepalive, reset floods) [`grpc_server`] sets.
//!
//! Every open connection holds a [`Slot`] from accept until tonic drops it, so handshakes in
//! progress count against the limits and run concurrently: a silent socket costs one slot for
//! at most `handshake_timeout` and never delays anybody else's handshake. At the total limit a
//! newcomer takes the slot of the oldest handshake still in progress (see [`Tracker`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_api::Identity;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument as _, debug, debug_span};

use crate::config::Config;

/// Handshaken connections waiting for tonic's accept loop (which only spawns a task each).
const INCOMING_BUFFER: usize = 64;
/// Pause after a failed `accept` (EMFILE and friends) instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Who is on the other end of a registry connection; tonic puts it in request extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote socket address.
    pub addr: SocketAddr,
    /// Identity from the client certificate; `None` for a joining host without one.
    pub identity: Option<Identity>,
    /// Serial of the client certificate (lowercase hex); `None` without one.
    pub serial: Option<String>,
}

impl Default for PeerInfo {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            identity: None,
            serial: None,
        }
    }
}

/// A TLS connection carrying its [`PeerInfo`].
pub struct MeshConn {
    tls: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// This connection's place under the limits; tonic drops the connection when it ends,
    /// which frees the slot.
    _slot: Slot,
}

impl tonic::transport::server::Connected for MeshConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The connection limits enforced before tonic sees a connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most open connections, handshakes in progress included.
    pub max_connections: usize,
    /// Most open connections per [`Source`].
    pub max_connections_per_ip: usize,
    /// Most open connections whose client presented no mesh certificate.
    pub max_unauthenticated_connections: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// The limits of `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            max_unauthenticated_connections: config.max_unauthenticated_connections,
            handshake_timeout: config.handshake_timeout,
        }
    }
}

/// tonic's server with the registry's HTTP/2 and call limits from `config`: streams per
/// connection, the unary request timeout, keepalive pings, and the reset-flood bounds. Message
/// sizes are per service (`RegistryServer::max_decoding_message_size`), set in `app`.
///
/// The timeout covers a call from its request headers until its response headers: all of a
/// unary call, and for a watch only the time until the stream opens, so watches live on.
pub fn grpc_server(config: &Config) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .timeout(config.request_timeout)
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(config.http2_max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(config.http2_max_local_error_reset_streams))
}

/// Why a connection was closed before tonic saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached.
    Total,
    /// `max_connections_per_ip` reached for the source.
    PerIp,
    /// `max_unauthenticated_connections` reached and the client presented no certificate.
    Unauthenticated,
    /// A TLS handshake in progress, closed at `max_connections` to make room for a newer
    /// connection (the oldest handshake goes first).
    Evicted,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerIp => "per_ip",
            Self::Unauthenticated => "unauthenticated",
            Self::Evicted => "evicted",
        }
    }
}

/// Labels of `mesh_registry_connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `total`, `per_ip`, `unauthenticated` or `evicted` (see [`Refusal`]).
    pub reason: &'static str,
}

/// Labels of `mesh_registry_tls_handshake_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `timeout` (nothing or too little within `handshake_timeout`) or `error`.
    pub reason: &'static str,
}

/// Metrics of the TLS front.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Connections closed at accept or after the handshake, by reason
    /// (`mesh_registry_connections_refused_total`).
    pub refused: Family<RefusedLabels, Counter>,
    /// Handshakes that failed, by reason (`mesh_registry_tls_handshake_failures_total`).
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Connections holding a slot, handshakes in progress included
    /// (`mesh_registry_connections_open`).
    pub open: Gauge,
}

impl Metrics {
    /// Registers the metrics under `registry`.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mesh_registry_connections_refused",
            "gRPC connections closed by the registry's connection limits, by reason \
             (total, per_ip, unauthenticated, evicted)",
            m.refused.clone(),
        );
        registry.register(
            "mesh_registry_tls_handshake_failures",
            "gRPC TLS handshakes that failed, by reason (timeout, error)",
            m.handshake_failures.clone(),
        );
        registry.register(
            "mesh_registry_connections_open",
            "Open gRPC connections, TLS handshakes in progress included",
            m.open.clone(),
        );
        m
    }

    fn refused(&self, why: Refusal) {
        self.refused
            .get_or_create(&RefusedLabels {
                reason: why.as_str(),
            })
            .inc();
    }
}

/// What `max_connections_per_ip` counts: one IPv4 address, or one IPv6 /64 (the smallest
/// prefix a site normally gets, so a single host cannot dodge the limit by cycling addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => Self::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

/// Counts of open connections, shared by the accept loop and every [`Slot`].
///
/// At `max_connections`, a new connection takes the place of the oldest one still in its TLS
/// handshake, if any: sockets that never finish a handshake (what an attacker without
/// credentials can hold longest) cannot lock out a client that completes one, which takes
/// milliseconds. Only established connections — authenticated ones, and at most
/// `max_unauthenticated_connections` others — can make the registry refuse at accept.
#[derive(Debug)]
pub struct Tracker {
    limits: Limits,
    metrics: Metrics,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    unauthenticated: usize,
    per_source: HashMap<Source, usize>,
    /// Connections in their TLS handshake by admission order; the first is evicted first.
    handshaking: BTreeMap<u64, (Source, Arc<Eviction>)>,
    next_id: u64,
}

impl Counts {
    fn release(&mut self, source: Source) {
        self.total -= 1;
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// How the accept loop tells a handshake task its slot was given to a newer connection.
#[derive(Debug, Default)]
struct Eviction {
    /// Woken once, on eviction (`notify_one` keeps the wake-up if nobody waits yet).
    notify: tokio::sync::Notify,
    /// Set under the [`Counts`] lock when the slot was released by eviction, so dropping the
    /// [`Slot`] does not release it twice.
    evicted: std::sync::atomic::AtomicBool,
}

impl Tracker {
    /// A tracker with nothing open.
    pub fn new(limits: Limits, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metrics,
            state: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every update keeps the counts consistent before it can panic (none does).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for a new connection from `ip` (evicting the oldest handshake in progress
    /// when `max_connections` is reached), or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let source = Source::from(ip);
        let mut c = self.counts();
        if c.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_connections_per_ip {
            return Err(Refusal::PerIp);
        }
        if c.total >= self.limits.max_connections {
            let Some((_, (oldest_source, oldest))) = c.handshaking.pop_first() else {
                return Err(Refusal::Total);
            };
            oldest
                .evicted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            oldest.notify.notify_one();
            c.release(oldest_source);
            self.metrics.open.dec();
        }
        *c.per_source.entry(source).or_default() += 1;
        c.total += 1;
        let id = c.next_id;
        c.next_id += 1;
        let eviction = Arc::new(Eviction::default());
        c.handshaking.insert(id, (source, eviction.clone()));
        drop(c);
        self.metrics.open.inc();
        Ok(Slot {
            tracker: self.clone(),
            source,
            id,
            eviction,
            unauthenticated: false,
        })
    }

    /// Open connections (handshakes included), sources, without a certificate, handshaking.
    pub fn open(&self) -> (usize, usize, usize, usize) {
        let c = self.counts();
        (
            c.total,
            c.per_source.len(),
            c.unauthenticated,
            c.handshaking.len(),
        )
    }
}

/// One open connection's place under the limits; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<Tracker>,
    source: Source,
    /// Key in [`Counts::handshaking`] while the handshake runs.
    id: u64,
    eviction: Arc<Eviction>,
    unauthenticated: bool,
}

impl Slot {
    /// Resolves when a newer connection took this slot; the handshake must then be abandoned.
    pub async fn evicted(&self) {
        self.eviction.notify.notified().await;
    }

    /// Ends the handshake phase: the connection can no longer be evicted. `Err` if it already
    /// was (the eviction raced the end of the handshake).
    pub fn established(&self) -> Result<(), Refusal> {
        let mut c = self.tracker.counts();
        if self.is_evicted() {
            return Err(Refusal::Evicted);
        }
        c.handshaking.remove(&self.id);
        Ok(())
    }

    fn is_evicted(&self) -> bool {
        self.eviction
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts this connection as one without a client certificate, if there is room.
    pub fn mark_unauthenticated(&mut self) -> Result<(), Refusal> {
        if self.unauthenticated {
            return Ok(());
        }
        let mut c = self.tracker.counts();
        if c.unauthenticated >= self.tracker.limits.max_unauthenticated_connections {
            return Err(Refusal::Unauthenticated);
        }
        c.unauthenticated += 1;
        self.unauthenticated = true;
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.tracker.counts();
        if self.is_evicted() {
            // Released by the eviction already.
            return;
        }
        c.handshaking.remove(&self.id);
        c.release(self.source);
        if self.unauthenticated {
            c.unauthenticated -= 1;
        }
        drop(c);
        self.tracker.metrics.open.dec();
    }
}

/// Accepts connections on `listener` until `shutdown` resolves, yielding handshaken ones.
///
/// A connection over a limit is closed as soon as it is accepted (or, for the unauthenticated
/// limit, right after its handshake; or, when evicted, during it) and counted in `metrics`; the
/// accept loop itself never waits for anything but the next connection.
pub fn incoming(
    listener: TcpListener,
    acceptor: tokio::sync::watch::Receiver<TlsAcceptor>,
    tracker: Arc<Tracker>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<Result<MeshConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(INCOMING_BUFFER);
    let handshake_timeout = tracker.limits.handshake_timeout;
    // Fire-and-forget: ends on shutdown, or when tonic stops reading (drops `rx`) and every
    // send fails; the listener closes with it.
    tokio::spawn(
        async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
                    _ = tx.closed() => break,
                };
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let slot = match tracker.admit(addr.ip()) {
                    Ok(slot) => slot,
                    Err(why) => {
                        tracker.metrics.refused(why);
                        debug!(
                            src.addr = %addr,
                            reason = why.as_str(),
                            "registry connection refused"
                        );
                        continue; // drops `tcp`: closed
                    }
                };
                // The current one: a CA rotation replaces it without a restart.
                let (acceptor, tx) = (acceptor.borrow().clone(), tx.clone());
                let metrics = tracker.metrics.clone();
                // Fire-and-forget: bounded by the handshake timeout, and the slot it holds
                // bounds how many run at once.
                tokio::spawn(
                    handshake(tcp, addr, slot, acceptor, handshake_timeout, metrics, tx)
                        .instrument(debug_span!("registry_conn", src.addr = %addr)),
                );
            }
        }
        .instrument(debug_span!("registry_accept")),
    );
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One connection's TLS handshake under `timeout`; hands the result to tonic through `tx`.
async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    mut slot: Slot,
    acceptor: TlsAcceptor,
    timeout: Duration,
    metrics: Metrics,
    tx: mpsc::Sender<Result<MeshConn, std::io::Error>>,
) {
    let _ = tcp.set_nodelay(true);
    let failed = |reason: &'static str| {
        metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .inc();
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(timeout, acceptor.accept(tcp)) => r,
        () = slot.evicted() => {
            metrics.refused(Refusal::Evicted);
            debug!("registry tls handshake evicted for a newer connection");
            return;
        }
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            failed("error");
            debug!(error = %e, "registry tls handshake failed");
            return;
        }
        Err(_) => {
            failed("timeout");
            debug!("registry tls handshake timed out");
            return;
        }
    };
    if let Err(why) = slot.established() {
        metrics.refused(why);
        debug!(reason = why.as_str(), "registry connection refused");
        return;
    }
    let chain = tls.get_ref().1.peer_certificates();
    let identity = chain.and_then(mesh_runtime::tls::peer_identity);
    let serial = chain.and_then(mesh_runtime::tls::peer_serial);
    if identity.is_none()
        && let Err(why) = slot.mark_unauthenticated()
    {
        metrics.refused(why);
        debug!(reason = why.as_str(), "registry connection refused");
        return;
    }
    let conn = MeshConn {
        tls,
        peer: PeerInfo {
            addr,
            identity,
            serial,
        },
        _slot: slot,
    };
    let _ = tx.send(Ok(conn)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(total: usize, per_ip: usize, unauthenticated: usize) -> Arc<Tracker> {
        Tracker::new(
            Limits {
                max_connections: total,
                max_connections_per_ip: per_ip,
                max_unauthenticated_connections: unauthenticated,
                handshake_timeout: Duration::from_secs(1),
            },
            Metrics::default(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_total_and_unauthenticated_limits() {
        let t = tracker(4, 2, 1);
        let a1 = t.admit(ip("10.0.0.1")).unwrap();
        let a2 = t.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(t.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerIp);
        // The IPv4-mapped form is the same source.
        assert_eq!(t.admit(ip("::ffff:10.0.0.1")).unwrap_err(), Refusal::PerIp);
        let mut b1 = t.admit(ip("10.0.0.2")).unwrap();
        let mut b2 = t.admit(ip("10.0.0.3")).unwrap();
        for s in [&a1, &a2, &b1, &b2] {
            s.established().unwrap();
        }
        // Full, and nobody is in a handshake: refused.
        assert_eq!(t.admit(ip("10.0.0.4")).unwrap_err(), Refusal::Total);
        b1.mark_unauthenticated().unwrap();
        assert_eq!(
            b2.mark_unauthenticated().unwrap_err(),
            Refusal::Unauthenticated
        );
        assert_eq!(t.open(), (4, 3, 1, 0));
        drop(b1);
        b2.mark_unauthenticated().unwrap();
        drop(a1);
        assert_eq!(t.open(), (2, 2, 1, 0));
        let _a3 = t.admit(ip("10.0.0.1")).unwrap();
        drop(b2);
        assert_eq!(t.open(), (2, 1, 0, 1));
        assert_eq!(t.metrics.open.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn at_the_limit_the_oldest_handshake_makes_room() {
        let t = tracker(3, 10, 10);
        let oldest = t.admit(ip("10.0.0.1")).unwrap();
        let done = t.admit(ip("10.0.0.2")).unwrap();
        done.established().unwrap();
        let younger = t.admit(ip("10.0.0.3")).unwrap();
        // Full: the newcomer takes the oldest handshake's place, not the established one's.
        let newcomer = t.admit(ip("10.0.0.4")).unwrap();
        tokio::time::timeout(Duration::from_secs(1), oldest.evicted())
            .await
            .expect("the oldest handshake is told");
        assert_eq!(oldest.established().unwrap_err(), Refusal::Evicted);
        assert_eq!(t.open(), (3, 3, 0, 2));
        // Dropping the evicted slot releases nothing more.
        drop(oldest);
        assert_eq!(t.open(), (3, 3, 0, 2));
        assert_eq!(t.metrics.open.get(), 3);
        // Next in line is `younger`; once every slot is established, newcomers are refused.
        let again = t.admit(ip("10.0.0.5")).unwrap();
        assert_eq!(younger.established().unwrap_err(), Refusal::Evicted);
        drop(younger);
        newcomer.established().unwrap();
        again.established().unwrap();
        assert_eq!(t.admit(ip("10.0.0.6")).unwrap_err(), Refusal::Total);
        assert_eq!(t.open(), (3, 3, 0, 0));
    }

    #[test]
    fn ipv6_sources_are_64_bit_prefixes() {
        let t = tracker(10, 1, 10);
        let _a = t.admit(ip("2001:db8:0:1::1")).unwrap();
        assert_eq!(t.admit(ip("2001:db8:0:1::2")).unwrap_err(), Refusal::PerIp);
        let _b = t.admit(ip("2001:db8:0:2::1")).unwrap();
    }
}
