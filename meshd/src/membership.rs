//! The only module that touches chitchat: publishes this node (inbound address, locality,
//! state) and its local services by gossip, and turns the live cluster into a `watch` snapshot
//! of members and service endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};
use mesh_api::ServiceKey;
use mesh_api::gossip::{self, NodeInfo, ServiceInfo};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Config, GossipProtocol, Protocol, Service};
use crate::gossip_seal::SealedTransport;
use crate::health::ServiceHealth;
use mesh_api::policy::DenyList;

use crate::gossip_auth::{Signer, StateVerifier};

mod remote;
pub mod warmup;

pub use remote::{MAX_REMOTE_GATEWAYS, MAX_REMOTE_SUBSETS, RemoteSite, rank_sites};
use remote::{rank_remote, remote_endpoints};

/// Phi-accrual threshold above which a silent node is considered dead, under gossip protocol V1
/// only (meshd speaks V2, where SWIM probes decide: see `chitchat_config`; kept for
/// `gossip-convergence --protocol v1` comparisons). chitchat's phi is the
/// silence divided by the mean time between heartbeat updates, which is a third to 0.9 of a
/// gossip interval whatever the cluster size (measured with 2–40 nodes), so 20 means dead after
/// about 7–18 gossip intervals of silence (1.4–3.7 s at the default 200 ms) and a 1 s loss of
/// contact or process stall marks nobody dead. At 8, nodes were dead 0.5–1.5 s into a silence
/// and a 1 s blip churned routes (`meshd/tests/gossip_scenarios.rs`, flapping node).
pub const DEFAULT_PHI_THRESHOLD: f64 = 20.0;
/// Heartbeat intervals longer than this are not sampled (a paused node must not skew phi).
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(2);
/// Heartbeat intervals the failure detector keeps per node.
pub const SAMPLING_WINDOW: usize = 1000;
/// How long a dead node's state is kept before it is collected.
pub const DEFAULT_DEAD_NODE_GRACE: Duration = Duration::from_secs(600);

/// Membership errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// chitchat could not start (e.g. the gossip port is taken).
    #[error("gossip could not start on {addr}: {reason}")]
    Start {
        /// Gossip bind address.
        addr: SocketAddr,
        /// chitchat's error.
        reason: String,
    },
}

/// One instance of a service, as seen by gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Node hosting it.
    pub node: String,
    /// The node's mTLS inbound address.
    pub addr: SocketAddr,
    /// Locality.
    pub datacenter: String,
    /// Locality.
    pub zone: String,
    /// The endpoint's site: what its node says (empty from meshd before sites), or the site
    /// behind the east-west gateway it is reached through.
    pub site: String,
    /// Set for an instance in another site: `addr` is one of that site's east-west gateways,
    /// and this is the server name that tells the gateway which service to pass the
    /// connection to ([`ServiceKey::site_sni`]).
    pub sni: Option<String>,
    /// For another site's instance, its site's place in [`MeshView::sites`] (0: the nearest);
    /// 0 for this site's.
    pub site_rank: u16,
    /// Subset labels.
    pub labels: BTreeMap<String, String>,
    /// What the instance speaks: callers proxy HTTP-family services per request.
    pub protocol: Protocol,
    /// Passing health checks.
    pub healthy: bool,
    /// The node takes no new work: starting (still learning the mesh) or draining.
    pub draining: bool,
}

impl Endpoint {
    /// Whether new connections may go to this endpoint.
    pub fn is_usable(&self) -> bool {
        self.healthy && !self.draining
    }
}

/// A live member of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Node name.
    pub node: String,
    /// Gossip address.
    pub gossip_addr: SocketAddr,
    /// Generation (start time in ms); grows on every restart.
    pub generation: u64,
    /// What the node published about itself, if readable.
    pub info: Option<NodeInfo>,
    /// Its services.
    pub services: Vec<String>,
}

/// Everything the proxy needs to know about the mesh, rebuilt on every gossip change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MeshView {
    /// Live members, by node name.
    pub members: Vec<Member>,
    /// Endpoints of every service.
    pub endpoints: BTreeMap<ServiceKey, Vec<Endpoint>>,
    /// The other sites with instances known here, nearest first (see [`rank_sites`]).
    pub sites: Vec<RemoteSite>,
}

