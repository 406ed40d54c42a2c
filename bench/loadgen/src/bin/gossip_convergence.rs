//! `gossip-convergence`: how fast meshd's gossip spreads a new service endpoint and a node's
//! death through N nodes, and what gossip costs each node in bandwidth. Run by
//! `bench/gossip.sh`; never run by CI.
//!
//! `run --nodes N` simulates a cluster of N nodes in this one process. Every node is a real
//! chitchat 0.13 server (`chitchat::spawn_chitchat`) configured by
//! `meshd::membership::chitchat_config`, so it gossips with meshd's interval (200 ms unless
//! `--gossip-interval` says otherwise), meshd's failure detector and meshd's wire format.
//! The nodes talk over chitchat's in-memory `ChannelTransport`: every message is really
//! serialized and deserialized, but there is no kernel UDP and no sealing (meshd encrypts each
//! datagram). What decides convergence is the number of rounds and the fan-out (3 peers per
//! round), which are the same; the per-message cost of UDP and ChaCha20 is not simulated, and
//! the transport refuses any message that would not fit one sealed UDP datagram, as meshd does.
//! Node i lists 3 random nodes among 0..i as seeds (as an operator lists a few existing hosts)
//! and publishes what meshd publishes: the `node` key (a `NodeInfo`) and one service key (a
//! `ServiceInfo`), encoded by `mesh_api::gossip`. All nodes start together, each at a random
//! offset within one gossip interval, so their rounds are not in step.
//!
//! Once every node sees N live nodes (setup time) and a settling pause has passed:
//!
//! 1. steady state: messages and bytes sent over `--window`, per node and per second, with the
//!    CPU this process and the whole machine used, and how late a 50 ms tokio timer fires (a
//!    late timer means late gossip rounds);
//! 2. new endpoint, `--reps` times from different nodes: one node sets a new service key; the
//!    time until each other node's chitchat state holds it, and until its live-nodes watch (what
//!    meshd's proxy view is rebuilt from) does;
//! 3. death, `--death-reps` times: one node's gossip task is aborted (no goodbye, like
//!    `kill -9`); the time until each remaining node no longer counts it as live.
//!
//! Times come from the main thread, which is not a tokio worker: it polls every node every
//! 10 ms (`try_lock` on the node's chitchat state, so it never waits behind a gossip round),
//! so each time is late by up to one poll. Gossip rounds actually achieved are counted from the
//! SYNs sent (3 per round): a CPU-starved simulation runs fewer rounds than the interval says,
//! and every delay is also given in those rounds. The simulation holds every node's copy of the
//! cluster, so its memory grows as N²: `--max-rss-mb` stops a run (keeping what was measured)
//! before it starves the machine. The results go to `--json`; `report` turns the JSON of several
//! runs into the markdown tables `bench/gossip.sh` prints.
//!
//! ## Clocks
//!
//! By default the nodes run in real time on a multi-thread runtime. Every node gossips every
//! interval, so the CPU the simulation needs grows as N² (N nodes × digests of N entries), and
//! past ~200 nodes on 2 vCPUs the rounds run late and the results measure the host, not gossip.
//!
//! `--virtual-time` makes it a discrete-event simulation instead: the nodes run on a
//! `current_thread` runtime whose clock is paused (`start_paused`), so tokio moves the clock
//! only when every task is idle, straight to the next timer. chitchat takes all its time from
//! tokio (`tokio::time::interval` for rounds, `tokio::time::Instant` in its failure detector and
//! state), so every round happens at its virtual time however long the CPU work of the rounds
//! before took, and the results do not depend on the CPU speed or on what else runs on the
//! host. The measuring thread drives the runtime: it polls the nodes (the runtime does not run
//! meanwhile, so the clock stands still), then runs it for 10 ms of virtual time
//! (`block_on(sleep)`), and so on. Messages arrive with no latency (the transport delivers them
//! in the same instant) and cost no time; a real node spends its "gossip CPU per node" (reported)
//! on them. Timer lateness means nothing then (it is always 0) and is not reported; CPU is
//! reported as CPU seconds per simulated second. Memory guards and wall time stay on the real
//! clock; `--max-wall` stops a run that would take too long.
//!
//! Pausing tokio's clock needs tokio's `test-util` feature, which this crate does not enable by
//! itself (in a workspace build it would reach meshd through feature unification):
//! `bench/gossip.sh` builds with `--features tokio/test-util`. Without it `--virtual-time` fails
//! with a message saying so; real time works either way.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
// `Instant` is the real clock (memory guard, wall time); measured durations use `SimInstant`
// through `Clock`, which is virtual with `--virtual-time`.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{Chitchat, ChitchatEnvelope, ChitchatHandle, ChitchatId};
use chitchat::{NodeState, ProtocolVersion, spawn_chitchat};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use mesh_api::ServiceKey;
use mesh_api::gossip::{self, NodeInfo, ServiceInfo};
use mesh_api::name::Label;
use meshd::config::{DEFAULT_GOSSIP_INTERVAL, Protocol};
use meshd::gossip_seal::{MAX_PLAINTEXT_LEN, MessageKind, SEAL_OVERHEAD};
use meshd::membership;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::time::Instant as SimInstant;

