//! Failure-detection scenarios for meshd's gossip membership, run against the exact chitchat
//! configuration meshd ships (`meshd::membership::chitchat_config`: default gossip interval,
//! protocol V2, SWIM failure detection) over meshd's own sealed transport — real UDP sockets on loopback, every datagram
//! encoded by chitchat, sealed, opened and replay-checked as in production — with a fault layer
//! under the sockets (`gossip_seal::impair`) that the test turns while the cluster runs:
//!
//! 1. a 3/3 partition: each side marks the other dead within a bound, never its own side, and
//!    the cluster is whole again within a bound after the heal;
//! 2. a node that lost its links to half the others is kept alive by everyone, and keeps everyone
//!    alive itself, through the indirect probes (PING-REQ) of the peers that still reach it;
//! 3. a node whose links flap every second never gets a healthy node marked dead, by anyone,
//!    the flapping node included (it fails every probe during an outage; its suspicions are
//!    held while it hears no one, or it would declare the whole cluster dead each time);
//! 4. a slow (delayed) or lossy node never gets a healthy node marked dead, and its own fate is
//!    reported (it may not flap in the others' views: probes wait out a member's measured round
//!    trip, so a slow node is suspected once, not every round);
//! 5. a killed node is marked dead by every other node within a bound;
//! 6. a node whose process stalls again and again (its whole runtime blocked 0.6-1.5 s, as a
//!    starved or paused process is) never marks a healthy node dead when it wakes to a pile of
//!    expired timers, nor gets one marked dead by anyone, and does not flap in their views (a
//!    stall is a slow ack: probes learn to wait for it).
//!
//! Every invariant is checked on every ~50 ms sample of every node's live/dead sets, over the
//! whole window, not only at its end. Measured times are printed:
//! `cargo test -p meshd --test gossip_scenarios -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat::{ChitchatHandle, ChitchatId};
use meshd::config::{DEFAULT_GOSSIP_INTERVAL, GossipProtocol};
use meshd::gossip_seal::impair::{Fate, Impairment};
use meshd::gossip_seal::{GossipKey, Keyring, SealStats, SealedTransport};
use meshd::membership;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often every node's view is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Time allowed for a fresh cluster to see itself whole.
const CONVERGE_WITHIN: Duration = Duration::from_secs(15);
/// Quiet time after convergence: the failure detector's windows fill with steady-state heartbeat
/// intervals, as on a cluster that has been up for a while.
const SETTLE: Duration = Duration::from_secs(3);
/// Bound asserted on detecting a partitioned or killed node (generous: two CPUs, tests in
/// parallel; the measured value is printed).
const DETECT_WITHIN: Duration = Duration::from_secs(15);
/// Bound asserted on the cluster becoming whole again after a heal.
const HEAL_WITHIN: Duration = Duration::from_secs(15);

/// What happens to sealed datagrams on one directed link.
#[derive(Debug, Clone, Copy, Default)]
struct Fault {
    /// Every datagram lost (a cut link; [`Net::cut`] sets it both ways).
    cut: bool,
    /// Fraction of datagrams lost.
    loss: f64,
    /// Each datagram is held for a uniformly random time in this range (so they also reorder).
    delay: Option<(Duration, Duration)>,
}

/// The faults per (from, to) link, changed by the test while the cluster runs.
#[derive(Clone, Default)]
struct Faults(Arc<Mutex<HashMap<(SocketAddr, SocketAddr), Fault>>>);

/// The network: meshd's sealed transport over loopback UDP with [`Faults`] under every socket.
#[derive(Clone)]
struct Net {
    faults: Faults,
    transport: Arc<SealedTransport>,
    _keyring: Arc<watch::Sender<Arc<Keyring>>>,
}

static NEXT_ADDR: AtomicU32 = AtomicU32::new(0);

