//! WAN gossip among the east-west gateways of every site: each gateway announces its site, its
//! passthrough address and a summary of every service its site exports (instances by subset,
//! healthy and total), and republishes what the other sites announce into its own site's
//! gossip (`remote/<site>/<ns>/<name>`), where every meshd reads it as endpoints at those
//! gateways. No meshd ever asks another site anything: failover is decided from what is already
//! known locally, so it holds when the other site, its registry or its gateways are gone.
//!
//! Each gateway also measures how far the other sites are ([`distance`]), so the site's meshd
//! prefer the nearest one.
//!
//! The WAN pool is sealed like LAN gossip (a keyring shared by the gateways of all sites, read
//! from `east_west.wan_key_file`) and every state is signed by its node certificate, which
//! chains to the mesh's shared root through its own site's intermediate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chitchat::{ChitchatHandle, ChitchatId, NodeState};
use mesh_api::gossip::{self, ExportedService, RemoteService, Subset, WanNode};
use mesh_api::policy::{DenyList, Exports};
use mesh_api::{Label, ServiceKey};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::east_west::EastWestConfig;
use crate::gossip_auth::{Signer, StateVerifier};
use crate::gossip_seal::{GossipKey, Keyring, SealedTransport};
use crate::membership::{self, MeshView};

/// Why WAN gossip could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key file could not be read.
    #[error("east_west.wan_key_file {path}: {source}")]
    KeyFileIo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file's content is not a keyring.
    #[error("east_west.wan_key_file {path}: line {line}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the file as a whole).
        line: usize,
        /// What is wrong and what would be valid.
        reason: String,
    },
    /// chitchat could not start (e.g. the port is taken).
    #[error("WAN gossip could not start on {addr}: {reason}")]
    Start {
        /// Bind address.
        addr: SocketAddr,
        /// chitchat's error.
        reason: String,
    },
}

/// Reads the WAN keyring: one standard base64 key of 32 bytes per line (e.g. from
/// `head -c32 /dev/urandom | base64`), the first sealing and every one opening; blank lines and
/// lines starting with `#` are ignored. A key is rotated like the LAN keyring (add it second
/// everywhere, then first everywhere, then remove the old one).
pub fn keyring_from_file(path: &Path) -> Result<Keyring, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::KeyFileIo {
        path: path.to_owned(),
        source,
    })?;
    keyring_from_text(&text).map_err(|(line, reason)| Error::KeyFile {
        path: path.to_owned(),
        line,
        reason,
    })
}

/// [`keyring_from_file`]'s parser: the keyring, or the line (1-based) and reason. Pure.
pub fn keyring_from_text(text: &str) -> Result<Keyring, (usize, String)> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = GossipKey::from_base64(line).map_err(|e| {
            let why = format!(
                "{e}; expected 32 random bytes in standard base64 (head -c32 /dev/urandom | base64)"
            );
            (i + 1, why)
        })?;
        keys.push(key);
    }
    let mut it = keys.into_iter();
    let primary = it.next().ok_or((
        0,
        "no key: the file needs at least one base64 key".to_owned(),
    ))?;
    Keyring::new(primary, it.collect()).map_err(|e| (0, e.to_string()))
}

/// How often the WAN key file is read again for a rotation.
pub const KEY_FILE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// What reading the key file again found.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyFileCheck {
    /// The same text as last time.
    Unchanged,
    /// A new keyring, now in use.
    Rotated,
    /// Changed but unreadable: the keyring in use stays (the error says why).
    Refused(String),
}

/// Reads `path` again and, if its text changed since `last` and is a keyring, hands it to
/// `keys_tx` (the sealed transport seals and opens with it from the next datagram). `last`
/// becomes the text read, so a bad file is reported once, not at every poll.
pub fn check_key_file(
    path: &Path,
    last: &mut String,
    keys_tx: &watch::Sender<Arc<Keyring>>,
) -> KeyFileCheck {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let why = format!("east_west.wan_key_file {}: {e}", path.display());
            if *last == why {
                return KeyFileCheck::Unchanged;
            }
            *last = why.clone();
            return KeyFileCheck::Refused(why);
        }
    };
    if text == *last {
        return KeyFileCheck::Unchanged;
    }
    *last = text.clone();
    match keyring_from_text(&text) {
        Ok(keyring) => {
            keys_tx.send_replace(Arc::new(keyring));
            KeyFileCheck::Rotated
        }
        Err((line, reason)) => KeyFileCheck::Refused(
            Error::KeyFile {
                path: path.to_owned(),
                line,
                reason,
            }
            .to_string(),
        ),
    }
}

