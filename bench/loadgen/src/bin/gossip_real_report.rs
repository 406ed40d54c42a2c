//! `gossip-real-report`: when did each meshd of `bench/gossip_real.sh` first log a gossip view
//! event after a moment `--since` (a node killed, a service added): from every node's log, the
//! first line with `--message` whose `--field` is at least (or at most) `--value`. Prints
//! `reached total max_ms median_ms` (delays from `--since`), or, with `--count`, only how many
//! logs have such a line yet. See BENCHMARKS.md ("Gossip at scale"); never run by CI.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Parser;

/// First matching log line per node, after a moment.
#[derive(Parser, Debug)]
#[command(name = "gossip-real-report", version)]
struct Args {
    /// The message, e.g. "mesh membership changed" or "mesh view changed".
    #[arg(long)]
    message: String,
    /// The numeric field, e.g. `members` or `services`.
    #[arg(long)]
    field: String,
    /// The value the field must reach.
    #[arg(long)]
    value: u64,
    /// The field must be at most `--value` (a member gone), not at least (one added).
    #[arg(long)]
    at_most: bool,
    /// Unix seconds (bash `$EPOCHREALTIME`): only lines logged after it count.
    #[arg(long)]
    since: f64,
    /// Only print how many logs have such a line.
    #[arg(long)]
    count: bool,
    /// meshd logs, one per node (plain text, as meshd writes to stderr).
    #[arg(required = true)]
    logs: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut delays = Vec::new();
    for log in &args.logs {
        if let Some(t) = first(log, &args)? {
            delays.push((t - args.since) * 1000.0);
        }
    }
    if args.count {
        println!("{}", delays.len());
        return Ok(());
    }
    delays.sort_by(f64::total_cmp);
    let max = delays.last().copied().unwrap_or(f64::NAN);
    let median = delays.get(delays.len().saturating_sub(1) / 2).copied();
    println!(
        "{} {} {:.0} {:.0}",
        delays.len(),
        args.logs.len(),
        max,
        median.unwrap_or(f64::NAN)
    );
    Ok(())
}

/// When `path` first logged a matching line after `args.since` (Unix seconds).
fn first(path: &Path, args: &Args) -> anyhow::Result<Option<f64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let key = format!("{}=", args.field);
    for line in text.lines() {
        let Some(at) = line.find(&args.message) else {
            continue;
        };
        let value = line[at + args.message.len()..]
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key.as_str()))
            .and_then(|v| v.parse::<u64>().ok());
        let Some(value) = value else { continue };
        let reached = if args.at_most {
            value <= args.value
        } else {
            value >= args.value
        };
        if !reached {
            continue;
        }
        let stamp = line.split_whitespace().next().unwrap_or_default();
        let t = humantime::parse_rfc3339(stamp)
            .with_context(|| format!("{}: bad timestamp {stamp:?}", path.display()))?;
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .context("time before 1970")?
            .as_secs_f64();
        if secs > args.since {
            return Ok(Some(secs));
        }
    }
    Ok(None)
}