/// Builds the view from chitchat's live nodes. Values this build cannot read (newer schema,
/// garbage) are skipped with a debug log, never trusted half-way. Nodes on the deny-list
/// (removed by an operator) are left out whatever they gossip. With a `verifier`, a node's
/// state is used only as far as it proves signed by that node (see [`crate::gossip_auth`]);
/// `None` reads states as they are (unit tests and the in-memory simulation).
pub fn build_view(
    nodes: &BTreeMap<ChitchatId, Arc<NodeState>>,
    deny: &DenyList,
    mut verifier: Option<&mut StateVerifier>,
) -> MeshView {
    let mut view = MeshView::default();
    let mut distances: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (id, state) in nodes {
        if deny.denies_node(&id.node_id) {
            continue;
        }
        let kvs: Vec<(String, String)> = match verifier.as_deref_mut() {
            Some(v) => match v.usable(id, state) {
                Some(kvs) => kvs,
                None => continue,
            },
            None => state
                .key_values()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        };
        let get = |key: &str| kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let info = get(gossip::KEY_NODE).and_then(|v| match gossip::decode::<NodeInfo>(v) {
            Ok(i) => Some(i),
            Err(e) => {
                debug!(node = %id.node_id, error = %e, "unreadable node info");
                None
            }
        });
        // A node that left gracefully is gone now, not when the failure detector says so.
        if info
            .as_ref()
            .is_some_and(|i| i.state == gossip::NodeState::Left)
        {
            continue;
        }
        let mut services = Vec::new();
        for (key, value) in kvs.iter().map(|(k, v)| (k.as_str(), v.as_str())) {
            if info.is_some() && key.starts_with(gossip::REMOTE_PREFIX) {
                remote_endpoints(&mut view, &id.node_id, key, value);
                continue;
            }
            if info.is_some()
                && let Some(site) = gossip::parse_site_rtt_key(key)
            {
                match gossip::decode::<gossip::SiteDistance>(value) {
                    Ok(d) => distances
                        .entry(site.to_string())
                        .or_default()
                        .push(d.rtt_us),
                    Err(e) => {
                        debug!(node = %id.node_id, key, error = %e, "unreadable site distance")
                    }
                }
                continue;
            }
            let Some(svc) = gossip::parse_service_key(key) else {
                continue;
            };
            services.push(svc.to_string());
            let Some(info) = &info else { continue };
            let decoded = gossip::decode::<ServiceInfo>(value).map_err(|e| e.to_string());
            let decoded = decoded.and_then(|s| match Protocol::from_name(&s.protocol) {
                Some(p) => Ok((s, p)),
                None => Err(format!("unknown protocol {:?}", s.protocol)),
            });
            match decoded {
                Ok((s, protocol)) => view.endpoints.entry(svc).or_default().push(Endpoint {
                    node: id.node_id.to_string(),
                    addr: info.inbound,
                    datacenter: info.datacenter.to_string(),
                    zone: info.zone.to_string(),
                    site: info
                        .site
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    sni: None,
                    site_rank: 0,
                    labels: s.labels,
                    protocol,
                    healthy: s.healthy,
                    draining: info.state != gossip::NodeState::Serving,
                }),
                Err(e) => debug!(node = %id.node_id, key, error = %e, "unreadable service info"),
            }
        }
        view.members.push(Member {
            node: id.node_id.to_string(),
            gossip_addr: id.gossip_advertise_addr,
            generation: id.generation_id,
            info,
            services,
        });
    }
    // Stable order so round robin is consistent across rebuilds. Several gateways of this site
    // publish the same remote service: one endpoint per remote gateway and subset, healthy if
    // any of them says so.
    for eps in view.endpoints.values_mut() {
        eps.sort_by(|a, b| {
            (&a.node, a.addr, &a.labels, !a.healthy).cmp(&(&b.node, b.addr, &b.labels, !b.healthy))
        });
        eps.dedup_by(|b, a| {
            a.sni.is_some() && (&a.node, a.addr, &a.labels) == (&b.node, b.addr, &b.labels)
        });
    }
    rank_remote(&mut view, &distances);
    if let Some(v) = verifier {
        v.retain(|n| nodes.keys().any(|id| &*id.node_id == n));
    }
    view
}

