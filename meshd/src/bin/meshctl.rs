//! `meshctl`: the operator CLI — policy resources (apply, get, delete, history), join tokens,
//! node and certificate inventory, gossip keys, mesh members and services.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use mesh_api::policy::Kind;
use meshd::control;
use meshd::ctl::{self, policy};

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
    /// Create or update policy resources from TOML files (validated locally first).
    Apply {
        /// A policy file, or a directory whose *.toml files are applied in name order; repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Validate and show what would change (with diffs) without storing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show policy resources.
    Get {
        /// Kind (AuthorizationPolicy, ap, routes, ...) or `all`.
        kind: policy::KindArg,
        /// Only this name.
        name: Option<String>,
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = policy::Output::Table)]
        output: policy::Output,
    },
    /// Delete a policy resource.
    Delete {
        /// Kind (AuthorizationPolicy, ap, routes, ...).
        #[arg(value_parser = policy::parse_kind)]
        kind: Kind,
        /// Name.
        name: String,
        /// Namespace (default: `default`, or `mesh-system` for MeshConfig).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Show what would be deleted without deleting it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Every version of a policy resource, oldest first.
    History {
        /// Kind (AuthorizationPolicy, ap, routes, ...).
        #[arg(value_parser = policy::parse_kind)]
        kind: Kind,
        /// Name.
        name: String,
        /// Namespace (default: `default`, or `mesh-system` for MeshConfig).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format (`json` shows every version's full spec).
        #[arg(short = 'o', long, value_enum, default_value_t = policy::Output::Table)]
        output: policy::Output,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The keys that seal gossip (held by the registry, pushed to every node).
    GossipKey {
        #[command(subcommand)]
        command: GossipKeyCommand,
    },
    /// Nodes registered with the registry.
    Nodes,
    /// Certificates the registry issued, newest first.
    Certs {
        /// How many to show (0 = all).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Every node one meshd knows: status (alive/dead), address, locality, state, services,
    /// last heard.
    Members {
        /// Admin address of a meshd.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
    /// Every instance of every service one meshd knows: node, address, labels, health.
    Services {
        /// Admin address of a meshd.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
}

#[derive(Subcommand)]
enum GossipKeyCommand {
    /// Key ids (primary first) and which keyring revision each node reported.
    List,
    /// Install a key that only opens (rotation step 1).
    Install {
        /// File holding the key (base64 of 32 bytes); the registry generates one when omitted.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Make an installed key the primary, the one that seals (rotation step 2).
    Use {
        /// Key id (8 hex digits, as `list` shows).
        id: String,
    },
    /// Remove a key that is not the primary (rotation step 3).
    Remove {
        /// Key id (8 hex digits, as `list` shows).
        id: String,
    },
    /// All three steps with a new key, each after every connected node holds the previous one.
    Rotate {
        /// How long to wait for the nodes at each step.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
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
    if let Command::Services { admin } = &cli.command {
        return ctl::print_services(admin).await;
    }
    if let Command::Apply { files, .. } = &cli.command {
        // Invalid files are reported before credentials are even looked at.
        policy::load(files)?;
    }
    let creds = ctl::Credentials::load(&cli.credentials)?;
    let client = creds.client(cli.registry.as_deref())?;
    match cli.command {
        Command::Apply { files, dry_run } => {
            print!("{}", policy::apply(&client, &files, dry_run).await?);
        }
        Command::Get {
            kind,
            name,
            namespace,
            output,
        } => {
            let out =
                policy::get(&client, kind, name.as_deref(), namespace.as_deref(), output).await?;
            if out.is_empty() {
                eprintln!("no resources found");
            }
            print!("{out}");
        }
        Command::Delete {
            kind,
            name,
            namespace,
            dry_run,
        } => {
            let out = policy::delete(&client, kind, &name, namespace.as_deref(), dry_run).await?;
            print!("{out}");
        }
        Command::History {
            kind,
            name,
            namespace,
            output,
        } => {
            let out = policy::history(&client, kind, &name, namespace.as_deref(), output).await?;
            print!("{out}");
        }
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
        Command::GossipKey { command } => {
            use mesh_api::proto::v1::change_gossip_keys_request::Action;
            use meshd::ctl::gossip_key;
            let status = match command {
                GossipKeyCommand::List => client.get_gossip_keys().await?,
                GossipKeyCommand::Install { key_file } => {
                    let key = match key_file {
                        Some(path) => std::fs::read_to_string(&path)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                        None => String::new(),
                    };
                    gossip_key::change(&client, Action::Install, key.trim()).await?
                }
                GossipKeyCommand::Use { id } => {
                    gossip_key::change(&client, Action::Use, &id).await?
                }
                GossipKeyCommand::Remove { id } => {
                    gossip_key::change(&client, Action::Remove, &id).await?
                }
                GossipKeyCommand::Rotate { timeout } => {
                    gossip_key::rotate(&client, timeout).await?
                }
            };
            print!("{}", gossip_key::render(&status));
        }
        Command::Members { .. } | Command::Services { .. } => {}
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
            let (text, code) = describe(&e);
            eprintln!("error: {text}");
            ExitCode::from(code)
        }
    }
}

/// The message and exit code of a failed command: registry refusals are said plainly
/// (permission denied, the problems of an invalid request), invalid input exits 64.
fn describe(e: &anyhow::Error) -> (String, u8) {
    let status = |s: &tonic::Status| {
        let msg = s.message();
        match s.code() {
            tonic::Code::PermissionDenied => format!("permission denied: {msg}"),
            tonic::Code::Unauthenticated => format!("not authenticated: {msg}"),
            tonic::Code::InvalidArgument => format!("the registry refused the request: {msg}"),
            tonic::Code::NotFound => msg.to_owned(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                format!("registry unreachable: {msg}")
            }
            code => format!("registry error ({code:?}): {msg}"),
        }
    };
    if let Some(pe) = e.downcast_ref::<policy::Error>() {
        let text = match pe {
            policy::Error::Registry(control::Error::Status(s)) => status(s),
            other => other.to_string(),
        };
        return (text, pe.exit_code());
    }
    if let Some(control::Error::Status(s)) = e.downcast_ref::<control::Error>() {
        let code = if s.code() == tonic::Code::InvalidArgument {
            EX_USAGE
        } else {
            1
        };
        return (status(s), code);
    }
    (format!("{e:#}"), 1)
}