/// Cluster id of the simulated mesh (meshd uses the trust domain).
const CLUSTER_ID: &str = "mesh.test";
/// Gossip port of every simulated node (each node has its own address in 10.0.0.0/8).
const GOSSIP_PORT: u16 = 7946;
/// Inbound (mTLS) port published in each node's `NodeInfo`.
const INBOUND_PORT: u16 = 15008;
/// Seeds each node lists: a few existing hosts, as an operator would write them.
const SEEDS_PER_NODE: usize = 3;
/// Peers chitchat 0.13 gossips with per round (its private `GOSSIP_COUNT`).
const GOSSIP_FANOUT: f64 = 3.0;
/// Distinct services the nodes publish (node i publishes `default/svc-<i mod SERVICES>`).
const SERVICES: usize = 20;
/// Zones the nodes are spread over.
const ZONES: [&str; 3] = ["a", "b", "c"];
/// How often the measuring thread looks at every node.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Quiet time after convergence: the failure detector's windows fill with steady-state
/// heartbeat intervals and the start-up backlog drains, as on a cluster that has been up a while.
const SETTLE: Duration = Duration::from_secs(5);
/// Pause between repetitions (plus up to one gossip interval of jitter, so repetitions do not
/// line up with the rounds).
const REP_GAP: Duration = Duration::from_secs(1);
/// Period of the timer whose lateness shows how far behind the tokio workers are.
const LAG_PROBE_PERIOD: Duration = Duration::from_millis(50);
/// How often progress is logged while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// IPv4 header, repeated in every fragment (for the on-the-wire estimate).
const IPV4_HEADER: u64 = 20;
/// UDP header, once per datagram.
const UDP_HEADER: u64 = 8;
/// Payload of one IPv4 fragment on a 1,500-byte MTU link.
const FRAGMENT_PAYLOAD: u64 = 1_480;
/// `USER_HZ`: the unit of `/proc/stat` (100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// Gossip convergence at fleet sizes, simulated in one process.
#[derive(Parser, Debug)]
#[command(name = "gossip-convergence", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Simulate one cluster size and write its measurements as JSON.
    Run(Box<RunArgs>),
    /// Print markdown tables from the JSON of one or more runs.
    Report {
        /// JSON files written by `run`.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Number of nodes.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=60_000))]
    nodes: u32,
    /// Gossip interval [default: meshd's, 200ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    gossip_interval: Option<Duration>,
    /// New-endpoint repetitions.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Death repetitions [default: --reps].
    #[arg(long)]
    death_reps: Option<usize>,
    /// Steady-state bandwidth window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    window: Duration,
    /// Give up waiting for every node to see every other after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    converge_timeout: Duration,
    /// Give up on one new-endpoint repetition after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    endpoint_timeout: Duration,
    /// Give up on one death repetition after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    death_timeout: Duration,
    /// Nodes start at random offsets within this [default: one gossip interval, a fleet booting
    /// at once], each with its own generation (its start time in ms, as a real process has).
    /// `bench/gossip_real.sh` starts 20 meshd per second: 5s for 100 nodes, to compare.
    #[arg(long, value_parser = humantime::parse_duration)]
    boot_spread: Option<Duration>,
    /// Appended to node names (`node-0001` + suffix): longer names make every digest longer.
    #[arg(long, default_value = "")]
    name_suffix: String,
    /// Gossip protocol: `v2` (what meshd ships: bounded digests, SWIM failure detection),
    /// `v1` (every member in every digest, compressed; meshd before V2) or `v0` (uncompressed):
    /// for before/after comparisons.
    #[arg(long, default_value = "v2", value_parser = parse_protocol)]
    protocol: ProtocolVersion,
    /// Simulate in virtual time: one thread, tokio's clock paused and moved by the simulation
    /// (see the top of the source). Needs tokio's `test-util` feature.
    #[arg(long)]
    virtual_time: bool,
    /// tokio worker threads in real time [default: one per CPU].
    #[arg(long, conflicts_with = "virtual_time")]
    workers: Option<usize>,
    /// Stop (and write what was measured) after this much wall time.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_wall: Option<Duration>,
    /// Stop (and write what was measured) when this process's RSS passes this many MB.
    #[arg(long, default_value_t = 12_000.0)]
    max_rss_mb: f64,
    /// Stop when the machine has less memory available than this many MB (it is shared).
    #[arg(long, default_value_t = 3_000.0)]
    min_available_mb: f64,
    /// Seed of the random choices (seeds, origins, victims).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the results.
    #[arg(long)]
    json: PathBuf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(&args),
        Cmd::Report { runs } => report(&runs),
    }
}

// === run ===

/// One simulated node.
struct Node {
    id: ChitchatId,
    handle: ChitchatHandle,
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    /// chitchat's live-nodes watch: meshd rebuilds its proxy view from it.
    live_rx: watch::Receiver<BTreeMap<ChitchatId, Arc<NodeState>>>,
    /// False once killed by a death repetition.
    alive: bool,
}

/// The running simulation, as the measuring thread sees it.
struct Sim<'rt> {
    n: usize,
    nodes: Vec<Node>,
    transport: CountingTransport,
    lag: LagProbe,
    guard: Guard,
    clock: Clock<'rt>,
}

/// How waiting for convergence ended.
enum Setup {
    Converged,
    TimedOut,
    Aborted(String),
}

/// Stops a run before it takes the shared machine's memory: one process holding every node's
/// copy of the cluster grows as N², and a CPU-starved simulation also queues messages. Also
/// stops it after `--max-wall`. On the real clock, in either mode.
struct Guard {
    max_rss_mb: f64,
    min_available_mb: f64,
    deadline: Option<Instant>,
    next_check: Cell<Instant>,
    reason: RefCell<Option<String>>,
}

/// The clock measured durations are taken on.
///
/// Real time: the multi-thread runtime runs by itself; `sleep` sleeps the measuring thread.
/// Virtual time: the runtime runs only inside `sleep` (`block_on`), and tokio's paused clock
/// jumps from timer to timer while every task is idle; between two `sleep`s nothing runs and
/// the clock stands still, so the measuring thread's own work takes no virtual time.
struct Clock<'rt> {
    rt: &'rt Runtime,
    virtual_time: bool,
    /// Wall time spent inside `sleep`: in virtual time, running the simulation (the rest of
    /// the wall time is the measuring thread's own work, e.g. polling).
    sleeping: Cell<Duration>,
}

impl Clock<'_> {
    /// tokio's clock: the real one, or the virtual one of a paused runtime.
    fn now(&self) -> SimInstant {
        let _rt = self.rt.enter();
        SimInstant::now()
    }

    fn since(&self, t: SimInstant) -> Duration {
        self.now().saturating_duration_since(t)
    }

    fn sleep(&self, d: Duration) {
        let wall = Instant::now();
        if self.virtual_time {
            // The timer is made inside the runtime: it needs the runtime's time driver.
            self.rt.block_on(async { tokio::time::sleep(d).await });
        } else {
            std::thread::sleep(d);
        }
        self.sleeping.set(self.sleeping.get() + wall.elapsed());
    }

    fn name(&self) -> &'static str {
        if self.virtual_time { "virtual" } else { "real" }
    }
}

/// `Builder::start_paused` exists only when tokio has its `test-util` feature (see the top of
/// the source). With the feature the inherent method wins over this one; without it this one
/// is called, does nothing, and `run` finds the clock running and says what to do.
trait StartPausedFallback {
    #[allow(
        dead_code,
        reason = "unused when tokio has `test-util`: the inherent method is called then"
    )]
    fn start_paused(&mut self, paused: bool) -> &mut Self;
}

impl StartPausedFallback for tokio::runtime::Builder {
    fn start_paused(&mut self, _paused: bool) -> &mut Self {
        self
    }
}