/// How one node looks to this one: alive or dead by the failure detector, and when it was last
/// known alive here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Liveness {
    /// Node name.
    pub node: String,
    /// Gossip address.
    pub gossip_addr: SocketAddr,
    /// Generation (start time in ms).
    pub generation: u64,
    /// `alive` or `dead` (kept until collected, [`DEFAULT_DEAD_NODE_GRACE`]).
    pub status: &'static str,
    /// When it was last known alive here (Unix ms): now for a live node (SWIM holds a member
    /// live until probes fail), the last sample before its death for a dead one.
    pub last_heard_unix_ms: u64,
}

/// Tracks when each node was last known alive. (Under gossip protocol V2 a heartbeat is an
/// incarnation and moves only on a refutation, so it cannot say when a node was last heard.)
#[derive(Debug, Default)]
struct HeartbeatClock {
    seen: std::collections::HashMap<ChitchatId, SystemTime>,
}

impl HeartbeatClock {
    /// Updates from chitchat's state at `now` and returns every known node's liveness.
    fn observe(&mut self, cc: &chitchat::Chitchat, now: SystemTime) -> Vec<Liveness> {
        let me = cc.self_chitchat_id().clone();
        // Alive = what the proxy uses (chitchat's live set); anything else it still holds is
        // dead or on its way out.
        let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
        let mut out = Vec::new();
        let mut present = std::collections::HashSet::new();
        for id in cc.node_states().keys() {
            present.insert(id.clone());
            let alive = live.contains(id) || *id == me;
            let entry = self.seen.entry(id.clone()).or_insert(now);
            if alive {
                *entry = now;
            }
            out.push(Liveness {
                node: id.node_id.to_string(),
                gossip_addr: id.gossip_advertise_addr,
                generation: id.generation_id,
                status: if alive { "alive" } else { "dead" },
                last_heard_unix_ms: entry
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            });
        }
        // Collected nodes are forgotten here too.
        self.seen.retain(|id, _| present.contains(id));
        // A dead generation of a node that came back is history, not a member: chitchat keeps
        // it until its grace period ends, nobody needs to see it meanwhile.
        let newest: std::collections::HashMap<String, u64> =
            out.iter().fold(Default::default(), |mut m, l| {
                let g = m.entry(l.node.clone()).or_insert(l.generation);
                *g = (*g).max(l.generation);
                m
            });
        out.retain(|l| l.status == "alive" || newest.get(&l.node) == Some(&l.generation));
        out.sort_by(|a, b| (&a.node, a.generation).cmp(&(&b.node, b.generation)));
        out
    }
}

/// The gateways `config` runs that are not also declared as services: each is gossiped as an
/// instance of the service named like it (on this node's inbound port), which is how callers
/// find the hosts of an egress gateway.
pub fn gateways_to_publish(config: &Config) -> impl Iterator<Item = &mesh_api::ServiceKey> {
    (config.gateway.names.iter()).filter(|g| !config.services.iter().any(|s| s.key == **g))
}

/// What this node gossips about a gateway it runs: always healthy (its listeners are its own).
fn gateway_info() -> ServiceInfo {
    ServiceInfo {
        v: gossip::VERSION,
        protocol: Protocol::Tcp.as_str().to_owned(),
        labels: BTreeMap::new(),
        healthy: true,
    }
}

/// What this node gossips about one of its services.
fn service_info(svc: &Service, healthy: bool) -> ServiceInfo {
    ServiceInfo {
        v: gossip::VERSION,
        protocol: svc.protocol.to_string(),
        labels: svc.labels.clone(),
        healthy,
    }
}

