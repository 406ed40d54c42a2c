//! `meshctl topology`: the service graph the registry aggregates from node reports — every
//! service-to-service edge with its rate, errors, latency and whether mutual TLS carried it —
//! rendered as a table, JSON, a Graphviz digraph, or SVG (the digraph through `dot -Tsvg`).
//! Edges to another site's instances (through its east-west gateway) name that site and are
//! drawn to a node of their own, so traffic that crossed a site boundary is never mistaken for
//! local traffic.
//! The renderings are pure functions of the registry's [`pb::Topology`]; only [`svg`] runs a
//! program.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::process::Stdio;
use std::time::Duration;

use crate as ctl;
use mesh_api::observe::EXTERNAL;
use mesh_api::proto::v1 as pb;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

/// The window `--window` asks for when not given (the registry's own default, 300 s).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// The Graphviz program `-o svg` pipes the digraph through.
pub const DOT_PROGRAM: &str = "dot";
/// Time allowed for `dot` to lay out the graph.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `MTLS` says for traffic that mutual TLS did not protect; loud on purpose.
const PLAINTEXT: &str = "PLAINTEXT";
/// The lock on mTLS edges in the digraph.
const LOCK: &str = "🔒";
/// What `SITE` says for an edge that stayed in the reporting nodes' own site.
const OWN_SITE: &str = "-";

/// The node an edge goes to: the service, or `service@site` for another site's instances.
fn destination_node(e: &pb::Edge) -> String {
    if e.destination_site.is_empty() {
        e.destination.clone()
    } else {
        format!("{}@{}", e.destination, e.destination_site)
    }
}

/// How `meshctl topology` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One row per edge.
    Table,
    /// The edges as JSON objects.
    Json,
    /// A Graphviz digraph (render with `dot -Tsvg`, `dot -Tpng`, ...).
    Dot,
    /// The digraph laid out by Graphviz's `dot` (needs the graphviz package).
    Svg,
}

/// Rendering the graph as SVG failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Graphviz is not installed (or not on `PATH`).
    #[error(
        "`{program}` was not found: -o svg needs Graphviz (install the `graphviz` package, e.g. \
         `apt-get install graphviz` or `dnf install graphviz`), or use -o dot and render the \
         graph elsewhere"
    )]
    GraphvizMissing {
        /// The program looked for.
        program: String,
    },
    /// Starting or talking to the program failed.
    #[error("running `{program} -Tsvg`")]
    Io {
        /// The program run.
        program: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The program ran but refused the graph.
    #[error("`{program} -Tsvg` failed ({status}): {stderr}")]
    Render {
        /// The program run.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// The program did not finish in time.
    #[error("`{program} -Tsvg` did not finish within {timeout:?}")]
    Timeout {
        /// The program run.
        program: String,
        /// The time it had.
        timeout: Duration,
    },
}

/// Parses `--window` (`5m`, `90s`, `1h`): whole seconds, at least one.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 90s, 5m or 1h"))?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is shorter than the smallest window, 1s; e.g. 90s, 5m or 1h"
        ));
    }
    Ok(d)
}

/// The edges in display order: by source, destination, its site (own first), protocol, then
/// mTLS before plaintext. The sort is stable, so edges the registry sent with equal keys keep
/// its order.
pub fn sorted_edges(t: &pb::Topology) -> Vec<&pb::Edge> {
    let mut edges: Vec<&pb::Edge> = t.edges.iter().collect();
    edges.sort_by(|a, b| {
        (
            &a.source,
            &a.destination,
            &a.destination_site,
            &a.protocol,
            !a.mtls,
        )
            .cmp(&(
                &b.source,
                &b.destination,
                &b.destination_site,
                &b.protocol,
                !b.mtls,
            ))
    });
    edges
}