/// A loopback address of its own for each node of every cluster this binary starts (tests run
/// in parallel), away from the 127.1.x.x the e2e hosts use.
fn next_addr() -> SocketAddr {
    let n = NEXT_ADDR.fetch_add(1, Ordering::Relaxed);
    let third = (std::process::id() % 50) as u8 * 5 + (n / 250) as u8;
    SocketAddr::from(([127, 3, third, 1 + (n % 250) as u8], 7946))
}
/// One node's view of the cluster at one instant.
#[derive(Debug, Clone)]
struct View {
    live: BTreeSet<String>,
    dead: BTreeSet<String>,
    /// SWIM incarnation of every known node, as last heard here (chitchat's heartbeat under
    /// protocol V2): it rises each time the node refutes a suspicion.
    incarnations: BTreeMap<String, u64>,
}

/// Every node's view (`None` once a node is killed), `at` after the event being measured.
struct Sample {
    at: Duration,
    views: Vec<Option<View>>,
}

/// Samples of one phase of a scenario.
struct Timeline {
    names: Vec<String>,
    samples: Vec<Sample>,
}

struct Node {
    name: String,
    addr: SocketAddr,
    handle: Option<ChitchatHandle>,
}

/// N chitchat nodes over one [`Net`], all seeded with node-0 like a packaged config with one
/// seed.
struct Cluster {
    net: Net,
    nodes: Vec<Node>,
}

/// A current-thread runtime on a thread of its own: blocking that thread stops everything a
/// node runs there at once (gossip loop, timers, socket reads), as the scheduler stops a
/// starved or paused process, while the datagrams sent to it queue in its socket.
struct Stallable {
    runtime: tokio::runtime::Handle,
}

impl Stallable {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            tx.send(runtime.handle().clone())
                .expect("the test waits for the handle");
            runtime.block_on(std::future::pending::<()>());
        });
        Self {
            runtime: rx.recv().expect("the runtime thread starts"),
        }
    }

    /// Blocks the runtime's thread for each of `stalls`, `gap` apart, then returns.
    async fn stall(&self, stalls: Vec<Duration>, gap: Duration) {
        self.runtime
            .spawn(async move {
                for stall in stalls {
                    tokio::time::sleep(gap).await;
                    // Blocking the worker is the point: it stands for the scheduler.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(stall);
                }
            })
            .await
            .expect("the stall schedule runs to its end");
    }
}

// === impl Net ===

impl Net {
    fn new() -> Self {
        let (tx, rx) = watch::channel(Arc::new(Keyring::single(GossipKey::generate())));
        let faults = Faults::default();
        let transport = SealedTransport::new(rx, Arc::new(SealStats::default()))
            .impaired(Arc::new(faults.clone()));
        Self {
            faults,
            transport: Arc::new(transport),
            _keyring: Arc::new(tx),
        }
    }

    fn update(&self, from: SocketAddr, to: SocketAddr, f: impl FnOnce(&mut Fault)) {
        let mut map = self.faults.0.lock().expect("faults lock is never poisoned");
        f(map.entry((from, to)).or_default());
    }

    fn set_fault(&self, from: SocketAddr, to: SocketAddr, fault: Fault) {
        self.update(from, to, |f| *f = fault);
    }

    /// Cuts the link between `a` and `b`, both ways.
    async fn cut(&self, a: SocketAddr, b: SocketAddr) {
        self.update(a, b, |f| f.cut = true);
        self.update(b, a, |f| f.cut = true);
    }

    /// Restores the link between `a` and `b`, both ways.
    async fn mend(&self, a: SocketAddr, b: SocketAddr) {
        self.update(a, b, |f| f.cut = false);
        self.update(b, a, |f| f.cut = false);
    }
}

impl Impairment for Faults {
    fn fate(&self, from: SocketAddr, to: SocketAddr) -> Fate {
        let fault = self
            .0
            .lock()
            .expect("faults lock is never poisoned")
            .get(&(from, to))
            .copied()
            .unwrap_or_default();
        let mut rng = rand::rng();
        if fault.cut || (fault.loss > 0.0 && rng.random_bool(fault.loss)) {
            return Fate::Drop;
        }
        match fault.delay {
            Some((lo, hi)) => Fate::Delay(rng.random_range(lo..=hi)),
            None => Fate::Deliver,
        }
    }
}

// === impl Sample ===

