//! `mesh-registry`: command line, exit codes and runtime for the registry process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_api::TrustDomain;
use mesh_api::name::Label;
use mesh_registry::{app, ca, config, init};

/// Exit code for bad command line or configuration (EX_USAGE), so systemd does not restart.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "mesh-registry",
    version,
    about = "meshd control plane: identities, join tokens, policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start; boxing `Init` would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Create the mesh CA, operator credentials and config in a new data directory.
    Init {
        /// Trust domain of the mesh, e.g. mesh.internal.
        #[arg(long)]
        trust_domain: String,
        /// Directory to create (holds ca/, admin/, viewer/, store/ and registry.toml).
        #[arg(long)]
        data_dir: PathBuf,
        /// gRPC listen address written into the config.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Admin listen address written into the config.
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: SocketAddr,
        /// Import this root certificate (PEM) instead of generating one.
        #[arg(long, requires_all = ["import_intermediate", "import_intermediate_key"])]
        import_root: Option<PathBuf>,
        /// Intermediate certificate (PEM) signed by --import-root.
        #[arg(long)]
        import_intermediate: Option<PathBuf>,
        /// Intermediate private key (PKCS#8 PEM).
        #[arg(long)]
        import_intermediate_key: Option<PathBuf>,
        /// Start a new site of an existing mesh: sign this site's own intermediate with the
        /// root in this directory (the first site's `<data-dir>/ca`, which holds the root key;
        /// the key is not copied). Needs --site.
        #[arg(long, requires = "site", conflicts_with = "import_root")]
        join_root: Option<PathBuf>,
        /// The new site's name (a label such as `eu-west`), with --join-root.
        #[arg(long, requires = "join_root")]
        site: Option<String>,
    },
    /// Serve the registry API.
    Run {
        /// Config file written by init.
        #[arg(long, env = "MESH_REGISTRY_CONFIG")]
        config: PathBuf,
    },
    /// Rotate the CA while the registry runs (it picks up the new files within a second).
    Ca {
        /// Config file written by init (names the data directory and trust domain).
        #[arg(long, env = "MESH_REGISTRY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Validate a config file and exit (0 valid, 64 invalid).
    CheckConfig {
        /// Config file to check.
        #[arg(long, env = "MESH_REGISTRY_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// A new signing intermediate under the same root (needs the root key in ca/). Leaves of
    /// the old intermediate stay valid until they expire.
    RotateIntermediate,
    /// Move the mesh to a new root in three steps: `prepare` (both roots trusted, pushed to
    /// every node), `activate` (sign under the new root), `finish` (trust only the new root,
    /// once the old root's leaves have expired).
    RotateRoot {
        /// The step to run.
        #[arg(value_enum)]
        step: ca::RootStep,
        /// `finish` before the node certificate lifetime has passed since `activate`.
        #[arg(long)]
        force: bool,
    },
}

fn run_ca(config: Option<PathBuf>, command: CaCommand) -> ExitCode {
    let Some(path) = config else {
        eprintln!("error: --config (or MESH_REGISTRY_CONFIG) is required");
        return ExitCode::from(EX_USAGE);
    };
    let cfg = match config::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let layout = ca::Layout::new(&cfg.data_dir);
    let now = std::time::SystemTime::now();
    let done = match command {
        CaCommand::RotateIntermediate => ca::rotate_intermediate(&layout, &cfg.trust_domain, now),
        CaCommand::RotateRoot { step, force } => {
            let wait = cfg.node_cert_ttl.max(cfg.workload_cert_ttl);
            ca::rotate_root(&layout, &cfg.trust_domain, step, now, wait, force)
        }
    };
    match done {
        Ok(msg) => {
            print!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mesh_runtime::telemetry::init(&mesh_runtime::telemetry::Settings {
        default_filter: "warn,mesh_registry=info,mesh_runtime=info",
        identifier: "mesh-registry",
    });
    mesh_runtime::tls::install_default_provider();
    match cli.command {
        Command::Init {
            trust_domain,
            data_dir,
            listen,
            admin_listen,
            import_root,
            import_intermediate,
            import_intermediate_key,
            join_root,
            site,
        } => {
            let trust_domain = match TrustDomain::new(&trust_domain) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: --trust-domain: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let import = match (import_root, import_intermediate, import_intermediate_key) {
                (Some(root_cert), Some(intermediate_cert), Some(intermediate_key)) => {
                    Some(init::Import {
                        root_cert,
                        intermediate_cert,
                        intermediate_key,
                    })
                }
                _ => None,
            };
            let join = match (join_root, site) {
                (Some(ca_dir), Some(site)) => match Label::new(&site) {
                    Ok(site) => Some(init::Join { ca_dir, site }),
                    Err(e) => {
                        eprintln!("error: --site {site:?}: {e}");
                        return ExitCode::from(EX_USAGE);
                    }
                },
                _ => None,
            };
            let args = init::Args {
                trust_domain,
                data_dir,
                listen,
                admin_listen,
                import,
                join,
            };
            match init::run(&args, std::time::SystemTime::now()) {
                Ok(r) => {
                    println!(
                        "initialised mesh {} in {}",
                        args.trust_domain,
                        args.data_dir.display()
                    );
                    println!("  root CA fingerprint: {}", r.root_fingerprint);
                    if r.root_key_stored {
                        println!(
                            "  root key: {} (move it offline once the mesh is set up)",
                            args.data_dir.join("ca/root-key.pem").display()
                        );
                    } else {
                        println!("  root key: not stored (imported CA)");
                    }
                    println!(
                        "  operator credentials: {} ({})",
                        r.admin_dir.display(),
                        r.admin_identity
                    );
                    println!(
                        "  read-only credentials: {} ({})",
                        r.viewer_dir.display(),
                        r.viewer_identity
                    );
                    println!(
                        "  gossip key: {} (only its id is shown; nodes get the key from the registry)",
                        r.gossip_key_id
                    );
                    println!("  config: {}", r.config_file.display());
                    println!();
                    println!("next:");
                    println!("  mesh-registry run --config {}", r.config_file.display());
                    println!(
                        "  meshctl --credentials {} token create --services web,api",
                        r.admin_dir.display()
                    );
                    println!(
                        "  meshctl --credentials {} get   (read-only: get and history)",
                        r.viewer_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Ca { config, command } => run_ca(config, command),
        Command::CheckConfig { config } => match config::Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Run { config } => {
            let cfg = match config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(async move {
                let bound = match app::build(cfg).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "registry failed to start");
                        return ExitCode::from(1);
                    }
                };
                bound
                    .wait_termination(async {
                        let _ = mesh_runtime::signal::shutdown().await;
                    })
                    .await;
                ExitCode::SUCCESS
            })
        }
    }
}