/// The chitchat configuration meshd runs with: its failure detector tuning included, so the
/// gossip scenario tests exercise exactly what ships.
pub fn chitchat_config(
    id: ChitchatId,
    cluster_id: String,
    listen_addr: SocketAddr,
    seed_nodes: Vec<String>,
    gossip_interval: Duration,
) -> ChitchatConfig {
    ChitchatConfig {
        chitchat_id: id,
        cluster_id,
        gossip_interval,
        listen_addr,
        seed_nodes,
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: DEFAULT_PHI_THRESHOLD,
            sampling_window_size: SAMPLING_WINDOW,
            max_interval: DEFAULT_MAX_INTERVAL,
            initial_interval: gossip_interval,
            dead_node_grace_period: DEFAULT_DEAD_NODE_GRACE,
        },
        marked_for_deletion_grace_period: DEFAULT_DEAD_NODE_GRACE,
        catchup_callback: None,
        extra_liveness_predicate: None,
        // V2 (our fork): digests of a bounded scope and SWIM failure detection, so gossip
        // bytes per node stay flat as the site grows (bench/gossip.sh, BENCHMARKS.md). Every
        // node of a site must speak it: a V1 node drops V2 datagrams.
        protocol_version: chitchat::ProtocolVersion::V2,
        admission: Some(admission(|_| true)),
        swim: chitchat::SwimConfig {
            // A suspicion lasts one gossip interval per decade of members once confirmed.
            suspicion_min: gossip_interval,
            ..chitchat::SwimConfig::default()
        },
        sync: chitchat::SyncConfig::default(),
    }
}

/// Most bytes the gossip table's ids may take, counted as chitchat counts a digest entry (the
/// id and 24 bytes). Under protocol V2 no digest lists the whole table (sweeps go range by
/// range), so this bounds what a holder of the gossip key can make every node hold with
/// invented ids, not the size of a datagram: about 10,000 short names, 3,700 of 100
/// characters. (V1 needed the whole digest in one datagram: ~1,100 nodes.) Each id is work on
/// every change of the view, and an invented one stays until probes find it dead; so the bound
/// sits above the sites meshd is measured at (BENCHMARKS.md), not far above.
pub const MAX_DIGEST_LEN: usize = 512 * 1024;

/// Under protocol 1 every SYN lists the whole table, so its ids must fit one sealed datagram
/// (room left for the rest of the SYN): about 1,100 nodes with short names.
pub const MAX_DIGEST_LEN_V1: usize = crate::gossip_seal::MAX_PLAINTEXT_LEN - 2 * 1024;

/// `gossip.protocol`: [`chitchat_config`] speaks protocol 2; pinned to 1, the table's
/// admission bound shrinks back to what one datagram holds.
pub fn speak(cc: &mut ChitchatConfig, protocol: GossipProtocol) {
    match protocol {
        GossipProtocol::V2 => cc.protocol_version = chitchat::ProtocolVersion::V2,
        GossipProtocol::V1 => {
            cc.protocol_version = chitchat::ProtocolVersion::V1;
            if let Some(admission) = cc.admission.as_mut() {
                admission.max_digest_len = MAX_DIGEST_LEN_V1;
            }
        }
    }
}

/// Which new node ids gossip takes into its table: valid node names for which `more` holds,
/// while the table's ids fit [`MAX_DIGEST_LEN`] (see `third_party/README.md`).
pub fn admission(more: impl Fn(&str) -> bool + Send + Sync + 'static) -> chitchat::Admission {
    chitchat::Admission {
        accept: Arc::new(move |id: &ChitchatId| {
            mesh_api::NodeName::new(&id.node_id).is_ok() && more(&id.node_id)
        }),
        max_digest_len: MAX_DIGEST_LEN,
    }
}

/// Running gossip membership.
pub struct Membership {
    handle: ChitchatHandle,
    node_info: NodeInfo,
    liveness_rx: watch::Receiver<Arc<Vec<Liveness>>>,
    signer: Signer,
}