impl Sample {
    fn view(&self, node: usize) -> Option<&View> {
        self.views[node].as_ref()
    }
}

// === impl Timeline ===

impl Timeline {
    /// Panics at the first sample where one of `observers` does not see one of `targets` alive.
    fn assert_always_alive(&self, observers: &[usize], targets: &[usize], what: &str) {
        for s in &self.samples {
            for &o in observers {
                let Some(v) = s.view(o) else { continue };
                for &t in targets {
                    let name = &self.names[t];
                    assert!(
                        v.live.contains(name),
                        "{what}: at +{:.2} s {} sees {name} {} (live {:?}, dead {:?})",
                        s.at.as_secs_f64(),
                        self.names[o],
                        if v.dead.contains(name) {
                            "dead"
                        } else {
                            "unknown"
                        },
                        v.live,
                        v.dead,
                    );
                }
            }
        }
    }

    /// When `observer` first saw `target` dead.
    fn first_dead(&self, observer: usize, target: usize) -> Option<Duration> {
        let name = &self.names[target];
        self.samples
            .iter()
            .find(|s| s.view(observer).is_some_and(|v| v.dead.contains(name)))
            .map(|s| s.at)
    }

    /// How many times `target` changed between alive and not alive in `observer`'s view.
    fn flips(&self, observer: usize, target: usize) -> usize {
        let name = &self.names[target];
        let alive: Vec<bool> = self
            .samples
            .iter()
            .filter_map(|s| s.view(observer).map(|v| v.live.contains(name)))
            .collect();
        alive.windows(2).filter(|w| w[0] != w[1]).count()
    }

    /// Share of samples in which `observer` saw `target` alive.
    fn alive_share(&self, observer: usize, target: usize) -> f64 {
        let name = &self.names[target];
        let alive: Vec<bool> = self
            .samples
            .iter()
            .filter_map(|s| s.view(observer).map(|v| v.live.contains(name)))
            .collect();
        alive.iter().filter(|a| **a).count() as f64 / alive.len().max(1) as f64
    }

    /// How many times `target` refuted a suspicion, as seen by `observer` over the window.
    fn refutations(&self, observer: usize, target: usize) -> u64 {
        let name = &self.names[target];
        let seen: Vec<u64> = self
            .samples
            .iter()
            .filter_map(|s| s.view(observer)?.incarnations.get(name).copied())
            .collect();
        match (seen.first(), seen.last()) {
            (Some(first), Some(last)) => last - first,
            _ => 0,
        }
    }

    fn end(&self) -> Duration {
        self.samples.last().map_or(Duration::ZERO, |s| s.at)
    }
}

// === impl Cluster ===

impl Cluster {
    /// Starts `n` nodes and waits until every node sees all of them alive.
    async fn start(what: &str, n: usize) -> Self {
        Self::start_with(what, n, None, GossipProtocol::V2).await
    }

    /// As [`Cluster::start`], the last node on `last_on`'s runtime.
    async fn start_on(what: &str, n: usize, last_on: Option<&Stallable>) -> Self {
        Self::start_with(what, n, last_on, GossipProtocol::V2).await
    }

