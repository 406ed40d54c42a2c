//! The proxy's state derived from policy, membership and configuration, compiled once per
//! change by one task: route tables, each destination's policy, route, endpoints with their
//! live state, circuit breaker and retry budget, each local service's rate limiter, and the
//! ExternalServices: reached from here (a client per service) or through their egress gateway
//! (whose hosts are then the endpoints).
//! Connections and requests read the current [`Compiled`] from a watch; nothing on the request
//! path builds derived state or locks a map shared by every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::ServiceKey;
use mesh_api::policy::{DestinationPolicy, ExternalService, Snapshot, Spec};
use tokio::sync::watch;
use tracing::debug;

use super::balance::{EndpointState, Target};
use super::breaker::Breaker;
use super::external::{self, ExternalClient};
use super::ratelimit::Limiter;
use super::retry::Budget;
use super::route::{self, CompiledRoute};
use crate::config::Config;
use crate::membership::{Endpoint, MeshView};

/// One destination service as this node sends to it.
#[derive(Debug)]
pub struct Destination {
    /// The service.
    pub service: ServiceKey,
    /// Its DestinationPolicy, if any.
    pub policy: Option<Arc<DestinationPolicy>>,
    /// Its Route, if any.
    pub route: Option<Arc<CompiledRoute>>,
    /// Its endpoints (as gossip says, in the view's order) with their state on this node.
    pub targets: Arc<[Target]>,
    /// Connections or requests in flight to it from this node.
    pub breaker: Breaker,
    /// Its retry budget.
    pub budget: Arc<Budget>,
    /// The server name its endpoints are dialled with: the service's own, or (an
    /// ExternalService behind an egress gateway) the one that names it to the gateway.
    pub sni: String,
    /// An ExternalService's resource.
    pub external: Option<Arc<ExternalService>>,
    /// An ExternalService this host reaches itself (no targets then: the client dials).
    pub direct: Option<Arc<ExternalClient>>,
}

/// Everything derived, as of one policy snapshot, mesh view and configuration.
#[derive(Debug)]
pub struct Compiled {
    /// The policy compiled.
    pub policy: Arc<Snapshot>,
    /// The view compiled.
    pub view: Arc<MeshView>,
    /// Routes and destination policies by service.
    pub routes: Arc<route::Table>,
    destinations: HashMap<ServiceKey, Arc<Destination>>,
    limiters: HashMap<ServiceKey, Arc<Limiter>>,
    /// ExternalServices by host name (several namespaces may name one host).
    external_hosts: HashMap<String, Vec<ServiceKey>>,
    /// The clients of the ExternalServices this host reaches itself, and what they were
    /// built with.
    clients: HashMap<ServiceKey, Arc<ExternalClient>>,
    settings: external::Settings,
}

impl Compiled {
    /// Compiles `policy`, `view` and the local services of `config`, carrying over from
    /// `prev` the state that must outlive a change: endpoint load, latency, ejections and
    /// reachability (by address), breaker counts, retry budgets and rate-limit buckets.
    pub fn new(
        prev: Option<&Compiled>,
        policy: Arc<Snapshot>,
        view: Arc<MeshView>,
        config: &Config,
    ) -> Self {
        let same_policy = prev.is_some_and(|p| Arc::ptr_eq(&p.policy, &policy));
        let same_view = prev.is_some_and(|p| Arc::ptr_eq(&p.view, &view));
        let routes = match prev {
            Some(p) if same_policy => Arc::clone(&p.routes),
            _ => Arc::new(route::Table::build(&policy)),
        };
        let settings = external::Settings {
            datacenter: config.datacenter.to_string(),
            zone: config.zone.to_string(),
            connect_timeout: config.outbound.connect_timeout,
            handshake_timeout: config.inbound.handshake_timeout,
        };
        let externals = external_services(&policy);
        let reuse = prev.filter(|p| same_policy && p.settings == settings);
        let clients = clients(&externals, config, &settings, reuse);
        let inputs = Inputs {
            prev,
            view: &view,
            routes: &routes,
            externals: &externals,
            clients: &clients,
            same_view,
        };
        let destinations = destinations(&inputs, config);
        let mut external_hosts: HashMap<String, Vec<ServiceKey>> = HashMap::new();
        for (key, ext) in &externals {
            for h in &ext.hosts {
                external_hosts
                    .entry(h.to_string())
                    .or_default()
                    .push(key.clone());
            }
        }
        let limiters = limiters(prev, &policy, config, same_policy);
        Self {
            policy,
            view,
            routes,
            destinations,
            limiters,
            external_hosts,
            clients,
            settings,
        }
    }