fn build_runtime(args: &RunArgs) -> anyhow::Result<Runtime> {
    if !args.virtual_time {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(w) = args.workers {
            builder.worker_threads(w);
        }
        return builder
            .enable_all()
            .build()
            .context("building the tokio runtime");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .context("building the tokio runtime")?;
    // A paused clock does not move while the runtime is not running.
    let paused = {
        let _rt = rt.enter();
        let before = SimInstant::now();
        std::thread::sleep(Duration::from_millis(5));
        SimInstant::now() == before
    };
    if !paused {
        bail!(
            "--virtual-time needs tokio's test-util feature: build with `cargo build --release \
             -p mesh-bench --bin gossip-convergence --features tokio/test-util` (as \
             bench/gossip.sh does)"
        );
    }
    Ok(rt)
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let interval = args.gossip_interval.unwrap_or(DEFAULT_GOSSIP_INTERVAL);
    let wall0 = Instant::now();
    let rt = build_runtime(args)?;
    let clock = Clock {
        rt: &rt,
        virtual_time: args.virtual_time,
        sleeping: Cell::new(Duration::ZERO),
    };
    let transport = CountingTransport::new();
    // In virtual time every timer fires exactly on time: nothing to probe.
    let lag = if args.virtual_time {
        LagProbe::disabled()
    } else {
        LagProbe::spawn(&rt)
    };
    let mut rng = SplitMix(args.seed);
    let mut out = json!({
        "nodes": args.nodes,
        "clock": clock.name(),
        "gossip_interval_ms": interval.as_secs_f64() * 1e3,
        "seeds_per_node": SEEDS_PER_NODE,
        "boot_spread_ms": args.boot_spread.unwrap_or(interval).as_secs_f64() * 1e3,
        "node_name_example": node_name(0, &args.name_suffix),
        "protocol": format!("{:?}", args.protocol),
        "tokio_workers": rt.metrics().num_workers(),
        "cpus": std::thread::available_parallelism().map_or(0, |c| c.get()),
        "loadavg_start": loadavg(),
        "endpoint_timeout_s": args.endpoint_timeout.as_secs_f64(),
        "death_timeout_s": args.death_timeout.as_secs_f64(),
    });
    let t0 = clock.now();
    let nodes = spawn_cluster(&rt, args, interval, &transport, &mut rng)?;
    let guard = Guard::new(args.max_rss_mb, args.min_available_mb, args.max_wall);
    let mut sim = Sim {
        n: nodes.len(),
        nodes,
        transport,
        lag,
        guard,
        clock,
    };
    out["spawn_s"] = json!(sim.clock.since(t0).as_secs_f64());
    out["spawn_wall_s"] = json!(wall0.elapsed().as_secs_f64());
    measure(&mut sim, args, interval, &mut rng, t0, &mut out);
    out["aborted"] = json!(sim.guard.reason());
    out["loadavg_end"] = json!(loadavg());
    out["refused_total"] = json!(sim.transport.counters.snapshot().refused);
    out["sim_s"] = json!(sim.clock.since(t0).as_secs_f64());
    let wall = wall0.elapsed();
    out["wall_s"] = json!(wall.as_secs_f64());
    // In virtual time, what the measuring thread itself took (start-up, polling, reporting).
    out["measuring_wall_s"] = json!(
        args.virtual_time
            .then(|| wall.saturating_sub(sim.clock.sleeping.get()).as_secs_f64())
    );
    out["peak_rss_mb"] = json!(peak_rss_mb());
    let text = serde_json::to_string_pretty(&out).context("encoding the results")?;
    std::fs::write(&args.json, text).with_context(|| format!("writing {}", args.json.display()))?;
    // The nodes hold the runtime's tasks; dropping the runtime stops them without waiting.
    drop(sim);
    rt.shutdown_background();
    Ok(())
}

/// The phases, in order, each recorded into `out`; stops early if the guard trips.
fn measure(
    sim: &mut Sim<'_>,
    args: &RunArgs,
    interval: Duration,
    rng: &mut SplitMix,
    t0: SimInstant,
    out: &mut Value,
) {
    let n = sim.n;
    let (setup, timeline) = sim.wait_converged(t0, args.converge_timeout);
    out["setup_s"] = json!(sim.clock.since(t0).as_secs_f64());
    out["converged"] = json!(matches!(setup, Setup::Converged));
    out["setup_timeline"] = json!(timeline);
    out["smallest_view_at_setup"] = json!(sim.views().into_iter().min());
    log(
        n,
        format_args!(
            "setup: converged={} after {:.1}s ({} clock)",
            out["converged"],
            out["setup_s"].as_f64().unwrap_or_default(),
            sim.clock.name(),
        ),
    );
    if let Setup::Aborted(why) = setup {
        log(n, format_args!("aborted: {why}"));
        return;
    }
    sim.wait(SETTLE);
    out["rss_mb_after_setup"] = json!(rss_mb());
    out["steady"] = sim.measure_steady(args.window);
    log(n, format_args!("steady state: {}", out["steady"]));

    let picks = rng.distinct(args.reps + args.death_reps.unwrap_or(args.reps), n);
    let (origins, victims) = picks.split_at(args.reps.min(picks.len()));
    sim.lag.take();
    let mut endpoint = Vec::new();
    for (rep, &origin) in origins.iter().enumerate() {
        if sim.guard.stop() {
            break;
        }
        pause(sim, rng, interval);
        let r = sim.new_endpoint(origin, rep, args.endpoint_timeout);
        log(n, format_args!("new endpoint from node {origin}: {r}"));
        endpoint.push(r);
    }
    out["endpoint"] = json!(endpoint);
    out["endpoint_lag"] = sim.lag.take();
    let mut death = Vec::new();
    for &victim in victims {
        if sim.guard.stop() {
            break;
        }
        pause(sim, rng, interval);
        let r = sim.kill(victim, args.death_timeout);
        log(n, format_args!("killed node {victim}: {r}"));
        death.push(r);
    }
    out["death"] = json!(death);
    out["death_lag"] = sim.lag.take();
}

fn log(n: usize, what: std::fmt::Arguments<'_>) {
    eprintln!("[gossip-convergence N={n}] {what}");
}

/// Waits between repetitions.
fn pause(sim: &Sim<'_>, rng: &mut SplitMix, interval: Duration) {
    let jitter = interval.mul_f64(rng.below(1000) as f64 / 1000.0);
    sim.wait(REP_GAP + jitter);
}

/// Starts all N nodes together, as a fleet booting at once, each at a random offset within
/// one gossip interval (or `--boot-spread`) and with its own generation: independent hosts do
/// not tick in step, and nodes that all gossip at the same instant would relay a change several
/// hops within one round of the simulation.
fn spawn_cluster(
    rt: &Runtime,
    args: &RunArgs,
    interval: Duration,
    transport: &CountingTransport,
    rng: &mut SplitMix,
) -> anyhow::Result<Vec<Node>> {
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut starting = Vec::with_capacity(args.nodes as usize);
    for i in 0..args.nodes as usize {
        let addr = SocketAddr::from((node_ip(i), GOSSIP_PORT));
        let spread = args.boot_spread.unwrap_or(interval);
        let offset = spread.mul_f64(rng.below(1000) as f64 / 1000.0);
        let generation = generation + offset.as_millis() as u64;
        let id = ChitchatId::new(node_name(i, &args.name_suffix), generation, addr);
        let seeds = rng
            .distinct(SEEDS_PER_NODE.min(i), i)
            .into_iter()
            .map(|j| SocketAddr::from((node_ip(j), GOSSIP_PORT)).to_string())
            .collect();
        let mut config =
            membership::chitchat_config(id.clone(), CLUSTER_ID.to_owned(), addr, seeds, interval);
        config.protocol_version = args.protocol;
        let transport = transport.clone();
        starting.push(rt.spawn(async move {
            tokio::time::sleep(offset).await;
            let handle = spawn_chitchat(config, published_keys(i), &transport).await?;
            let chitchat = handle.chitchat();
            let live_rx = chitchat.lock().await.live_nodes_watcher();
            anyhow::Ok(Node {
                id,
                handle,
                chitchat,
                live_rx,
                alive: true,
            })
        }));
    }
    let mut nodes = Vec::with_capacity(starting.len());
    for task in starting {
        nodes.push(rt.block_on(task).context("node start task panicked")??);
    }
    Ok(nodes)
}

/// 10.0.0.1, 10.0.0.2, ... 10.0.0.250, 10.0.1.1, ...
fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        (i / 62_500) as u8,
        (i / 250 % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

fn node_name(i: usize, suffix: &str) -> String {
    format!("node-{:04}{suffix}", i + 1)
}

fn label(s: &str) -> Label {
    Label::new(s).expect("benchmark labels are valid DNS labels")
}

/// What meshd publishes at start (`Membership::start`): its node info and its services.
fn published_keys(i: usize) -> Vec<(String, String)> {
    let info = NodeInfo {
        v: gossip::VERSION,
        inbound: SocketAddr::from((node_ip(i), INBOUND_PORT)),
        datacenter: label("dc1"),
        zone: label(ZONES[i % ZONES.len()]),
        site: Some(label("default")),
        state: gossip::NodeState::Serving,
    };
    let service = ServiceKey::new(label("default"), label(&format!("svc-{:02}", i % SERVICES)));
    vec![
        (gossip::KEY_NODE.to_owned(), gossip::encode(&info)),
        (
            gossip::service_key(&service),
            gossip::encode(&service_info()),
        ),
    ]
}

fn service_info() -> ServiceInfo {
    ServiceInfo {
        v: gossip::VERSION,
        protocol: Protocol::Http.as_str().to_owned(),
        labels: [("version".to_owned(), "v1".to_owned())].into(),
        healthy: true,
    }
}

/// p50/p99/max in ms over the nodes that saw the event, and how many did.
fn spread(times: &[Option<Duration>]) -> Value {
    let mut ms: Vec<f64> = times
        .iter()
        .flatten()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    let all = ms.len() == times.len();
    json!({
        "seen": ms.len(),
        "of": times.len(),
        "p50_ms": pct(&ms, 0.50),
        "p99_ms": pct(&ms, 0.99),
        // Only a real maximum when every node saw it.
        "max_ms": if all { ms.last().copied() } else { None },
    })
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

// === impl Sim ===

impl Sim<'_> {
    /// Size of every node's live set.
    fn views(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|nd| nd.live_rx.borrow().len())
            .collect()
    }

    /// SYNs sent since `since`, per node and second, as gossip rounds (each round sends
    /// `GOSSIP_FANOUT` SYNs).
    fn rounds_per_node_s(&self, since: &CounterSnapshot, secs: f64, nodes: usize) -> f64 {
        let syn = self.transport.counters.snapshot().msgs[0] - since.msgs[0];
        syn as f64 / nodes as f64 / secs / GOSSIP_FANOUT
    }

    /// Lets the simulation run for `d` (in steps, so that the guard is looked at meanwhile).
    fn wait(&self, d: Duration) {
        let start = self.clock.now();
        loop {
            let left = d.saturating_sub(self.clock.since(start));
            if left.is_zero() || self.guard.stop() {
                return;
            }
            self.clock.sleep(left.min(Guard::EVERY));
        }
    }

    /// Waits until every node's live set has N members, sampling progress every
    /// `PROGRESS_EVERY`.
    fn wait_converged(&self, t0: SimInstant, timeout: Duration) -> (Setup, Vec<Value>) {
        let n = self.n;
        let mut timeline = Vec::new();
        let mut mark = (self.clock.now(), self.transport.counters.snapshot());
        let wall0 = Instant::now();
        loop {
            let mut views = self.views();
            let full = views.iter().filter(|&&v| v >= n).count();
            if full == n {
                return (Setup::Converged, timeline);
            }
            if self.clock.since(t0) > timeout {
                return (Setup::TimedOut, timeline);
            }
            if self.guard.stop() {
                let why = self.guard.reason().unwrap_or_default();
                return (Setup::Aborted(why), timeline);
            }
            let since_mark = self.clock.since(mark.0);
            if since_mark >= PROGRESS_EVERY {
                views.sort_unstable();
                let secs = since_mark.as_secs_f64();
                let synack = self.transport.counters.snapshot().msgs[1] - mark.1.msgs[1];
                let sample = json!({
                    "t_s": self.clock.since(t0).as_secs_f64(),
                    "wall_s": wall0.elapsed().as_secs_f64(),
                    "nodes_seeing_all": full,
                    "smallest_view": views[0],
                    "median_view": views[n / 2],
                    "rounds_per_node_s": self.rounds_per_node_s(&mark.1, secs, n),
                    "syn_acks_per_node_s": synack as f64 / n as f64 / secs,
                    "timer_lateness": self.lag.take(),
                    "rss_mb": rss_mb(),
                });
                log(n, format_args!("setup progress: {sample}"));
                timeline.push(sample);
                mark = (self.clock.now(), self.transport.counters.snapshot());
            }
            self.clock.sleep(POLL_INTERVAL);
        }
    }

    /// Bandwidth and CPU over `window` of a converged cluster.
    fn measure_steady(&self, window: Duration) -> Value {
        let counters = &self.transport.counters;
        let (c0, p0, m0) = (counters.snapshot(), process_cpu_ns(), machine_cpu());
        let (t0, wall0) = (self.clock.now(), Instant::now());
        self.lag.take();
        self.wait(window);
        let (c1, p1, m1) = (counters.snapshot(), process_cpu_ns(), machine_cpu());
        // Seconds of the cluster's life (virtual in virtual time), and of the machine's.
        let secs = self.clock.since(t0).as_secs_f64();
        let wall = wall0.elapsed().as_secs_f64();
        let per_node = |v: u64| v as f64 / self.n as f64 / secs;
        let kinds: Vec<Value> = (0..KINDS)
            .map(|k| {
                let msgs = c1.msgs[k] - c0.msgs[k];
                let bytes = c1.bytes[k] - c0.bytes[k];
                json!({
                    "kind": KIND_NAMES[k],
                    "msgs_per_node_s": per_node(msgs),
                    "mean_bytes": if msgs == 0 { 0.0 } else { bytes as f64 / msgs as f64 },
                })
            })
            .collect();
        let msgs: u64 = (0..KINDS).map(|k| c1.msgs[k] - c0.msgs[k]).sum();
        let bytes: u64 = (0..KINDS).map(|k| c1.bytes[k] - c0.bytes[k]).sum();
        // Real time: cores. Virtual time: CPU seconds per simulated second.
        let cpu_per_s = (p1 - p0) as f64 / 1e9 / secs;
        json!({
            "window_s": secs,
            "window_wall_s": wall,
            "msgs_per_node_s": per_node(msgs),
            "bytes_per_node_s": per_node(bytes),
            "wire_bytes_per_node_s": per_node(c1.wire_bytes - c0.wire_bytes),
            "rounds_per_node_s": per_node(c1.msgs[0] - c0.msgs[0]) / GOSSIP_FANOUT,
            "kinds": kinds,
            "largest_message_bytes": c1.max_len,
            "refused": c1.refused - c0.refused,
            "process_cpu_cores": (!self.clock.virtual_time).then_some(cpu_per_s),
            "process_cpu_s_per_sim_s": self.clock.virtual_time.then_some(cpu_per_s),
            "cpu_ms_per_node_s": cpu_per_s * 1e3 / self.n as f64,
            "machine_busy_cores": (m1.busy - m0.busy) / USER_HZ / wall,
            "machine_steal_cores": (m1.steal - m0.steal) / USER_HZ / wall,
            "timer_lateness": self.lag.take(),
        })
    }

    /// One node publishes a new service; times until each other node has it.
    fn new_endpoint(&self, origin: usize, rep: usize, timeout: Duration) -> Value {
        let nodes = &self.nodes;
        let service = ServiceKey::new(label("default"), label(&format!("bench-new-{rep}")));
        let key = gossip::service_key(&service);
        let value = gossip::encode(&service_info());
        let origin_id = nodes[origin].id.clone();
        let mark = self.transport.counters.snapshot();
        let start = {
            // Not in an async context (in virtual time the runtime is not even running).
            let mut chitchat = nodes[origin].chitchat.blocking_lock();
            chitchat.self_node_state().set(&key, &value);
            self.clock.now()
        };
        let has_key = |state: Option<&NodeState>| state.is_some_and(|s| s.get(&key).is_some());
        let watched = |i: usize| i != origin && nodes[i].alive;
        let mut in_state = vec![None; nodes.len()];
        let mut in_view = vec![None; nodes.len()];
        loop {
            let now = self.clock.since(start);
            for (i, node) in nodes.iter().enumerate().filter(|(i, _)| watched(*i)) {
                // A node busy in a gossip round is looked at again on the next pass (in real
                // time; in virtual time no round runs while the nodes are looked at).
                if in_state[i].is_none()
                    && let Ok(chitchat) = node.chitchat.try_lock()
                    && has_key(chitchat.node_state(&origin_id))
                {
                    in_state[i] = Some(now);
                }
                if in_view[i].is_none()
                    && has_key(node.live_rx.borrow().get(&origin_id).map(|state| &**state))
                {
                    in_view[i] = Some(now);
                }
            }
            let pending = (0..nodes.len())
                .filter(|&i| watched(i) && (in_state[i].is_none() || in_view[i].is_none()))
                .count();
            if pending == 0 || now > timeout || self.guard.stop() {
                break;
            }
            self.clock.sleep(POLL_INTERVAL);
        }
        let secs = self.clock.since(start).as_secs_f64();
        let alive = nodes.iter().filter(|nd| nd.alive).count();
        let pick = |v: &[Option<Duration>]| -> Vec<Option<Duration>> {
            (0..nodes.len())
                .filter(|&i| watched(i))
                .map(|i| v[i])
                .collect()
        };
        json!({
            "node": origin,
            "rounds_per_node_s": self.rounds_per_node_s(&mark, secs, alive),
            "state": spread(&pick(&in_state)),
            "view": spread(&pick(&in_view)),
        })
    }

    /// Aborts one node's gossip task (no goodbye, like `kill -9`); times until each remaining
    /// node drops it from its live set.
    fn kill(&mut self, victim: usize, timeout: Duration) -> Value {
        self.nodes[victim].handle.abort();
        self.nodes[victim].alive = false;
        let mark = self.transport.counters.snapshot();
        let start = self.clock.now();
        let victim_id = self.nodes[victim].id.clone();
        let alive: Vec<&Node> = self.nodes.iter().filter(|nd| nd.alive).collect();
        let mut gone = vec![None; alive.len()];
        loop {
            let now = self.clock.since(start);
            for (i, node) in alive.iter().enumerate() {
                if gone[i].is_none() && !node.live_rx.borrow().contains_key(&victim_id) {
                    gone[i] = Some(now);
                }
            }
            let done = gone.iter().all(Option::is_some);
            if done || now > timeout || self.guard.stop() {
                break;
            }
            self.clock.sleep(POLL_INTERVAL);
        }
        let secs = self.clock.since(start).as_secs_f64();
        json!({
            "node": victim,
            "rounds_per_node_s": self.rounds_per_node_s(&mark, secs, alive.len()),
            "gone": spread(&gone),
        })
    }
}

// === impl Guard ===

impl Guard {
    /// How often memory is looked at.
    const EVERY: Duration = Duration::from_secs(1);

    fn new(max_rss_mb: f64, min_available_mb: f64, max_wall: Option<Duration>) -> Self {
        Self {
            max_rss_mb,
            min_available_mb,
            deadline: max_wall.map(|d| Instant::now() + d),
            next_check: Cell::new(Instant::now()),
            reason: RefCell::new(None),
        }
    }

    /// Whether the run must stop (checked at most once per `EVERY`; once tripped, stays so).
    fn stop(&self) -> bool {
        if self.reason.borrow().is_some() {
            return true;
        }
        let now = Instant::now();
        if now < self.next_check.get() {
            return false;
        }
        self.next_check.set(now + Self::EVERY);
        let (rss, available) = (rss_mb(), mem_available_mb());
        let why = if rss > self.max_rss_mb {
            format!(
                "RSS reached {rss:.0} MB (limit --max-rss-mb {:.0})",
                self.max_rss_mb
            )
        } else if available < self.min_available_mb {
            format!("the machine had only {available:.0} MB available")
        } else if self.deadline.is_some_and(|d| now >= d) {
            "wall time limit (--max-wall) reached".to_owned()
        } else {
            return false;
        };
        *self.reason.borrow_mut() = Some(why);
        true
    }

    fn reason(&self) -> Option<String> {
        self.reason.borrow().clone()
    }
}

// === impl SplitMix ===

/// SplitMix64: reproducible choices without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is negligible for small n).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `k` distinct values of `0..n` (fewer if n < k).
    fn distinct(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k.min(n));
        while out.len() < k.min(n) {
            let v = self.below(n);
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }
}

