//! `registry-abuse`: do renewals keep succeeding while the registry is abused? Run by
//! `bench/registry_abuse.sh` against a real `mesh-registry` process; see BENCHMARKS.md
//! ("Registry under abuse"). Never run by CI.
//!
//! Setup: `--nodes` hosts join with the token in `--token-file` (real node certificates from
//! the registry, each host from its own loopback address 127.1.x.y, as hosts have their own
//! addresses). Then, for the whole run, every host renews a workload certificate with
//! `SignWorkload` once per `--interval`, over one long-lived connection, as meshd does (tonic
//! over mTLS, reconnecting by itself); and `--fresh` more clients (127.2.0.x,
//! with the first hosts' certificates) renew over a new connection each time (TCP + TLS + call),
//! as a host does after a restart or a lost connection. Each kind's renewals are spread evenly
//! over the interval. Every renewal has meshd's 10 s
//! deadline. One CSR per host is made up front, so the client's key generation is not measured.
//!
//! The run is a sequence of phases (`--phases`), each measured for `--phase` after `--warmup`,
//! followed by `--cooldown` with no attack. A renewal counts in the phase it started in:
//!
//! * `baseline`: no abuse.
//! * `idle`: a flood of idle connections from `--idle-addrs` addresses (127.3.x.y), each with
//!   `--idle-per-addr` workers: half open TCP and never send a ClientHello, half complete a TLS
//!   handshake without a certificate, send the HTTP/2 preface and stay idle (answering pings).
//!   A worker whose connection is closed reconnects after 1 s.
//! * `idle-wide`: silent TCP only (what holds a slot longest without credentials: until the
//!   handshake timeout) from `--wide-addrs` addresses with `--wide-per-addr` workers each,
//!   enough to fill `max_connections`.
//! * `streams`: `--stream-conns` unauthenticated HTTP/2 connections (127.4.0.x, 10 per address)
//!   each keeping `--stream-depth` unary calls open whose request body never comes; a stream
//!   that is refused or ends is replaced at once.
//! * `reset`: `--reset-conns` unauthenticated connections (127.5.0.x) each writing
//!   HEADERS + DATA + RST_STREAM(CANCEL) for `GetTrustBundle`, `--reset-batch` streams per write,
//!   as fast as the socket takes them (HTTP/2 rapid reset); reconnecting at once after a GOAWAY.
//! * `all`: `idle`, `streams` and `reset` at once.
//!
//! Reported per phase: renewals started, success rate and latency (p50, p99, max) for both kinds
//! of client; the registry's CPU (from `/proc/<--registry-pid>/stat`) and this process's, and the
//! registry's resident memory at the end of the phase; the
//! registry's own counts of refused connections and failed handshakes (from its `/metrics`); and
//! what the attack achieved (connections opened and held, streams opened and refused, resets
//! sent, GOAWAYs received). The attack and the clients run on separate runtimes (threads) of
//! this one process, on the same machine as the registry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use mesh_api::proto::v1 as pb;
use mesh_api::proto::v1::registry_client::RegistryClient;
use mesh_api::token::JoinToken;
use mesh_api::{Identity, NodeName, ServiceKey, TrustDomain};
use mesh_runtime::tls::{self, CertSlot, PinnedRootVerifier, SpiffeVerifier};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Endpoint;

/// Server name sent to the registry (meshd's; the verifier checks the SPIFFE identity).
const SERVER_NAME: &str = "registry.mesh.invalid";
/// Pause before an attack worker reconnects after its connection was closed: a flood of idle
/// connections, not of handshakes (which would be a CPU attack of its own).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Attack connections per source address for the stream and reset floods.
const CONNS_PER_ADDR: usize = 10;

