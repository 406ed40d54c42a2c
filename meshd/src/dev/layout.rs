//! Addresses, ports and files of the dev mesh: one registry on 127.0.0.1 and nodes on
//! 127.0.0.2, 127.0.0.3, ..., each with a block of ten ports above `--base-port`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Trust domain of the dev mesh (`.test` is reserved for testing).
pub const TRUST_DOMAIN: &str = "mesh.test";
/// Fewest and most nodes: one `web` node plus at least one `api` node.
pub const MIN_NODES: usize = 2;
/// See [`MIN_NODES`]; nodes use 127.0.0.2 up to 127.0.0.(MAX_NODES + 1).
pub const MAX_NODES: usize = 16;
/// Ports per node, from `base_port + PORTS_PER_NODE * i`.
const PORTS_PER_NODE: u16 = 10;
/// Grace period written into node configs so that stopping the dev mesh is quick.
const DEV_DRAIN_GRACE: &str = "2s";

/// Everything the dev mesh listens on and writes.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Root directory.
    pub dir: PathBuf,
    /// Registry gRPC address.
    pub registry: SocketAddr,
    /// Registry admin address.
    pub registry_admin: SocketAddr,
    /// The nodes, `n1` first.
    pub nodes: Vec<Node>,
    /// The `http` listener of the ingress gateway `public`, which n1 runs.
    pub gateway: SocketAddr,
}

/// One node: its meshd listeners and the one demo service it runs.
#[derive(Debug, Clone)]
pub struct Node {
    /// `n1`, `n2`, ...
    pub name: String,
    /// Gossip (TCP and UDP).
    pub gossip: SocketAddr,
    /// mTLS inbound listener.
    pub inbound: SocketAddr,
    /// Admin endpoint.
    pub admin: SocketAddr,
    /// The service this node runs: `web` on n1, `api` elsewhere.
    pub service: String,
    /// Where its demo-app listens.
    pub app: SocketAddr,
    /// Service labels.
    pub labels: Vec<(String, String)>,
    /// Upstream listener to `api` (only `web` has one).
    pub upstream: Option<SocketAddr>,
}

// === impl Layout ===