/// `SOURCE DESTINATION SITE PROTO MTLS RPS ERRORS P50 P99`, one row per edge (header only when
/// there is no traffic); `SITE` is `-` unless the traffic crossed to another site.
pub fn table(t: &pb::Topology) -> String {
    let rows: Vec<Vec<String>> = sorted_edges(t)
        .into_iter()
        .map(|e| {
            vec![
                e.source.clone(),
                e.destination.clone(),
                if e.destination_site.is_empty() {
                    OWN_SITE.to_owned()
                } else {
                    e.destination_site.clone()
                },
                e.protocol.clone(),
                if e.mtls { "mtls" } else { PLAINTEXT }.to_owned(),
                rate(e.requests_per_second),
                error_percent(e),
                latency(e, e.p50_ms),
                latency(e, e.p99_ms),
            ]
        })
        .collect();
    ctl::columns(
        &[
            "SOURCE",
            "DESTINATION",
            "SITE",
            "PROTO",
            "MTLS",
            "RPS",
            "ERRORS",
            "P50",
            "P99",
        ],
        &rows,
    )
}

/// `{"window_seconds": …, "edges": [{…}, …]}` with the API's field names; the latencies are
/// `null` where there are none (TCP, or no requests), `destination_site` where the traffic
/// stayed in the reporting nodes' site.
pub fn json(t: &pb::Topology) -> String {
    let edges: Vec<Value> = sorted_edges(t)
        .into_iter()
        .map(|e| {
            let ms = |v: f64| has_latency(e).then_some(v);
            json!({
                "source": e.source,
                "destination": e.destination,
                "destination_site": (!e.destination_site.is_empty()).then_some(&e.destination_site),
                "protocol": e.protocol,
                "mtls": e.mtls,
                "requests": e.requests,
                "errors": e.errors,
                "requests_per_second": e.requests_per_second,
                "error_rate": e.error_rate,
                "p50_ms": ms(e.p50_ms),
                "p99_ms": ms(e.p99_ms),
                "bytes": e.bytes,
            })
        })
        .collect();
    let v = json!({ "window_seconds": t.window_seconds, "edges": edges });
    let mut s = serde_json::to_string_pretty(&v).expect("JSON values serialise");
    s.push('\n');
    s
}

/// A Graphviz digraph: one node per service (and one for `external` callers, and one per
/// service and other site its instances there were called in, double-bordered), one edge per
/// edge labelled with its rate, error percentage and p99. mTLS edges are solid with a lock;
/// plaintext edges are red, dashed and say PLAINTEXT, so they stand out; an edge that crossed
/// to another site says so.
pub fn dot(t: &pb::Topology) -> String {
    let edges = sorted_edges(t);
    let services: BTreeSet<String> = (edges.iter())
        .flat_map(|e| [e.source.clone(), destination_node(e)])
        .collect();
    let remote: BTreeSet<String> = (edges.iter())
        .filter(|e| !e.destination_site.is_empty())
        .map(|e| destination_node(e))
        .collect();
    let mut out = String::new();
    out.push_str("digraph mesh {\n");
    let window = ctl::short_duration(Duration::from_secs(t.window_seconds));
    let _ = writeln!(
        out,
        "  graph [rankdir=LR, fontname=\"Helvetica\", labelloc=t, label={}];",
        quote(&format!("mesh topology, last {window}"))
    );
    out.push_str("  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n");
    out.push_str("  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for s in &services {
        if s == EXTERNAL {
            let _ = writeln!(out, "  {} [shape=ellipse, style=dashed];", quote(s));
        } else if remote.contains(s) {
            let _ = writeln!(out, "  {} [peripheries=2];", quote(s));
        } else {
            let _ = writeln!(out, "  {};", quote(s));
        }
    }
    for e in edges {
        let mut stats = format!(
            "{} rps · {} err",
            rate(e.requests_per_second),
            error_percent(e)
        );
        if has_latency(e) {
            let _ = write!(stats, " · p99 {}", ms(e.p99_ms));
        }
        let (mut head, style) = if e.mtls {
            (format!("{LOCK} mtls {}", e.protocol), "style=solid")
        } else {
            (
                format!("{PLAINTEXT} {}", e.protocol),
                "style=dashed, color=red, fontcolor=red",
            )
        };
        if !e.destination_site.is_empty() {
            let _ = write!(head, " · to site {}", e.destination_site);
        }
        // `\n` inside a DOT label is a line break; `quote` leaves it to Graphviz.
        let label = format!("{}\\n{}", escape(&head), escape(&stats));
        let _ = writeln!(
            out,
            "  {} -> {} [label=\"{label}\", {style}];",
            quote(&e.source),
            quote(&destination_node(e))
        );
    }
    out.push_str("}\n");
    out
}