/// Reads the WAN key file every [`KEY_FILE_POLL`] until `shutdown`, rotating the keyring in
/// use when it changes (add the new key second on every gateway, then first, then drop the
/// old: no gateway is cut off at any step).
pub async fn watch_key_file(
    path: PathBuf,
    keys_tx: watch::Sender<Arc<Keyring>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = std::fs::read_to_string(&path).unwrap_or_default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEY_FILE_POLL) => {}
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
        match check_key_file(&path, &mut last, &keys_tx) {
            KeyFileCheck::Unchanged => {}
            KeyFileCheck::Rotated => info!(path = %path.display(), "WAN keyring reloaded"),
            KeyFileCheck::Refused(why) => {
                warn!(error = %why, "WAN key file changed but cannot be used; keeping the keyring in use");
            }
        }
    }
}

/// What this site exports, as the WAN announces it: per exported service with instances in
/// this site, its instances by subset. Other sites' endpoints (known here through gateways)
/// are never re-exported. Pure.
pub fn summarize(view: &MeshView, exports: &Exports) -> BTreeMap<ServiceKey, ExportedService> {
    let mut out = BTreeMap::new();
    for (svc, eps) in &view.endpoints {
        if !exports.exports(svc) {
            continue;
        }
        let mut subsets: BTreeMap<&BTreeMap<String, String>, (u32, u32)> = BTreeMap::new();
        let mut protocol = None;
        for ep in eps.iter().filter(|e| e.sni.is_none()) {
            protocol.get_or_insert(ep.protocol);
            let counts = subsets.entry(&ep.labels).or_default();
            counts.0 += u32::from(ep.is_usable());
            counts.1 += 1;
        }
        let Some(protocol) = protocol else { continue };
        let subsets = (subsets.into_iter())
            .map(|(labels, (healthy, total))| Subset {
                labels: labels.clone(),
                healthy,
                total,
            })
            .collect();
        let summary = ExportedService {
            v: gossip::VERSION,
            protocol: protocol.as_str().to_owned(),
            subsets,
        };
        out.insert(svc.clone(), summary);
    }
    out
}

/// One WAN member's verified key-values.
pub struct WanState<'a> {
    /// Node name.
    pub node: &'a str,
    /// Its key-values.
    pub kvs: &'a [(String, String)],
}