// === impl LagProbe ===

/// A tokio task that sleeps `LAG_PROBE_PERIOD` again and again and records how late it wakes:
/// chitchat's round timer sits in the same queues, so this is how late rounds start. None in
/// virtual time, where every timer fires exactly on time.
struct LagProbe {
    hist: Option<Arc<Mutex<Histogram<u64>>>>,
}

impl LagProbe {
    fn spawn(rt: &Runtime) -> Self {
        let hist = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
        let hist = Arc::new(Mutex::new(hist));
        let h = hist.clone();
        // Fire-and-forget: ends with the runtime.
        rt.spawn(async move {
            loop {
                let due = tokio::time::Instant::now() + LAG_PROBE_PERIOD;
                tokio::time::sleep_until(due).await;
                let late = due.elapsed().as_micros() as u64;
                h.lock()
                    .expect("lag lock is never poisoned")
                    .saturating_record(late.max(1));
            }
        });
        Self { hist: Some(hist) }
    }

    fn disabled() -> Self {
        Self { hist: None }
    }

    /// Lateness (ms) since the last call, and starts over; null when disabled.
    /// No sample at all means the probe itself never got to run: the workers were saturated.
    fn take(&self) -> Value {
        let Some(hist) = &self.hist else {
            return Value::Null;
        };
        let mut h = hist.lock().expect("lag lock is never poisoned");
        let ms = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e3);
        let out = json!({
            "samples": h.len(),
            "p50_ms": ms(0.50),
            "p99_ms": ms(0.99),
            "max_ms": ms(1.0),
        });
        h.reset();
        out
    }
}

