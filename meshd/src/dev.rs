//! `meshd dev`: one command that starts a complete local mesh for trying meshd out — a
//! registry, N meshd nodes on 127.0.0.x and demo apps — checks that it works, prints a
//! walk-through, and stops everything on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};

use mesh_api::proto::v1 as pb;
use mesh_client::admin;
use mesh_client::credentials::Credentials;

mod check;
mod layout;
mod procs;
mod walkthrough;

pub use layout::{Layout, Node};

use check::{self_check, wait_converged, wait_until};
use procs::Procs;

/// Default number of nodes.
pub const DEFAULT_NODES: usize = 3;
/// Default first port.
pub const DEFAULT_BASE_PORT: u16 = 17700;
/// Line printed once the mesh works (tests wait for it).
pub const READY_LINE: &str = "meshd dev: ready";

/// Exit code for a bad command line (EX_USAGE).
const EX_USAGE: u8 = 64;
/// Time `mesh-registry init` may take.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for each startup phase (registry ready, nodes ready, membership converged).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Time children get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `meshd dev` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Number of nodes: n1 runs `web`, the others run `api` (version v1, v2, v1, ...).
    #[arg(long, default_value_t = DEFAULT_NODES)]
    pub nodes: usize,
    /// Directory for the mesh's files, created if missing, must be empty, kept on exit
    /// (default: a new temporary directory, removed on exit).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// First port: the registry uses it and the next one, node i uses base+10i to base+10i+4.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
    /// Keep the temporary directory on exit.
    #[arg(long)]
    pub keep: bool,
}

/// The programs `meshd dev` runs.
#[derive(Debug, Clone)]
struct Bins {
    /// This executable: `meshd run` and `meshd demo-app`.
    meshd: PathBuf,
    /// `mesh-registry`, next to it.
    registry: PathBuf,
    /// `meshctl`, next to it (only shown in the walk-through).
    meshctl: PathBuf,
}

/// SIGINT and SIGTERM, listened to from the start so that no signal orphans the children.
struct Signals {
    term: Signal,
    int: Signal,
}

/// Runs the dev mesh until SIGINT or SIGTERM. Exit codes: 0 after a clean stop, 1 if the mesh
/// did not come up, 64 for a bad command line.
pub fn main(args: Args) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: meshd dev: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: meshd dev: listening for signals: {e}");
            return ExitCode::from(1);
        }
    };
    let bins = match find_bins() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: meshd dev: {e:#}");
            return ExitCode::from(1);
        }
    };
    let (layout, temporary) = match plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: meshd dev: {e:#}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let created = check_ports(&layout).and_then(|()| create_dir(&layout.dir, temporary));
    if let Err(e) = created {
        eprintln!("error: meshd dev: {e:#}");
        return ExitCode::from(1);
    }
    let mut procs = Procs::default();
    let started = tokio::select! {
        r = start(&bins, &layout, &mut procs) => Some(r),
        s = signals.recv() => {
            println!("meshd dev: {s} during startup");
            None
        }
    };
    let ok = match started {
        Some(Ok(())) => {
            walkthrough::print(&layout, &bins, &procs, temporary && !args.keep);
            println!("{READY_LINE}");
            println!("Press Ctrl-C to stop.");
            watch(&mut procs, &mut signals).await;
            true
        }
        Some(Err(e)) => {
            eprintln!("error: meshd dev: {e:#}");
            false
        }
        None => true,
    };
    println!("meshd dev: stopping");
    let killed = tokio::select! {
        k = procs.stop(STOP_GRACE) => k,
        s = signals.recv() => {
            println!("meshd dev: second {s}: killing everything");
            procs.kill_all().await;
            Vec::new()
        }
    };
    if !killed.is_empty() {
        println!(
            "meshd dev: killed {} after {STOP_GRACE:?} without exiting",
            killed.join(", ")
        );
    }
    if ok && temporary && !args.keep {
        remove_dir(&layout.dir);
    } else {
        println!("meshd dev: files kept in {}", layout.dir.display());
    }
    println!("meshd dev: stopped");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Chooses the directory (an existing one must be empty) and plans the layout; creates
/// nothing. Returns whether the directory is a temporary one.
fn plan(args: &Args) -> anyhow::Result<(Layout, bool)> {
    let (dir, temporary) = match &args.dir {
        Some(d) => {
            let d = std::path::absolute(d).with_context(|| format!("--dir {}", d.display()))?;
            match std::fs::read_dir(&d) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        bail!(
                            "--dir {}: directory is not empty; pass a new or empty directory",
                            d.display()
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bail!("--dir {}: {e}", d.display()),
            }
            (d, false)
        }
        None => {
            let name = format!("meshd-dev-{:08x}", rand::random::<u32>());
            (std::env::temp_dir().join(name), true)
        }
    };
    Ok((Layout::new(&dir, args.nodes, args.base_port)?, temporary))
}

/// Creates the mesh's directory, private to the user: it holds the CA's keys.
fn create_dir(dir: &Path, temporary: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let created = if temporary {
        std::fs::create_dir(dir)
    } else {
        std::fs::create_dir_all(dir)
    };
    created
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("creating {}", dir.display()))
}

