//! Waiting for the dev mesh to converge and checking that it carries requests: probes of the
//! admin endpoints, the self-check through web's upstream port, the plaintext probe.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use super::STARTUP_TIMEOUT;
use super::layout::Layout;
use super::procs::Procs;
use mesh_client::admin;

/// Time one probe of an admin endpoint or app may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between probes.
const POLL: Duration = Duration::from_millis(100);
/// Requests the self-check sends through the mesh.
const SELF_CHECK_REQUESTS: usize = 6;
/// Time for the whole self-check.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Time one self-check request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from a demo app.
const MAX_ANSWER: u64 = 64 * 1024;

/// Waits until every node is ready and sees every node serving, and n1 sees every api instance.
pub(super) async fn wait_converged(layout: &Layout, procs: &mut Procs) -> anyhow::Result<()> {
    let names: Vec<&str> = layout.nodes.iter().map(|n| n.name.as_str()).collect();
    for node in &layout.nodes {
        let admin = node.admin.to_string();
        let log = layout.node_log(node);
        let what = format!("{} to be ready (log: {})", node.name, log.display());
        wait_until(procs, &what, STARTUP_TIMEOUT, || {
            admin::get(&admin, "/ready")
        })
        .await?;
    }
    for node in &layout.nodes {
        let admin = node.admin.to_string();
        let log = layout.node_log(node);
        let what = format!("{} to see every node (log: {})", node.name, log.display());
        wait_until(procs, &what, STARTUP_TIMEOUT, || async {
            let view = members(&admin).await?;
            let missing: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !view.serving.contains(*n))
                .collect();
            if !missing.is_empty() {
                bail!("{} does not see {} yet", node.name, missing.join(", "));
            }
            Ok(())
        })
        .await?;
    }
    let web = &layout.nodes[0];
    let admin = web.admin.to_string();
    let want = layout.nodes.len() - 1;
    let what = format!(
        "{} to see all {want} api instances (log: {})",
        web.name,
        layout.node_log(web).display()
    );
    wait_until(procs, &what, STARTUP_TIMEOUT, || async {
        let view = members(&admin).await?;
        if view.usable_api < want {
            bail!(
                "{} sees {} usable api endpoint(s)",
                web.name,
                view.usable_api
            );
        }
        Ok(())
    })
    .await?;
    for node in &layout.nodes {
        let what = format!(
            "{}'s {} demo-app to listen on {} (log: {})",
            node.name,
            node.service,
            node.app,
            layout.app_log(node).display()
        );
        wait_until(procs, &what, STARTUP_TIMEOUT, || async {
            TcpStream::connect(node.app).await.map(drop)
        })
        .await?;
    }
    Ok(())
}

/// What a node's `/members` says, reduced to what `meshd dev` waits for.
struct MembersView {
    /// Names of the serving members.
    serving: BTreeSet<String>,
    /// Healthy, not draining endpoints of `default/api`.
    usable_api: usize,
}

async fn members(admin: &str) -> anyhow::Result<MembersView> {
    let body = admin::get(admin, "/members").await?;
    let v: serde_json::Value = serde_json::from_str(&body).context("parsing /members")?;
    let serving = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["info"]["state"] == "serving")
        .filter_map(|m| m["node"].as_str())
        .map(str::to_owned)
        .collect();
    let usable_api = v["endpoints"]["default/api"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["healthy"] == true && e["draining"] == false)
        .count();
    Ok(MembersView {
        serving,
        usable_api,
    })
}

/// Sends requests through web's upstream port and prints the answers; also shows that plain
/// TCP to an inbound port gets no answer.
pub(super) async fn self_check(layout: &Layout, procs: &mut Procs) -> anyhow::Result<()> {
    let web = &layout.nodes[0];
    let addr = web
        .upstream
        .context("the layout gives n1 an upstream to api")?;
    println!(
        "meshd dev: self-check: {SELF_CHECK_REQUESTS} HTTP requests to web's upstream port \
         {addr}, carried by meshd over mTLS to api"
    );
    let deadline = Instant::now() + SELF_CHECK_TIMEOUT;
    let mut answered_by: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=SELF_CHECK_REQUESTS {
        let body = loop {
            let last = match timeout(REQUEST_TIMEOUT, http_get(addr, "/")).await {
                Ok(Ok(body)) if body.starts_with("hello from api on ") => break body,
                Ok(Ok(body)) => format!("unexpected answer {body:?}"),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
            };
            procs.check_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "self-check: request {i} to {addr} failed: {last}; see {} and the api \
                     nodes' meshd.log",
                    layout.node_log(web).display()
                );
            }
            println!("  request {i}: {last}; retrying");
            sleep(POLL * 5).await;
        };
        let body = body.trim_end();
        println!("  {i}. {body}");
        let node = body.rsplit(' ').next().unwrap_or_default().to_owned();
        *answered_by.entry(node).or_default() += 1;
    }
    let summary: Vec<String> = answered_by
        .iter()
        .map(|(n, c)| format!("{n} ×{c}"))
        .collect();
    println!("  answered by {}", summary.join(", "));

    check_edge_and_policy(layout, procs).await?;
    if let Some(api) = layout.nodes.get(1) {
        println!(
            "meshd dev: plaintext to {}'s inbound port {}: {}",
            api.name,
            api.inbound,
            plaintext_probe(api.inbound).await
        );
    }
    Ok(())
}