// === impl CountingTransport ===

/// Message kinds, in counter order.
/// Message kinds counted, in [`MessageKind`] order.
const KINDS: usize = MessageKind::ALL.len();
const KIND_NAMES: [&str; KINDS] = [
    "syn",
    "syn-ack",
    "ack",
    "bad-cluster",
    "ping",
    "ping-req",
    "ping-ack",
];

#[derive(Default)]
struct Counters {
    msgs: [AtomicU64; KINDS],
    bytes: [AtomicU64; KINDS],
    /// Estimated bytes on the wire: sealed, in UDP, in IPv4 fragments.
    wire_bytes: AtomicU64,
    max_len: AtomicU64,
    /// Messages too long for one sealed datagram, not sent (meshd refuses them too).
    refused: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct CounterSnapshot {
    msgs: [u64; KINDS],
    bytes: [u64; KINDS],
    wire_bytes: u64,
    max_len: u64,
    refused: u64,
}

impl Counters {
    fn record(&self, kind: usize, len: usize) {
        let len = len as u64;
        self.msgs[kind].fetch_add(1, Ordering::Relaxed);
        self.bytes[kind].fetch_add(len, Ordering::Relaxed);
        let udp = len + SEAL_OVERHEAD as u64 + UDP_HEADER;
        let wire = udp + IPV4_HEADER * udp.div_ceil(FRAGMENT_PAYLOAD);
        self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        self.max_len.fetch_max(len, Ordering::Relaxed);
    }

