//! The per-service listeners (`listen`, `http_proxy`, upstream binds), keyed by address, so a
//! reload keeps the socket of every address it still uses: a listener whose settings changed
//! gets a new accept loop on the same socket (the old loop stops after the new one started),
//! so no connection is refused while the configuration changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument as _, info, info_span};

use super::accept::{Error, Stops};
use super::shared::Shared;
use super::{gateway, inbound, outbound};
use crate::config::{Config, Service, Upstream};

/// What one listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A service's `listen` address (mTLS, or plaintext under PERMISSIVE).
    Direct(Service),
    /// A service's `http_proxy` listener.
    HttpProxy(Service),
    /// An upstream bind of a service.
    Upstream(Service, Upstream),
    /// A listener of a Gateway this host runs.
    Gateway(gateway::GatewayListener),
}

/// How a set of running listeners becomes the wanted one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Addresses not listened on yet: bind.
    pub bind: Vec<Spec>,
    /// Addresses listened on with other settings: new accept loop, same socket.
    pub replace: Vec<Spec>,
    /// Addresses no longer wanted: stop accepting (open connections finish).
    pub stop: Vec<SocketAddr>,
    /// Addresses whose listener stays as it is.
    pub keep: usize,
}

/// Listeners bound for a [`Diff`] but not serving yet: dropping it closes them, so a refused
/// reload leaves nothing behind.
pub struct Prepared {
    diff: Diff,
    bound: Vec<(Spec, TcpListener)>,
}

/// The running per-service listeners.
#[derive(Default)]
pub struct Set {
    running: BTreeMap<SocketAddr, Running>,
}

struct Running {
    spec: Spec,
    socket: Arc<TcpListener>,
    /// Turning it true stops this listener's accept loop.
    retire: watch::Sender<bool>,
}

// === impl Spec ===

impl Spec {
    /// The configured address (the key of the listener).
    pub fn addr(&self) -> SocketAddr {
        match self {
            Spec::Direct(s) => s.listen.unwrap_or(s.address),
            Spec::HttpProxy(s) => s.http_proxy.unwrap_or(s.address),
            Spec::Upstream(_, u) => u.bind,
            Spec::Gateway(g) => g.listener.bind,
        }
    }

    /// For logs and bind errors.
    pub fn describe(&self) -> String {
        match self {
            Spec::Direct(s) => format!("the listen address of {}", s.key),
            Spec::HttpProxy(s) => format!("the http_proxy of {}", s.key),
            Spec::Upstream(s, u) => format!("upstream {} of {}", u.service, s.key),
            Spec::Gateway(g) => format!("listener {} of gateway {}", g.listener.name, g.gateway),
        }
    }
}

impl Spec {
    /// What an accept loop depends on: the kind, the service's key and the upstream. The
    /// loops read nothing else of the service (the rest comes from the current config per
    /// connection), so a service whose labels or app changed keeps its listeners as they are.
    /// A gateway listener's loop depends on the whole listener (protocol, hosts, TLS).
    fn same_loop(&self, other: &Spec) -> bool {
        match (self, other) {
            (Spec::Direct(a), Spec::Direct(b)) | (Spec::HttpProxy(a), Spec::HttpProxy(b)) => {
                a.key == b.key
            }
            (Spec::Upstream(a, ua), Spec::Upstream(b, ub)) => a.key == b.key && ua == ub,
            (Spec::Gateway(a), Spec::Gateway(b)) => a == b,
            _ => false,
        }
    }
}

/// Every per-service listener `config` asks for, in file order.
pub fn specs(config: &Config) -> Vec<Spec> {
    let mut out = Vec::new();
    for svc in &config.services {
        if svc.listen.is_some() {
            out.push(Spec::Direct(svc.clone()));
        }
        if svc.http_proxy.is_some() {
            out.push(Spec::HttpProxy(svc.clone()));
        }
        for up in &svc.upstreams {
            out.push(Spec::Upstream(svc.clone(), up.clone()));
        }
    }
    out
}

