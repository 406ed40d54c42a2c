//! `meshctl`: the operator CLI — policy resources (apply, get, delete, history), join tokens,
//! node and certificate inventory, gossip keys, mesh members and services, and observability:
//! the service graph (`topology`), SLO status (`slo status`) and the mesh health verdict
//! (`check`, whose exit code scripts and monitors can use).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use mesh_api::policy::Kind;
use mesh_client::registry as control;
use meshctl::{self as ctl, check, policy, revoke, slo, token, topology};

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
    /// Cut a node off: `meshctl node remove NAME`.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Revoke certificates: `meshctl cert revoke SERIAL | --node NAME | --service NS/NAME |
    /// --identity admin/NAME`.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Operator credentials: create, list, revoke.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
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
    /// The service graph: each edge's requests/s, errors, p50/p99 and mTLS (or PLAINTEXT).
    ///
    /// One edge per caller and called service over a recent window. Sources are
    /// `namespace/name`, or `external` for plaintext callers from outside the mesh. TCP edges
    /// count connections and have no latency. `-o dot` prints a Graphviz digraph (plaintext
    /// edges red and dashed); `-o svg` lays it out with Graphviz's `dot`.
    Topology {
        /// How far back to look, e.g. 90s, 5m, 1h.
        #[arg(long, default_value = "5m", value_parser = topology::parse_window)]
        window: Duration,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = topology::Output::Table)]
        output: topology::Output,
    },
    /// Service level objectives (SLO resources) as the registry evaluates them.
    Slo {
        #[command(subcommand)]
        command: SloCommand,
    },
    /// Is the mesh healthy? Exits 0 if so, 1 if a check fails, 2 on warnings only.
    ///
    /// Checks: the registry answers; every joined node reported within --stale of its report
    /// periods; no certificate any node holds has expired (fail) or expires within --cert-warn
    /// (warning); node clocks within --max-skew of the registry's; gossip converged (every
    /// reporting node sees the same members, as many as there are reporting nodes); every
    /// reporting node at the registry's policy and keyring revisions (nodes catch up within a
    /// report period of a change); every stored policy resource validates; no SLO alert
    /// (fast burn fails, slow burn warns).
    #[command(
        after_help = "Exit status: 0 when every check passes, 1 when any fails (or \
                            meshctl itself fails, e.g. no credentials), 2 when the worst is a \
                            warning, 64 for bad arguments."
    )]
    Check {
        /// Warn about certificates valid for this long or less.
        #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
        cert_warn: Duration,
        /// The largest clock offset from the registry's that passes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        max_skew: Duration,
        /// A node is stale after this many of its report periods without a report (e.g. 3x).
        #[arg(long, default_value = "3x", value_parser = check::parse_stale)]
        stale: f64,
    },
}

