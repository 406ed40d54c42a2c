//! Which gateway listeners this host runs, kept in step with the policy and the config by one
//! task. Per gateway, the listeners its resource declares are bound all together or not at all:
//! one that cannot be bound (address in use) leaves that gateway as it was, and its status says
//! why; other gateways are not held back by it.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_api::ServiceKey;
use mesh_api::policy::{Kind, ResourceKey, Snapshot, Spec as ResourceSpec};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::super::listeners::{self, Spec};
use super::super::shared::Shared;
use super::listener::GatewayListener;
use super::terminate::{self, Terminator};

/// What this host does for one gateway it is configured to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    /// The listeners of policy revision `revision` are open.
    Serving {
        /// Policy revision applied.
        revision: u64,
        /// `name (protocol, bind)` of each open listener.
        listeners: Vec<String>,
    },
    /// The policy has no Gateway of this name: nothing is open for it.
    NotInPolicy {
        /// Policy revision looked at.
        revision: u64,
    },
    /// Revision `revision` could not be applied; what was open before stays open.
    Refused {
        /// Policy revision refused.
        revision: u64,
        /// Why.
        error: String,
    },
}

/// The listener specs of gateway `name` in `snapshot`; `None` when it has no such Gateway.
pub fn specs(name: &ServiceKey, snapshot: &Snapshot) -> Option<Vec<Spec>> {
    let key = ResourceKey::new(Kind::Gateway, name.namespace.clone(), name.name.clone());
    let ResourceSpec::Gateway(gw) = &snapshot.resources.get(&key)?.spec else {
        return None;
    };
    let listener = |l: &mesh_api::policy::Listener| {
        Spec::Gateway(GatewayListener {
            gateway: name.clone(),
            listener: l.clone(),
        })
    };
    Some(gw.listeners.iter().map(listener).collect())
}

/// Keeps the gateway listeners in step until `stop_rx` turns true (the node drains; its
/// accept loops stop on the same signal).
pub async fn run(
    shared: Shared,
    mut config_rx: watch::Receiver<Arc<crate::config::Config>>,
    mut policy_rx: watch::Receiver<Arc<Snapshot>>,
    stop_rx: watch::Receiver<bool>,
    status_tx: watch::Sender<BTreeMap<ServiceKey, Status>>,
) {
    let mut sets: BTreeMap<ServiceKey, Running> = BTreeMap::new();
    let mut stop = stop_rx.clone();
    loop {
        let names = config_rx.borrow_and_update().gateway.names.clone();
        let snapshot = policy_rx.borrow_and_update().clone();
        let mut statuses = BTreeMap::new();
        for name in &names {
            let running = sets.entry(name.clone()).or_default();
            let status = apply(running, name, &snapshot, &shared, &stop_rx).await;
            statuses.insert(name.clone(), status);
        }
        // Gateways this host no longer runs: close their listeners.
        let gone: Vec<ServiceKey> = sets
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut running) = sets.remove(&name)
                && let Ok(p) = running.set.prepare(&[]).await
            {
                running.set.apply(p, &shared, &stop_rx);
                info!(gateway = %name, "gateway no longer run here; its listeners are closed");
            }
        }
        status_tx.send_replace(statuses);
        tokio::select! {
            r = config_rx.changed() => if r.is_err() { return },
            r = policy_rx.changed() => if r.is_err() { return },
            _ = mesh_runtime::drain::until_true(&mut stop) => return,
        }
    }
}

/// One gateway's open listeners, and the TLS terminators of its https listeners (held, so
/// their certificates stay loaded and watched while the listeners serve).
#[derive(Default)]
struct Running {
    set: listeners::Set,
    terminators: Vec<Arc<Terminator>>,
}

/// Loads the certificates of every https listener in `wanted`; the first that cannot be used
/// refuses the whole revision for this gateway.
fn terminators(wanted: &[Spec]) -> Result<Vec<Arc<Terminator>>, String> {
    let mut out = Vec::new();
    for spec in wanted {
        if let Spec::Gateway(g) = spec
            && let Some(tls) = &g.listener.tls
        {
            let t = terminate::terminator(tls)
                .map_err(|e| format!("listener {}: {e}", g.listener.name))?;
            out.push(t);
        }
    }
    Ok(out)
}

/// Brings one gateway's listeners to what `snapshot` declares, all or nothing.
async fn apply(
    running: &mut Running,
    name: &ServiceKey,
    snapshot: &Snapshot,
    shared: &Shared,
    stop_rx: &watch::Receiver<bool>,
) -> Status {
    let revision = snapshot.revision;
    let wanted = specs(name, snapshot).unwrap_or_default();
    let refused = |error: String| {
        warn!(gateway = %name, revision, error = %error, "gateway listeners not updated; the ones open stay open");
        Status::Refused { revision, error }
    };
    let terminators = match terminators(&wanted) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    let set = &mut running.set;
    match set.prepare(&wanted).await {
        Ok(prepared) => {
            if !prepared.diff().is_empty() {
                info!(gateway = %name, revision, "gateway listeners updated");
            }
            set.apply(prepared, shared, stop_rx);
            running.terminators = terminators;
            if specs(name, snapshot).is_none() {
                return Status::NotInPolicy { revision };
            }
            let listeners = (set.bound().into_iter())
                .filter_map(|(spec, addr)| match spec {
                    Spec::Gateway(g) => Some(format!(
                        "{} ({}, {addr})",
                        g.listener.name, g.listener.protocol
                    )),
                    _ => None,
                })
                .collect();
            Status::Serving {
                revision,
                listeners,
            }
        }
        Err(e) => refused(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        let resources = mesh_api::policy::parse_file("t.toml", text).unwrap();
        Snapshot::new(3, resources)
    }

    #[test]
    fn specs_follow_the_resource() {
        let snap = snapshot(
            r#"
[[resource]]
kind = "Gateway"
namespace = "shop"
name = "public"
[[resource.listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
[[resource.listeners]]
name = "db"
bind = "127.0.0.1:5432"
protocol = "tcp"
service = "db"
"#,
        );
        let name: ServiceKey = "shop/public".parse().unwrap();
        let served = specs(&name, &snap).unwrap();
        assert_eq!(served.len(), 2);
        assert_eq!(served[0].addr(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(served[1].addr(), "127.0.0.1:5432".parse().unwrap());
        assert!(matches!(&served[0], Spec::Gateway(g) if g.listener.name.as_str() == "web"));
        assert!(specs(&"shop/other".parse().unwrap(), &snap).is_none());
    }
}