    /// As [`Cluster::start_on`], every node speaking `protocol` (`gossip.protocol`).
    async fn start_with(
        what: &str,
        n: usize,
        last_on: Option<&Stallable>,
        protocol: GossipProtocol,
    ) -> Self {
        let net = Net::new();
        let addrs: Vec<SocketAddr> = (0..n).map(|_| next_addr()).collect();
        let seeds = vec![addrs[0].to_string()];
        let mut nodes = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            let name = format!("node-{i}");
            let mut config = membership::chitchat_config(
                ChitchatId::new(name.clone(), 1, addr),
                "gossip-scenarios".to_owned(),
                addr,
                seeds.clone(),
                DEFAULT_GOSSIP_INTERVAL,
            );
            membership::speak(&mut config, protocol);
            let transport = net.transport.clone();
            let spawn = async move {
                chitchat::spawn_chitchat(config, Vec::new(), transport.as_ref())
                    .await
                    .expect("each node's loopback address is bound once")
            };
            let handle = match last_on {
                Some(stallable) if i + 1 == n => stallable
                    .runtime
                    .spawn(spawn)
                    .await
                    .expect("the spawn task completes"),
                _ => spawn.await,
            };
            nodes.push(Node {
                name,
                addr,
                handle: Some(handle),
            });
        }
        let cluster = Cluster { net, nodes };
        let names = cluster.names();
        let all: Vec<usize> = (0..n).collect();
        let converged = cluster
            .record(Instant::now(), CONVERGE_WITHIN, |s| {
                all_see_alive(s, &names, &all, &all)
            })
            .await;
        let last = converged.samples.last().expect("at least one sample");
        assert!(
            all_see_alive(last, &names, &all, &all),
            "{what}: {n} nodes did not converge within {CONVERGE_WITHIN:?}"
        );
        eprintln!(
            "{what}: {n} nodes converged in {:.2} s",
            converged.end().as_secs_f64()
        );
        // Every datagram went through the production seal and open.
        let stats = cluster.net.transport.stats();
        assert!(
            stats.sealed() > 0 && stats.opened() > 0,
            "{what}: gossip bypassed the sealed transport"
        );
        cluster
    }

    fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    /// Lets the cluster run for [`SETTLE`] and asserts nobody marks anyone dead meanwhile.
    async fn settle(&self, what: &str) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let steady = self.record(Instant::now(), SETTLE, |_| false).await;
        steady.assert_always_alive(&all, &all, &format!("{what}: steady state"));
    }

    async fn sample(&self) -> Vec<Option<View>> {
        let mut views = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let Some(handle) = &node.handle else {
                views.push(None);
                continue;
            };
            // Only reads under chitchat's lock, and the lock is released before the next node.
            let chitchat = handle.chitchat();
            let cc = chitchat.lock().await;
            views.push(Some(View {
                live: cc.live_nodes().map(|id| id.node_id.to_string()).collect(),
                dead: cc.dead_nodes().map(|id| id.node_id.to_string()).collect(),
                incarnations: cc
                    .node_states()
                    .iter()
                    .map(|(id, st)| (id.node_id.to_string(), u64::from(st.heartbeat())))
                    .collect(),
            }));
        }
        views
    }

    /// Samples every node every [`SAMPLE_EVERY`], timed from `t0`, until `done` holds for a
    /// sample or `max` has passed since `t0`.
    async fn record(
        &self,
        t0: Instant,
        max: Duration,
        mut done: impl FnMut(&Sample) -> bool,
    ) -> Timeline {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut samples = Vec::new();
        loop {
            tick.tick().await;
            let views = self.sample().await;
            let sample = Sample {
                at: t0.elapsed(),
                views,
            };
            let stop = done(&sample) || sample.at >= max;
            samples.push(sample);
            if stop {
                break;
            }
        }
        Timeline {
            names: self.names(),
            samples,
        }
    }

    async fn shutdown(mut self) {
        for node in &mut self.nodes {
            if let Some(handle) = node.handle.take() {
                handle.shutdown().await.expect("chitchat stops cleanly");
            }
        }
    }
}

/// Whether every one of `observers` sees every one of `targets` alive.
fn all_see_alive(s: &Sample, names: &[String], observers: &[usize], targets: &[usize]) -> bool {
    observers.iter().all(|&o| {
        s.views[o]
            .as_ref()
            .is_some_and(|v| targets.iter().all(|&t| v.live.contains(&names[t])))
    })
}

/// Whether every one of `observers` sees every one of `targets` dead.
fn all_see_dead(s: &Sample, names: &[String], observers: &[usize], targets: &[usize]) -> bool {
    observers.iter().all(|&o| {
        s.views[o]
            .as_ref()
            .is_some_and(|v| targets.iter().all(|&t| v.dead.contains(&names[t])))
    })
}

fn summary(durations: &[Duration]) -> String {
    let mut d = durations.to_vec();
    d.sort();
    if d.is_empty() {
        return "none".to_owned();
    }
    format!(
        "min {:.2} s, median {:.2} s, max {:.2} s (n={})",
        d[0].as_secs_f64(),
        d[d.len() / 2].as_secs_f64(),
        d[d.len() - 1].as_secs_f64(),
        d.len()
    )
}