/// Lays out `dot_text` with `program -Tsvg` (normally [`DOT_PROGRAM`]) and returns the SVG.
pub async fn svg(dot_text: &str, program: &str) -> Result<String, Error> {
    let io = |source| Error::Io {
        program: program.to_owned(),
        source,
    };
    let mut child = tokio::process::Command::new(program)
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::GraphvizMissing {
                program: program.to_owned(),
            },
            _ => io(e),
        })?;
    let stdin = child.stdin.take();
    // Feed stdin while waiting for the output: a big graph could fill both pipes otherwise.
    // Dropping stdin at the end closes it, which tells dot the graph is complete.
    let feed = async move {
        if let Some(mut stdin) = stdin {
            stdin.write_all(dot_text.as_bytes()).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let run = async { tokio::join!(feed, child.wait_with_output()) };
    let (fed, output) = tokio::time::timeout(RENDER_TIMEOUT, run)
        .await
        .map_err(|_| Error::Timeout {
            program: program.to_owned(),
            timeout: RENDER_TIMEOUT,
        })?;
    let output = output.map_err(io)?;
    if !output.status.success() {
        return Err(Error::Render {
            program: program.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    // A failed write with a successful exit would mean dot rendered half a graph.
    fed.map_err(io)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fetches the graph over `window` and renders it as `output`.
pub async fn show(
    client: &mesh_client::registry::Client,
    window: Duration,
    output: Output,
) -> anyhow::Result<String> {
    let t = client.get_topology(window.as_secs()).await?;
    if t.edges.is_empty() && output == Output::Table {
        let window = ctl::short_duration(Duration::from_secs(t.window_seconds));
        eprintln!("no traffic reported in the last {window}");
    }
    Ok(match output {
        Output::Table => table(&t),
        Output::Json => json(&t),
        Output::Dot => dot(&t),
        Output::Svg => svg(&dot(&t), DOT_PROGRAM).await?,
    })
}

// === formatting ===

/// A DOT string literal: quoted, with `"` and `\` escaped (service names hold `/`, which a
/// bare DOT id may not).
fn quote(s: &str) -> String {
    format!("\"{}\"", escape(s))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Requests per second with precision where it matters: `1234`, `12.3`, `0.42`, `<0.01`.
fn rate(rps: f64) -> String {
    match rps {
        r if r >= 100.0 => format!("{r:.0}"),
        r if r >= 10.0 => format!("{r:.1}"),
        r if r >= 0.01 => format!("{r:.2}"),
        r if r > 0.0 => "<0.01".to_owned(),
        _ => "0".to_owned(),
    }
}

/// Errors as a percentage of requests, from the counts (`<0.01%` rather than a misleading
/// `0.00%` when there were some).
fn error_percent(e: &pb::Edge) -> String {
    if e.requests == 0 || e.errors == 0 {
        return "0%".to_owned();
    }
    let pct = e.errors as f64 * 100.0 / e.requests as f64;
    if pct < 0.01 {
        "<0.01%".to_owned()
    } else {
        format!("{pct:.2}%")
    }
}

/// Only HTTP edges with requests have durations; TCP counts connections.
fn has_latency(e: &pb::Edge) -> bool {
    !e.protocol.eq_ignore_ascii_case("tcp") && e.requests > 0
}

fn latency(e: &pb::Edge, value: f64) -> String {
    if has_latency(e) {
        ms(value)
    } else {
        "-".to_owned()
    }
}

/// `0.8ms`, `45ms`, `1.25s`.
fn ms(v: f64) -> String {
    match v {
        v if v >= 1000.0 => format!("{:.2}s", v / 1000.0),
        v if v >= 10.0 => format!("{v:.0}ms"),
        v => format!("{v:.1}ms"),
    }
}

#[cfg(test)]
mod tests;
