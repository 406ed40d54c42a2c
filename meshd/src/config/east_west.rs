//! `[east_west]`: this host is one of its site's east-west gateways — a passthrough listener
//! other sites connect to, and a member of the WAN gossip among the gateways of every site.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::check::Checker;
use super::{DEFAULT_MAX_CONNECTIONS, ser_duration};

/// Time between WAN gossip rounds: five times the LAN default, since WAN round trips are longer
/// and there are only a few gateways per site.
pub const DEFAULT_WAN_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest WAN gossip interval accepted.
pub const MIN_WAN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest WAN gossip interval accepted (a site's death is noticed after about ten rounds).
pub const MAX_WAN_INTERVAL: Duration = Duration::from_secs(10);
/// How long a connection to the passthrough listener may take to send its ClientHello.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `[east_west]` as validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EastWestConfig {
    /// Passthrough listener.
    pub bind: SocketAddr,
    /// Where other sites reach it; `bind` unless that is a wildcard.
    pub advertise: SocketAddr,
    /// Most connections relayed at once.
    pub max_connections: usize,
    /// Time a connection has to send its ClientHello.
    #[serde(serialize_with = "ser_duration")]
    pub hello_timeout: Duration,
    /// WAN gossip listen address.
    pub wan_bind: SocketAddr,
    /// Where the other gateways reach this one's WAN gossip.
    pub wan_advertise: SocketAddr,
    /// `host:port` of other gateways' WAN gossip (any site) to contact first.
    pub wan_seeds: Vec<String>,
    /// Time between WAN gossip rounds.
    #[serde(serialize_with = "ser_duration")]
    pub wan_interval: Duration,
    /// The WAN keyring: base64 keys, one per line, the first sealing (see
    /// [`crate::wan::keyring_from_file`]).
    pub wan_key_file: PathBuf,
}

/// `[east_west]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEastWest {
    /// Required IP address and port.
    pub bind: Option<String>,
    /// IP address and port; required when `bind` is a wildcard.
    pub advertise: Option<String>,
    /// Greater than zero.
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    /// Duration such as `"10s"`.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout: String,
    /// Required IP address and port.
    pub wan_bind: Option<String>,
    /// IP address and port; required when `wan_bind` is a wildcard.
    pub wan_advertise: Option<String>,
    /// `host:port` entries.
    #[serde(default)]
    pub wan_seeds: Vec<String>,
    /// Duration such as `"1s"`.
    #[serde(default = "default_wan_interval")]
    pub wan_interval: String,
    /// Required path (relative to the node file's directory).
    pub wan_key_file: Option<String>,
}

fn default_max_connections() -> u64 {
    DEFAULT_MAX_CONNECTIONS as u64
}

fn default_hello_timeout() -> String {
    humantime::format_duration(DEFAULT_HELLO_TIMEOUT).to_string()
}

fn default_wan_interval() -> String {
    humantime::format_duration(DEFAULT_WAN_INTERVAL).to_string()
}

impl RawEastWest {
    /// Checks every key, reporting problems under `east_west.`.
    pub(super) fn check(self, c: &mut Checker<'_>, base: &Path) -> Option<EastWestConfig> {
        let bind = c
            .required("east_west.bind", self.bind.as_deref())
            .and_then(|v| c.socket_addr("east_west.bind", v));
        let advertise = super::node::advertise_of(
            c,
            "east_west",
            "bind",
            "advertise",
            bind,
            self.advertise.as_deref(),
        );
        let max_connections = match usize::try_from(self.max_connections) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                c.push(
                    "east_west.max_connections",
                    format!(
                        "{} is out of range: must be greater than 0",
                        self.max_connections
                    ),
                );
                None
            }
        };
        let hello_timeout = c.timeout("east_west.hello_timeout", &self.hello_timeout);
        let wan_bind = c
            .required("east_west.wan_bind", self.wan_bind.as_deref())
            .and_then(|v| c.socket_addr("east_west.wan_bind", v));
        let wan_advertise = super::node::advertise_of(
            c,
            "east_west",
            "wan_bind",
            "wan_advertise",
            wan_bind,
            self.wan_advertise.as_deref(),
        );
        let seeds: Vec<Option<String>> = (self.wan_seeds.iter().enumerate())
            .map(|(i, seed)| c.host_port(&format!("east_west.wan_seeds[{i}]"), seed))
            .collect();
        let wan_interval = c.duration("east_west.wan_interval", &self.wan_interval);
        let wan_interval = wan_interval.and_then(|d| {
            if (MIN_WAN_INTERVAL..=MAX_WAN_INTERVAL).contains(&d) {
                return Some(d);
            }
            let message = format!(
                "{:?} is out of range: must be between {} and {}",
                self.wan_interval,
                humantime::format_duration(MIN_WAN_INTERVAL),
                humantime::format_duration(MAX_WAN_INTERVAL),
            );
            c.push("east_west.wan_interval", message);
            None
        });
        let wan_key_file = c
            .required("east_west.wan_key_file", self.wan_key_file.as_deref())
            .and_then(|v| c.path("east_west.wan_key_file", v, base));
        Some(EastWestConfig {
            bind: bind?,
            advertise: advertise?,
            max_connections: max_connections?,
            hello_timeout: hello_timeout?,
            wan_bind: wan_bind?,
            wan_advertise: wan_advertise?,
            wan_seeds: seeds.into_iter().collect::<Option<_>>()?,
            wan_interval: wan_interval?,
            wan_key_file: wan_key_file?,
        })
    }
}