impl Layout {
    /// Plans `nodes` nodes under `dir` with ports from `base_port`.
    pub fn new(dir: &Path, nodes: usize, base_port: u16) -> anyhow::Result<Self> {
        if !(MIN_NODES..=MAX_NODES).contains(&nodes) {
            bail!("--nodes {nodes}: must be between {MIN_NODES} and {MAX_NODES}");
        }
        // Node i uses base_port + 10 * i up to base_port + 10 * i + 4.
        let last = u32::from(base_port) + u32::from(PORTS_PER_NODE) * nodes as u32 + 4;
        if base_port < 1024 || last > u32::from(u16::MAX) {
            bail!(
                "--base-port {base_port}: the dev mesh uses ports {base_port} to {last}; \
                 pick a base port from 1024 to {}",
                u32::from(u16::MAX) + u32::from(base_port) - last
            );
        }
        let local = |port: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let nodes = (1..=nodes)
            .map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8 + 1));
                let port = base_port + PORTS_PER_NODE * i as u16;
                let web = i == 1;
                Node {
                    name: format!("n{i}"),
                    gossip: SocketAddr::new(ip, port),
                    inbound: SocketAddr::new(ip, port + 1),
                    admin: SocketAddr::new(ip, port + 2),
                    service: if web { "web" } else { "api" }.to_owned(),
                    app: local(port + 3),
                    labels: vec![(
                        "version".to_owned(),
                        if web || i % 2 == 0 { "v1" } else { "v2" }.to_owned(),
                    )],
                    upstream: web.then(|| local(port + 4)),
                }
            })
            .collect();
        Ok(Self {
            dir: dir.to_owned(),
            registry: local(base_port),
            registry_admin: local(base_port + 1),
            nodes,
            gateway: local(base_port + PORTS_PER_NODE + 5),
        })
    }

    /// The registry's data directory (`mesh-registry init --data-dir`).
    pub fn registry_dir(&self) -> PathBuf {
        self.dir.join("registry")
    }

    /// Operator credentials written by `mesh-registry init`.
    pub fn admin_dir(&self) -> PathBuf {
        self.registry_dir().join("admin")
    }

    /// The registry's config file.
    pub fn registry_config(&self) -> PathBuf {
        self.registry_dir().join("registry.toml")
    }

    /// The policy `meshd dev` applies (kept for the user to edit and apply again).
    pub fn policy_file(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    /// The registry's log.
    pub fn registry_log(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// Directory of one node.
    pub fn node_dir(&self, node: &Node) -> PathBuf {
        self.dir.join(&node.name)
    }

    /// The node's config file.
    pub fn node_config(&self, node: &Node) -> PathBuf {
        self.node_dir(node).join("meshd.toml")
    }

    /// The node's meshd log.
    pub fn node_log(&self, node: &Node) -> PathBuf {
        self.node_dir(node).join("meshd.log")
    }

    /// The log of the node's demo-app.
    pub fn app_log(&self, node: &Node) -> PathBuf {
        self.node_dir(node).join(format!("{}.log", node.service))
    }

    /// Every TCP address the mesh will listen on, with what it is for.
    pub fn tcp_addrs(&self) -> Vec<(SocketAddr, String)> {
        let mut out = vec![
            (self.registry, "registry".to_owned()),
            (self.registry_admin, "registry admin".to_owned()),
        ];
        for n in &self.nodes {
            out.push((n.gossip, format!("{} gossip", n.name)));
            out.push((n.inbound, format!("{} inbound", n.name)));
            out.push((n.admin, format!("{} admin", n.name)));
            out.push((n.app, format!("{} {} app", n.name, n.service)));
            if let Some(u) = n.upstream {
                out.push((u, format!("{} upstream to api", n.name)));
            }
        }
        out.push((self.gateway, "n1 ingress gateway".to_owned()));
        out
    }

    /// Writes the node's config, service file and join token.
    pub fn write_node(&self, node: &Node, token: &str) -> anyhow::Result<()> {
        let dir = self.node_dir(node);
        let services = dir.join("services.d");
        std::fs::create_dir_all(&services)
            .with_context(|| format!("creating {}", services.display()))?;
        let write = |path: PathBuf, text: &str| {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write(self.node_config(node), &self.node_toml(node))?;
        write(
            services.join(format!("{}.toml", node.service)),
            &node.service_toml(),
        )?;
        write(dir.join("token"), &format!("{token}\n"))
    }

    /// The node config file: paths relative to the node's directory.
    pub fn node_toml(&self, node: &Node) -> String {
        let seeds = self
            .nodes
            .iter()
            .filter(|n| n.name != node.name)
            .map(|n| format!("\"{}\"", n.gossip))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"# Written by `meshd dev`: node {name} of a local mesh.
node_name = "{name}"
data_dir = "data"
services_dir = "services.d"

[registry]
address = "{registry}"
join_token_file = "token"

[gossip]
bind = "{gossip}"
seeds = [{seeds}]

[inbound]
bind = "{inbound}"

[admin]
bind = "{admin}"

[drain]
grace_period = "{DEV_DRAIN_GRACE}"
{gateway}"#,
            gateway = if node.runs_gateway() {
                format!("\n[gateway]\nnames = [\"default/{GATEWAY}\"]\n")
            } else {
                String::new()
            },
            name = node.name,
            registry = self.registry,
            gossip = node.gossip,
            inbound = node.inbound,
            admin = node.admin,
        )
    }

    /// The demo policy: api's versions as subsets, canary requests (`x-canary: 1`) to v2 when
    /// a node runs it, api callable by web and the gateway only and never on `/admin`, and the
    /// gateway's routes (`/api/` to api, the rest to web).
    pub fn policy_toml(&self) -> String {
        let canary = if self
            .nodes
            .iter()
            .any(|n| n.service == "api" && n.version() == "v2")
        {
            "[[resource.http]]\nname = \"canary\"\nmatch = [{ headers = { \"x-canary\" = { exact = \"1\" } } }]\nroute = [{ subset = \"v2\" }]\n"
        } else {
            ""
        };
        let td = TRUST_DOMAIN;
        format!(
            r#"# Written by `meshd dev`: the demo mesh's policy. Edit it and apply it again with
#   meshctl --credentials {admin} apply -f {file}

[[resource]]
kind = "DestinationPolicy"
name = "api"
service = "api"
load_balancer = "round_robin"
[[resource.subsets]]
name = "v1"
labels = {{ version = "v1" }}
[[resource.subsets]]
name = "v2"
labels = {{ version = "v2" }}

[[resource]]
kind = "Route"
name = "api"
service = "api"
{canary}[[resource.http]]
name = "default"
route = [{{ weight = 100 }}]
retries = {{ attempts = 2, retry_on = ["connect-failure", "reset"] }}

[[resource]]
kind = "AuthorizationPolicy"
name = "api-from-web-and-the-gateway"
selector = {{ service = "api" }}
rules = [{{ from = [{{ principals = ["spiffe://{td}/ns/default/svc/web", "spiffe://{td}/ns/default/svc/{GATEWAY}"] }}] }}]

[[resource]]
kind = "AuthorizationPolicy"
name = "api-no-admin"
action = "deny"
selector = {{ service = "api" }}
rules = [{{ to = [{{ paths = ["/admin", "/admin/*"] }}] }}]

[[resource]]
kind = "Gateway"
name = "{GATEWAY}"
[[resource.listeners]]
name = "web"
bind = "{gateway}"
protocol = "http"

[[resource]]
kind = "Route"
name = "edge"
gateways = ["{GATEWAY}"]
[[resource.http]]
name = "api"
match = [{{ path = {{ prefix = "/api/" }} }}]
route = [{{ service = "api" }}]
[[resource.http]]
name = "site"
route = [{{ service = "web" }}]
"#,
            admin = self.admin_dir().display(),
            file = self.policy_file().display(),
            gateway = self.gateway,
        )
    }
}

/// The ingress gateway n1 runs.
pub const GATEWAY: &str = "public";

// === impl Node ===

impl Node {
    /// Whether this node runs the ingress gateway (n1 does).
    pub fn runs_gateway(&self) -> bool {
        self.upstream.is_some()
    }

    /// The services this node's join token must allow: its own, and the gateway's.
    pub fn identities(&self) -> Vec<String> {
        let mut out = vec![self.service.clone()];
        if self.runs_gateway() {
            out.push(GATEWAY.to_owned());
        }
        out
    }

    /// The node's one service file.
    pub fn service_toml(&self) -> String {
        let mut s = format!(
            "# Written by `meshd dev`: the {} demo-app on {}.\nname = \"{}\"\naddress = \"{}\"\nprotocol = \"http\"\n",
            self.service, self.name, self.service, self.app
        );
        if !self.labels.is_empty() {
            s.push_str("\n[labels]\n");
            for (k, v) in &self.labels {
                let _ = writeln!(s, "{k} = \"{v}\"");
            }
        }
        if let Some(bind) = self.upstream {
            let _ = write!(s, "\n[[upstreams]]\nservice = \"api\"\nbind = \"{bind}\"\n");
        }
        s
    }

    /// The version label.
    pub fn version(&self) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == "version")
            .map_or("", |(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn plans_distinct_addresses() {
        let l = Layout::new(Path::new("/tmp/x"), 3, 17700).unwrap();
        let addrs = l.tcp_addrs();
        let mut unique: Vec<_> = addrs.iter().map(|(a, _)| *a).collect();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addrs.len());
        assert_eq!(
            l.nodes[0].upstream,
            Some("127.0.0.1:17714".parse().unwrap())
        );
        assert_eq!(l.nodes[2].admin, "127.0.0.4:17732".parse().unwrap());
        assert_eq!(
            l.nodes.iter().map(Node::version).collect::<Vec<_>>(),
            ["v1", "v1", "v2"]
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(Layout::new(Path::new("/x"), 1, 17700).is_err());
        assert!(Layout::new(Path::new("/x"), MAX_NODES + 1, 17700).is_err());
        assert!(Layout::new(Path::new("/x"), MAX_NODES, 65400).is_err());
        assert!(Layout::new(Path::new("/x"), MAX_NODES, 65535 - 180).is_ok());
        assert!(Layout::new(Path::new("/x"), 2, 80).is_err());
    }

    #[test]
    fn written_files_are_valid_configs() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path(), 3, 17700).unwrap();
        for n in &l.nodes {
            l.write_node(n, "tok").unwrap();
            let c = Config::load(&l.node_config(n)).unwrap();
            assert_eq!(c.node_name.to_string(), n.name);
            assert_eq!(c.services.len(), 1);
            assert_eq!(c.services[0].address, n.app);
            let ups: Vec<_> = c.services[0].upstreams.iter().map(|u| u.bind).collect();
            assert_eq!(ups, n.upstream.into_iter().collect::<Vec<_>>());
        }
    }
}
