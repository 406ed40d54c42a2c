//! `meshd`: command line, exit codes and runtime of the per-host daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshd::{app, config};

// The proxy allocates per request in hyper, h2 and rustls: glibc's malloc/free took 7–8% of its
// CPU at saturation (perf, BENCHMARKS.md "HTTP (L7)"), mimalloc's thread-local free lists less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad command line or configuration (EX_USAGE): systemd must not restart-loop.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "meshd: service mesh daemon for VMs and bare-metal hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Node config file.
        #[arg(long, env = "MESHD_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the node config and every service file; exit 0 if valid, 64 if not.
    CheckConfig {
        /// Node config file.
        #[arg(long, env = "MESHD_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A service file to check before installing it, together with the node config and
        /// the other service files (e.g. Ansible's `validate:`).
        #[arg(long, value_name = "FILE")]
        service: Option<PathBuf>,
        /// The name `--service` will have in services_dir (default: its own file name); it
        /// replaces the file of that name there, if any.
        #[arg(long = "as", value_name = "NAME.toml", requires = "service")]
        as_name: Option<std::ffi::OsString>,
    },
    /// Show the members and endpoints this node sees (from its admin endpoint).
    Members {
        /// Admin address of the local meshd.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
    /// Start a complete local mesh (registry, nodes, demo apps) to try meshd out.
    Dev(meshd::dev::Args),
    /// Demo service for the dev mesh and tests: HTTP hello, echo for anything else.
    #[command(hide = true)]
    DemoApp(meshd::demo::Args),
}

/// The proxy's runtime: one worker per CPU, or `TOKIO_WORKER_THREADS`. One worker runs on
/// tokio's single-threaded scheduler: the same behaviour without the work-stealing machinery
/// (atomics on every wake, a shared injection queue), which a lone worker never uses.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let one_worker = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut builder = if one_worker {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mesh_runtime::telemetry::init(&mesh_runtime::telemetry::Settings {
        default_filter: "warn,meshd=info,mesh_runtime=info,chitchat=warn",
        identifier: "meshd",
    });
    mesh_runtime::tls::install_default_provider();
    match cli.command {
        Command::Dev(args) => meshd::dev::main(args),
        Command::DemoApp(args) => meshd::demo::main(args),
        Command::CheckConfig {
            config,
            service,
            as_name,
        } => check_config(&config, service, as_name),
        Command::Run { config } => {
            let cfg = match config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(async move {
                // Before the build: a SIGHUP sent while starting reloads once started.
                let mut hangups = match mesh_runtime::signal::hangups() {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot handle SIGHUP");
                        return ExitCode::from(1);
                    }
                };
                let bound = match app::build(cfg).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "meshd failed to start");
                        return ExitCode::from(1);
                    }
                };
                // SIGHUP (systemctl reload): read the files again and apply them whole, or
                // refuse them whole; the reloader logs and counts either outcome.
                let reload = bound.reload_handle();
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        tracing::info!(config = %config.display(), "SIGHUP: reloading the configuration");
                        let _ = reload.reload_file(config.clone()).await;
                    }
                });
                let drain = bound.wait_termination(async {
                    let _ = mesh_runtime::signal::shutdown().await;
                });
                // A second SIGINT/SIGTERM during the drain exits at once.
                tokio::select! {
                    r = drain => match r {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(_) => ExitCode::from(1),
                    },
                    _ = async {
                        let _ = mesh_runtime::signal::shutdown().await;
                        let _ = mesh_runtime::signal::shutdown().await;
                    } => {
                        tracing::warn!("second signal: exiting without finishing the drain");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Command::Members { admin } => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(mesh_client::admin::print_members(&admin)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `meshd check-config`: the node file and every service file, optionally with a candidate
/// service file standing in for one of them.
fn check_config(
    config: &std::path::Path,
    service: Option<PathBuf>,
    as_name: Option<std::ffi::OsString>,
) -> ExitCode {
    let candidate = match service {
        None => None,
        Some(source) => {
            let name = as_name.or_else(|| source.file_name().map(ToOwned::to_owned));
            let Some(name) = name else {
                eprintln!(
                    "--service {}: not a file name; pass --as NAME.toml",
                    source.display()
                );
                return ExitCode::from(EX_USAGE);
            };
            match config::Candidate::new(source, name) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("--as {e}");
                    return ExitCode::from(EX_USAGE);
                }
            }
        }
    };
    match config::Config::load_with(config, candidate.as_ref()) {
        Ok(c) => {
            if let Some(cand) = &candidate {
                println!(
                    "{}: ok as {}",
                    cand.source.display(),
                    c.services_dir.join(&cand.as_name).display()
                );
            }
            println!(
                "{}: ok (node {}, {} service(s) from {})",
                config.display(),
                c.node_name,
                c.services.len(),
                c.services_dir.display()
            );
            // Valid, so exit 0; but other hosts could act as a local service (or read the
            // admin endpoint).
            for w in c.listeners_off_loopback() {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EX_USAGE)
        }
    }
}
