//! mesh-e2e: the multi-node test harness — starts a real registry and real meshd processes
//! (each on its own loopback address, or in its own network namespace), creates tokens with
//! the real meshctl, and gives tests handles to kill, restart and inspect them.

pub mod apps;
pub mod curl;
pub mod http_app;
pub mod knobs;
pub mod netns;
pub mod otlp;
pub mod postgres;
pub mod proc;
pub mod py;
pub mod scratch;
pub mod tls;

pub use knobs::{can_run, scaled};
use proc::wrap;
pub use proc::{Proc, Within, output_within};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Default time a test waits for a condition (scaled, like every wait, by
/// `MESH_E2E_TIMEOUT_SCALE`).
pub const WAIT: Duration = Duration::from_secs(20);

/// How long one HTTP request or echo round trip of the test clients may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `meshctl` (or other CLI) call may take before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `meshd`.
    pub meshd: PathBuf,
    /// `mesh-registry`.
    pub registry: PathBuf,
    /// `meshctl`.
    pub meshctl: PathBuf,
}

/// Finds the binaries next to the test executable (`target/<profile>/`).
pub fn bins() -> Bins {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let b = Bins {
        meshd: dir.join("meshd"),
        registry: dir.join("mesh-registry"),
        meshctl: dir.join("meshctl"),
    };
    for p in [&b.meshd, &b.registry, &b.meshctl] {
        assert!(
            p.exists(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`, or run scripts/test)",
            p.display()
        );
    }
    b
}

static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback address for one simulated host. Tests in one binary run in parallel, so
/// every host gets its own address; the third octet is derived from the process id so that
/// leftovers of an earlier run cannot collide.
pub fn next_ip() -> Ipv4Addr {
    let n = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
    let third = 10 + (std::process::id() % 100) as u8 * 2 + (n / 250) as u8;
    Ipv4Addr::new(127, 1, third, 2 + (n % 250) as u8)
}

/// Runs `f` until it returns `Some` or `timeout` (scaled) passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_while(timeout, what, || None, f).await
}

/// Like [`eventually`], but fails at once when `gone` reports something (a process the wait
/// depends on has exited) instead of waiting out the timeout.
pub async fn eventually_while<T, F, Fut, G>(
    timeout: Duration,
    what: &str,
    mut gone: G,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
    G: FnMut() -> Option<String>,
{
    let timeout = scaled(timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if let Some(why) = gone() {
            bail!("gave up waiting for {what}: {why}");
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `proc` (named `name`) did if it has exited, for [`eventually_while`].
fn exited(name: &str, proc: Option<&Proc>) -> Option<String> {
    let status = match proc {
        Some(p) => p.exited()?,
        None => "stopped by the test".to_owned(),
    };
    Some(format!("{name} exited ({status})"))
}

/// Options for the registry under test.
#[derive(Debug, Clone)]
pub struct RegistryOpts {
    /// Workload certificate lifetime (short in rotation tests).
    pub workload_cert_ttl: Duration,
    /// Node certificate lifetime.
    pub node_cert_ttl: Duration,
    /// Listen IP.
    pub ip: IpAddr,
    /// Run inside this network namespace.
    pub netns: Option<String>,
    /// Top-level `key = value` lines for registry.toml (replacing the same keys).
    pub extra: Vec<String>,
    /// Another site's registry: this site's name and the first site's CA directory, whose root
    /// signs this site's intermediate (`init --site --join-root`).
    pub join: Option<(String, PathBuf)>,
}

impl Default for RegistryOpts {
    fn default() -> Self {
        Self {
            workload_cert_ttl: Duration::from_secs(3600),
            node_cert_ttl: Duration::from_secs(24 * 3600),
            ip: IpAddr::V4(next_ip()),
            netns: None,
            extra: Vec::new(),
            join: None,
        }
    }
}

/// A real registry process with its data directory.
pub struct Registry {
    /// Binaries.
    pub bins: Bins,
    /// Scratch directory of the whole cluster (kept on failure: see `keep`).
    pub dir: PathBuf,
    /// Registry data dir.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Operator credentials dir.
    pub creds: PathBuf,
    /// How it was started.
    pub opts: RegistryOpts,
    /// The process (None while stopped).
    pub proc: Option<Proc>,
    scratch: scratch::Scratch,
}

impl Registry {
    /// Inits and starts a registry in a new temp dir; waits until it answers.
    pub async fn start(opts: RegistryOpts) -> anyhow::Result<Self> {
        let bins = bins();
        let scratch = scratch::Scratch::new()?;
        let dir = scratch.path().to_owned();
        let data_dir = dir.join("registry");
        let addr = SocketAddr::new(opts.ip, 7700);
        let admin = SocketAddr::new(opts.ip, 7701);
        let mut init = Command::new(&bins.registry);
        init.args(["init", "--trust-domain", "mesh.test", "--data-dir"])
            .arg(&data_dir)
            .args([
                "--listen",
                &addr.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ]);
        if let Some((site, ca)) = &opts.join {
            init.args(["--site", site, "--join-root"]).arg(ca);
        }
        let out = output_within(&mut init, CLI_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "mesh-registry init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cfg = data_dir.join("registry.toml");
        let mut text = std::fs::read_to_string(&cfg)?;
        let mut lines = vec![
            format!(
                "workload_cert_ttl = \"{}s\"",
                opts.workload_cert_ttl.as_secs()
            ),
            format!("node_cert_ttl = \"{}s\"", opts.node_cert_ttl.as_secs()),
            // Every test meshd reaches the registry from 127.0.0.1 (their own addresses are
            // for listening): one source address for a whole fleet, unlike production.
            "max_connections_per_ip = 4096".to_owned(),
        ];
        lines.extend(opts.extra.iter().cloned());
        let key_of = |l: &str| l.split('=').next().unwrap_or_default().trim().to_owned();
        let replaced: Vec<String> = lines.iter().map(|l| key_of(l)).collect();
        // Top-level keys go before the first table.
        let (top, tables) = match text.find("\n[") {
            Some(i) => (text[..i].to_owned(), text[i..].to_owned()),
            None => (text.clone(), String::new()),
        };
        let mut out: Vec<String> = top
            .lines()
            .filter(|l| !replaced.contains(&key_of(l)))
            .map(str::to_owned)
            .collect();
        out.extend(lines);
        text = format!("{}\n{tables}\n", out.join("\n"));
        std::fs::write(&cfg, text)?;
        let mut r = Self {
            creds: data_dir.join("admin"),
            bins,
            dir,
            data_dir,
            addr,
            admin,
            opts,
            proc: None,
            scratch,
        };
        r.run().await?;
        Ok(r)
    }

    /// Starts (or restarts) the registry process and waits for its admin endpoint.
    pub async fn run(&mut self) -> anyhow::Result<()> {
        let mut cmd = wrap(&self.opts.netns, &self.bins.registry);
        cmd.arg("run")
            .arg("--config")
            .arg(self.data_dir.join("registry.toml"));
        self.proc = Some(Proc::spawn(cmd, &self.dir.join("registry.log"))?);
        let admin = self.admin.to_string();
        let proc = self.proc.as_ref();
        let gone = || exited("the registry", proc);
        eventually_while(WAIT, "the registry to answer", gone, || {
            let admin = admin.clone();
            async move {
                http_get(&admin, "/ready")
                    .await
                    .ok()
                    .filter(|(c, _)| *c == 200)
            }
        })
        .await
        .with_context(|| format!("registry log:\n{}", self.log()))?;
        Ok(())
    }

    /// SIGKILL the registry.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// The registry's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// Runs meshctl with the operator credentials.
    pub fn meshctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut cmd = wrap(&self.opts.netns, &self.bins.meshctl);
        cmd.arg("--credentials")
            .arg(&self.creds)
            .arg("--registry")
            .arg(self.addr.to_string());
        output_within(cmd.args(args), CLI_TIMEOUT)
    }

    /// Runs meshctl and returns its stdout, failing (with stderr) on a non-zero exit.
    pub fn meshctl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.meshctl(args)?;
        if !out.status.success() {
            bail!(
                "meshctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Writes `text` to `policies/<name>` and `meshctl apply`s it; returns the revision the
    /// registry acknowledged.
    pub fn apply(&self, name: &str, text: &str) -> anyhow::Result<u64> {
        let dir = self.dir.join("policies");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        let out = self.meshctl_ok(&["apply", "-f", &path.to_string_lossy()])?;
        let at = out
            .rfind("(revision ")
            .with_context(|| format!("no revision in {out:?}"))?;
        let rev = out[at + "(revision ".len()..]
            .split(')')
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bad revision in {out:?}"))?;
        Ok(rev)
    }

    /// Node names listed by `meshctl nodes`.
    pub fn node_names(&self) -> anyhow::Result<Vec<String>> {
        let out = self.meshctl_ok(&["nodes"])?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// Every certificate record listed by `meshctl certs --limit 0`, as (serial, node, identity).
    pub fn cert_records(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let out = self.meshctl_ok(&["certs", "--limit", "0"])?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                // SERIAL NODE <expires: several words> IDENTITY
                Some((
                    cols.first()?.to_string(),
                    cols.get(1)?.to_string(),
                    cols.last()?.to_string(),
                ))
            })
            .collect())
    }

    /// Sum of the registry's samples of `name` whose labels include all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (code, body) = http_get(&self.admin.to_string(), "/metrics").await?;
        if code != 200 {
            bail!("registry /metrics answered {code}");
        }
        metric_sum(&body, name, labels)
    }

    /// Like [`Registry::metric`], but 0 for a declared family without such a series yet.
    pub async fn metric_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (code, body) = http_get(&self.admin.to_string(), "/metrics").await?;
        if code != 200 {
            bail!("registry /metrics answered {code}");
        }
        metric_sum_or_zero(&body, name, labels)
    }

    /// Creates a join token with `meshctl token create`.
    pub fn token(&self, services: &[&str], uses: u32) -> anyhow::Result<String> {
        let out = self.meshctl(&[
            "token",
            "create",
            "--services",
            &services.join(","),
            "--uses",
            &uses.to_string(),
        ])?;
        if !out.status.success() {
            bail!(
                "meshctl token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// The mesh CA, loaded from the registry's files (for crafting foreign/expired certs).
    pub fn authority(&self) -> anyhow::Result<mesh_ca::Authority> {
        let ca = self.data_dir.join("ca");
        let files = mesh_ca::CaFiles {
            root_cert_pem: std::fs::read_to_string(ca.join("root.pem"))?,
            root_key_pem: std::fs::read_to_string(ca.join("root-key.pem")).ok(),
            intermediate_cert_pem: std::fs::read_to_string(ca.join("intermediate.pem"))?,
            intermediate_key_pem: std::fs::read_to_string(ca.join("intermediate-key.pem"))?,
        };
        Ok(mesh_ca::Authority::load(
            &mesh_api::TrustDomain::new("mesh.test")?,
            &files,
            std::time::SystemTime::now(),
        )?)
    }

    /// Keeps the scratch dir after the test (for debugging a failure).
    pub fn keep(&mut self) -> PathBuf {
        self.scratch.keep()
    }
}

/// A local service of a node.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Name (namespace default).
    pub name: String,
    /// Where the app listens.
    pub address: SocketAddr,
    /// meshd's direct listener for the service (`listen`), if any.
    pub listen: Option<SocketAddr>,
    /// `protocol` (meshd's default, tcp, when `None`).
    pub protocol: Option<String>,
    /// `http_proxy` listener, if any.
    pub http_proxy: Option<SocketAddr>,
    /// Upstreams: (service, local bind).
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Health checks: the body of each `[[checks]]` table, as TOML lines.
    pub checks: Vec<String>,
}

impl ServiceSpec {
    /// A service with no upstreams.
    pub fn new(name: &str, address: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            address,
            listen: None,
            protocol: None,
            http_proxy: None,
            upstreams: Vec::new(),
            labels: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Adds a health check (the body of its `[[checks]]` table).
    pub fn check(mut self, body: &str) -> Self {
        self.checks.push(body.to_owned());
        self
    }

    /// Sets the protocol.
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = Some(protocol.to_owned());
        self
    }

    /// Adds an upstream.
    pub fn upstream(mut self, service: &str, bind: SocketAddr) -> Self {
        self.upstreams.push((service.to_owned(), bind));
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The service file.
    pub fn to_toml(&self) -> String {
        let mut text = format!("name = \"{}\"\naddress = \"{}\"\n", self.name, self.address);
        if let Some(listen) = self.listen {
            text.push_str(&format!("listen = \"{listen}\"\n"));
        }
        if let Some(p) = &self.protocol {
            text.push_str(&format!("protocol = \"{p}\"\n"));
        }
        if let Some(p) = self.http_proxy {
            text.push_str(&format!("http_proxy = \"{p}\"\n"));
        }
        if !self.labels.is_empty() {
            text.push_str("[labels]\n");
            for (k, v) in &self.labels {
                text.push_str(&format!("{k} = \"{v}\"\n"));
            }
        }
        for (svc, bind) in &self.upstreams {
            text.push_str(&format!(
                "[[upstreams]]\nservice = \"{svc}\"\nbind = \"{bind}\"\n"
            ));
        }
        for body in &self.checks {
            text.push_str(&format!("[[checks]]\n{body}\n"));
        }
        text
    }
}

/// How to start one meshd host.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// Its directory under the cluster's (default: the node name), for a second host claiming
    /// a name already in use.
    pub dir_name: Option<String>,
    /// Its address (loopback or netns).
    pub ip: IpAddr,
    /// Local services.
    pub services: Vec<ServiceSpec>,
    /// Gossip seeds.
    pub seeds: Vec<SocketAddr>,
    /// Join token.
    pub token: String,
    /// Advertised inbound address override (to route through a relay).
    pub inbound_advertise: Option<SocketAddr>,
    /// Run inside this network namespace.
    pub netns: Option<String>,
    /// Extra lines appended to meshd.toml.
    pub extra: String,
    /// Zone (meshd's default when `None`).
    pub zone: Option<String>,
    /// Datacenter (meshd's default when `None`).
    pub datacenter: Option<String>,
    /// Site (meshd's default when `None`).
    pub site: Option<String>,
    /// Extra environment of the meshd process (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// Run meshd as under systemd's journal: in a private mount namespace whose
    /// `/run/systemd/journal` is this directory (where the test binds its own journal socket),
    /// with `JOURNAL_STREAM` set.
    pub journal: Option<PathBuf>,
}

/// Gossip port every node uses on its own address.
pub const GOSSIP_PORT: u16 = 7946;
/// Inbound port every node uses on its own address.
pub const INBOUND_PORT: u16 = 15008;
/// Admin port every node uses on its own address.
pub const ADMIN_PORT: u16 = 15000;

impl NodeSpec {
    /// A node on a fresh loopback address.
    pub fn new(name: &str, token: String) -> Self {
        Self {
            name: name.to_owned(),
            dir_name: None,
            ip: IpAddr::V4(next_ip()),
            services: Vec::new(),
            seeds: Vec::new(),
            token,
            inbound_advertise: None,
            netns: None,
            extra: String::new(),
            zone: None,
            datacenter: None,
            site: None,
            env: Vec::new(),
            journal: None,
        }
    }

    /// The gossip address of this node.
    pub fn gossip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, GOSSIP_PORT)
    }
}

/// A running (or stopped) meshd host.
pub struct Node {
    /// How it was started.
    pub spec: NodeSpec,
    /// Its directory (config, data, services.d, log).
    pub dir: PathBuf,
    /// Inbound address.
    pub inbound: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// The process (None while stopped).
    pub proc: Option<Proc>,
    bins: Bins,
}

impl Node {
    /// Writes the config and starts meshd; does not wait for readiness.
    pub fn start(registry: &Registry, spec: NodeSpec) -> anyhow::Result<Self> {
        let dir = registry
            .dir
            .join(spec.dir_name.as_deref().unwrap_or(&spec.name));
        std::fs::create_dir_all(dir.join("services.d"))?;
        std::fs::write(dir.join("token"), &spec.token)?;
        let seeds: Vec<String> = spec.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let inbound = SocketAddr::new(spec.ip, INBOUND_PORT);
        let admin = SocketAddr::new(spec.ip, ADMIN_PORT);
        let advertise = spec
            .inbound_advertise
            .map(|a| format!("advertise = \"{a}\"\n"))
            .unwrap_or_default();
        let zone = (spec.zone.as_ref())
            .map(|z| format!("zone = \"{z}\"\n"))
            .unwrap_or_default()
            + &(spec.datacenter.as_ref())
                .map(|dc| format!("datacenter = \"{dc}\"\n"))
                .unwrap_or_default()
            + &(spec.site.as_ref())
                .map(|s| format!("site = \"{s}\"\n"))
                .unwrap_or_default();
        // Nodes in network namespaces serve admin on their own address, for the test process.
        let allow_remote = if spec.ip.is_loopback() {
            ""
        } else {
            "allow_remote = true\n"
        };
        let cfg = format!(
            "node_name = \"{name}\"\n{zone}data_dir = \"data\"\nservices_dir = \"services.d\"\n\
             [registry]\naddress = \"{reg}\"\njoin_token_file = \"token\"\n\
             [gossip]\nbind = \"{ip}:{gp}\"\nseeds = [{seeds}]\ninterval = \"100ms\"\n\
             [inbound]\nbind = \"{inbound}\"\n{advertise}\
             [admin]\nbind = \"{admin}\"\n{allow_remote}\
             [drain]\ngrace_period = \"5s\"\n{extra}",
            name = spec.name,
            reg = registry.addr,
            ip = spec.ip,
            gp = GOSSIP_PORT,
            seeds = seeds.join(", "),
            extra = spec.extra,
        );
        std::fs::write(dir.join("meshd.toml"), cfg)?;
        for s in &spec.services {
            std::fs::write(
                dir.join("services.d").join(format!("{}.toml", s.name)),
                s.to_toml(),
            )?;
        }
        let mut node = Self {
            spec,
            dir,
            inbound,
            admin,
            proc: None,
            bins: registry.bins.clone(),
        };
        node.run()?;
        Ok(node)
    }

    /// Starts (or restarts) the meshd process with the existing config and data.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut cmd = match &self.spec.journal {
            // unshare and sh exec in place: the pid is meshd's, signals reach it.
            Some(dir) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(
                        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
                         && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
                    )
                    .arg(dir)
                    .arg(&self.bins.meshd);
                c.env("JOURNAL_STREAM", "0:0");
                c
            }
            None => wrap(&self.spec.netns, &self.bins.meshd),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(self.dir.join("meshd.toml"));
        cmd.env("MESHD_LOG", "info,chitchat=warn");
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        self.proc = Some(Proc::spawn(cmd, &self.dir.join("meshd.log"))?);
        Ok(())
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let admin = self.admin.to_string();
        let what = format!("{} to be ready", self.spec.name);
        eventually_while(WAIT, &what, self.gone(), || {
            let admin = admin.clone();
            async move {
                http_get(&admin, "/ready")
                    .await
                    .ok()
                    .filter(|(c, _)| *c == 200)
            }
        })
        .await
        .with_context(|| format!("{} log:\n{}", self.spec.name, self.log()))?;
        Ok(())
    }

    /// Waits until this node sees `n` live members with endpoints for every service in `services`.
    pub async fn wait_members(&self, n: usize) -> anyhow::Result<()> {
        self.wait_members_where(n, false).await
    }

    /// Waits until this node sees `n` members, all serving.
    pub async fn wait_all_serving(&self, n: usize) -> anyhow::Result<()> {
        self.wait_members_where(n, true).await
    }

    /// Waits until this node sees `n` members (all serving, if `serving`).
    async fn wait_members_where(&self, n: usize, serving: bool) -> anyhow::Result<()> {
        let admin = self.admin.to_string();
        let what = if serving { " serving" } else { "" };
        eventually_while(
            WAIT,
            &format!("{} to see {n} members{what}", self.spec.name),
            self.gone(),
            || {
                let admin = admin.clone();
                async move {
                    let (_, body) = http_get(&admin, "/members").await.ok()?;
                    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                    let members = v["members"].as_array()?;
                    let ok = !serving
                        || members
                            .iter()
                            .all(|m| m["info"]["state"].as_str() == Some("serving"));
                    (members.len() == n && ok).then_some(())
                }
            },
        )
        .await
        .with_context(|| format!("{} log:\n{}", self.spec.name, self.log()))
    }

    /// The node's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("meshd.log")).unwrap_or_default()
    }

    /// `/config_dump` as JSON.
    pub async fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        let (code, body) = http_get(&self.admin.to_string(), "/config_dump").await?;
        if code != 200 {
            bail!("/config_dump answered {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `not_after` (Unix seconds) of each workload certificate, by service, from `/config_dump`.
    pub async fn workload_not_after(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let dump = self.config_dump().await?;
        let list = dump["identity"]["workloads"]
            .as_array()
            .context("identity.workloads missing")?;
        list.iter()
            .map(|w| {
                let svc = w["service"].as_str().context("workload without service")?;
                let na = w["not_after"]
                    .as_u64()
                    .context("workload without not_after")?;
                Ok((svc.to_owned(), na))
            })
            .collect()
    }

    /// `/members` as (member names, number of usable endpoints of each service).
    pub async fn view(&self) -> anyhow::Result<(Vec<String>, Vec<(String, usize)>)> {
        let (code, body) = http_get(&self.admin.to_string(), "/members").await?;
        if code != 200 {
            bail!("/members answered {code}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let members = v["members"]
            .as_array()
            .context("members missing")?
            .iter()
            .filter_map(|m| m["node"].as_str().map(str::to_owned))
            .collect();
        let endpoints = v["endpoints"]
            .as_object()
            .context("endpoints missing")?
            .iter()
            .map(|(svc, eps)| {
                let usable = eps
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|e| {
                                e["healthy"].as_bool() == Some(true)
                                    && e["draining"].as_bool() != Some(true)
                            })
                            .count()
                    })
                    .unwrap_or(0);
                (svc.clone(), usable)
            })
            .collect();
        Ok((members, endpoints))
    }

    /// `/members`' other sites, nearest first, with the round trip measured (µs) if any.
    pub async fn sites(&self) -> anyhow::Result<Vec<(String, Option<u64>)>> {
        let (code, body) = http_get(&self.admin.to_string(), "/members").await?;
        if code != 200 {
            bail!("/members answered {code}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let sites = v["sites"].as_array().context("sites missing")?;
        Ok((sites.iter())
            .map(|s| {
                let name = s["site"].as_str().unwrap_or_default().to_owned();
                (name, s["rtt_us"].as_u64())
            })
            .collect())
    }

    /// Waits until this node enforces policy revision `rev` or a later one.
    pub async fn wait_policy_revision(&self, rev: u64) -> anyhow::Result<()> {
        let what = format!("{} to enforce policy revision {rev}", self.spec.name);
        eventually_while(WAIT, &what, self.gone(), || async {
            let r = self.metric("meshd_policy_revision", &[]).await.ok()?;
            (r as u64 >= rev).then_some(())
        })
        .await
    }

    /// Waits until this node sees `n` usable endpoints of `service` (e.g. `default/api`).
    pub async fn wait_endpoints(&self, service: &str, n: usize) -> anyhow::Result<()> {
        let what = format!("{} to see {n} endpoint(s) of {service}", self.spec.name);
        eventually_while(WAIT, &what, self.gone(), || async {
            let (_, eps) = self.view().await.ok()?;
            let got = eps
                .iter()
                .find(|(s, _)| s == service)
                .map_or(0, |(_, c)| *c);
            (got == n).then_some(())
        })
        .await
        .with_context(|| format!("{} log:\n{}", self.spec.name, self.log()))
    }

    /// For [`eventually_while`]: what this node's process did, once it has exited.
    pub fn gone(&self) -> impl FnMut() -> Option<String> + '_ {
        || exited(&self.spec.name, self.proc.as_ref())
    }

    /// Whether the process is still running (false once it exited or was stopped).
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (code, body) = http_get(&self.admin.to_string(), "/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// Sum of the samples of `name` whose label set contains every `labels` pair; an error
    /// when there is none (see [`metric_sum`]).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        metric_sum(&self.metrics().await?, name, labels)
    }

    /// Like [`Node::metric`], but 0 for a declared family without such a series yet (see
    /// [`metric_sum_or_zero`]).
    pub async fn metric_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        metric_sum_or_zero(&self.metrics().await?, name, labels)
    }

    /// Writes (or replaces) `services.d/<file>` with `text`.
    pub fn write_service_file(&self, file: &str, text: &str) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("services.d").join(file), text)?;
        Ok(())
    }

    /// Removes `services.d/<file>`.
    pub fn remove_service_file(&self, file: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.dir.join("services.d").join(file))?;
        Ok(())
    }

    /// Sends SIGHUP (what `systemctl reload meshd` does).
    pub fn sighup(&self) -> anyhow::Result<()> {
        let pid = (self.proc.as_ref())
            .and_then(Proc::pid)
            .context("meshd is not running")?;
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), "kill -HUP {pid} failed");
        Ok(())
    }

    /// The `reload` section of `/config_dump`.
    pub async fn reload_status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.config_dump().await?["reload"].clone())
    }

    /// Sends SIGHUP and waits until the reload is decided; `Ok(summary)` if it was applied,
    /// `Err(error text)` if it was refused (the outer error is the harness's own).
    pub async fn reload(&self) -> anyhow::Result<Result<serde_json::Value, String>> {
        let before = self.reload_status().await?;
        let attempts = |v: &serde_json::Value| {
            v["generation"].as_u64().unwrap_or(0) + v["refused"].as_u64().unwrap_or(0)
        };
        let n = attempts(&before);
        self.sighup()?;
        let after = eventually_while(WAIT, "the reload to be decided", self.gone(), || async {
            let v = self.reload_status().await.ok()?;
            (attempts(&v) > n).then_some(v)
        })
        .await
        .with_context(|| format!("{} log:\n{}", self.spec.name, self.log()))?;
        Ok(if after["last_ok"].as_bool() == Some(true) {
            Ok(after["last_applied"].clone())
        } else {
            Err(after["last_error"].as_str().unwrap_or_default().to_owned())
        })
    }

    /// Waits for meshd to exit on its own (a start-up failure) and returns its exit code.
    pub async fn exit_code(&mut self) -> anyhow::Result<Option<i32>> {
        let what = format!("{} to exit", self.spec.name);
        let proc = self.proc.as_ref().context("meshd was not started")?;
        eventually(WAIT, &what, || {
            std::future::ready(proc.exited().map(|_| ()))
        })
        .await
        .with_context(|| format!("{} log:\n{}", self.spec.name, self.log()))?;
        // Reaps it (the SIGTERM goes nowhere) and reads the status.
        self.stop(Duration::from_secs(5))
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        match self.proc.take() {
            Some(mut p) => p.terminate(timeout),
            None => Ok(None),
        }
    }
}

/// One sample line: (metric name, raw label text, value).
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some(match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}'), value),
                None => (series, "", value),
            })
        })
}

fn has_labels(lbls: &str, labels: &[(&str, &str)]) -> bool {
    labels
        .iter()
        .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")))
}

/// Sums the samples of metric `name` (exact name, e.g. `meshd_bytes_total`) whose labels
/// include all of `labels`. An error when no sample matches: a renamed metric or label must
/// not read as zero (use [`metric_sum_or_zero`] for a series that may not exist yet).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for (metric, lbls, value) in samples(text) {
        if metric == name && has_labels(lbls, labels) {
            found = true;
            sum += value
                .parse::<f64>()
                .with_context(|| format!("{name}{{{lbls}}}: value {value:?}"))?;
        }
    }
    anyhow::ensure!(
        found,
        "no series {name} with labels {labels:?} in the metrics"
    );
    Ok(sum)
}

/// Like [`metric_sum`], but 0 when no sample has these label values yet: for a reading taken
/// *before* the events a test then waits for with the strict [`metric_sum`]. Still an error
/// when the family has samples and none carries a label key asked for (a renamed label). A
/// test asserting "still zero" must use [`metric_sum`] on a series that exists at zero.
pub fn metric_sum_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    if let Ok(v) = metric_sum(text, name, labels) {
        return Ok(v);
    }
    for (k, _) in labels {
        let key = format!("{k}=\"");
        let seen_any = samples(text).any(|(m, _, _)| m == name);
        let key_known = samples(text).any(|(m, l, _)| m == name && l.contains(&key));
        anyhow::ensure!(
            !seen_any || key_known,
            "{name} has samples, none with a label {k:?}"
        );
    }
    Ok(0.0)
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").context("malformed response")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status code")?;
        Ok::<_, anyhow::Error>((code, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("http get timed out")?
}

/// A registry plus nodes, killed on drop.
pub struct Cluster {
    /// The registry.
    pub registry: Registry,
    /// Nodes in start order.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts a registry with `opts`.
    pub async fn new(opts: RegistryOpts) -> anyhow::Result<Self> {
        Ok(Self {
            registry: Registry::start(opts).await?,
            nodes: Vec::new(),
        })
    }

    /// Creates a single-use token for `services`, starts the node seeded with every node
    /// started before, and waits for it to be ready.
    pub async fn add(
        &mut self,
        name: &str,
        services: Vec<ServiceSpec>,
    ) -> anyhow::Result<&mut Node> {
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let token = self.registry.token(
            if names.is_empty() {
                &["unused"]
            } else {
                &names
            },
            1,
        )?;
        let mut spec = NodeSpec::new(name, token);
        spec.services = services;
        spec.seeds = self.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        self.add_spec(spec).await
    }

    /// Starts a node from a full spec and waits for it to be ready.
    pub async fn add_spec(&mut self, spec: NodeSpec) -> anyhow::Result<&mut Node> {
        let node = Node::start(&self.registry, spec)?;
        node.wait_ready().await?;
        self.nodes.push(node);
        Ok(self.nodes.last_mut().expect("just pushed"))
    }

    /// Starts the [`PairSpec`] (b, then a seeded with b), waits until both see each other and
    /// a sees api's endpoint; returns a's upstream address for api.
    pub async fn pair(&mut self, p: PairSpec) -> anyhow::Result<SocketAddr> {
        let upstream = p.upstream();
        let api_name = p.api.name.clone();
        let mut b = NodeSpec::new("b", self.registry.token(&[&api_name], 1)?);
        b.ip = p.b_ip.into();
        b.services = vec![p.api];
        b.extra = p.b_extra;
        b.inbound_advertise = p.b_advertise;
        b.seeds = self.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        self.add_spec(b).await?;
        let mut a = NodeSpec::new("a", self.registry.token(&[&p.web.name], 1)?);
        a.ip = p.a_ip.into();
        a.services = vec![p.web];
        a.extra = p.a_extra;
        a.seeds = self.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        self.add_spec(a).await?;
        self.converge().await?;
        self.node("a")
            .wait_endpoints(&format!("default/{api_name}"), 1)
            .await?;
        Ok(upstream)
    }

    /// Waits until every running node sees all running nodes.
    pub async fn converge(&self) -> anyhow::Result<()> {
        let n = self.nodes.iter().filter(|n| n.proc.is_some()).count();
        for node in self.nodes.iter().filter(|n| n.proc.is_some()) {
            node.wait_members(n).await?;
        }
        // Settled: every node has left `starting` in every view (a node serves once its view
        // stood still for two rounds; an event right after a bare member count, such as a
        // kill detected in a few hundred ms, would otherwise catch a node still starting).
        for node in self.nodes.iter().filter(|n| n.proc.is_some()) {
            node.wait_all_serving(n).await?;
        }
        Ok(())
    }

    /// The node named `name`.
    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.spec.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Keeps the scratch dir (call from a failing test to debug).
    pub fn keep(&mut self) -> PathBuf {
        self.registry.keep()
    }
}

/// The setup most tests start from: `web` on node `a` calls `api` on node `b` through a's
/// upstream port. Fields are public for the tests that need to change one thing.
pub struct PairSpec {
    /// b's address (start the api app on it first).
    pub b_ip: Ipv4Addr,
    /// a's address.
    pub a_ip: Ipv4Addr,
    /// api as b serves it.
    pub api: ServiceSpec,
    /// web as a runs it: by default at a:18080 with an upstream to api bound at a:19001.
    pub web: ServiceSpec,
    /// Lines appended to b's meshd.toml.
    pub b_extra: String,
    /// Lines appended to a's meshd.toml.
    pub a_extra: String,
    /// b's advertised inbound address (a relay in front of the real port).
    pub b_advertise: Option<SocketAddr>,
}

/// a's upstream port for api in the default [`PairSpec`].
pub const PAIR_UPSTREAM_PORT: u16 = 19001;

impl PairSpec {
    /// b at `b_ip` serving `api`; a on a fresh address with the default web.
    pub fn new(b_ip: Ipv4Addr, api: ServiceSpec) -> Self {
        let a_ip = next_ip();
        let web = ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080))
            .upstream(&api.name, SocketAddr::new(a_ip.into(), PAIR_UPSTREAM_PORT));
        Self {
            b_ip,
            a_ip,
            api,
            web,
            b_extra: String::new(),
            a_extra: String::new(),
            b_advertise: None,
        }
    }

    /// Changes web (its protocol, labels, upstreams).
    pub fn web(mut self, f: impl FnOnce(ServiceSpec) -> ServiceSpec) -> Self {
        self.web = f(self.web);
        self
    }

    /// a's upstream bind for api.
    pub fn upstream(&self) -> SocketAddr {
        self.web
            .upstreams
            .iter()
            .find(|(svc, _)| *svc == self.api.name)
            .map_or(
                SocketAddr::new(self.a_ip.into(), PAIR_UPSTREAM_PORT),
                |(_, b)| *b,
            )
    }
}

/// The IP of a node as a plain Ipv4 (helper for building app addresses).
pub fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("tests use IPv4"),
    }
}

/// Starts an echo app (echoes bytes until the client half-closes) on `listen`, inside `netns`
/// when given: `meshd demo-app` if this build has it, otherwise a small python3 echo server.
/// Waits until the port accepts connections (from the test's namespace).
pub async fn echo_app(
    bins: &Bins,
    netns: Option<&str>,
    listen: SocketAddr,
    name: &str,
    log: &Path,
) -> anyhow::Result<Proc> {
    let has_demo = Command::new(&bins.meshd)
        .args(["demo-app", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let addr = listen.to_string();
    let mut proc = if has_demo {
        Proc::start(
            netns,
            &bins.meshd,
            &["demo-app", "--listen", &addr, "--name", name],
            log,
        )?
    } else {
        let script = format!(
            "import socket, threading\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{ip}', {port}))\n\
             s.listen(512)\n\
             def serve(c):\n\
             \x20   try:\n\
             \x20       while True:\n\
             \x20           d = c.recv(65536)\n\
             \x20           if not d:\n\
             \x20               break\n\
             \x20           c.sendall(d)\n\
             \x20       c.shutdown(socket.SHUT_WR)\n\
             \x20   finally:\n\
             \x20       c.close()\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   threading.Thread(target=serve, args=(c,), daemon=True).start()\n",
            ip = listen.ip(),
            port = listen.port(),
        );
        Proc::start(netns, Path::new("python3"), &["-c", &script], log)?
    };
    let what = format!("echo app {name} on {addr}");
    let res = eventually(WAIT, &what, || async {
        tokio::net::TcpStream::connect(listen)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    if let Err(e) = res {
        let running = proc.is_running();
        bail!("{e} (running: {running}); log:\n{}", proc.log_text());
    }
    Ok(proc)
}

/// What a [`Load`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Round trips that returned exactly what was sent.
    pub ok: u64,
    /// Round trips that failed, timed out or returned other bytes.
    pub failed: u64,
    /// The first failures: (seconds since the load started, what happened).
    pub errors: Vec<(f64, String)>,
}

/// Continuous traffic: `workers` loops, each opening a new connection per round trip of a
/// checksummed payload, until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    errors: std::sync::Arc<std::sync::Mutex<Vec<(f64, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts the loops against `addr`; each round trip carries `size` bytes and must finish
    /// within `timeout`.
    pub fn start(addr: SocketAddr, workers: usize, size: usize, timeout: Duration) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let started = std::time::Instant::now();
        let tasks = (0..workers)
            .map(|w| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let data = apps::payload(size, (w as u64) << 32 | i);
                        let res =
                            tokio::time::timeout(timeout, apps::round_trip(addr, &data)).await;
                        let problem = match res {
                            Ok(Ok(got)) if got == data => None,
                            Ok(Ok(got)) => Some(format!(
                                "worker {w} #{i}: got {} bytes (sha {}) for {} sent",
                                got.len(),
                                &apps::sha256(&got)[..12],
                                data.len()
                            )),
                            Ok(Err(e)) => Some(format!("worker {w} #{i}: {e}")),
                            Err(_) => {
                                Some(format!("worker {w} #{i}: no answer within {timeout:?}"))
                            }
                        };
                        match problem {
                            None => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(p) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut errs = errors.lock().expect("load errors lock");
                                if errs.len() < 20 {
                                    errs.push((started.elapsed().as_secs_f64(), p));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            errors,
            tasks,
        }
    }

    /// Successful round trips so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failed round trips so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `more` further round trips have succeeded (the load is making progress).
    pub async fn progress(&self, more: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.ok() + more;
        eventually(
            timeout,
            &format!("{more} more successful round trips"),
            || async { (self.ok() >= target).then_some(()) },
        )
        .await
        .with_context(|| {
            format!(
                "failed so far: {} {:?}",
                self.failed(),
                self.errors.lock().map(|e| e.clone()).unwrap_or_default()
            )
        })
    }

    /// Stops the loops (each finishes its round trip in flight) and reports.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        LoadReport {
            ok: self.ok(),
            failed: self.failed(),
            errors: self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One long-lived connection that streams a checksummed payload in paced chunks while the
/// echo comes back on the same connection.
pub struct Stream {
    task: tokio::task::JoinHandle<anyhow::Result<(usize, String, String)>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stream {
    /// Connects to `addr` and sends a `chunk`-byte piece every `every` until stopped.
    pub async fn start(addr: SocketAddr, chunk: usize, every: Duration) -> anyhow::Result<Self> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = tokio::net::TcpStream::connect(addr).await?;
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let write = async move {
                let mut sent = ring::digest::Context::new(&ring::digest::SHA256);
                let mut total = 0usize;
                let mut tick = tokio::time::interval(every);
                let mut i = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    tick.tick().await;
                    i += 1;
                    let data = apps::payload(chunk, 0x5eed_0000 + i);
                    w.write_all(&data)
                        .await
                        .with_context(|| format!("writing chunk {i}"))?;
                    sent.update(&data);
                    total += data.len();
                }
                w.shutdown().await?;
                Ok::<_, anyhow::Error>((total, hex(sent.finish().as_ref())))
            };
            let read = async move {
                let mut got = ring::digest::Context::new(&ring::digest::SHA256);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = r.read(&mut buf).await.context("reading the echo")?;
                    if n == 0 {
                        break;
                    }
                    got.update(&buf[..n]);
                }
                Ok::<_, anyhow::Error>(hex(got.finish().as_ref()))
            };
            let (w, r) = tokio::join!(write, read);
            let (total, sent) = w?;
            Ok((total, sent, r?))
        });
        Ok(Self { task, stop })
    }

    /// Stops sending, half-closes, and returns (bytes sent, sha256 sent, sha256 echoed).
    pub async fn finish(self, timeout: Duration) -> anyhow::Result<(usize, String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(timeout, self.task)
            .await
            .context("the long-lived stream did not finish")??
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP meshd_requests Requests.\n# TYPE meshd_requests counter\n\
        meshd_requests_total{direction=\"inbound\",code=\"200\"} 3\n\
        meshd_requests_total{direction=\"outbound\",code=\"200\"} 4\n\
        # TYPE meshd_rejected counter\n\
        # TYPE meshd_policy_revision gauge\nmeshd_policy_revision 7\n";

    #[test]
    fn a_missing_series_is_an_error_not_a_zero() {
        assert_eq!(metric_sum(TEXT, "meshd_requests_total", &[]).unwrap(), 7.0);
        let inbound = [("direction", "inbound")];
        assert_eq!(
            metric_sum(TEXT, "meshd_requests_total", &inbound).unwrap(),
            3.0
        );
        assert_eq!(metric_sum(TEXT, "meshd_policy_revision", &[]).unwrap(), 7.0);
        // Renamed metric, renamed label key, label value never seen: all errors.
        assert!(metric_sum(TEXT, "meshd_request_total", &[]).is_err());
        assert!(metric_sum(TEXT, "meshd_requests_total", &[("dir", "inbound")]).is_err());
        assert!(metric_sum(TEXT, "meshd_requests_total", &[("code", "503")]).is_err());
    }

    #[test]
    fn or_zero_allows_an_unseen_series_but_not_an_unknown_label_key() {
        let f = |name, labels: &[(&str, &str)]| metric_sum_or_zero(TEXT, name, labels);
        assert_eq!(f("meshd_requests_total", &[("code", "503")]).unwrap(), 0.0);
        assert_eq!(f("meshd_rejected_total", &[("reason", "x")]).unwrap(), 0.0);
        assert_eq!(f("meshd_requests_total", &[("code", "200")]).unwrap(), 7.0);
        assert!(f("meshd_requests_total", &[("status", "503")]).is_err());
    }
}