    fn snapshot(&self) -> CounterSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            msgs: std::array::from_fn(|k| load(&self.msgs[k])),
            bytes: std::array::from_fn(|k| load(&self.bytes[k])),
            wire_bytes: load(&self.wire_bytes),
            max_len: load(&self.max_len),
            refused: load(&self.refused),
        }
    }
}

/// chitchat's `ChannelTransport` limited to what fits one sealed UDP datagram, counting every
/// message by kind. (`Transport` and `Socket` are `async_trait` traits; their methods are
/// written out as the boxed futures the macro would produce, so this crate needs no
/// `async-trait` dependency.)
#[derive(Clone)]
struct CountingTransport {
    inner: ChannelTransport,
    counters: Arc<Counters>,
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    counters: Arc<Counters>,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl CountingTransport {
    fn new() -> Self {
        Self {
            inner: ChannelTransport::with_mtu(MAX_PLAINTEXT_LEN),
            counters: Arc::default(),
        }
    }
}

impl Transport for CountingTransport {
    fn open<'s, 'f>(
        &'s self,
        listen_addr: SocketAddr,
    ) -> BoxFuture<'f, anyhow::Result<Box<dyn Socket>>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let inner = self.inner.open(listen_addr).await?;
            let counters = self.counters.clone();
            Ok(Box::new(CountingSocket { inner, counters }) as Box<dyn Socket>)
        })
    }
}

impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn send<'s, 'f>(
        &'s mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> BoxFuture<'f, anyhow::Result<SendOutcome>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let kind = MessageKind::of(&envelope.message) as usize;
            // The only error of ChannelTransport's send is "larger than the MTU".
            let outcome = self.inner.send(to, envelope).await;
            match &outcome {
                Ok(sent) => self.counters.record(kind, sent.num_bytes_sent),
                Err(_) => _ = self.counters.refused.fetch_add(1, Ordering::Relaxed),
            }
            outcome
        })
    }

    fn recv<'s, 'f>(&'s mut self) -> BoxFuture<'f, anyhow::Result<RecvOutcome>>
    where
        's: 'f,
        Self: 'f,
    {
        self.inner.recv()
    }
}