#[derive(Subcommand)]
enum SloCommand {
    /// Every SLO: service, objective, goal, window, indicator, error budget left, burn rates
    /// (5m/1h and 30m/6h) and alert (ok, SLOW BURN or FAST BURN since when).
    #[command(
        after_help = "Exits 0 even while alerts fire: this is a view. `meshctl check` \
                            is the command that fails (1 on a fast burn, 2 on a slow burn)."
    )]
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = slo::Output::Table)]
        output: slo::Output,
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
enum NodeCommand {
    /// Remove a node from the mesh: its record is deleted, every certificate issued to it is
    /// revoked (every meshd refuses them within seconds and closes connections they carry),
    /// gossip drops it and refuses it back, and its renewals are refused. To let a reinstalled
    /// host join under the name again, create a token with `token create --replace NAME`.
    Remove {
        /// The node's name.
        name: String,
        /// Then rotate the gossip key, so the key the removed host holds opens nothing any
        /// more (waits for every connected node at each step).
        #[arg(long)]
        rotate_gossip_key: bool,
        /// How long to wait for the nodes at each rotation step.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Revoke certificates (name exactly one: a serial, or --node, --service, --identity).
    Revoke {
        /// A certificate serial (hex, as `meshctl certs` shows it).
        serial: Option<String>,
        /// Every unexpired certificate issued to this node (it stays registered and may renew).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Every unexpired workload certificate of this service.
        #[arg(long, value_name = "NS/NAME")]
        service: Option<String>,
        /// Every unexpired certificate of an operator identity.
        #[arg(long, value_name = "admin/NAME|viewer/NAME")]
        identity: Option<String>,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Issue operator credentials into a new directory (the key is made on this host).
    Create {
        /// `admin` (may change the mesh) or `viewer` (read-only).
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        /// The identity's name, e.g. a person's user name.
        name: String,
        /// Directory to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime (default and limit: one year).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Every operator certificate the registry issued: identity, serial, state, expiry.
    List,
    /// Revoke operator credentials: a serial, or every certificate of `admin/NAME` /
    /// `viewer/NAME`. The credentials making the call cannot revoke themselves.
    Revoke {
        /// A serial, or an identity (`admin/NAME`, `viewer/NAME`).
        what: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token; prints only the token on stdout.
    ///
    /// A host joins under a node name nobody has registered yet. To re-join a name that is
    /// registered (a reinstalled host), create the token with --replace NAME: it joins as
    /// exactly that name, replacing the node's record.
    Create {
        /// Services the host may run: name, namespace/name or namespace/* (comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        services: Vec<String>,
        /// Lifetime, e.g. 24h (the registry's default when omitted).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// How many hosts may join with it; 0 = unlimited until it expires (the registry
        /// allows 1 unless unlimited is asked for explicitly).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The registered node this token may replace; it joins only under this name.
        #[arg(long, value_name = "NAME")]
        replace: Option<String>,
    },
    /// Every join token: services, created, expires, uses, the node it replaces, who created
    /// it and whether it is still usable (never the secret).
    List,
    /// Revoke a join token: no host can join with it again. Nodes that joined with it keep
    /// their identity.
    Revoke {
        /// Token id (as `list` and `create` show it), or the whole token.
        id: String,
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

/// Runs the command; `Ok` carries the exit code (`meshctl check` has its own).
async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Members { admin } = &cli.command {
        ctl::print_members(admin).await?;
        return Ok(0);
    }
    if let Command::Services { admin } = &cli.command {
        ctl::print_services(admin).await?;
        return Ok(0);
    }
    if let Command::Apply { files, .. } = &cli.command {
        // Invalid files are reported before credentials are even looked at.
        policy::load(files)?;
    }
    let creds = ctl::Credentials::load(&cli.credentials)?;
    let client = creds.client(cli.registry.as_deref())?;
    // Keeps ca.pem in step with a root rotation; a failure here is the command's to report.
    if let Ok(true) = creds.refresh_bundle(&client).await {
        eprintln!(
            "note: the registry's trust bundle changed (a root rotation); updated {}",
            cli.credentials.join("ca.pem").display()
        );
    }
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
                    replace,
                },
        } => {
            let create = token::Create {
                services,
                ttl,
                uses,
                replace,
            };
            let t = token::create(&client, &create).await?;
            match &create.replace {
                Some(node) => eprintln!(
                    "token {} expires {}; it joins only as node {node}, replacing its record",
                    t.id,
                    ago(t.expires_unix)
                ),
                None => eprintln!("token {} expires {}", t.id, ago(t.expires_unix)),
            }
            println!("{}", t.token);
        }
        Command::Token {
            command: TokenCommand::List,
        } => {
            let tokens = client.list_tokens().await?.tokens;
            if tokens.is_empty() {
                eprintln!("no join tokens (meshctl token create makes one)");
            }
            print!("{}", token::table(&tokens, ctl::now_unix()));
        }
        Command::Token {
            command: TokenCommand::Revoke { id },
        } => {
            print!("{}", token::revoke(&client, &id).await?);
        }
        Command::Node {
            command:
                NodeCommand::Remove {
                    name,
                    rotate_gossip_key,
                    timeout,
                },
        } => {
            print!("{}", revoke::remove_node(&client, &name).await?);
            if rotate_gossip_key {
                let status = meshctl::gossip_key::rotate(&client, timeout).await?;
                print!(
                    "gossip key rotated\n{}",
                    meshctl::gossip_key::render(&status)
                );
            } else {
                println!(
                    "the host still holds the gossip key: run `meshctl gossip-key rotate` (or pass --rotate-gossip-key)"
                );
            }
        }
        Command::Cert {
            command:
                CertCommand::Revoke {
                    serial,
                    node,
                    service,
                    identity,
                },
        } => {
            let r = revoke::Revoke {
                serial,
                node,
                service,
                identity,
            };
            print!("{}", revoke::revoke(&client, &r).await?);
        }
        Command::Credentials { command } => match command {
            CredentialsCommand::Create {
                role,
                name,
                out,
                ttl,
            } => {
                let td = creds.trust_domain()?;
                let registry = creds.registry_address(cli.registry.as_deref())?;
                let msg =
                    revoke::create_credentials(&client, &td, &registry, &role, &name, ttl, &out)
                        .await?;
                print!("{msg}");
            }
            CredentialsCommand::List => {
                let list = client.list_credentials().await?.credentials;
                print!("{}", revoke::credentials_table(&list, ctl::now_unix()));
            }
            CredentialsCommand::Revoke { what } => {
                let r = if what.contains('/') {
                    revoke::Revoke {
                        identity: Some(what),
                        ..Default::default()
                    }
                } else {
                    revoke::Revoke {
                        serial: Some(what),
                        ..Default::default()
                    }
                };
                print!("{}", revoke::revoke(&client, &r).await?);
            }
        },
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
            use meshctl::gossip_key;
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
        Command::Topology { window, output } => {
            print!("{}", topology::show(&client, window, output).await?);
        }
        Command::Slo {
            command: SloCommand::Status { output },
        } => {
            print!("{}", slo::status(&client, output).await?);
        }
        Command::Check {
            cert_warn,
            max_skew,
            stale,
        } => {
            let thresholds = check::Thresholds {
                cert_warn,
                max_skew,
                stale_periods: stale,
            };
            let registry = creds.registry_address(cli.registry.as_deref())?;
            let (report, code) = check::run(&client, &registry, &thresholds).await;
            print!("{report}");
            return Ok(code);
        }
        Command::Members { .. } | Command::Services { .. } => {}
    }
    Ok(0)
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
        Ok(code) => ExitCode::from(code),
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
            tonic::Code::FailedPrecondition => format!("the registry refused the request: {msg}"),
            tonic::Code::AlreadyExists => format!("the registry refused the request: {msg}"),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_named_constants() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        match parse(&["meshctl", "topology"]) {
            Ok(Command::Topology { window, output }) => {
                assert_eq!(window, topology::DEFAULT_WINDOW);
                assert_eq!(output, topology::Output::Table);
            }
            _ => panic!("topology parses"),
        }
        match parse(&["meshctl", "check"]) {
            Ok(Command::Check {
                cert_warn,
                max_skew,
                stale,
            }) => {
                let t = check::Thresholds::default();
                assert_eq!(
                    (cert_warn, max_skew, stale),
                    (t.cert_warn, t.max_skew, t.stale_periods)
                );
            }
            _ => panic!("check parses"),
        }
        assert!(matches!(
            parse(&["meshctl", "slo", "status", "-o", "json"]),
            Ok(Command::Slo {
                command: SloCommand::Status {
                    output: slo::Output::Json
                }
            })
        ));
    }

    #[test]
    fn token_commands_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        match parse(&["meshctl", "token", "create", "--services", "web,api"]) {
            Ok(Command::Token {
                command:
                    TokenCommand::Create {
                        services,
                        ttl: None,
                        uses: 1,
                        replace: None,
                    },
            }) => assert_eq!(services, ["web", "api"]),
            _ => panic!("token create parses with one use by default"),
        }
        let replace = [
            "meshctl",
            "token",
            "create",
            "--services",
            "web",
            "--replace",
            "node-1",
            "--uses",
            "0",
        ];
        assert!(matches!(
            parse(&replace),
            Ok(Command::Token {
                command: TokenCommand::Create { uses: 0, replace: Some(r), .. },
            }) if r == "node-1"
        ));
        assert!(matches!(
            parse(&["meshctl", "token", "list"]),
            Ok(Command::Token {
                command: TokenCommand::List
            })
        ));
        assert!(matches!(
            parse(&["meshctl", "token", "revoke", "00000000000000aa"]),
            Ok(Command::Token {
                command: TokenCommand::Revoke { id },
            }) if id == "00000000000000aa"
        ));
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            &["meshctl", "topology", "--window", "0s"][..],
            &["meshctl", "topology", "-o", "png"],
            &["meshctl", "check", "--stale", "0.5x"],
            &["meshctl", "check", "--cert-warn", "soon"],
            &["meshctl", "slo"],
            &["meshctl", "token", "revoke"],
            &[
                "meshctl",
                "token",
                "create",
                "--services",
                "web",
                "--replace",
            ],
            &[
                "meshctl",
                "token",
                "create",
                "--services",
                "web",
                "--uses",
                "-1",
            ],
        ] {
            let e = Cli::try_parse_from(args).err().expect("refused");
            assert!(e.use_stderr(), "{args:?} exits {EX_USAGE}");
        }
    }
}