/// The services of other sites, from the WAN members' states: per (site, service), the
/// gateways of that site that announce it, and the summary of the one that says the most
/// instances are healthy (gateways of one site see the same gossip, so they differ only while
/// it spreads). Members of `own_site` are skipped; unreadable values are skipped. Pure.
pub fn remote_services(
    members: &[WanState<'_>],
    own_site: &Label,
) -> BTreeMap<(Label, ServiceKey), RemoteService> {
    let mut out: BTreeMap<(Label, ServiceKey), RemoteService> = BTreeMap::new();
    for m in members {
        let get = |key: &str| {
            m.kvs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let Some(node) = get(gossip::KEY_WAN_NODE).and_then(|v| gossip::decode::<WanNode>(v).ok())
        else {
            debug!(node = m.node, "WAN member without readable gateway info");
            continue;
        };
        if node.site == *own_site {
            continue;
        }
        for (key, value) in m.kvs {
            let Some(svc) = gossip::parse_export_key(key) else {
                continue;
            };
            let Ok(summary) = gossip::decode::<ExportedService>(value) else {
                debug!(node = m.node, key, "unreadable exported service");
                continue;
            };
            let healthy = |s: &[Subset]| s.iter().map(|x| u64::from(x.healthy)).sum::<u64>();
            let entry = out
                .entry((node.site.clone(), svc))
                .or_insert_with(|| RemoteService {
                    v: gossip::VERSION,
                    protocol: summary.protocol.clone(),
                    subsets: summary.subsets.clone(),
                    gateways: Vec::new(),
                });
            if healthy(&summary.subsets) > healthy(&entry.subsets) {
                entry.protocol = summary.protocol.clone();
                entry.subsets = summary.subsets.clone();
            }
            if !entry.gateways.contains(&node.gateway) {
                entry.gateways.push(node.gateway);
                entry.gateways.sort();
            }
        }
    }
    out
}

/// The other sites' gateways, from the WAN members' states (members of `own_site` and
/// unreadable ones skipped), sorted. Pure.
pub fn gateways_by_site(
    members: &[WanState<'_>],
    own_site: &Label,
) -> BTreeMap<Label, Vec<SocketAddr>> {
    let mut out: BTreeMap<Label, Vec<SocketAddr>> = BTreeMap::new();
    for m in members {
        let node = (m.kvs.iter())
            .find(|(k, _)| k == gossip::KEY_WAN_NODE)
            .and_then(|(_, v)| gossip::decode::<WanNode>(v).ok());
        let Some(node) = node.filter(|n| n.site != *own_site) else {
            continue;
        };
        let gws = out.entry(node.site).or_default();
        if !gws.contains(&node.gateway) {
            gws.push(node.gateway);
            gws.sort();
        }
    }
    out
}

/// The LAN key-values that carry `remote`.
pub fn remote_keys(
    remote: &BTreeMap<(Label, ServiceKey), RemoteService>,
) -> BTreeMap<String, String> {
    (remote.iter())
        .map(|((site, svc), r)| (gossip::remote_key(site, svc), gossip::encode(r)))
        .collect()
}

/// Everything the WAN task needs.
pub struct Inputs {
    /// `[east_west]`.
    pub config: EastWestConfig,
    /// This node.
    pub node_name: String,
    /// This site.
    pub site: Label,
    /// The WAN pool's cluster id.
    pub cluster_id: String,
    /// Signs this gateway's WAN state.
    pub signer: Signer,
    /// Roots to verify the other gateways against (and renewals, to re-sign).
    pub certs_rx: watch::Receiver<Arc<crate::identity::Certs>>,
    /// Nodes removed in any site (the merged deny-list): their WAN states are ignored and
    /// they are not taken into the WAN table, as in the LAN.
    pub deny_rx: watch::Receiver<Arc<DenyList>>,
    /// This site's view (from LAN gossip).
    pub view_rx: watch::Receiver<Arc<MeshView>>,
    /// What this site exports.
    pub exports_rx: watch::Receiver<Arc<Exports>>,
    /// Publishes the remote services into this site's gossip.
    pub lan: membership::Publisher,
    /// Counts WAN states refused by verification.
    pub refused: prometheus_client::metrics::counter::Counter,
    /// `gossip.protocol`, spoken in the WAN pool too.
    pub protocol: crate::config::GossipProtocol,
}

/// Running WAN gossip.
pub struct Wan {
    handle: ChitchatHandle,
}

impl Wan {
    /// Joins the WAN pool and keeps this site's exports announced and the other sites'
    /// republished in the LAN, until `shutdown`.
    pub async fn start(
        inputs: Inputs,
        transport: &SealedTransport,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, Error> {
        let cfg = &inputs.config;
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let me = WanNode {
            v: gossip::VERSION,
            site: inputs.site.clone(),
            gateway: cfg.advertise,
        };
        let kvs = vec![(gossip::KEY_WAN_NODE.to_owned(), gossip::encode(&me))];
        let mut cc = membership::chitchat_config(
            ChitchatId::new(inputs.node_name.clone(), generation, cfg.wan_advertise),
            inputs.cluster_id.clone(),
            cfg.wan_bind,
            cfg.wan_seeds.clone(),
            cfg.wan_interval,
        );
        let removed = inputs.deny_rx.clone();
        cc.admission = Some(membership::admission(move |name| {
            !removed.borrow().denies_node(name)
        }));
        membership::speak(&mut cc, inputs.protocol);
        let handle = chitchat::spawn_chitchat(cc, kvs, transport)
            .await
            .map_err(|e| Error::Start {
                addr: cfg.wan_bind,
                reason: format!("{e:#}"),
            })?;
        let chitchat = handle.chitchat();
        {
            let mut c = chitchat.lock().await;
            let id = c.self_chitchat_id().clone();
            inputs.signer.sign(&id, c.self_node_state());
        }
        info!(addr = %cfg.wan_bind, advertise = %cfg.wan_advertise, gateway = %cfg.advertise, site = %inputs.site, "WAN gossip started");
        let (gateways_tx, gateways_rx) = watch::channel(BTreeMap::new());
        tokio::spawn(distance::run(
            gateways_rx,
            inputs.lan.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(run(inputs, chitchat, gateways_tx, shutdown));
        Ok(Self { handle })
    }

    /// Leaves the WAN pool.
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            warn!(error = %e, "WAN gossip shutdown failed");
        }
    }
}

/// Announces this site's exports on every change of the view or the exports, and republishes
/// the other sites' on every change of the WAN.
async fn run(
    inputs: Inputs,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    gateways_tx: watch::Sender<BTreeMap<Label, Vec<SocketAddr>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Inputs {
        site,
        signer,
        mut certs_rx,
        mut deny_rx,
        mut view_rx,
        mut exports_rx,
        lan,
        refused,
        ..
    } = inputs;
    let mut verifier = {
        let certs = certs_rx.borrow_and_update();
        StateVerifier::new(certs.trust_domain.clone(), certs.roots.clone()).counting(refused)
    };
    let mut live_rx = chitchat.lock().await.live_nodes_watcher();
    let mut announced = BTreeMap::new();
    let mut republished = None;
    loop {
        let summary = {
            let view = view_rx.borrow_and_update().clone();
            let exports = exports_rx.borrow_and_update().clone();
            summarize(&view, &exports)
        };
        if summary != announced {
            let kvs = (summary.iter())
                .map(|(svc, s)| (gossip::export_key(svc), gossip::encode(s)))
                .collect();
            let mut c = chitchat.lock().await;
            membership::replace_prefix(c.self_node_state(), gossip::EXPORT_PREFIX, &kvs);
            let id = c.self_chitchat_id().clone();
            signer.sign(&id, c.self_node_state());
            debug!(
                services = summary.len(),
                "WAN: this site's exports announced"
            );
            announced = summary;
        }
        let remote = {
            let nodes = live_rx.borrow_and_update().clone();
            let deny = deny_rx.borrow_and_update().clone();
            let states = verified_states(&nodes, &deny, &mut verifier);
            let members: Vec<WanState<'_>> = (states.iter())
                .map(|(node, kvs)| WanState { node, kvs })
                .collect();
            gateways_tx.send_if_modified(|g| {
                let now = gateways_by_site(&members, &site);
                let changed = *g != now;
                *g = now;
                changed
            });
            remote_keys(&remote_services(&members, &site))
        };
        if republished.as_ref() != Some(&remote) {
            lan.replace_prefix(gossip::REMOTE_PREFIX, &remote).await;
            debug!(
                services = remote.len(),
                "WAN: other sites' services republished"
            );
            republished = Some(remote);
        }
        tokio::select! {
            r = live_rx.changed() => if r.is_err() { return },
            Ok(()) = view_rx.changed() => {}
            Ok(()) = exports_rx.changed() => {}
            Ok(()) = deny_rx.changed() => {}
            Ok(()) = certs_rx.changed() => {
                let roots = certs_rx.borrow_and_update().roots.clone();
                verifier.set_roots(roots);
                let mut c = chitchat.lock().await;
                let id = c.self_chitchat_id().clone();
                signer.sign(&id, c.self_node_state());
            }
            _ = mesh_runtime::drain::until_true(&mut shutdown) => {
                // Leaving: this site's gossip forgets the other sites at once rather than
                // when this node is found dead (another gateway of the site still has them).
                lan.replace_prefix(gossip::REMOTE_PREFIX, &BTreeMap::new()).await;
                return;
            }
        }
    }
}

/// The WAN members' states, each as far as it proves signed by its node; removed nodes'
/// are left out whatever they say.
fn verified_states(
    nodes: &BTreeMap<ChitchatId, Arc<NodeState>>,
    deny: &DenyList,
    verifier: &mut StateVerifier,
) -> Vec<(String, Vec<(String, String)>)> {
    let states = (nodes.iter())
        .filter(|(id, _)| !deny.denies_node(&id.node_id))
        .filter_map(|(id, st)| Some((id.node_id.to_string(), verifier.usable(id, st)?)))
        .collect();
    verifier.retain(|n| nodes.keys().any(|id| &*id.node_id == n));
    states
}

pub mod distance;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
