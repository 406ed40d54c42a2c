//! Operator commands behind `meshctl` (and `meshd members`): registry calls with the operator
//! credentials written by `mesh-registry init`, reads of a node's admin endpoint, and the text
//! helpers the commands share (aligned columns, short durations). Each command group with
//! decisions or formats of its own has a module here: [`policy`], [`gossip_key`], [`token`]
//! (join tokens), [`topology`] (the service graph), [`slo`] (SLO status) and [`check`] (the
//! mesh health verdict).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh_api::TrustDomain;
use mesh_runtime::tls::{self, CertSlot};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::control::{self, Auth};

pub mod check;
pub mod gossip_key;
pub mod policy;
pub mod revoke;
pub mod slo;
pub mod token;
pub mod topology;

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

    /// The registry address: `registry` (from `--registry`) or the one in `meshctl.toml`.
    pub fn registry_address(&self, registry: Option<&str>) -> anyhow::Result<String> {
        registry
            .map(str::to_owned)
            .or_else(|| self.registry.clone())
            .context("no registry address: pass --registry or put registry = \"host:port\" in meshctl.toml")
    }

    /// The trust domain of the operator certificate.
    pub fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        let p = self.dir.join("admin.pem");
        let chain = std::fs::read_to_string(&p)
            .with_context(|| format!("reading operator credential {}", p.display()))?;
        let certs = tls::parse_certs(&chain, "operator certificate")?;
        tls::peer_identity(&certs)
            .map(|id| id.trust_domain().clone())
            .context("operator certificate carries no mesh identity")
    }

    /// Replaces `ca.pem` with the registry's current trust bundle when it differs (a root
    /// rotation), so these credentials keep reaching the registry after it switches roots.
    /// The bundle arrives over a connection verified against the old one. Returns whether the
    /// file changed.
    pub async fn refresh_bundle(&self, client: &control::Client) -> anyhow::Result<bool> {
        let bundle = client.trust_bundle().await?.trust_bundle_pem;
        let path = self.dir.join("ca.pem");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if bundle.is_empty() || bundle == current {
            return Ok(false);
        }
        tls::root_store(&bundle).context("the registry's trust bundle does not parse")?;
        let tmp = self.dir.join("ca.pem.tmp");
        std::fs::write(&tmp, &bundle).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(true)
    }

    /// A registry client authenticated as the operator; `registry` overrides the address.
    pub fn client(&self, registry: Option<&str>) -> anyhow::Result<control::Client> {
        let addr = self.registry_address(registry)?;
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
                roots: tls::RootsSlot::new(tls::root_store(&bundle)?),
                trust_domain,
                cert: CertSlot::new(Some(tls::certified_key(&chain, &key)?)),
            },
            DEFAULT_TIMEOUT,
            DEFAULT_TIMEOUT,
        )?)
    }
}

/// `3h12m ago` or `in 21h`.
pub fn when(unix: i64, now_unix: i64) -> String {
    let d = short_duration(Duration::from_secs((now_unix - unix).unsigned_abs()));
    if unix <= now_unix {
        format!("{d} ago")
    } else {
        format!("in {d}")
    }
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

/// Rows under a header, each column as wide as its widest cell (counted in characters, so
/// names with non-ASCII letters still line up), three spaces apart, the last column unpadded.
/// Rows shorter than the header leave their last cells empty.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            l.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 3;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str).take(widths.len()));
    }
    out
}

/// A duration in at most its two largest units, for people: `850ms`, `42s`, `12m3s`, `3h12m`,
/// `2d4h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) if s == 0 => format!("{}ms", d.as_millis()),
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) if secs == 0 => format!("{mins}m"),
        (0, 0, _) => format!("{mins}m{secs}s"),
        (0, _, 0) => format!("{hours}h"),
        (0, _, _) => format!("{hours}h{mins}m"),
        (_, 0, _) => format!("{days}d"),
        _ => format!("{days}d{hours}h"),
    }
}

/// The current time as Unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        for (d, want) in [
            (Duration::from_millis(0), "0ms"),
            (Duration::from_millis(850), "850ms"),
            (Duration::from_secs(42), "42s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(12 * 60 + 3), "12m3s"),
            (Duration::from_secs(3 * 3600), "3h"),
            (Duration::from_secs(3 * 3600 + 12 * 60 + 59), "3h12m"),
            (Duration::from_secs(2 * 86_400 + 59), "2d"),
            (Duration::from_secs(2 * 86_400 + 4 * 3600), "2d4h"),
        ] {
            assert_eq!(short_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn columns_line_up_by_characters() {
        let rows = vec![
            vec!["a".to_owned(), "ünïcode".to_owned(), "last".to_owned()],
            vec!["longer".to_owned(), "b".to_owned(), String::new()],
            vec!["short".to_owned()],
        ];
        assert_eq!(
            columns(&["X", "Y", "Z"], &rows),
            "X        Y         Z\n\
             a        ünïcode   last\n\
             longer   b\n\
             short\n"
        );
        assert_eq!(columns(&["ONLY"], &[]), "ONLY\n");
    }
}