// === /proc ===

/// CPU time of every thread of this process, ns (`/proc/self/task/*/schedstat`).
fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

struct MachineCpu {
    busy: f64,
    steal: f64,
}

/// Busy (not idle, not iowait) and steal ticks of all CPUs (`/proc/stat`).
fn machine_cpu() -> MachineCpu {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    MachineCpu {
        busy: get(0) + get(1) + get(2) + get(5) + get(6) + get(7),
        steal: get(7),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `MemAvailable` of the machine, MB.
fn mem_available_mb() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::INFINITY, |kb| kb / 1024.0)
}

/// This process's resident memory, MB.
fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

/// This process's peak resident memory, MB.
fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

/// A `kB` field of `/proc/self/status`, MB.
fn proc_status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// === report ===

fn report(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut runs = paths
        .iter()
        .map(|p| read_run(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    runs.sort_by_key(|r| {
        (
            r["nodes"].as_u64(),
            r["node_name_example"].as_str().map(str::len),
            clock_of(r) == "real",
            r["gossip_interval_ms"].as_f64().map(|v| v as u64),
        )
    });
    let mut out = format!(
        "Failure detector as meshd ships it (`meshd::membership`): phi threshold {}, {} \
         heartbeat intervals per peer, intervals over {:?} not sampled, dead nodes kept {:?}. \
         Largest message meshd can send: {MAX_PLAINTEXT_LEN} bytes before sealing.\n\n",
        membership::DEFAULT_PHI_THRESHOLD,
        membership::SAMPLING_WINDOW,
        membership::DEFAULT_MAX_INTERVAL,
        membership::DEFAULT_DEAD_NODE_GRACE,
    );
    out += "Clock: *virtual* = discrete-event simulation on tokio's paused clock (every round on \
            time whatever the CPU; all times are simulated time), *real* = real time on a \
            multi-thread runtime (rounds run late when the host cannot keep up).\n\n";
    out += "| nodes | clock | gossip interval, ms | setup: start → every node sees N live, s | new endpoint known by all, ms: median (min–max, reps) | same, in gossip rounds | new endpoint, median node, ms | new endpoint in every node's live-nodes watch (meshd's view), ms | death known by all, s: median (min–max, reps) | bytes/s per node | msgs/s per node |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in &runs {
        let _ = writeln!(out, "{}", headline(r));
    }
    out += "\nIn virtual time, CPU is per simulated second: \"gossip CPU per node\" is CPU ms per \
            node per simulated second, \"simulation CPU\" is CPU seconds per simulated second (on \
            one thread, so also about the wall seconds each simulated second took), and timer \
            lateness is n/a (every timer fires on time). \"Machine busy\" is always per real \
            second.\n\n";
    out += "| nodes | clock | gossip interval, ms | gossip rounds/s per node (SYNs ÷ 3) | mean SYN / SYN-ACK / ACK, bytes | largest message, bytes | refused as too long for one sealed datagram | est. wire bytes/s per node (sealed, UDP, IPv4 fragments) | gossip CPU per node, ms/s | simulation CPU: cores (real) or CPU s per simulated s (virtual) | machine busy / steal, cores | timer lateness p50 / p99 / max, ms: steady · endpoint · death | RSS, MB | load average start → end |\n";
    out +=
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in runs.iter().filter(|r| r["steady"].is_object()) {
        let _ = writeln!(out, "{}", costs(r));
    }
    out += "\nEvery repetition (ms; median / p99 / max over the nodes; rounds/s is the gossip rate the nodes achieved meanwhile):\n\n";
    out += "| nodes | clock | event | from / victim node | median | p99 | max | seen by | rounds/s per node |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in &runs {
        for (what, list, field) in [
            ("new endpoint, in state", "endpoint", "state"),
            ("new endpoint, in live-nodes watch", "endpoint", "view"),
            ("death", "death", "gone"),
        ] {
            for e in r[list].as_array().into_iter().flatten() {
                let d = &e[field];
                let _ = writeln!(
                    out,
                    "| {} | {} | {what} | {} | {} | {} | {} | {} of {} | {} |",
                    nodes_label(r),
                    clock_of(r),
                    e["node"],
                    num(d["p50_ms"].as_f64(), 0),
                    num(d["p99_ms"].as_f64(), 0),
                    num(d["max_ms"].as_f64(), 0),
                    d["seen"],
                    d["of"],
                    num(e["rounds_per_node_s"].as_f64(), 2),
                );
            }
        }
    }
    for r in runs.iter().filter(|r| r["converged"] != json!(true)) {
        let _ = writeln!(
            out,
            "\nSetup of the run with {} nodes ({} clock), which did not converge:\n",
            nodes_label(r),
            clock_of(r),
        );
        out += "| s since start | nodes seeing all | smallest / median view | rounds/s per node | SYN-ACKs/s per node | timer lateness p99 / max, ms (— = the timer never fired) | RSS, MB |\n";
        out += "| --- | --- | --- | --- | --- | --- | --- |\n";
        for s in r["setup_timeline"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "| {} | {} | {} / {} | {} | {} | {} / {} | {} |",
                num(s["t_s"].as_f64(), 0),
                s["nodes_seeing_all"],
                s["smallest_view"],
                s["median_view"],
                num(s["rounds_per_node_s"].as_f64(), 2),
                num(s["syn_acks_per_node_s"].as_f64(), 1),
                num(s["timer_lateness"]["p99_ms"].as_f64(), 0),
                num(s["timer_lateness"]["max_ms"].as_f64(), 0),
                num(s["rss_mb"].as_f64(), 0),
            );
        }
    }
    out += "\nRuns: simulated (or real) seconds from start to end, the wall time they took, and \
            the measuring thread's own share of it in virtual time (start-up, polling every \
            node every 10 ms, the results; the rest is the simulation running).\n\n";
    out += "| nodes | clock | run, s | wall time, s | wall s per run s | measuring thread, s of wall | peak RSS, MB | stopped early |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in &runs {
        let run_s = r["sim_s"].as_f64().or(r["wall_s"].as_f64());
        let wall_s = r["wall_s"].as_f64();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            nodes_label(r),
            clock_of(r),
            num(run_s, 0),
            num(wall_s, 0),
            num(wall_s.zip(run_s).map(|(w, s)| w / s), 2),
            num(r["measuring_wall_s"].as_f64(), 1),
            num(r["peak_rss_mb"].as_f64(), 0),
            r["aborted"].as_str().unwrap_or("no"),
        );
    }
    print!("{out}");
    Ok(())
}