/// A plain HTTP/1.1 GET; returns the body of a 200 answer.
/// The ingress gateway routes by path, and policy answers: `/` reaches web, `/api/` reaches api
/// (as the gateway's identity), and `/admin` on api is denied with the deciding policy named.
async fn check_edge_and_policy(layout: &Layout, procs: &mut Procs) -> anyhow::Result<()> {
    let gw = layout.gateway;
    println!("meshd dev: self-check: the ingress gateway on {gw} and the policy");
    for (path, want) in [
        ("/", "hello from web on n1"),
        ("/api/orders", "hello from api on "),
    ] {
        let what = format!("GET http://{gw}{path} to answer {want:?}");
        let body = wait_until(procs, &what, SELF_CHECK_TIMEOUT, || async {
            let (status, body) = http_request(gw, path).await?;
            if status == 200 && body.starts_with(want) {
                return Ok(body);
            }
            bail!("answered {status}: {}", body.trim_end())
        })
        .await?;
        println!("  GET {path} via the gateway: {}", body.trim_end());
    }
    let up = (layout.nodes[0].upstream).context("the layout gives n1 an upstream to api")?;
    let what = format!("GET http://{up}/admin to be denied");
    let body = wait_until(procs, &what, SELF_CHECK_TIMEOUT, || async {
        let (status, body) = http_request(up, "/admin").await?;
        if status == 403 {
            return Ok(body);
        }
        bail!("answered {status}: {}", body.trim_end())
    })
    .await?;
    println!("  GET /admin on api: 403 {}", body.trim_end());
    Ok(())
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (status, body) = http_request(addr, path).await?;
    if status != 200 {
        bail!("answer: {status} {}", body.trim_end());
    }
    Ok(body)
}

/// One HTTP/1.1 GET: the status and the body.
async fn http_request(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .with_context(|| format!("sending to {addr}"))?;
    let mut buf = Vec::new();
    (&mut s)
        .take(MAX_ANSWER)
        .read_to_end(&mut buf)
        .await
        .with_context(|| format!("reading from {addr}"))?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP answer ({} bytes)", buf.len());
    };
    let status = (head.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {:?}", head.lines().next()))?;
    Ok((status, body.to_owned()))
}

/// What happens to a plaintext HTTP request sent to an mTLS inbound port.
async fn plaintext_probe(addr: SocketAddr) -> String {
    let probe = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let mut buf = Vec::new();
        (&mut s).take(MAX_ANSWER).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match timeout(REQUEST_TIMEOUT, probe).await {
        Ok(Ok(b)) if b.starts_with(b"HTTP/") => {
            "WARNING: it answered in plaintext; report this as a bug".to_owned()
        }
        Ok(Ok(b)) if b.first() == Some(&0x15) => {
            "refused (TLS alert, connection closed)".to_owned()
        }
        Ok(Ok(_)) => "refused (connection closed without an answer)".to_owned(),
        Ok(Err(e)) => format!("refused ({e})"),
        Err(_) => format!("no answer within {REQUEST_TIMEOUT:?} (not served)"),
    }
}

/// Runs `probe` until it succeeds; fails after `limit` with its last error, or at once if a
/// child exits.
pub(super) async fn wait_until<T, F, Fut, E>(
    procs: &mut Procs,
    what: &str,
    limit: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<anyhow::Error>,
{
    let deadline = Instant::now() + limit;
    loop {
        procs.check_running()?;
        let last = match timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.into(),
            Err(_) => anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}; last error: {last:#}");
        }
        sleep(POLL).await;
    }
}