#[derive(Parser, Debug)]
#[command(name = "registry-abuse", version)]
struct Args {
    /// The registry's gRPC address.
    #[arg(long)]
    registry: SocketAddr,
    /// The registry's admin address (for `/metrics`).
    #[arg(long)]
    admin: SocketAddr,
    /// A join token for service `api` with enough uses for every host.
    #[arg(long)]
    token_file: PathBuf,
    /// The registry's pid, for its CPU time.
    #[arg(long)]
    registry_pid: Option<u32>,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Hosts renewing over a long-lived connection each.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Clients renewing over a new connection each time (at most --nodes).
    #[arg(long, default_value_t = 10)]
    fresh: usize,
    /// Time between two renewals of one client.
    #[arg(long, default_value = "1s")]
    interval: humantime::Duration,
    /// Deadline of one renewal (meshd's registry.request_timeout).
    #[arg(long, default_value = "10s")]
    deadline: humantime::Duration,
    /// Comma-separated phases: baseline, idle, idle-wide, streams, reset, all.
    #[arg(
        long,
        default_value = "baseline,idle,idle-wide,streams,reset,all,baseline"
    )]
    phases: String,
    /// Measured time per phase.
    #[arg(long, default_value = "20s")]
    phase: humantime::Duration,
    /// Time an attack runs before its phase is measured.
    #[arg(long, default_value = "3s")]
    warmup: humantime::Duration,
    /// Quiet time after each phase.
    #[arg(long, default_value = "3s")]
    cooldown: humantime::Duration,
    /// Source addresses of the `idle` flood.
    #[arg(long, default_value_t = 64)]
    idle_addrs: usize,
    /// Source addresses of the `idle-wide` flood (× --wide-per-addr must pass
    /// `max_connections`, 10,000 by default).
    #[arg(long, default_value_t = 500)]
    wide_addrs: usize,
    /// Flood workers per source address in the `idle-wide` flood.
    #[arg(long, default_value_t = 34)]
    wide_per_addr: usize,
    /// Flood workers per source address (more than the registry's per-address limit of 32).
    #[arg(long, default_value_t = 36)]
    idle_per_addr: usize,
    /// Connections of the stream flood.
    #[arg(long, default_value_t = 200)]
    stream_conns: usize,
    /// Open streams each stream-flood connection tries to keep.
    #[arg(long, default_value_t = 1000)]
    stream_depth: usize,
    /// Connections of the rapid-reset flood.
    #[arg(long, default_value_t = 16)]
    reset_conns: usize,
    /// HEADERS + DATA + RST_STREAM triples per write in the rapid-reset flood.
    #[arg(long, default_value_t = 8)]
    reset_batch: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.fresh <= args.nodes, "--fresh must be at most --nodes");
    tls::install_default_provider();
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("clients")
        .enable_all()
        .build()
        .context("cannot build the clients' runtime")?;
    let attack = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("attack")
        .enable_all()
        .build()
        .context("cannot build the attack runtime")?;
    let report = clients.block_on(run(&args, attack.handle().clone()))?;
    print!("{report}");
    attack.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// A host: its address and what it renews with.
struct Host {
    source: IpAddr,
    tls: Arc<rustls::ClientConfig>,
    request: pb::SignWorkloadRequest,
}

/// `127.<net>.x.y` for the `i`-th address of a block (up to 250 × 250 of them).
fn addr(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        u8::try_from(i / 250).unwrap_or(u8::MAX),
        u8::try_from(i % 250 + 1).unwrap_or(u8::MAX),
    ))
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(to).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("constant server name is a valid DNS name")
}

/// A tonic channel from `source`, like meshd's `control::Client`.
fn endpoint() -> Endpoint {
    Endpoint::from_static("http://registry.mesh.invalid")
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
}