    /// The ExternalService an app's request for `host` (lowercase, without port) goes to: one
    /// in the caller's namespace first, else the first by key.
    pub fn external_for_host(&self, host: &str, caller_namespace: &str) -> Option<&ServiceKey> {
        let keys = self.external_hosts.get(host)?;
        (keys.iter())
            .find(|k| k.namespace.as_str() == caller_namespace)
            .or_else(|| keys.iter().min())
    }

    /// The ExternalService `service`, if it is one.
    pub fn external(&self, service: &ServiceKey) -> Option<&Arc<ExternalService>> {
        self.destinations.get(service)?.external.as_ref()
    }

    /// Every ExternalService client of this host.
    pub fn external_clients(&self) -> impl Iterator<Item = &Arc<ExternalClient>> {
        self.clients.values()
    }

    /// The client of an ExternalService this host reaches itself (also as its egress gateway).
    pub fn external_client(&self, service: &ServiceKey) -> Option<&Arc<ExternalClient>> {
        self.clients.get(service)
    }

    /// The destination `service`: compiled if gossip or the configuration knows it, else an
    /// empty one (no endpoints; its policy and route still apply).
    pub fn destination(&self, service: &ServiceKey) -> Arc<Destination> {
        if let Some(d) = self.destinations.get(service) {
            return Arc::clone(d);
        }
        Arc::new(Destination {
            service: service.clone(),
            policy: self.routes.destination(service).cloned(),
            route: self.routes.route(service).cloned(),
            targets: Arc::from(Vec::new()),
            breaker: Breaker::default(),
            budget: Arc::default(),
            sni: service.sni(),
            external: None,
            direct: None,
        })
    }

    /// The rate limiter of the local service `service`, if it is configured.
    pub fn limiter(&self, service: &ServiceKey) -> Option<&Arc<Limiter>> {
        self.limiters.get(service)
    }
}

/// What [`destinations`] compiles from.
struct Inputs<'a> {
    prev: Option<&'a Compiled>,
    view: &'a MeshView,
    routes: &'a route::Table,
    externals: &'a HashMap<ServiceKey, Arc<ExternalService>>,
    clients: &'a HashMap<ServiceKey, Arc<ExternalClient>>,
    same_view: bool,
}

/// Every destination this node may send to: the services gossip knows, the upstreams of
/// `config` and the ExternalServices, each with its state carried over from `prev`.
fn destinations(i: &Inputs<'_>, config: &Config) -> HashMap<ServiceKey, Arc<Destination>> {
    let Inputs {
        prev,
        view,
        routes,
        externals,
        clients,
        same_view,
    } = *i;
    let upstreams = (config.services.iter()).flat_map(|s| s.upstreams.iter().map(|u| &u.service));
    let mut destinations = HashMap::new();
    for service in view
        .endpoints
        .keys()
        .chain(upstreams)
        .chain(externals.keys())
    {
        if destinations.contains_key(service) {
            continue;
        }
        let old = prev.and_then(|p| p.destinations.get(service));
        let external = externals.get(service).cloned();
        let direct = clients.get(service).cloned();
        // Behind an egress gateway this host does not run: the gateway's hosts.
        let (sni, via) = match (&external, &direct) {
            (Some(ext), None) => egress_route(service, ext),
            _ => (service.sni(), service.clone()),
        };
        let eps = match direct {
            Some(_) => &[][..],
            None => view.endpoints.get(&via).map_or(&[][..], Vec::as_slice),
        };
        let targets = match old {
            Some(d) if same_view && d.sni == sni => Arc::clone(&d.targets),
            _ => targets(eps, old.map(|d| &d.targets[..])),
        };
        let dst = Destination {
            service: service.clone(),
            policy: routes.destination(service).cloned(),
            route: routes.route(service).cloned(),
            targets,
            breaker: old.map(|d| d.breaker.clone()).unwrap_or_default(),
            budget: old.map(|d| Arc::clone(&d.budget)).unwrap_or_default(),
            sni,
            external,
            direct,
        };
        destinations.insert(service.clone(), Arc::new(dst));
    }
    destinations
}

/// The rate limiter of each local service, kept (buckets and all) while the policy is the same.
fn limiters(
    prev: Option<&Compiled>,
    policy: &Snapshot,
    config: &Config,
    same_policy: bool,
) -> HashMap<ServiceKey, Arc<Limiter>> {
    (config.services.iter())
        .map(|s| {
            let old = prev.and_then(|p| p.limiters.get(&s.key));
            let limiter = match old {
                Some(l) if same_policy => Arc::clone(l),
                _ => {
                    let mut new = Limiter::new(policy, &s.key);
                    if let Some(old) = old {
                        new.carry_over(old);
                    }
                    Arc::new(new)
                }
            };
            (s.key.clone(), limiter)
        })
        .collect()
}