/// What turns the listeners `running` into `wanted` (validation has ruled out two wanted
/// listeners on one address).
pub fn diff(running: &BTreeMap<SocketAddr, Spec>, wanted: &[Spec]) -> Diff {
    let mut d = Diff::default();
    for spec in wanted {
        match running.get(&spec.addr()) {
            None => d.bind.push(spec.clone()),
            Some(current) if current.same_loop(spec) => d.keep += 1,
            Some(_) => d.replace.push(spec.clone()),
        }
    }
    d.stop = (running.keys())
        .filter(|addr| !wanted.iter().any(|s| s.addr() == **addr))
        .copied()
        .collect();
    d
}

// === impl Diff ===

impl Diff {
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.bind.is_empty() && self.replace.is_empty() && self.stop.is_empty()
    }
}

// === impl Prepared ===

impl Prepared {
    /// What applying it will do.
    pub fn diff(&self) -> &Diff {
        &self.diff
    }
}

// === impl Set ===

impl Set {
    /// The specs of the running listeners.
    pub fn specs(&self) -> BTreeMap<SocketAddr, Spec> {
        (self.running.iter())
            .map(|(a, r)| (*a, r.spec.clone()))
            .collect()
    }

    /// Bound addresses: (spec, local address), for tests and logs.
    pub fn bound(&self) -> Vec<(Spec, SocketAddr)> {
        (self.running.values())
            .filter_map(|r| Some((r.spec.clone(), r.socket.local_addr().ok()?)))
            .collect()
    }

    /// Binds the addresses `wanted` adds. Fails on the first address that cannot be bound,
    /// closing the ones already bound for it.
    pub async fn prepare(&self, wanted: &[Spec]) -> Result<Prepared, Error> {
        let diff = diff(&self.specs(), wanted);
        let mut bound = Vec::with_capacity(diff.bind.len());
        for spec in &diff.bind {
            let addr = spec.addr();
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind {
                    what: spec.describe(),
                    addr,
                    source,
                })?;
            bound.push((spec.clone(), l));
        }
        Ok(Prepared { diff, bound })
    }

    /// Starts what `prepared` binds and replaces, then stops what it drops. Cannot fail: all
    /// the fallible work (binding) was done by [`Set::prepare`]. Accept loops also stop when
    /// `stop_rx` turns true (the node drains).
    pub fn apply(&mut self, prepared: Prepared, shared: &Shared, stop_rx: &watch::Receiver<bool>) {
        let Prepared { diff, bound } = prepared;
        for (spec, l) in bound {
            info!(addr = ?l.local_addr().ok(), listener = %spec.describe(), "listening");
            let running = start(spec, Arc::new(l), shared, stop_rx);
            self.running.insert(running.spec.addr(), running);
        }
        for spec in diff.replace {
            let addr = spec.addr();
            let Some(old) = self.running.remove(&addr) else {
                continue;
            };
            // The new loop accepts before the old one stops: the socket is never unattended.
            let running = start(spec, old.socket.clone(), shared, stop_rx);
            old.retire.send_replace(true);
            info!(addr = %addr, listener = %running.spec.describe(), "listener settings updated");
            self.running.insert(addr, running);
        }
        for addr in diff.stop {
            if let Some(old) = self.running.remove(&addr) {
                old.retire.send_replace(true);
                info!(addr = %addr, listener = %old.spec.describe(), "listener closed");
            }
        }
    }
}