fn connector(
    source: IpAddr,
    to: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let connector = tokio_rustls::TlsConnector::from(tls);
    tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = connect_from(source, to).await?;
            let tls = connector.connect(server_name(), tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

/// Joins `args.nodes` hosts with the token (8 at a time) and prepares their renewals.
async fn join_hosts(args: &Args) -> anyhow::Result<Vec<Arc<Host>>> {
    let text = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let token = JoinToken::decode(&text).context("decoding the join token")?;
    let fingerprint = token
        .ca_fingerprint()
        .context("join token CA fingerprint")?;
    let td = TrustDomain::new(&token.td).context("join token trust domain")?;
    let pinned = Arc::new(tls::client_config(
        Arc::new(PinnedRootVerifier::new(fingerprint)),
        None,
        &[b"h2"],
    )?);
    let service = ServiceKey::parse("default/api").context("service key")?;
    let mut hosts = Vec::with_capacity(args.nodes);
    let mut pending = JoinSet::new();
    let mut next = 0;
    while hosts.len() < args.nodes {
        while pending.len() < 8 && next < args.nodes {
            let (i, text, td, pinned, service) = (
                next,
                text.clone(),
                td.clone(),
                pinned.clone(),
                service.clone(),
            );
            let registry = args.registry;
            pending.spawn(async move { join_one(i, registry, &text, &td, pinned, &service).await });
            next += 1;
        }
        match pending.join_next().await {
            Some(joined) => hosts.push(Arc::new(joined.context("join task")??)),
            None => bail!("join tasks ended early"),
        }
    }
    Ok(hosts)
}

async fn join_one(
    i: usize,
    registry: SocketAddr,
    token: &str,
    td: &TrustDomain,
    pinned: Arc<rustls::ClientConfig>,
    service: &ServiceKey,
) -> anyhow::Result<Host> {
    let source = addr(1, i);
    let name = NodeName::new(&format!("bench-{i:04}")).context("node name")?;
    let (key_pem, csr_pem) = tls::new_key_and_csr(&Identity::node(td, &name))?;
    let channel = endpoint()
        .connect_with_connector(connector(source, registry, pinned))
        .await
        .with_context(|| format!("{name}: connecting to the registry from {source}"))?;
    let joined = RegistryClient::new(channel)
        .join(pb::JoinRequest {
            token: token.trim().to_owned(),
            node_name: name.to_string(),
            csr_pem,
            datacenter: "dc1".to_owned(),
            zone: "a".to_owned(),
        })
        .await
        .with_context(|| format!("{name}: join"))?
        .into_inner();
    let roots = tls::root_store(&joined.trust_bundle_pem)?;
    let cert = CertSlot::new(Some(tls::certified_key(
        &joined.node_cert_chain_pem,
        &key_pem,
    )?));
    let tls = Arc::new(tls::client_config(
        Arc::new(SpiffeVerifier::exact(roots, Identity::registry(td))),
        Some(cert),
        &[b"h2"],
    )?);
    let (_key, csr_pem) = tls::new_key_and_csr(&Identity::workload(td, service))?;
    Ok(Host {
        source,
        tls,
        request: pb::SignWorkloadRequest {
            namespace: service.namespace.to_string(),
            service: service.name.to_string(),
            csr_pem,
        },
    })
}

// === measurement ===

/// Outcomes of one kind of client in one phase.
struct Outcomes {
    latency_us: Histogram<u64>,
    ok: u64,
    failed: BTreeMap<String, u64>,
}

impl Outcomes {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3)
                .expect("constant histogram bounds are valid"),
            ok: 0,
            failed: BTreeMap::new(),
        }
    }
}

/// What one phase measured.
struct PhaseResult {
    name: String,
    persistent: Outcomes,
    fresh: Outcomes,
    registry_cpu: Option<f64>,
    /// The registry's resident memory at the end of the measured window, MB.
    registry_rss_mb: Option<f64>,
    own_cpu: Option<f64>,
    refused: BTreeMap<String, f64>,
    attack: AttackSnapshot,
}

/// Where renewals are recorded: the phase being measured, or none (warm-up, cool-down).
struct Recorder {
    current: AtomicUsize,
    phases: Mutex<Vec<(Outcomes, Outcomes)>>,
}

const NOT_MEASURING: usize = usize::MAX;

impl Recorder {
    fn record(&self, phase: usize, fresh: bool, took: Duration, outcome: Result<(), String>) {
        if phase == NOT_MEASURING {
            return;
        }
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let Some((persistent, fresh_outcomes)) = phases.get_mut(phase) else {
            return;
        };
        let o = if fresh { fresh_outcomes } else { persistent };
        match outcome {
            Ok(()) => {
                o.ok += 1;
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                o.latency_us.saturating_record(us.max(1));
            }
            Err(kind) => *o.failed.entry(kind).or_default() += 1,
        }
    }
}

fn classify(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// When and where one client renews, and where it records the outcome.
struct Schedule {
    registry: SocketAddr,
    /// First renewal this long after the start (spreads the clients over the interval).
    offset: Duration,
    interval: Duration,
    deadline: Duration,
    recorder: Arc<Recorder>,
    /// Becomes `true` at the end of the run.
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Schedule {
    /// Runs `renew` every interval until stopped, recording each outcome as `fresh` or not.
    async fn run<F, Fut>(mut self, fresh: bool, mut renew: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut next = Instant::now() + self.offset;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.stop.wait_for(|s| *s) => return,
            }
            next = (next + self.interval).max(Instant::now());
            let phase = self.recorder.current.load(Ordering::Relaxed);
            let start = Instant::now();
            let outcome = match tokio::time::timeout(self.deadline, renew()).await {
                Ok(r) => r,
                Err(_) => Err("deadline".to_owned()),
            };
            self.recorder.record(phase, fresh, start.elapsed(), outcome);
        }
    }
}

