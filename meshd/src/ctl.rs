//! Operator commands behind `meshctl` (and `meshd members`): registry calls with the operator
//! credentials written by `mesh-registry init`, and reads of a node's admin endpoint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh_api::TrustDomain;
use mesh_api::proto::v1 as pb;
use mesh_runtime::tls::{self, CertSlot};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::control::{self, Auth};

pub mod gossip_key;
pub mod policy;

/// Time allowed for one registry or admin call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where `meshctl` looks for operator credentials by default.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/etc/mesh/admin";

/// Operator credentials: `admin.pem`, `admin-key.pem`, `ca.pem`, optional `meshctl.toml`.
pub struct Credentials {
    dir: PathBuf,
    registry: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    registry: Option<String>,
}

impl Credentials {
    /// Reads `dir/meshctl.toml` if present.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join("meshctl.toml");
        let registry = match std::fs::read_to_string(&file) {
            Ok(text) => {
                toml::from_str::<CredentialsFile>(&text)
                    .with_context(|| format!("{}", file.display()))?
                    .registry
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        Ok(Self {
            dir: dir.to_owned(),
            registry,
        })
    }

    /// A registry client authenticated as the operator; `registry` overrides the address.
    pub fn client(&self, registry: Option<&str>) -> anyhow::Result<control::Client> {
        let addr = registry
            .map(str::to_owned)
            .or_else(|| self.registry.clone())
            .context("no registry address: pass --registry or put registry = \"host:port\" in meshctl.toml")?;
        let read = |name: &str| {
            let p = self.dir.join(name);
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading operator credential {}", p.display()))
        };
        let chain = read("admin.pem")?;
        let key = read("admin-key.pem")?;
        let bundle = read("ca.pem")?;
        let certs = tls::parse_certs(&chain, "operator certificate")?;
        let trust_domain: TrustDomain = tls::peer_identity(&certs)
            .map(|id| id.trust_domain().clone())
            .context("operator certificate carries no mesh identity")?;
        Ok(control::Client::new(
            &addr,
            Auth::Mesh {
                roots: tls::root_store(&bundle)?,
                trust_domain,
                cert: CertSlot::new(Some(tls::certified_key(&chain, &key)?)),
            },
            DEFAULT_TIMEOUT,
            DEFAULT_TIMEOUT,
        )?)
    }
}

/// Creates a join token and returns its string.
pub async fn create_token(
    client: &control::Client,
    services: Vec<String>,
    ttl: Option<Duration>,
    uses: u32,
) -> anyhow::Result<pb::CreateTokenResponse> {
    Ok(client
        .create_token(pb::CreateTokenRequest {
            services,
            ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
            uses,
        })
        .await?)
}

/// A minimal HTTP/1.0 GET for loopback admin endpoints; returns the body of a 200.
pub async fn admin_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the meshd admin endpoint at {addr}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("{path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(DEFAULT_TIMEOUT, fut)
        .await
        .context("admin endpoint timed out")?
}

/// How long ago `unix_ms` was, for humans ("0.4s", "3m12s").
fn since(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let ms = now.saturating_sub(unix_ms);
    if ms < 60_000 {
        format!("{:.1}s ago", ms as f64 / 1000.0)
    } else {
        let d = std::time::Duration::from_secs(ms / 1000);
        format!("{} ago", humantime::format_duration(d))
    }
}

/// Prints every node a meshd knows: alive or dead, address, locality, state, services and
/// when it was last heard from.
pub async fn print_members(admin: &str) -> anyhow::Result<()> {
    let body = admin_get(admin, "/members").await?;
    let v: serde_json::Value = serde_json::from_str(&body).context("parsing /members")?;
    println!(
        "{:<24} {:<6} {:<22} {:<10} {:<10} {:<9} {:<12} SERVICES",
        "NODE", "STATUS", "INBOUND", "DC", "ZONE", "STATE", "LAST HEARD"
    );
    let members: Vec<&serde_json::Value> = v["members"].as_array().into_iter().flatten().collect();
    for l in v["liveness"].as_array().into_iter().flatten() {
        let node = l["node"].as_str().unwrap_or("?");
        // A live member's published info; a dead node only has its gossip identity.
        let m = members
            .iter()
            .find(|m| m["node"].as_str() == Some(node) && m["generation"] == l["generation"]);
        let info = m.map(|m| &m["info"]);
        let field = |k: &str| info.and_then(|i| i[k].as_str()).unwrap_or("-").to_owned();
        let services: Vec<&str> = (m.and_then(|m| m["services"].as_array()))
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .collect();
        println!(
            "{:<24} {:<6} {:<22} {:<10} {:<10} {:<9} {:<12} {}",
            node,
            l["status"].as_str().unwrap_or("?"),
            field("inbound"),
            field("datacenter"),
            field("zone"),
            field("state"),
            since(l["last_heard_unix_ms"].as_u64().unwrap_or_default()),
            services.join(",")
        );
    }
    Ok(())
}

/// Prints every instance of every service a meshd knows: node, address, labels, health.
pub async fn print_services(admin: &str) -> anyhow::Result<()> {
    let body = admin_get(admin, "/members").await?;
    let v: serde_json::Value = serde_json::from_str(&body).context("parsing /members")?;
    println!(
        "{:<28} {:<20} {:<22} {:<8} {:<10} {:<12} LABELS",
        "SERVICE", "NODE", "ADDRESS", "PROTO", "ZONE", "HEALTH"
    );
    for (svc, eps) in v["endpoints"].as_object().into_iter().flatten() {
        for e in eps.as_array().into_iter().flatten() {
            let health = match (e["healthy"].as_bool(), e["draining"].as_bool()) {
                (_, Some(true)) => "draining",
                (Some(true), _) => "healthy",
                _ => "unhealthy",
            };
            let labels: Vec<String> = (e["labels"].as_object().into_iter().flatten())
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            println!(
                "{:<28} {:<20} {:<22} {:<8} {:<10} {:<12} {}",
                svc,
                e["node"].as_str().unwrap_or("?"),
                e["addr"].as_str().unwrap_or("?"),
                e["protocol"].as_str().unwrap_or("?"),
                format!(
                    "{}/{}",
                    e["datacenter"].as_str().unwrap_or("?"),
                    e["zone"].as_str().unwrap_or("?")
                ),
                health,
                labels.join(",")
            );
        }
    }
    Ok(())
}