/// Every ExternalService of `policy`, by the service it names.
fn external_services(policy: &Snapshot) -> HashMap<ServiceKey, Arc<ExternalService>> {
    (policy.resources.values())
        .filter_map(|r| match &r.spec {
            Spec::ExternalService(e) => Some((
                ServiceKey::new(r.key.namespace.clone(), r.key.name.clone()),
                Arc::new(e.clone()),
            )),
            _ => None,
        })
        .collect()
}

/// Clients for the ExternalServices this host reaches itself: those without an egress
/// gateway, and those whose gateway this host runs. `reuse` (same policy and settings) keeps
/// the previous clients and their pooled connections.
fn clients(
    externals: &HashMap<ServiceKey, Arc<ExternalService>>,
    config: &Config,
    settings: &external::Settings,
    reuse: Option<&Compiled>,
) -> HashMap<ServiceKey, Arc<ExternalClient>> {
    let runs = |key: &ServiceKey, gw: &mesh_api::name::Label| {
        (config.gateway.names.iter()).any(|g| g.namespace == key.namespace && g.name == *gw)
    };
    (externals.iter())
        .filter(|(key, ext)| ext.egress_gateway.as_ref().is_none_or(|gw| runs(key, gw)))
        .map(|(key, ext)| {
            let client = match reuse.and_then(|p| p.clients.get(key)) {
                Some(c) => Arc::clone(c),
                None => Arc::new(ExternalClient::new(key.clone(), ext.clone(), settings)),
            };
            (key.clone(), client)
        })
        .collect()
}

/// The server name and the gateway service of an ExternalService reached through its egress
/// gateway.
fn egress_route(service: &ServiceKey, ext: &ExternalService) -> (String, ServiceKey) {
    match &ext.egress_gateway {
        Some(gw) => (
            mesh_api::policy::egress_sni(&service.name, gw, &service.namespace),
            ServiceKey::new(service.namespace.clone(), gw.clone()),
        ),
        // Not reached: without a gateway the service has a client.
        None => (service.sni(), service.clone()),
    }
}

/// The targets of `eps`, each keeping the state its address had in `old`.
fn targets(eps: &[Endpoint], old: Option<&[Target]>) -> Arc<[Target]> {
    let kept: HashMap<SocketAddr, &Arc<EndpointState>> = (old.unwrap_or_default().iter())
        .map(|t| (t.endpoint.addr, &t.state))
        .collect();
    (eps.iter())
        .map(|e| Target {
            endpoint: e.clone(),
            state: kept
                .get(&e.addr)
                .map_or_else(Arc::default, |s| Arc::clone(s)),
        })
        .collect()
}

/// Compiles the current inputs, then again on every change of any of them, until `shutdown`.
/// Returns the compiled state and the view it was compiled from (what admin shows, so a view
/// seen there is one the proxy already uses).
pub fn spawn(
    mut config_rx: watch::Receiver<Arc<Config>>,
    mut policy_rx: watch::Receiver<Arc<Snapshot>>,
    mut view_rx: watch::Receiver<Arc<MeshView>>,
    mut shutdown: watch::Receiver<bool>,
) -> (
    watch::Receiver<Arc<Compiled>>,
    watch::Receiver<Arc<MeshView>>,
) {
    let compile = |prev: Option<&Compiled>,
                   config_rx: &mut watch::Receiver<Arc<Config>>,
                   policy_rx: &mut watch::Receiver<Arc<Snapshot>>,
                   view_rx: &mut watch::Receiver<Arc<MeshView>>| {
        let config = config_rx.borrow_and_update().clone();
        let policy = policy_rx.borrow_and_update().clone();
        let view = view_rx.borrow_and_update().clone();
        Compiled::new(prev, policy, view, &config)
    };
    let first = compile(None, &mut config_rx, &mut policy_rx, &mut view_rx);
    let (view_tx, view_out) = watch::channel(Arc::clone(&first.view));
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        // An input whose sender is gone keeps its last value; the others are still followed.
        let mut open = [true; 3];
        while open.iter().any(|o| *o) {
            tokio::select! {
                r = config_rx.changed(), if open[0] => if r.is_err() { open[0] = false; continue },
                r = policy_rx.changed(), if open[1] => if r.is_err() { open[1] = false; continue },
                r = view_rx.changed(), if open[2] => if r.is_err() { open[2] = false; continue },
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            }
            let prev = tx.borrow().clone();
            let next = compile(Some(&prev), &mut config_rx, &mut policy_rx, &mut view_rx);
            debug!(
                policy.revision = next.policy.revision,
                destinations = next.destinations.len(),
                "proxy state compiled"
            );
            let view = Arc::clone(&next.view);
            tx.send_replace(Arc::new(next));
            view_tx.send_replace(view);
        }
    });
    (rx, view_out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