impl Membership {
    /// Starts gossip, publishing this node and its services.
    pub async fn start(
        config: &Config,
        cluster_id: String,
        inbound: SocketAddr,
        transport: &SealedTransport,
        auth: Auth,
        mut deny_rx: watch::Receiver<Arc<DenyList>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, watch::Receiver<Arc<MeshView>>), Error> {
        let Auth {
            signer,
            mut certs_rx,
            refused,
            refused_nodes,
        } = auth;
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let node_info = NodeInfo {
            v: gossip::VERSION,
            inbound,
            datacenter: config.datacenter.clone(),
            zone: config.zone.clone(),
            site: Some(config.site.clone()),
            state: gossip::NodeState::Starting,
        };
        let mut kvs = vec![(gossip::KEY_NODE.to_owned(), gossip::encode(&node_info))];
        for svc in &config.services {
            // A service with health checks takes no traffic until its first check passes
            // (`publish_health` says so); one without checks is healthy from the start.
            let healthy = svc.checks.is_empty();
            kvs.push((
                gossip::service_key(&svc.key),
                gossip::encode(&service_info(svc, healthy)),
            ));
        }
        for gw in gateways_to_publish(config) {
            kvs.push((gossip::service_key(gw), gossip::encode(&gateway_info())));
        }
        let mut cc = chitchat_config(
            ChitchatId::new(
                config.node_name.to_string(),
                generation,
                config.gossip.advertise,
            ),
            cluster_id,
            config.gossip.bind,
            config.gossip.seeds.clone(),
            config.gossip.interval,
        );
        // Removed nodes are not taken back into the table either.
        let removed = deny_rx.clone();
        cc.admission = Some(admission(move |name| !removed.borrow().denies_node(name)));
        speak(&mut cc, config.gossip.protocol);
        let handle = chitchat::spawn_chitchat(cc, kvs, transport)
            .await
            .map_err(|e| Error::Start {
                addr: config.gossip.bind,
                reason: format!("{e:#}"),
            })?;
        handle.with_chitchat(|c| resign(c, &signer)).await;
        let mut verifier = {
            let certs = certs_rx.borrow_and_update();
            StateVerifier::new(certs.trust_domain.clone(), certs.roots.clone())
                .counting(refused)
                .accepting_unsigned(config.gossip.legacy_peers)
        };
        let mut live_rx = handle.chitchat().lock().await.live_nodes_watcher();
        let initial = Arc::new(build_view(
            &live_rx.borrow_and_update(),
            &deny_rx.borrow_and_update(),
            Some(&mut verifier),
        ));
        let chitchat_for_certs = handle.chitchat();
        let signer_for_certs = signer.clone();
        let (view_tx, view_rx) = watch::channel(initial);
        let mut shutdown_view = shutdown.clone();
        // Fire-and-forget: ends when chitchat stops (sender dropped) or on shutdown.
        tokio::spawn(async move {
            let mut members = 0usize;
            loop {
                tokio::select! {
                    r = live_rx.changed() => if r.is_err() { return },
                    // Discovery gone (shutting down): the last deny-list stays in force.
                    Ok(()) = deny_rx.changed() => {}
                    // A renewed node certificate re-signs this node's state; new roots (a
                    // root rotation) verify every state again.
                    Ok(()) = certs_rx.changed() => {
                        let roots = certs_rx.borrow_and_update().roots.clone();
                        verifier.set_roots(roots);
                        resign(&mut *chitchat_for_certs.lock().await, &signer_for_certs);
                    }
                    _ = mesh_runtime::drain::until_true(&mut shutdown_view) => return,
                }
                let deny = deny_rx.borrow_and_update().clone();
                let view = build_view(&live_rx.borrow_and_update(), &deny, Some(&mut verifier));
                if view.members.len() != members {
                    info!(members = view.members.len(), "mesh membership changed");
                    members = view.members.len();
                }
                // Only a different view is published: caches keyed by the view (per-service
                // endpoint lists of the balancer) stay warm across gossip rounds that change
                // nothing the proxy reads.
                view_tx.send_if_modified(|current| {
                    let changed = **current != view;
                    if changed {
                        // bench/gossip_real.sh times a new service reaching every node by this.
                        debug!(services = view.endpoints.len(), "mesh view changed");
                        *current = Arc::new(view);
                    }
                    changed
                });
            }
        });
        let (liveness_tx, liveness_rx) = watch::channel(Arc::new(Vec::new()));
        {
            let chitchat = handle.chitchat();
            let interval = config.gossip.interval;
            let mut shutdown = shutdown.clone();
            let refused_nodes = refused_nodes.clone();
            // Fire-and-forget: sampled once per gossip round until shutdown.
            tokio::spawn(async move {
                let mut clock = HeartbeatClock::default();
                let mut counted = 0u64;
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
                    }
                    let (list, refused) = {
                        let c = chitchat.lock().await;
                        (clock.observe(&c, SystemTime::now()), c.refused_admissions())
                    };
                    liveness_tx.send_replace(Arc::new(list));
                    refused_nodes.inc_by(refused.saturating_sub(counted));
                    counted = refused;
                }
            });
        }
        tokio::spawn(warmup::serve_when_warm(
            handle.chitchat(),
            signer.clone(),
            view_rx.clone(),
            !config.gossip.seeds.is_empty(),
            config.gossip.interval,
            shutdown.clone(),
        ));
        info!(addr = %config.gossip.bind, advertise = %config.gossip.advertise, "gossip started");
        Ok((
            Self {
                handle,
                node_info,
                liveness_rx,
                signer,
            },
            view_rx,
        ))
    }

    /// Publishes that this node is draining, so peers stop sending it new connections.
    pub async fn set_draining(&mut self) {
        self.publish_state(gossip::NodeState::Draining).await;
    }

    /// Publishes this node's state in its node info, signed.
    async fn publish_state(&mut self, state: gossip::NodeState) {
        self.node_info.state = state;
        let value = gossip::encode(&self.node_info);
        let signer = self.signer.clone();
        self.handle
            .with_chitchat(|c| {
                c.self_node_state().set(gossip::KEY_NODE, &value);
                resign(c, &signer);
            })
            .await;
    }

    /// Resolves if the gossip server stops on its own (chitchat ended or panicked, e.g. on a
    /// digest too large for one datagram): the node's view would silently freeze, so the
    /// caller treats it as fatal.
    pub fn stopped(&self) -> impl std::future::Future<Output = anyhow::Result<()>> + use<> {
        self.handle.termination_watcher()
    }

    /// Every known node's liveness, refreshed each gossip round.
    pub fn liveness(&self) -> watch::Receiver<Arc<Vec<Liveness>>> {
        self.liveness_rx.clone()
    }

    /// A handle that publishes this node's services (a reload adds, changes and removes
    /// them; health checks flip them).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            chitchat: self.handle.chitchat(),
            signer: self.signer.clone(),
        }
    }

    /// Leaves the cluster: publishes that this node left, gossips for [`LEAVE_ROUNDS`] more
    /// rounds of `interval` so peers take it (and spread it), then stops gossip. Peers drop the
    /// node from their view when the state reaches them, well before their failure detector
    /// would.
    pub async fn leave(mut self, interval: Duration) {
        self.publish_state(gossip::NodeState::Left).await;
        // SWIM's own word for it, so chitchat's live set drops the node too.
        self.handle.with_chitchat(|c| c.announce_leave()).await;
        tokio::time::sleep(interval * LEAVE_ROUNDS).await;
        if let Err(e) = self.handle.shutdown().await {
            warn!(error = %e, "gossip shutdown failed");
        }
    }
}

