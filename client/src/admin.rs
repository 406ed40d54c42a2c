//! Reads of a node's admin endpoint (loopback HTTP): the raw GET, and the member and service
//! tables `meshctl members` and `meshd members` print.

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::DEFAULT_TIMEOUT;

/// A minimal HTTP/1.0 GET for loopback admin endpoints; returns the body of a 200.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
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
    let body = get(admin, "/members").await?;
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
    let body = get(admin, "/members").await?;
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
