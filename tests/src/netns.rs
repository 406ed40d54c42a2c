//! Network-namespace hosts: each host gets its own namespace with one veth into a shared
//! bridge and its own 10.213.<n>.0/24 address that exists only inside this test run.
//! Needs root (CI runs as root); tests skip (counted by the test command) when `ip netns` is
//! not permitted, or fail when `MESH_E2E_REQUIRE` names `netns`.

use std::net::Ipv4Addr;

use crate::Within as _;
use std::process::Command;

use anyhow::{Context as _, bail};

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .within(crate::CLI_TIMEOUT)
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process may create network namespaces.
pub fn available() -> bool {
    let name = format!("meshprobe{}", std::process::id());
    let ok = ip(&["netns", "add", &name]).is_ok();
    if ok {
        let _ = ip(&["netns", "del", &name]);
    }
    ok
}

/// A bridge with hosts attached; everything is deleted on drop.
pub struct Net {
    /// Bridge device name.
    pub bridge: String,
    /// Subnet third octet.
    pub subnet: u8,
    /// Namespaces created.
    pub hosts: Vec<Host>,
}

/// One namespace host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name (pass to `ip netns exec`).
    pub ns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// The veth end in the root namespace (down = host cut off).
    pub veth_root: String,
}

impl Net {
    /// Creates the bridge `mb<id>` with 10.213.<subnet>.1/24 in the root namespace.
    pub fn new(id: u8) -> anyhow::Result<Self> {
        let bridge = format!("mb{}x{id}", std::process::id() % 10000);
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        // From here on Drop deletes the bridge, also when the rest of the setup fails.
        let net = Self {
            bridge,
            subnet: id,
            hosts: Vec::new(),
        };
        ip(&[
            "addr",
            "add",
            &format!("10.213.{id}.1/24"),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The bridge's own address (10.213.<subnet>.1), reachable from every host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// Adds host number `n` (2..=254) as 10.213.<subnet>.<n>.
    pub fn add_host(&mut self, n: u8) -> anyhow::Result<Host> {
        let tag = format!("{}x{}x{n}", std::process::id() % 10000, self.subnet);
        let ns = format!("mesh{tag}");
        let veth_root = format!("vr{tag}");
        let veth_ns = format!("vn{tag}");
        let _ = ip(&["netns", "del", &ns]);
        let _ = ip(&["link", "del", &veth_root]);
        ip(&["netns", "add", &ns])?;
        let addr = Ipv4Addr::new(10, 213, self.subnet, n);
        let host = Host {
            ns,
            ip: addr,
            veth_root,
        };
        // Recorded before it is wired up, so that Drop also cleans up a half-made host.
        self.hosts.push(host.clone());
        let Host { ns, veth_root, .. } = &host;
        ip(&[
            "link", "add", veth_root, "type", "veth", "peer", "name", &veth_ns,
        ])?;
        ip(&["link", "set", &veth_ns, "netns", ns])?;
        ip(&["link", "set", veth_root, "master", &self.bridge])?;
        ip(&["link", "set", veth_root, "up"])?;
        ip(&[
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &veth_ns,
        ])?;
        ip(&["netns", "exec", ns, "ip", "link", "set", &veth_ns, "up"])?;
        ip(&["netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// Cuts a host off the bridge (partition) or reconnects it.
    pub fn set_link(&self, host: &Host, up: bool) -> anyhow::Result<()> {
        ip(&[
            "link",
            "set",
            &host.veth_root,
            if up { "up" } else { "down" },
        ])
    }
}

/// A router namespace joined to several bridges (one per site) at 10.213.<subnet>.254, with
/// forwarding on inside it only: a host reaches another bridge only through the routes it is
/// given ([`route`]), so a test decides which addresses of one site another can reach.
pub struct Router {
    /// Its namespace.
    pub ns: String,
    /// Per bridge joined: the subnet and the veth end inside the router (down = that bridge is
    /// cut off from the others).
    links: Vec<(u8, String)>,
    /// The veth ends in the root namespace, deleted on drop.
    roots: Vec<String>,
}

impl Router {
    /// A router joined to every bridge of `nets`.
    pub fn new(nets: &[&Net]) -> anyhow::Result<Self> {
        let tag = format!("{}", std::process::id() % 10000);
        let ns = format!("meshrt{tag}");
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let mut router = Self {
            ns,
            links: Vec::new(),
            roots: Vec::new(),
        };
        for net in nets {
            let root = format!("rr{tag}x{}", net.subnet);
            let inner = format!("ri{tag}x{}", net.subnet);
            let _ = ip(&["link", "del", &root]);
            ip(&["link", "add", &root, "type", "veth", "peer", "name", &inner])?;
            router.roots.push(root.clone());
            ip(&["link", "set", &inner, "netns", &router.ns])?;
            ip(&["link", "set", &root, "master", &net.bridge])?;
            ip(&["link", "set", &root, "up"])?;
            let addr = format!("{}/24", router.addr_on(net));
            ip(&[
                "netns", "exec", &router.ns, "ip", "addr", "add", &addr, "dev", &inner,
            ])?;
            ip(&[
                "netns", "exec", &router.ns, "ip", "link", "set", &inner, "up",
            ])?;
            router.links.push((net.subnet, inner));
        }
        ip(&["netns", "exec", &router.ns, "ip", "link", "set", "lo", "up"])?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &router.ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .within(crate::CLI_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "enabling forwarding in {}: {}",
                router.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(router)
    }

    /// The router's address on `net`'s bridge.
    pub fn addr_on(&self, net: &Net) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, net.subnet, 254)
    }

    /// Cuts `net`'s bridge off the others (or joins it again).
    pub fn set_link(&self, net: &Net, up: bool) -> anyhow::Result<()> {
        let (_, inner) = (self.links.iter())
            .find(|(subnet, _)| *subnet == net.subnet)
            .context("the router is not joined to that bridge")?;
        let state = if up { "up" } else { "down" };
        ip(&["netns", "exec", &self.ns, "ip", "link", "set", inner, state])
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        for r in &self.roots {
            let _ = ip(&["link", "del", r]);
        }
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Gives `host` a route to `dest` (an address or a prefix such as 10.213.7.0/24) through
/// `via` (a router on its bridge).
pub fn route(host: &Host, dest: &str, via: Ipv4Addr) -> anyhow::Result<()> {
    ip(&[
        "netns",
        "exec",
        &host.ns,
        "ip",
        "route",
        "add",
        dest,
        "via",
        &via.to_string(),
    ])
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["link", "del", &h.veth_root]);
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