/// Gossip rounds a leaving node keeps gossiping after publishing that it left: each round it
/// hands its state to three peers, who spread it on.
pub const LEAVE_ROUNDS: u32 = 2;

/// Publishes this node's services by gossip.
#[derive(Clone)]
pub struct Publisher {
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    signer: Signer,
}

/// What gossip needs to sign this node's state and check everyone else's.
pub struct Auth {
    /// Signs with the node certificate.
    pub signer: Signer,
    /// The node's certificates: the roots to verify others against, and renewals (re-sign).
    pub certs_rx: watch::Receiver<Arc<crate::identity::Certs>>,
    /// Counts states refused by verification.
    pub refused: prometheus_client::metrics::counter::Counter,
    /// Counts new node ids kept out of the gossip table (admission).
    pub refused_nodes: prometheus_client::metrics::counter::Counter,
}

/// Makes the keys of `state` under `prefix` exactly `kvs`: stale ones deleted, changed ones
/// set. Returns whether anything changed.
pub fn replace_prefix(state: &mut NodeState, prefix: &str, kvs: &BTreeMap<String, String>) -> bool {
    let stale: Vec<String> = (state.key_values())
        .filter(|(k, _)| k.starts_with(prefix) && !kvs.contains_key(*k))
        .map(|(k, _)| k.to_owned())
        .collect();
    let mut changed = !stale.is_empty();
    for k in stale {
        state.delete(&k);
    }
    for (k, v) in kvs {
        if state.get(k) != Some(v.as_str()) {
            state.set(k, v);
            changed = true;
        }
    }
    changed
}

