//! Listeners bound off loopback. An upstream or `http_proxy` listener sends whatever connects
//! to it into the mesh with a local service's identity, and the admin endpoint has no
//! authentication: on an address other hosts can reach, any of them acts as a local service
//! (or reads the node's state). Valid configuration, so a warning (`check-config`, the log,
//! `meshctl check`), except the admin endpoint, which needs `admin.allow_remote = true`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use mesh_api::ServiceKey;

use super::Config;

#[cfg(test)]
mod tests;

/// The warning code of an [`OffLoopback`] in node reports.
pub const LISTENER_OFF_LOOPBACK: &str = "listener_off_loopback";

/// What a listener off loopback lets other hosts do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    /// An upstream listener of `service`: connections are carried to `upstream` with
    /// `service`'s identity.
    Upstream {
        /// The local service it belongs to.
        service: ServiceKey,
        /// The service it calls.
        upstream: ServiceKey,
    },
    /// The `http_proxy` listener of `service`: requests reach any HTTP-family mesh service with
    /// `service`'s identity.
    HttpProxy {
        /// The local service it belongs to.
        service: ServiceKey,
    },
    /// The admin endpoint (allowed off loopback by `admin.allow_remote`).
    Admin,
}

/// One listener bound to an address other hosts can reach. Displays as one line naming the
/// file, the key and the address, and the risk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffLoopback {
    /// The file that declares it.
    pub file: PathBuf,
    /// Its key, e.g. `upstreams[0].bind`, `http_proxy`, `admin.bind`.
    pub key: String,
    /// The address it binds.
    pub addr: SocketAddr,
    /// Which listener it is.
    pub listener: Listener,
}

/// Whether `ip` only accepts connections from this host: `127.0.0.0/8`, `::1`, and the
/// IPv4-mapped form of the former. Wildcards (`0.0.0.0`, `::`) are not.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// See [`Config::listeners_off_loopback`].
pub(super) fn off_loopback(config: &Config) -> Vec<OffLoopback> {
    let mut out = Vec::new();
    let mut add = |file: &PathBuf, key: String, addr: SocketAddr, listener| {
        if !is_loopback(addr.ip()) {
            out.push(OffLoopback {
                file: file.clone(),
                key,
                addr,
                listener,
            });
        }
    };
    add(
        &config.node_file,
        "admin.bind".to_owned(),
        config.admin.bind,
        Listener::Admin,
    );
    for svc in &config.services {
        for (i, u) in svc.upstreams.iter().enumerate() {
            let listener = Listener::Upstream {
                service: svc.key.clone(),
                upstream: u.service.clone(),
            };
            add(&svc.file, format!("upstreams[{i}].bind"), u.bind, listener);
        }
        if let Some(addr) = svc.http_proxy {
            let listener = Listener::HttpProxy {
                service: svc.key.clone(),
            };
            add(&svc.file, "http_proxy".to_owned(), addr, listener);
        }
    }
    out
}

// === impl OffLoopback ===

impl OffLoopback {
    /// Why it matters, in one line.
    pub fn risk(&self) -> String {
        match &self.listener {
            Listener::Upstream { service, upstream } => {
                format!("any host that can reach it can call {upstream} with {service}'s identity")
            }
            Listener::HttpProxy { service } => format!(
                "any host that can reach it can call the mesh's HTTP services with {service}'s \
                 identity"
            ),
            Listener::Admin => "the admin endpoint has no authentication: any host that can \
                                reach it can read this node's configuration, metrics and \
                                members (admin.allow_remote is set)"
                .to_owned(),
        }
    }
}

impl fmt::Display for OffLoopback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let every = if self.addr.ip().is_unspecified() {
            " (it listens on every address of this host)"
        } else {
            ""
        };
        write!(
            f,
            "{}: {}: {} is not on loopback{every}; {}",
            self.file.display(),
            self.key,
            self.addr,
            self.risk()
        )
    }
}