/// One host renewing over its long-lived channel (which reconnects by itself).
async fn renew_persistent(host: Arc<Host>, schedule: Schedule) {
    let channel = endpoint()
        .timeout(schedule.deadline)
        .connect_with_connector_lazy(connector(host.source, schedule.registry, host.tls.clone()));
    let client = RegistryClient::new(channel);
    schedule
        .run(false, || {
            let (mut client, request) = (client.clone(), host.request.clone());
            async move {
                client
                    .sign_workload(request)
                    .await
                    .map(drop)
                    .map_err(|s| classify(&s))
            }
        })
        .await;
}

/// One client renewing over a new connection from `source` each time.
async fn renew_fresh(host: Arc<Host>, source: IpAddr, schedule: Schedule) {
    let registry = schedule.registry;
    schedule
        .run(true, || {
            let host = host.clone();
            async move {
                let channel = endpoint()
                    .connect_with_connector(connector(source, registry, host.tls.clone()))
                    .await
                    .map_err(|_| "connect".to_owned())?;
                RegistryClient::new(channel)
                    .sign_workload(host.request.clone())
                    .await
                    .map(drop)
                    .map_err(|s| classify(&s))
            }
        })
        .await;
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: &str, clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck as f64)
}

/// Resident memory of `pid` in MB.
fn rss_mb(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The registry's counters of refused connections and failed handshakes.
async fn scrape(admin: SocketAddr) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(mut tcp) = TcpStream::connect(admin).await else {
        return out;
    };
    if tcp
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return out;
    }
    let mut text = String::new();
    if tcp.read_to_string(&mut text).await.is_err() {
        return out;
    }
    for line in text.lines() {
        for (prefix, name) in [
            (
                "mesh_registry_connections_refused_total{reason=\"",
                "refused ",
            ),
            (
                "mesh_registry_tls_handshake_failures_total{reason=\"",
                "handshake ",
            ),
        ] {
            if let Some(rest) = line.strip_prefix(prefix)
                && let Some((reason, value)) = rest.split_once("\"} ")
                && let Ok(v) = value.trim().parse::<f64>()
            {
                out.insert(format!("{name}{reason}"), v);
            }
        }
    }
    out
}

