//! `propagation-report`: turns the apply timestamps recorded by `bench/propagation.sh` and the
//! registry's and every meshd's log into policy propagation delays (apply acknowledged →
//! revision enforced on each node). `--count-applied` is the script's "are all nodes there yet"
//! check. See BENCHMARKS.md ("Policy"); never run by CI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, bail};
use clap::Parser;

/// Message meshd logs (info) after persisting a revision, just before publishing it to the
/// proxy (meshd/src/discovery.rs).
const NODE_MESSAGE: &str = "policy revision applied";
/// Message the registry logs (info) once a revision is durable, just before pushing it to the
/// watch streams (registry/src/api/policy.rs).
const REGISTRY_MESSAGE: &str = "policy revision committed";

/// Propagation delays from `propagation.sh`'s apply log and the node logs.
#[derive(Parser, Debug)]
#[command(name = "propagation-report", version)]
struct Args {
    /// Tab-separated lines `iteration revision start ack`: start and ack are Unix times in
    /// seconds (bash `$EPOCHREALTIME`) just before `meshctl apply` ran and just after it
    /// returned.
    #[arg(long)]
    applies: Option<PathBuf>,
    /// The registry's log (for the commit times).
    #[arg(long)]
    registry_log: Option<PathBuf>,
    /// Label of this run in the output, e.g. "N=100".
    #[arg(long, default_value = "")]
    label: String,
    /// Write every (node, iteration) delay as TSV here.
    #[arg(long)]
    raw: Option<PathBuf>,
    /// Only print how many of the node logs show a revision at or above this one, and exit.
    #[arg(long)]
    count_applied: Option<u64>,
    /// meshd logs, one per node.
    #[arg(required = true)]
    node_logs: Vec<PathBuf>,
}

struct Apply {
    iteration: u32,
    revision: u64,
    start: f64,
    ack: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nodes: Vec<(String, Vec<(u64, f64)>)> = args
        .node_logs
        .iter()
        .map(|p| Ok((node_name(p), events(p, NODE_MESSAGE)?)))
        .collect::<anyhow::Result<_>>()?;
    if let Some(rev) = args.count_applied {
        let n = nodes
            .iter()
            .filter(|(_, ev)| ev.iter().any(|(r, _)| *r >= rev))
            .count();
        println!("{n}");
        return Ok(());
    }
    let applies = read_applies(args.applies.as_deref().context("--applies is required")?)?;
    let committed: BTreeMap<u64, f64> = match &args.registry_log {
        Some(p) => events(p, REGISTRY_MESSAGE)?.into_iter().collect(),
        None => BTreeMap::new(),
    };

    let mut from_ack = Vec::new(); // per (node, iteration), ms
    let mut from_start = Vec::new();
    let mut from_commit = Vec::new();
    let mut last_from_ack = Vec::new(); // per iteration: the slowest node
    let mut command = Vec::new(); // meshctl apply wall time
    let mut commit_to_ack = Vec::new();
    let mut missing = Vec::new();
    let mut raw = String::from("iteration\trevision\tnode\tfrom_ack_ms\tfrom_commit_ms\n");
    for a in &applies {
        let commit = committed.get(&a.revision).copied();
        command.push((a.ack - a.start) * 1e3);
        if let Some(c) = commit {
            commit_to_ack.push((a.ack - c) * 1e3);
        }
        let mut slowest = f64::NEG_INFINITY;
        for (name, ev) in &nodes {
            // Enforced once any revision at or above this one is in force (a node resynced
            // with a full snapshot may skip revisions).
            let Some(&(_, t)) = ev.iter().find(|(r, _)| *r >= a.revision) else {
                missing.push(format!("{name}@{}", a.revision));
                continue;
            };
            let d = (t - a.ack) * 1e3;
            from_ack.push(d);
            from_start.push((t - a.start) * 1e3);
            slowest = slowest.max(d);
            let dc = commit.map(|c| (t - c) * 1e3);
            if let Some(dc) = dc {
                from_commit.push(dc);
            }
            let _ = writeln!(
                raw,
                "{}\t{}\t{name}\t{d:.3}\t{}",
                a.iteration,
                a.revision,
                dc.map_or_else(String::new, |v| format!("{v:.3}"))
            );
        }
        if slowest.is_finite() {
            last_from_ack.push(slowest);
        }
    }
    if let Some(p) = &args.raw {
        std::fs::write(p, raw).with_context(|| format!("writing {}", p.display()))?;
    }

    let row = |what: &str, v: &mut Vec<f64>| {
        if v.is_empty() {
            return format!("| {} | {what} | — | — | — | — | 0 |\n", args.label);
        }
        v.sort_by(f64::total_cmp);
        format!(
            "| {} | {what} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            args.label,
            pct(v, 0.50),
            pct(v, 0.99),
            v[v.len() - 1],
            v[0],
            v.len()
        )
    };
    let mut out = String::new();
    out += &row("ack → enforced, every (node, apply)", &mut from_ack);
    out += &row(
        "ack → enforced on the last node, per apply",
        &mut last_from_ack,
    );
    out += &row(
        "registry commit → enforced, every (node, apply)",
        &mut from_commit,
    );
    out += &row("registry commit → ack", &mut commit_to_ack);
    out += &row(
        "`meshctl apply` started → enforced, every (node, apply)",
        &mut from_start,
    );
    out += &row("`meshctl apply` wall time", &mut command);
    print!("{out}");
    if !missing.is_empty() {
        bail!(
            "{} (node, revision) pairs never enforced: {}",
            missing.len(),
            missing
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], q: f64) -> f64 {
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The node's directory name (`<dir>/node-007/meshd.log` → `node-007`), else the file stem.
fn node_name(p: &Path) -> String {
    let by_dir = p.parent().and_then(Path::file_name);
    let name = if p.file_name().is_some_and(|f| f == "meshd.log") {
        by_dir
    } else {
        p.file_stem()
    };
    name.map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Every `(revision, unix seconds)` of lines with `message` in the plain-text log at `path`:
/// `2026-11-22T02:31:19.123456Z  INFO span: target: <message> revision=7 ...`.
fn events(path: &Path, message: &str) -> anyhow::Result<Vec<(u64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find(message) else {
            continue;
        };
        let fields = &line[at + message.len()..];
        let Some(rev) = fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix("revision="))
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let stamp = line.split_whitespace().next().unwrap_or_default();
        let t = humantime::parse_rfc3339(stamp)
            .with_context(|| format!("{}: bad timestamp {stamp:?}", path.display()))?;
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .context("time before 1970")?
            .as_secs_f64();
        out.push((rev, secs));
    }
    Ok(out)
}

fn read_applies(path: &Path) -> anyhow::Result<Vec<Apply>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let [iteration, revision, start, ack] = f[..] else {
                bail!("{}: expected 4 tab-separated fields: {l:?}", path.display());
            };
            Ok(Apply {
                iteration: iteration.parse()?,
                revision: revision.parse()?,
                start: start.parse()?,
                ack: ack.parse()?,
            })
        })
        .collect()
}