/// Spawns the accept loop of `spec` on `socket`.
fn start(
    spec: Spec,
    socket: Arc<TcpListener>,
    shared: &Shared,
    stop_rx: &watch::Receiver<bool>,
) -> Running {
    let (retire, retire_rx) = watch::channel(false);
    let stops = Stops {
        node: stop_rx.clone(),
        listener: retire_rx,
    };
    let shared = shared.clone();
    let addr = socket.local_addr().ok();
    // Detached: the loop ends when retired or when the node stops accepting; connections it
    // accepted are tracked by the drain, not by this task.
    match &spec {
        Spec::Direct(svc) => {
            let span = info_span!("direct", service = %svc.key, addr = ?addr);
            let entry = inbound::Entry::Direct(svc.key.clone());
            tokio::spawn(inbound::serve(socket.clone(), entry, shared, stops).instrument(span));
        }
        Spec::HttpProxy(svc) => {
            let span = info_span!("http_proxy", src = %svc.key);
            tokio::spawn(
                outbound::serve_http_proxy(socket.clone(), svc.clone(), shared, stops)
                    .instrument(span),
            );
        }
        Spec::Upstream(svc, up) => {
            let span = info_span!("outbound", src = %svc.key, dst = %up.service);
            tokio::spawn(
                outbound::serve(socket.clone(), svc.clone(), up.clone(), shared, stops)
                    .instrument(span),
            );
        }
        Spec::Gateway(g) => {
            let span = info_span!("gateway", gateway = %g.gateway, listener = %g.listener.name);
            tokio::spawn(gateway::serve(socket.clone(), g.clone(), shared, stops).instrument(span));
        }
    }
    Running {
        spec,
        socket,
        retire,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn svc(name: &str, app: u16, listen: Option<u16>, ups: &[(&str, u16)]) -> Service {
        let dir = std::env::temp_dir();
        let mut text = format!("name = \"{name}\"\naddress = \"127.0.0.1:{app}\"\n");
        if let Some(p) = listen {
            text.push_str(&format!("listen = \"127.0.0.1:{p}\"\n"));
        }
        for (u, p) in ups {
            text.push_str(&format!(
                "[[upstreams]]\nservice = \"{u}\"\nbind = \"127.0.0.1:{p}\"\n"
            ));
        }
        Service::from_toml_str(&dir.join(format!("{name}.toml")), &text).unwrap()
    }

    fn running(specs: &[Spec]) -> BTreeMap<SocketAddr, Spec> {
        specs.iter().map(|s| (s.addr(), s.clone())).collect()
    }

    fn addrs(v: &[Spec]) -> Vec<u16> {
        v.iter().map(|s| s.addr().port()).collect()
    }

    #[test]
    fn diff_table() {
        let mut cfg = Config::for_test(&std::env::temp_dir());
        cfg.services = vec![svc("web", 8080, Some(9000), &[("api", 9001), ("db", 9002)])];
        let before = specs(&cfg);
        assert_eq!(addrs(&before), [9000, 9001, 9002]);

        // (case, services after, bind, replace, stop, keep)
        type Case = (
            &'static str,
            Vec<Service>,
            Vec<u16>,
            Vec<u16>,
            Vec<u16>,
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                "same config",
                vec![svc("web", 8080, Some(9000), &[("api", 9001), ("db", 9002)])],
                vec![],
                vec![],
                vec![],
                3,
            ),
            (
                "upstream added, one removed",
                vec![svc(
                    "web",
                    8080,
                    Some(9000),
                    &[("api", 9001), ("cache", 9003)],
                )],
                vec![9003],
                vec![],
                vec![9002],
                2,
            ),
            (
                "an upstream moved to another service on the same port: same socket",
                vec![svc(
                    "web",
                    8080,
                    Some(9000),
                    &[("api", 9001), ("queue", 9002)],
                )],
                vec![],
                vec![9002],
                vec![],
                2,
            ),
            (
                "the app address changed: listeners read it per connection, they stay",
                vec![svc("web", 8081, Some(9000), &[("api", 9001), ("db", 9002)])],
                vec![],
                vec![],
                vec![],
                3,
            ),
            (
                "the listen address moved",
                vec![svc("web", 8080, Some(9005), &[("api", 9001), ("db", 9002)])],
                vec![9005],
                vec![],
                vec![9000],
                2,
            ),
            (
                "service removed, another added",
                vec![svc("batch", 8090, None, &[("api", 9011)])],
                vec![9011],
                vec![],
                vec![9000, 9001, 9002],
                0,
            ),
        ];
        for (case, services, bind, replace, stop, keep) in cases {
            let mut after = cfg.clone();
            after.services = services;
            let d = diff(&running(&before), &specs(&after));
            assert_eq!(addrs(&d.bind), bind, "{case}: bind");
            assert_eq!(addrs(&d.replace), replace, "{case}: replace");
            let stopped: Vec<u16> = d.stop.iter().map(|a| a.port()).collect();
            assert_eq!(stopped, stop, "{case}: stop");
            assert_eq!(d.keep, keep, "{case}: keep");
            assert_eq!(d.is_empty(), keep == 3, "{case}: is_empty");
        }
    }
}