async fn run(args: &Args, attack_rt: tokio::runtime::Handle) -> anyhow::Result<String> {
    let phases: Vec<String> = args
        .phases
        .split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    for p in &phases {
        anyhow::ensure!(
            ["baseline", "idle", "idle-wide", "streams", "reset", "all"].contains(&p.as_str()),
            "unknown phase {p:?}"
        );
    }
    eprintln!("registry-abuse: joining {} hosts", args.nodes);
    let hosts = join_hosts(args).await?;
    let recorder = Arc::new(Recorder {
        current: AtomicUsize::new(NOT_MEASURING),
        phases: Mutex::new(
            phases
                .iter()
                .map(|_| (Outcomes::new(), Outcomes::new()))
                .collect(),
        ),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut renewers = JoinSet::new();
    let (interval, deadline) = (*args.interval, *args.deadline);
    // Renewals spread evenly over the interval (deterministic, so runs compare).
    let offset = |i: usize, n: usize| interval.mul_f64(i as f64 / n.max(1) as f64);
    let schedule = |i: usize, n: usize| Schedule {
        registry: args.registry,
        offset: offset(i, n),
        interval,
        deadline,
        recorder: recorder.clone(),
        stop: stop_rx.clone(),
    };
    for (i, host) in hosts.iter().enumerate() {
        renewers.spawn(renew_persistent(host.clone(), schedule(i, hosts.len())));
    }
    for (j, host) in hosts.iter().take(args.fresh).enumerate() {
        renewers.spawn(renew_fresh(
            host.clone(),
            addr(2, j),
            schedule(j, args.fresh),
        ));
    }
    eprintln!(
        "registry-abuse: {} hosts renewing every {}, {} over fresh connections; settling",
        args.nodes, args.interval, args.fresh
    );
    tokio::time::sleep(*args.cooldown).await;

    let pid = args.registry_pid.map(|p| p.to_string());
    let mut results = Vec::new();
    for (index, name) in phases.iter().enumerate() {
        eprintln!("registry-abuse: phase {} ({name})", index + 1);
        let stats = Arc::new(AttackStats::default());
        let mut attack = JoinSet::new();
        start_attack(name, args, &stats, &mut attack, &attack_rt);
        tokio::time::sleep(*args.warmup).await;
        let reg_before = pid.as_deref().and_then(|p| cpu_seconds(p, args.clk_tck));
        let own_before = cpu_seconds("self", args.clk_tck);
        let refused_before = scrape(args.admin).await;
        let started = Instant::now();
        recorder.current.store(index, Ordering::Relaxed);
        tokio::time::sleep(*args.phase).await;
        recorder.current.store(NOT_MEASURING, Ordering::Relaxed);
        let wall = started.elapsed().as_secs_f64();
        let reg_after = pid.as_deref().and_then(|p| cpu_seconds(p, args.clk_tck));
        let own_after = cpu_seconds("self", args.clk_tck);
        let refused_after = scrape(args.admin).await;
        let registry_rss_mb = pid.as_deref().and_then(rss_mb);
        let snapshot = stats.snapshot();
        attack.abort_all();
        while attack.join_next().await.is_some() {}
        let refused = refused_after
            .iter()
            .map(|(k, v)| (k.clone(), v - refused_before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        results.push(PhaseResult {
            name: name.clone(),
            persistent: Outcomes::new(),
            fresh: Outcomes::new(),
            registry_cpu: reg_before.zip(reg_after).map(|(b, a)| (a - b) / wall),
            registry_rss_mb,
            own_cpu: own_before.zip(own_after).map(|(b, a)| (a - b) / wall),
            refused,
            attack: snapshot,
        });
        tokio::time::sleep(*args.cooldown).await;
    }
    stop_tx.send_replace(true);
    while renewers.join_next().await.is_some() {}
    let measured = std::mem::take(&mut *recorder.phases.lock().unwrap_or_else(|e| e.into_inner()));
    for (r, (persistent, fresh)) in results.iter_mut().zip(measured) {
        r.persistent = persistent;
        r.fresh = fresh;
    }
    Ok(render(args, &results))
}

// === attacks ===

#[derive(Default)]
struct AttackStats {
    connections: AtomicU64,
    held: AtomicI64,
    held_peak: AtomicI64,
    streams: AtomicU64,
    refused_streams: AtomicU64,
    resets_sent: AtomicU64,
    /// GOAWAY(ENHANCE_YOUR_CALM) received.
    goaways: AtomicU64,
}

#[derive(Default, Clone)]
struct AttackSnapshot {
    connections: u64,
    held_peak: i64,
    streams: u64,
    refused_streams: u64,
    resets_sent: u64,
    goaways: u64,
}

impl AttackStats {
    fn snapshot(&self) -> AttackSnapshot {
        AttackSnapshot {
            connections: self.connections.load(Ordering::Relaxed),
            held_peak: self.held_peak.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            refused_streams: self.refused_streams.load(Ordering::Relaxed),
            resets_sent: self.resets_sent.load(Ordering::Relaxed),
            goaways: self.goaways.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection as held until the guard drops.
    fn hold(self: &Arc<Self>) -> Held {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let now = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        self.held_peak.fetch_max(now, Ordering::Relaxed);
        Held(self.clone())
    }
}

struct Held(Arc<AttackStats>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

fn start_attack(
    phase: &str,
    args: &Args,
    stats: &Arc<AttackStats>,
    set: &mut JoinSet<()>,
    rt: &tokio::runtime::Handle,
) {
    // `with_tls`: every other worker completes a TLS handshake; otherwise all stay silent.
    let idle = |set: &mut JoinSet<()>, addrs: usize, per_addr: usize, with_tls: bool| {
        let anonymous = anonymous_tls();
        for a in 0..addrs {
            for w in 0..per_addr {
                let tls = (with_tls && w % 2 == 0).then(|| anonymous.clone());
                set.spawn_on(
                    idle_worker(addr(3, a), args.registry, tls, stats.clone()),
                    rt,
                );
            }
        }
    };
    let streams = |set: &mut JoinSet<()>| {
        for c in 0..args.stream_conns {
            set.spawn_on(
                stream_worker(
                    addr(4, c / CONNS_PER_ADDR),
                    args.registry,
                    args.stream_depth,
                    stats.clone(),
                ),
                rt,
            );
        }
    };
    let reset = |set: &mut JoinSet<()>| {
        for c in 0..args.reset_conns {
            set.spawn_on(
                reset_worker(
                    addr(5, c / CONNS_PER_ADDR),
                    args.registry,
                    args.reset_batch,
                    stats.clone(),
                ),
                rt,
            );
        }
    };
    match phase {
        "idle" => idle(set, args.idle_addrs, args.idle_per_addr, true),
        "idle-wide" => idle(set, args.wide_addrs, args.wide_per_addr, false),
        "streams" => streams(set),
        "reset" => reset(set),
        "all" => {
            idle(set, args.idle_addrs, args.idle_per_addr, true);
            streams(set);
            reset(set);
        }
        _ => {}
    }
}

/// An attacker's TLS config: no certificate, and it accepts whatever the registry presents.
fn anonymous_tls() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

async fn tls_connect(
    source: IpAddr,
    to: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect_from(source, to).await?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(server_name(), tcp)
        .await
}

/// Holds one connection at a time open as long as the registry lets it: silent TCP when `tls`
/// is `None`, else an idle HTTP/2 connection (answering pings).
async fn idle_worker(
    source: IpAddr,
    to: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    stats: Arc<AttackStats>,
) {
    loop {
        if let Ok(tcp) = connect_from(source, to).await {
            let _held = stats.hold();
            match &tls {
                None => {
                    let mut tcp = tcp;
                    let mut buf = [0u8; 512];
                    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                }
                Some(cfg) => {
                    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                    if let Ok(io) = connector.connect(server_name(), tcp).await
                        && let Ok(mut conn) = h2::Conn::open(io).await
                    {
                        loop {
                            match conn.next().await {
                                h2::Event::Ping(payload) if conn.pong(payload).await.is_err() => {
                                    break;
                                }
                                h2::Event::Closed | h2::Event::GoAway(_) => break,
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// Keeps `depth` bodiless unary calls open on one unauthenticated connection, replacing each
/// that ends; reconnects when the connection closes.
async fn stream_worker(source: IpAddr, to: SocketAddr, depth: usize, stats: Arc<AttackStats>) {
    let tls = anonymous_tls();
    loop {
        if let Ok(io) = tls_connect(source, to, tls.clone()).await
            && let Ok(mut conn) = h2::Conn::open(io).await
        {
            let _held = stats.hold();
            let mut next_id = 1u32;
            let mut ok = true;
            for _ in 0..depth {
                ok &= conn.headers(next_id, h2::GET_TRUST_BUNDLE).await.is_ok();
                next_id += 2;
                stats.streams.fetch_add(1, Ordering::Relaxed);
            }
            while ok {
                let replace = match conn.next().await {
                    h2::Event::Reset(code) => {
                        if code == h2::REFUSED_STREAM {
                            stats.refused_streams.fetch_add(1, Ordering::Relaxed);
                        }
                        true
                    }
                    h2::Event::EndStream => true,
                    h2::Event::Ping(payload) => {
                        ok = conn.pong(payload).await.is_ok();
                        false
                    }
                    h2::Event::GoAway(code) => {
                        if code == h2::ENHANCE_YOUR_CALM {
                            stats.goaways.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    h2::Event::Closed => break,
                    h2::Event::Other => false,
                };
                if replace && next_id < h2::MAX_STREAM_ID {
                    ok = conn.headers(next_id, h2::GET_TRUST_BUNDLE).await.is_ok();
                    next_id += 2;
                    stats.streams.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// HTTP/2 rapid reset on one unauthenticated connection at a time: HEADERS + DATA + RST_STREAM
/// triples, `batch` per write, as fast as the socket takes them; reconnects after GOAWAY.
async fn reset_worker(source: IpAddr, to: SocketAddr, batch: usize, stats: Arc<AttackStats>) {
    let tls = anonymous_tls();
    loop {
        if let Ok(io) = tls_connect(source, to, tls.clone()).await
            && let Ok(conn) = h2::Conn::open(io).await
        {
            let _held = stats.hold();
            let (mut reader, mut writer) = conn.split();
            let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
            let stats_r = stats.clone();
            // Reads until GOAWAY or close, queueing SETTINGS/PING acknowledgements.
            let mut read = tokio::spawn(async move {
                loop {
                    match reader.next().await {
                        h2::Event::Ping(payload) => {
                            let _ = ctl_tx.send(h2::pong_frame(payload));
                        }
                        h2::Event::GoAway(code) => {
                            if code == h2::ENHANCE_YOUR_CALM {
                                stats_r.goaways.fetch_add(1, Ordering::Relaxed);
                            }
                            return;
                        }
                        h2::Event::Closed => return,
                        _ => {}
                    }
                    while let Some(ack) = reader.pending_ack.take() {
                        let _ = ctl_tx.send(ack);
                    }
                }
            });
            let mut id = 1u32;
            loop {
                let mut out = Vec::new();
                while let Ok(ctl) = ctl_rx.try_recv() {
                    out.extend(ctl);
                }
                for _ in 0..batch {
                    h2::headers_frame(&mut out, id, h2::GET_TRUST_BUNDLE, false);
                    h2::frame(&mut out, h2::DATA, h2::END_STREAM, id, &[0, 0, 0, 0, 0]);
                    h2::frame(&mut out, h2::RST_STREAM, 0, id, &h2::CANCEL.to_be_bytes());
                    id += 2;
                }
                let written = tokio::select! {
                    w = writer.write_all(&out) => w.is_ok(),
                    _ = &mut read => false,
                };
                if !written || id >= h2::MAX_STREAM_ID {
                    break;
                }
                stats.resets_sent.fetch_add(batch as u64, Ordering::Relaxed);
                stats.streams.fetch_add(batch as u64, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            read.abort();
            // Straight back: a rapid-reset attacker reconnects at once after a GOAWAY.
            continue;
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

// === report ===

fn ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        return "-".to_owned();
    }
    let us = if q >= 1.0 {
        h.max()
    } else {
        h.value_at_quantile(q)
    };
    format!("{:.1}", us as f64 / 1000.0)
}

fn rate(o: &Outcomes) -> String {
    let failed: u64 = o.failed.values().sum();
    let total = o.ok + failed;
    if total == 0 {
        return "-".to_owned();
    }
    let pct = 100.0 * o.ok as f64 / total as f64;
    let mut s = format!("{total} / {pct:.1}%");
    if failed > 0 {
        let kinds: Vec<String> = o.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = write!(s, " ({})", kinds.join(", "));
    }
    s
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{:.0}%", v * 100.0))
}

fn render(args: &Args, results: &[PhaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} hosts renewing every {} over their own connection, {} renewing over a new \
         connection each time; {} per phase after {} of attack warm-up; deadline {}.\n",
        args.nodes, args.interval, args.fresh, args.phase, args.warmup, args.deadline
    );
    let _ = writeln!(
        out,
        "| # | abuse | renewals (long-lived conn.): n / ok | p50 / p99 / max ms | \
         renewals (new conn.): n / ok | p50 / p99 / max ms | registry CPU | registry RSS | \
         loadgen CPU |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (i, r) in results.iter().enumerate() {
        let lat = |o: &Outcomes| {
            format!(
                "{} / {} / {}",
                ms(&o.latency_us, 0.5),
                ms(&o.latency_us, 0.99),
                ms(&o.latency_us, 1.0)
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            r.name,
            rate(&r.persistent),
            lat(&r.persistent),
            rate(&r.fresh),
            lat(&r.fresh),
            pct(r.registry_cpu),
            r.registry_rss_mb
                .map_or("-".to_owned(), |m| format!("{m:.0} MB")),
            pct(r.own_cpu),
        );
    }
    let _ = writeln!(
        out,
        "\n| # | abuse | attack connections opened / most held at once | streams opened / \
         refused | rapid-reset streams written | GOAWAY(ENHANCE_YOUR_CALM) received | \
         registry: refused connections, failed handshakes |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for (i, r) in results.iter().enumerate() {
        let a = &r.attack;
        let refused: Vec<String> = r
            .refused
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} / {} | {} | {} | {} |",
            i + 1,
            r.name,
            a.connections,
            a.held_peak,
            a.streams,
            a.refused_streams,
            a.resets_sent,
            a.goaways,
            if refused.is_empty() {
                "-".to_owned()
            } else {
                refused.join(", ")
            },
        );
    }
    out
}

/// Just enough HTTP/2 (RFC 9113) to misbehave on purpose: frames are written raw, HPACK uses
/// only literal, non-indexed, non-Huffman fields, and responses are looked at frame by frame.
mod h2 {
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const GET_TRUST_BUNDLE: &str = "/mesh.v1.Registry/GetTrustBundle";
    pub const MAX_STREAM_ID: u32 = (1 << 31) - 1;

    pub const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    pub const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }

    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        // "Literal Header Field without Indexing — New Name", lengths < 127, no Huffman.
        out.push(0);
        out.push(u8::try_from(name.len()).unwrap_or(0x7f));
        out.extend_from_slice(name.as_bytes());
        out.push(u8::try_from(value.len()).unwrap_or(0x7f));
        out.extend_from_slice(value.as_bytes());
    }

    /// The HEADERS frame of a gRPC call to `path`.
    pub fn headers_frame(out: &mut Vec<u8>, stream: u32, path: &str, end_stream: bool) {
        let mut block = Vec::new();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "registry.mesh.invalid"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            literal(&mut block, n, v);
        }
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        frame(out, HEADERS, flags, stream, &block);
    }

    pub fn pong_frame(payload: [u8; 8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, PING, ACK, 0, &payload);
        out
    }

    pub enum Event {
        /// A stream was reset, with this error code.
        Reset(u32),
        /// A stream ended (HEADERS with END_STREAM).
        EndStream,
        Ping([u8; 8]),
        GoAway(u32),
        Closed,
        Other,
    }

    pub struct Conn<IO> {
        io: IO,
    }

    pub struct Reader<R> {
        io: R,
        /// A SETTINGS acknowledgement to send.
        pub pending_ack: Option<Vec<u8>>,
    }

    impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
        /// Sends the preface and empty SETTINGS.
        pub async fn open(mut io: IO) -> std::io::Result<Self> {
            let mut out = PREFACE.to_vec();
            frame(&mut out, SETTINGS, 0, 0, &[]);
            io.write_all(&out).await?;
            io.flush().await?;
            Ok(Self { io })
        }

        pub fn split(self) -> (Reader<tokio::io::ReadHalf<IO>>, tokio::io::WriteHalf<IO>) {
            let (r, w) = tokio::io::split(self.io);
            (
                Reader {
                    io: r,
                    pending_ack: None,
                },
                w,
            )
        }

        pub async fn headers(&mut self, stream: u32, path: &str) -> std::io::Result<()> {
            let mut out = Vec::new();
            headers_frame(&mut out, stream, path, false);
            self.io.write_all(&out).await?;
            self.io.flush().await
        }

        pub async fn pong(&mut self, payload: [u8; 8]) -> std::io::Result<()> {
            self.io.write_all(&pong_frame(payload)).await?;
            self.io.flush().await
        }

        /// The next frame (SETTINGS acknowledged on the way).
        pub async fn next(&mut self) -> Event {
            let (event, ack) = read_event(&mut self.io).await;
            if let Some(ack) = ack
                && (self.io.write_all(&ack).await.is_err() || self.io.flush().await.is_err())
            {
                return Event::Closed;
            }
            event
        }
    }

    impl<R: AsyncRead + Unpin> Reader<R> {
        pub async fn next(&mut self) -> Event {
            let (event, ack) = read_event(&mut self.io).await;
            self.pending_ack = ack;
            event
        }
    }

    async fn read_event(io: &mut (impl AsyncRead + Unpin)) -> (Event, Option<Vec<u8>>) {
        let mut head = [0u8; 9];
        if io.read_exact(&mut head).await.is_err() {
            return (Event::Closed, None);
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        if io.read_exact(&mut payload).await.is_err() {
            return (Event::Closed, None);
        }
        let word = |at: usize| {
            payload
                .get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind {
            SETTINGS if flags & ACK == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                (Event::Other, Some(ack))
            }
            HEADERS if flags & END_STREAM != 0 => (Event::EndStream, None),
            RST_STREAM => (Event::Reset(word(0)), None),
            GOAWAY => (Event::GoAway(word(4)), None),
            PING if flags & ACK == 0 => {
                let mut p = [0u8; 8];
                if payload.len() == 8 {
                    p.copy_from_slice(&payload);
                }
                (Event::Ping(p), None)
            }
            _ => (Event::Other, None),
        }
    }
}