/// Fails with a useful message if any address of the mesh cannot be bound.
fn check_ports(layout: &Layout) -> anyhow::Result<()> {
    for (addr, what) in layout.tcp_addrs() {
        let udp = what.ends_with("gossip");
        let res = std::net::TcpListener::bind(addr).map(drop).and_then(|()| {
            if udp {
                std::net::UdpSocket::bind(addr).map(drop)
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => bail!(
                "cannot use {} ({what}): {e}; meshd dev puts each node on its own loopback \
                 address, which works on Linux (all of 127.0.0.0/8 is local); elsewhere add \
                 an alias, e.g. `sudo ifconfig lo0 alias {}`",
                addr,
                addr.ip()
            ),
            Err(e) => bail!(
                "cannot listen on {addr} ({what}): {e}; is another `meshd dev` running? \
                 Pass --base-port to use other ports"
            ),
        }
    }
    Ok(())
}

fn find_bins() -> anyhow::Result<Bins> {
    let meshd = std::env::current_exe().context("finding the path of this executable")?;
    let dir = meshd
        .parent()
        .context("this executable has no parent directory")?
        .to_owned();
    let registry = dir.join("mesh-registry");
    if !registry.is_file() {
        bail!(
            "{} not found: meshd dev runs the mesh-registry built next to meshd; build the \
             whole workspace first (`cargo build --workspace`, or `cargo build --workspace \
             --release`)",
            registry.display()
        );
    }
    Ok(Bins {
        meshd,
        registry,
        meshctl: dir.join("meshctl"),
    })
}

/// Starts the registry, the nodes and the demo apps, waits until the mesh has converged and
/// checks that requests cross it.
async fn start(bins: &Bins, layout: &Layout, procs: &mut Procs) -> anyhow::Result<()> {
    println!(
        "meshd dev: starting a registry and {} nodes in {}",
        layout.nodes.len(),
        layout.dir.display()
    );
    start_registry(bins, layout, procs).await?;
    let creds = Credentials::load(&layout.admin_dir())?;
    let client = creds.client(None)?;
    for node in &layout.nodes {
        let what = format!(
            "a join token for {} from the registry (log: {})",
            node.name,
            layout.registry_log().display()
        );
        let token = wait_until(procs, &what, STARTUP_TIMEOUT, || async {
            let request = pb::CreateTokenRequest {
                services: node.identities(),
                uses: 1,
                ..Default::default()
            };
            client.create_token(request).await
        })
        .await?
        .token;
        layout.write_node(node, &token)?;
    }
    apply_policy(&client, layout).await?;
    for node in &layout.nodes {
        let listen = node.app.to_string();
        let args = [
            "demo-app",
            "--listen",
            &listen,
            "--name",
            &node.service,
            "--node",
            &node.name,
        ];
        let name = format!("{} {} demo-app", node.name, node.service);
        procs.spawn(&name, &bins.meshd, args, &layout.app_log(node))?;
    }
    for node in &layout.nodes {
        let config = layout.node_config(node);
        let args = [
            Path::new("run").as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ];
        let name = format!("{} meshd", node.name);
        procs.spawn(&name, &bins.meshd, args, &layout.node_log(node))?;
    }
    println!("meshd dev: waiting for the nodes to join and see each other");
    wait_converged(layout, procs).await?;
    self_check(layout, procs).await
}

/// Writes the demo policy next to the nodes and applies it, before any node joins: the mesh
/// starts with its routes and authorization in force.
async fn apply_policy(
    client: &mesh_client::registry::Client,
    layout: &Layout,
) -> anyhow::Result<()> {
    let text = layout.policy_toml();
    let file = layout.policy_file();
    std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let resources =
        mesh_api::policy::parse_file(&file.display().to_string(), &text).map_err(|problems| {
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("the demo policy does not parse:\n{}", lines.join("\n"))
        })?;
    let wire = resources
        .iter()
        .map(mesh_api::policy::Resource::to_proto)
        .collect();
    client
        .apply(pb::ApplyRequest {
            resources: wire,
            dry_run: false,
        })
        .await
        .context("applying the demo policy")?;
    println!("meshd dev: policy applied ({})", file.display());
    Ok(())
}

async fn start_registry(bins: &Bins, layout: &Layout, procs: &mut Procs) -> anyhow::Result<()> {
    let log = layout.registry_log();
    let data_dir = layout.registry_dir();
    let (listen, admin) = (
        layout.registry.to_string(),
        layout.registry_admin.to_string(),
    );
    let init = [
        "init".as_ref(),
        "--trust-domain".as_ref(),
        layout::TRUST_DOMAIN.as_ref(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
        "--admin-listen".as_ref(),
        admin.as_ref(),
    ];
    procs::run_to_end(
        "mesh-registry init",
        &bins.registry,
        init,
        &log,
        INIT_TIMEOUT,
    )
    .await?;
    let config = layout.registry_config();
    let run = [
        Path::new("run").as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    procs.spawn("registry", &bins.registry, run, &log)?;
    let what = format!("the registry to be ready (log: {})", log.display());
    wait_until(procs, &what, STARTUP_TIMEOUT, || {
        admin::get(&admin, "/ready")
    })
    .await?;
    Ok(())
}

/// Reports children that exit (e.g. a node the user killed) until a signal arrives.
async fn watch(procs: &mut Procs, signals: &mut Signals) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            s = signals.recv() => {
                println!("meshd dev: {s}");
                return;
            }
            _ = tick.tick() => {
                for (name, status) in procs.newly_exited() {
                    println!("meshd dev: {name} exited ({status})");
                }
            }
        }
    }
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => println!("meshd dev: removed {}", dir.display()),
        Err(e) => eprintln!("meshd dev: could not remove {}: {e}", dir.display()),
    }
}

// === impl Signals ===

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