/// "virtual" or "real" (runs from before the virtual clock were real).
fn clock_of(r: &Value) -> &str {
    r["clock"].as_str().unwrap_or("real")
}

/// The headline row of one run.
fn headline(r: &Value) -> String {
    let setup = match (r["converged"].as_bool(), r["aborted"].as_str()) {
        (Some(true), _) => num(r["setup_s"].as_f64(), 1),
        (_, Some(why)) => format!("aborted after {} s: {why}", num(r["setup_s"].as_f64(), 0)),
        _ => format!("did not converge in {} s", num(r["setup_s"].as_f64(), 0)),
    };
    let ep = r["endpoint"].as_array().cloned().unwrap_or_default();
    let death = r["death"].as_array().cloned().unwrap_or_default();
    let ep_timeout = r["endpoint_timeout_s"].as_f64().unwrap_or(0.0) * 1e3;
    let death_timeout = r["death_timeout_s"].as_f64().unwrap_or(0.0) * 1e3;
    // Rounds: how long the last node took, times the gossip rate the nodes achieved meanwhile.
    let mut rounds: Vec<f64> = ep
        .iter()
        .filter_map(|e| {
            Some(e["state"]["max_ms"].as_f64()? / 1e3 * e["rounds_per_node_s"].as_f64()?)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    format!(
        "| {} | {} | {} | {setup} | {} | {} | {} | {} | {} | {} | {} |",
        nodes_label(r),
        clock_of(r),
        num(r["gossip_interval_ms"].as_f64(), 0),
        over_reps(&ep, "/state/max_ms", ep_timeout, 1.0, 0),
        num(pct(&rounds, 0.5), 1),
        median_over_reps(&ep, "/state/p50_ms"),
        over_reps(&ep, "/view/max_ms", ep_timeout, 1.0, 0),
        over_reps(&death, "/gone/max_ms", death_timeout, 1e-3, 2),
        si(r["steady"]["bytes_per_node_s"].as_f64()),
        num(r["steady"]["msgs_per_node_s"].as_f64(), 0),
    )
}

/// N, with the node name length when it is not the default's.
fn nodes_label(r: &Value) -> String {
    let mut label = r["nodes"].to_string();
    let name_len = r["node_name_example"].as_str().map_or(0, str::len);
    if name_len != node_name(0, "").len() {
        let _ = write!(label, " ({name_len}-character names)");
    }
    if let Some(protocol) = r["protocol"].as_str().filter(|p| *p != "V2") {
        let _ = write!(label, " (protocol {protocol})");
    }
    label
}

fn parse_protocol(s: &str) -> Result<ProtocolVersion, String> {
    match s {
        "v0" => Ok(ProtocolVersion::V0),
        "v1" => Ok(ProtocolVersion::V1),
        "v2" => Ok(ProtocolVersion::V2),
        _ => Err(format!("unknown protocol {s:?}: v0, v1 or v2")),
    }
}

/// The cost row of one run.
fn costs(r: &Value) -> String {
    let s = &r["steady"];
    let size = |k: usize| num(s["kinds"][k]["mean_bytes"].as_f64(), 0);
    let lag = |v: &Value| {
        let f = |k: &str| num(v[k].as_f64(), 0);
        format!("{} / {} / {}", f("p50_ms"), f("p99_ms"), f("max_ms"))
    };
    let lateness = if clock_of(r) == "virtual" {
        "n/a".to_owned()
    } else {
        format!(
            "{} · {} · {}",
            lag(&s["timer_lateness"]),
            lag(&r["endpoint_lag"]),
            lag(&r["death_lag"])
        )
    };
    let cpu = s["process_cpu_cores"]
        .as_f64()
        .or(s["process_cpu_s_per_sim_s"].as_f64());
    format!(
        "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} / {} | {lateness} | {} | {} → {} |",
        nodes_label(r),
        clock_of(r),
        num(r["gossip_interval_ms"].as_f64(), 0),
        num(s["rounds_per_node_s"].as_f64(), 2),
        size(0),
        size(1),
        size(2),
        s["largest_message_bytes"],
        r["refused_total"],
        si(s["wire_bytes_per_node_s"].as_f64()),
        num(s["cpu_ms_per_node_s"].as_f64(), 1),
        num(cpu, 2),
        num(s["machine_busy_cores"].as_f64(), 2),
        num(s["machine_steal_cores"].as_f64(), 2),
        num(r["rss_mb_after_setup"].as_f64(), 0),
        r["loadavg_start"].as_str().unwrap_or(""),
        r["loadavg_end"].as_str().unwrap_or(""),
    )
}

fn read_run(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if v["nodes"].as_u64().is_none() {
        bail!("{}: not a gossip-convergence result", path.display());
    }
    Ok(v)
}

/// "median (min–max)" of the value at `pointer` over repetitions, scaled; a repetition that did
/// not finish counts as longer than the timeout.
fn over_reps(reps: &[Value], pointer: &str, timeout_ms: f64, scale: f64, digits: usize) -> String {
    let mut v: Vec<f64> = reps
        .iter()
        .map(|r| {
            r.pointer(pointer)
                .and_then(Value::as_f64)
                .unwrap_or(f64::INFINITY)
        })
        .collect();
    if v.is_empty() {
        return "—".to_owned();
    }
    v.sort_by(f64::total_cmp);
    let show = |x: f64| {
        if x.is_finite() {
            format!("{:.digits$}", x * scale)
        } else {
            format!("> {:.digits$}", timeout_ms * scale)
        }
    };
    let median = pct(&v, 0.5).unwrap_or(f64::INFINITY);
    let reps = if v.len() == 1 { "rep" } else { "reps" };
    format!(
        "{} ({}–{}, {} {reps})",
        show(median),
        show(v[0]),
        show(v[v.len() - 1]),
        v.len()
    )
}

/// Median over repetitions of the value at `pointer`, ms.
fn median_over_reps(reps: &[Value], pointer: &str) -> String {
    let mut v: Vec<f64> = reps
        .iter()
        .filter_map(|r| r.pointer(pointer).and_then(Value::as_f64))
        .collect();
    v.sort_by(f64::total_cmp);
    num(pct(&v, 0.5), 0)
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |x| format!("{x:.digits$}"))
}

/// Bytes per second with a unit.
fn si(v: Option<f64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(x) if x >= 1e6 => format!("{:.2} MB/s", x / 1e6),
        Some(x) if x >= 1e3 => format!("{:.1} kB/s", x / 1e3),
        Some(x) => format!("{x:.0} B/s"),
    }
}
