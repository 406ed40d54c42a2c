//! `meshctl`: the operator CLI — join tokens, node and certificate inventory, mesh members.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use meshd::ctl;

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "operate a meshd service mesh")]
struct Cli {
    /// Registry address (host:port); defaults to the one in <credentials>/meshctl.toml.
    #[arg(long, global = true, env = "MESHCTL_REGISTRY")]
    registry: Option<String>,
    /// Directory with the operator credentials written by `mesh-registry init`.
    #[arg(long, global = true, env = "MESHCTL_CREDENTIALS", default_value = ctl::DEFAULT_CREDENTIALS_DIR)]
    credentials: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Nodes registered with the registry.
    Nodes,
    /// Certificates the registry issued, newest first.
    Certs {
        /// How many to show (0 = all).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Members and endpoints as one node sees them.
    Members {
        /// Admin address of a meshd.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token; prints only the token on stdout.
    Create {
        /// Services the host may run: name, namespace/name or namespace/* (comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        services: Vec<String>,
        /// Lifetime, e.g. 24h (the registry's default when omitted).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// How many hosts may join with it (0 = unlimited until it expires).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

fn ago(unix: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let d = Duration::from_secs((now - unix).unsigned_abs());
    let h = humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    if unix <= now {
        format!("{h} ago")
    } else {
        format!("in {h}")
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Members { admin } = &cli.command {
        return ctl::print_members(admin).await;
    }
    let creds = ctl::Credentials::load(&cli.credentials)?;
    let client = creds.client(cli.registry.as_deref())?;
    match cli.command {
        Command::Token {
            command:
                TokenCommand::Create {
                    services,
                    ttl,
                    uses,
                },
        } => {
            let t = ctl::create_token(&client, services, ttl, uses).await?;
            eprintln!("token {} expires {}", t.id, ago(t.expires_unix));
            println!("{}", t.token);
        }
        Command::Nodes => {
            let nodes = client.list_nodes().await?.nodes;
            println!(
                "{:<24} {:<8} {:<10} {:<16} {:<22} SERVICES",
                "NODE", "DC", "ZONE", "JOINED", "CERT EXPIRES"
            );
            for n in nodes {
                println!(
                    "{:<24} {:<8} {:<10} {:<16} {:<22} {}",
                    n.name,
                    n.datacenter,
                    n.zone,
                    ago(n.joined_unix),
                    ago(n.cert_not_after_unix),
                    n.allowed_services.join(",")
                );
            }
        }
        Command::Certs { limit } => {
            let certs = client.list_certificates(limit).await?.certificates;
            println!("{:<34} {:<20} {:<22} IDENTITY", "SERIAL", "NODE", "EXPIRES");
            for c in certs {
                println!(
                    "{:<34} {:<20} {:<22} {}",
                    c.serial,
                    c.node,
                    ago(c.not_after_unix),
                    c.identity
                );
            }
        }
        Command::Members { .. } => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    mesh_runtime::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