/// Signs this node's state after a change (see [`crate::gossip_auth`]).
fn resign(c: &mut chitchat::Chitchat, signer: &Signer) {
    let id = c.self_chitchat_id().clone();
    signer.sign(&id, c.self_node_state());
}

impl Publisher {
    /// Publishes `svc` (protocol, labels) with the given health, replacing what this node
    /// published for it before: a service added or changed by a reload.
    pub async fn set_service(&self, svc: &Service, healthy: bool) {
        let key = gossip::service_key(&svc.key);
        let value = gossip::encode(&service_info(svc, healthy));
        let mut c = self.chitchat.lock().await;
        c.self_node_state().set(&key, &value);
        resign(&mut c, &self.signer);
    }

    /// Publishes a gateway this node runs (a reload added it).
    pub async fn set_gateway(&self, gateway: &mesh_api::ServiceKey) {
        let key = gossip::service_key(gateway);
        let value = gossip::encode(&gateway_info());
        let mut c = self.chitchat.lock().await;
        c.self_node_state().set(&key, &value);
        resign(&mut c, &self.signer);
    }

    /// Makes this node's keys under `prefix` exactly `kvs` (the other sites' services an
    /// east-west gateway republishes), signing again if anything changed.
    pub async fn replace_prefix(&self, prefix: &str, kvs: &BTreeMap<String, String>) {
        let mut c = self.chitchat.lock().await;
        if replace_prefix(c.self_node_state(), prefix, kvs) {
            resign(&mut c, &self.signer);
        }
    }

    /// Stops publishing `svc` (a reload removed it): peers drop this instance when the
    /// deletion reaches them.
    pub async fn remove_service(&self, svc: &mesh_api::ServiceKey) {
        let key = gossip::service_key(svc);
        let mut c = self.chitchat.lock().await;
        c.self_node_state().delete(&key);
        resign(&mut c, &self.signer);
    }

    /// A task that publishes `svc`'s health by gossip each time it flips, until `health_rx`
    /// closes or `shutdown` turns true. Peers drop an unhealthy instance from their
    /// load-balancing sets when they see it.
    ///
    /// `published` is what gossip says now: `None` at start (the service was published as
    /// healthy iff it has no checks). After a reload changed the checks, it is the old health,
    /// which stays published until every new check has run once, so new checks do not take a
    /// serving instance out of rotation while they start.
    pub fn publish_health(
        &self,
        svc: &Service,
        mut health_rx: watch::Receiver<ServiceHealth>,
        published: Option<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let chitchat = self.chitchat.clone();
        let signer = self.signer.clone();
        let key = gossip::service_key(&svc.key);
        let mut settled = published.is_none();
        let mut info = service_info(svc, published.unwrap_or(svc.checks.is_empty()));
        let mut published = info.healthy;
        async move {
            loop {
                let (healthy, ran) = {
                    let h = health_rx.borrow_and_update();
                    (h.healthy, h.checks.iter().all(|c| c.last_checked.is_some()))
                };
                settled |= ran;
                if settled && healthy != published {
                    info.healthy = healthy;
                    let value = gossip::encode(&info);
                    let mut c = chitchat.lock().await;
                    c.self_node_state().set(&key, value);
                    resign(&mut c, &signer);
                    published = healthy;
                    debug!(key, healthy, "service health published");
                }
                tokio::select! {
                    r = health_rx.changed() => if r.is_err() { return },
                    _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