#[tokio::test]
async fn partition_and_heal() {
    let cluster = Cluster::start("partition", 6).await;
    let names = cluster.names();
    let (a, b) = ([0, 1, 2], [3, 4, 5]);
    cluster.settle("partition").await;

    for &x in &a {
        for &y in &b {
            cluster.net.cut(cluster.addr(x), cluster.addr(y)).await;
        }
    }
    let t0 = Instant::now();
    // Past detection, keep watching a while: a side must not turn on itself later either.
    let split = cluster
        .record(t0, DETECT_WITHIN, |s| {
            s.at >= Duration::from_secs(5)
                && all_see_dead(s, &names, &a, &b)
                && all_see_dead(s, &names, &b, &a)
        })
        .await;
    split.assert_always_alive(&a, &a, "partition: side A about itself");
    split.assert_always_alive(&b, &b, "partition: side B about itself");
    let mut detected = Vec::new();
    for (observers, targets) in [(&a, &b), (&b, &a)] {
        for &o in observers {
            for &t in targets {
                let at = split.first_dead(o, t).unwrap_or_else(|| {
                    panic!(
                        "partition: {} never marked {} dead within {DETECT_WITHIN:?}",
                        names[o], names[t]
                    )
                });
                detected.push(at);
            }
        }
    }
    eprintln!(
        "partition: other side marked dead after {}",
        summary(&detected)
    );
    assert!(detected.iter().all(|d| *d < DETECT_WITHIN));

    for &x in &a {
        for &y in &b {
            cluster.net.mend(cluster.addr(x), cluster.addr(y)).await;
        }
    }
    let t1 = Instant::now();
    let all: Vec<usize> = (0..6).collect();
    let healed = cluster
        .record(t1, HEAL_WITHIN, |s| all_see_alive(s, &names, &all, &all))
        .await;
    let last = healed.samples.last().expect("at least one sample");
    assert!(
        all_see_alive(last, &names, &all, &all),
        "partition: not whole {HEAL_WITHIN:?} after the heal"
    );
    eprintln!(
        "partition: whole again {:.2} s after the heal",
        healed.end().as_secs_f64()
    );
    // And it stays whole.
    cluster.settle("partition, after the heal").await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn half_partitioned_node_stays_alive_through_indirect_probes() {
    let cluster = Cluster::start("half partition", 7).await;
    let all: Vec<usize> = (0..7).collect();
    // node-6 loses node-0 (the seed), node-1 and node-2; node-3..5 still reach everyone.
    let (x, lost) = (6, [0, 1, 2]);
    cluster.settle("half partition").await;

    for &p in &lost {
        cluster.net.cut(cluster.addr(x), cluster.addr(p)).await;
    }
    let window = 50 * DEFAULT_GOSSIP_INTERVAL;
    let timeline = cluster.record(Instant::now(), window, |_| false).await;
    let refuted: Vec<u64> = all.iter().map(|&o| timeline.refutations(o, x)).collect();
    eprintln!(
        "half partition: over {:.1} s, {} refuted suspicions {refuted:?} times in each view",
        timeline.end().as_secs_f64(),
        cluster.names()[x]
    );
    timeline.assert_always_alive(&all, &all, "half partition");
    cluster.shutdown().await;
}

#[tokio::test]
async fn flapping_node_never_gets_a_healthy_node_marked_dead() {
    let cluster = Cluster::start("flapping", 6).await;
    let names = cluster.names();
    let flapper = 5;
    let healthy: Vec<usize> = (0..5).collect();
    cluster.settle("flapping").await;

    // Down 1 s, up 1 s, five times, while the main task samples.
    let net = cluster.net.clone();
    let f_addr = cluster.addr(flapper);
    let peers: Vec<SocketAddr> = healthy.iter().map(|&i| cluster.addr(i)).collect();
    let flapping = tokio::spawn(async move {
        for _ in 0..5 {
            for &p in &peers {
                net.cut(f_addr, p).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            for &p in &peers {
                net.mend(f_addr, p).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let t0 = Instant::now();
    let timeline = cluster.record(t0, Duration::from_secs(10), |_| false).await;
    flapping
        .await
        .expect("the flapping schedule runs to its end");
    let flips: Vec<usize> = healthy
        .iter()
        .map(|&o| timeline.flips(o, flapper))
        .collect();
    let self_flips: Vec<usize> = healthy
        .iter()
        .map(|&t| timeline.flips(flapper, t))
        .collect();
    eprintln!(
        "flapping: {} flipped live<->dead in the healthy nodes' views {flips:?} times \
         (5 outages of 1 s); healthy nodes flipped in its own view {self_flips:?} times",
        names[flapper]
    );
    timeline.assert_always_alive(&healthy, &healthy, "flapping: healthy about healthy");
    timeline.assert_always_alive(&[flapper], &healthy, "flapping: flapper about healthy");

    // Once the links stay up, the flapping node is back everywhere.
    let all: Vec<usize> = (0..6).collect();
    let back = cluster
        .record(Instant::now(), HEAL_WITHIN, |s| {
            all_see_alive(s, &names, &all, &all)
        })
        .await;
    assert!(
        all_see_alive(back.samples.last().expect("a sample"), &names, &all, &all),
        "flapping: not whole {HEAL_WITHIN:?} after the links came back for good"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn stalled_node_never_gets_a_healthy_node_marked_dead() {
    let stallable = Stallable::new();
    let cluster = Cluster::start_on("stalled", 6, Some(&stallable)).await;
    let names = cluster.names();
    let stalled = 5;
    let healthy: Vec<usize> = (0..5).collect();
    cluster.settle("stalled").await;

    // 12 stalls of 600-1,500 ms, each after 400 ms of running: on every wake the node's probe
    // and suspicion timers have all expired while the acks and refutations that answer them
    // wait unread in its socket.
    let mut rng = rand::rng();
    let stalls: Vec<Duration> = (0..12)
        .map(|_| Duration::from_millis(rng.random_range(600..=1500)))
        .collect();
    let total: Duration = stalls.iter().sum();
    let schedule = stallable.stall(stalls, Duration::from_millis(400));
    let recording = cluster.record(Instant::now(), total + Duration::from_secs(6), |_| false);
    let ((), timeline) = tokio::join!(schedule, recording);
    let flips: Vec<usize> = healthy
        .iter()
        .map(|&o| timeline.flips(o, stalled))
        .collect();
    let self_flips: Vec<usize> = healthy
        .iter()
        .map(|&t| timeline.flips(stalled, t))
        .collect();
    eprintln!(
        "stalled: {} (12 stalls, {:.1} s in all) flipped live<->dead in the healthy nodes' \
         views {flips:?} times; healthy nodes flipped in its own view {self_flips:?} times",
        names[stalled],
        total.as_secs_f64()
    );
    timeline.assert_always_alive(&[stalled], &healthy, "stalled: stalled node about healthy");
    // Detected at its first long stall, maybe; then its probes wait out the round trip its
    // late acks taught (a stall is a slow ack), instead of a death and a refutation per stall.
    const MAX_FLIPS: usize = 4;
    assert!(
        flips.iter().all(|f| *f <= MAX_FLIPS),
        "stalled: {} flapped {flips:?} times in the healthy nodes' views (max {MAX_FLIPS})",
        names[stalled]
    );
    timeline.assert_always_alive(&healthy, &healthy, "stalled: healthy about healthy");
    cluster.shutdown().await;
}

/// Degrades everything `slow` sends with `fault` for 10 s and checks that no healthy node is
/// marked dead by anyone, and that `slow` does not flap in their views.
async fn degraded_node(what: &str, fault: Fault) {
    let cluster = Cluster::start(what, 6).await;
    let names = cluster.names();
    let slow = 5;
    let healthy: Vec<usize> = (0..5).collect();
    let all: Vec<usize> = (0..6).collect();
    cluster.settle(what).await;

    for &p in &healthy {
        cluster
            .net
            .set_fault(cluster.addr(slow), cluster.addr(p), fault);
    }
    let timeline = cluster
        .record(Instant::now(), Duration::from_secs(10), |_| false)
        .await;
    let flips: Vec<usize> = healthy.iter().map(|&o| timeline.flips(o, slow)).collect();
    let shares: Vec<String> = healthy
        .iter()
        .map(|&o| format!("{:.0}%", 100.0 * timeline.alive_share(o, slow)))
        .collect();
    let refuted: Vec<u64> = healthy
        .iter()
        .map(|&o| timeline.refutations(o, slow))
        .collect();
    eprintln!(
        "{what}: {} seen alive {shares:?} of 10 s by the healthy nodes, flipped {flips:?} \
         times; refuted suspicions {refuted:?} times",
        names[slow],
    );
    timeline.assert_always_alive(&all, &healthy, &format!("{what}: about healthy nodes"));
    // Kept alive or marked dead are both acceptable findings; flapping is not: a view that
    // flips churns every route through the node.
    const MAX_FLIPS: usize = 4;
    assert!(
        flips.iter().all(|f| *f <= MAX_FLIPS),
        "{what}: {} flapped {flips:?} times in the healthy nodes' views (max {MAX_FLIPS})",
        names[slow]
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn slow_node_never_gets_a_healthy_node_marked_dead() {
    let delay = (Duration::from_millis(300), Duration::from_millis(800));
    degraded_node(
        "slow node (300-800 ms)",
        Fault {
            cut: false,
            loss: 0.0,
            delay: Some(delay),
        },
    )
    .await;
}

#[tokio::test]
async fn lossy_node_never_gets_a_healthy_node_marked_dead() {
    degraded_node(
        "lossy node (50% dropped)",
        Fault {
            cut: false,
            loss: 0.5,
            delay: None,
        },
    )
    .await;
}

#[tokio::test]
async fn killed_node_is_marked_dead_by_everyone() {
    killed_node("killed", GossipProtocol::V2).await;
}

/// `gossip.protocol = 1` (a rolling upgrade from a meshd that speaks nothing else) still
/// converges and detects a death, by phi accrual on heartbeats as before protocol 2.
#[tokio::test]
async fn killed_node_is_marked_dead_by_everyone_under_protocol_1() {
    killed_node("killed (protocol 1)", GossipProtocol::V1).await;
}

async fn killed_node(what: &str, protocol: GossipProtocol) {
    let mut cluster = Cluster::start_with(what, 6, None, protocol).await;
    let names = cluster.names();
    let victim = 5;
    let survivors: Vec<usize> = (0..5).collect();
    cluster.settle(what).await;
    // The protocol really spoken: protocol 1 beats its heartbeat every round (15 in the
    // 3 s settle), protocol 2's heartbeat is the SWIM incarnation, raised only to refute.
    let views = cluster.sample().await;
    let heartbeat = views[1].as_ref().expect("node-1 runs").incarnations[&names[0]];
    match protocol {
        GossipProtocol::V1 => assert!(heartbeat > 10, "{what}: heartbeat {heartbeat}"),
        GossipProtocol::V2 => assert!(heartbeat < 5, "{what}: incarnation {heartbeat}"),
    }

    // Abrupt: no leave message (chitchat has none), the task is aborted like a crash.
    let handle = cluster.nodes[victim]
        .handle
        .take()
        .expect("the victim is running");
    handle.abort();
    drop(handle);
    let t0 = Instant::now();
    let timeline = cluster
        .record(t0, DETECT_WITHIN, |s| {
            all_see_dead(s, &names, &survivors, &[victim])
        })
        .await;
    timeline.assert_always_alive(&survivors, &survivors, &format!("{what}: about survivors"));
    let detected: Vec<Duration> = survivors
        .iter()
        .map(|&o| {
            timeline.first_dead(o, victim).unwrap_or_else(|| {
                panic!(
                    "{what}: {} never marked {} dead within {DETECT_WITHIN:?}",
                    names[o], names[victim]
                )
            })
        })
        .collect();
    eprintln!(
        "{what}: {} marked dead after {}",
        names[victim],
        summary(&detected)
    );
    cluster.shutdown().await;
}
