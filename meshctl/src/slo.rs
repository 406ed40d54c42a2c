//! `meshctl slo status`: every SLO the registry evaluates — its indicator over the window, the
//! error budget left, the burn rates of the multiwindow alert pairs (5m/1h fast, 30m/6h slow)
//! and whether an alert fires — as a table or JSON. A view: it exits 0 while alerts fire;
//! `meshctl check` is the command that fails on them. Rendering is pure; the registry computes
//! every number.

use std::time::{Duration, UNIX_EPOCH};

use mesh_api::proto::v1 as pb;
use serde_json::{Value, json};

use crate as ctl;
use mesh_client::registry as control;

/// The registry's alert states (`SloStatus.alert`).
pub const ALERT_OK: &str = "ok";
/// Budget burning fast enough to be gone within hours: page someone.
pub const ALERT_FAST_BURN: &str = "fast_burn";
/// Budget burning faster than the goal allows, slowly: a ticket.
pub const ALERT_SLOW_BURN: &str = "slow_burn";

/// How `meshctl slo status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One row per SLO.
    Table,
    /// Every field the registry sent, per SLO.
    Json,
}

/// The SLOs in display order: by name (the registry's order breaks ties).
pub fn sorted(slos: &[pb::SloStatus]) -> Vec<&pb::SloStatus> {
    let mut v: Vec<&pb::SloStatus> = slos.iter().collect();
    v.sort_by(|a, b| a.slo.cmp(&b.slo));
    v
}

/// `SLO SERVICE OBJECTIVE GOAL WINDOW SLI BUDGET LEFT BURN 5M/1H BURN 30M/6H ALERT`; `now` (Unix
/// seconds) dates the alerts.
pub fn table(slos: &[pb::SloStatus], now_unix: i64) -> String {
    let rows: Vec<Vec<String>> = sorted(slos)
        .into_iter()
        .map(|s| {
            vec![
                name(&s.slo).to_owned(),
                s.service.clone(),
                s.objective.clone(),
                percent(s.goal),
                s.window.clone(),
                percent(s.sli),
                format!("{:.1}%", s.budget_remaining * 100.0),
                format!("{}/{}", burn(s.burn_5m), burn(s.burn_1h)),
                format!("{}/{}", burn(s.burn_30m), burn(s.burn_6h)),
                alert(s, now_unix),
            ]
        })
        .collect();
    ctl::columns(
        &[
            "SLO",
            "SERVICE",
            "OBJECTIVE",
            "GOAL",
            "WINDOW",
            "SLI",
            "BUDGET LEFT",
            "BURN 5M/1H",
            "BURN 30M/6H",
            "ALERT",
        ],
        &rows,
    )
}

/// `{"slos": [{…}, …]}` with the API's field names.
pub fn json(slos: &[pb::SloStatus]) -> String {
    let list: Vec<Value> = sorted(slos)
        .into_iter()
        .map(|s| {
            json!({
                "slo": s.slo,
                "service": s.service,
                "objective": s.objective,
                "goal": s.goal,
                "window": s.window,
                "total": s.total,
                "good": s.good,
                "sli": s.sli,
                "budget_remaining": s.budget_remaining,
                "burn_5m": s.burn_5m,
                "burn_30m": s.burn_30m,
                "burn_1h": s.burn_1h,
                "burn_6h": s.burn_6h,
                "alert": s.alert,
                "alert_since_unix": s.alert_since_unix,
            })
        })
        .collect();
    let mut out =
        serde_json::to_string_pretty(&json!({ "slos": list })).expect("JSON values serialise");
    out.push('\n');
    out
}

/// The alert column: `ok`, or `FAST BURN` / `SLOW BURN` with when it started and for how long.
pub fn alert(s: &pb::SloStatus, now_unix: i64) -> String {
    let state = match s.alert.as_str() {
        "" | ALERT_OK => return ALERT_OK.to_owned(),
        ALERT_FAST_BURN => "FAST BURN".to_owned(),
        ALERT_SLOW_BURN => "SLOW BURN".to_owned(),
        // A state this meshctl does not know yet: still loud.
        other => other.replace('_', " ").to_uppercase(),
    };
    if s.alert_since_unix <= 0 {
        return state;
    }
    let at = UNIX_EPOCH + Duration::from_secs(s.alert_since_unix.unsigned_abs());
    let age = Duration::from_secs((now_unix - s.alert_since_unix).max(0).unsigned_abs());
    format!(
        "{state} since {} ({})",
        humantime::format_rfc3339_seconds(at),
        ctl::short_duration(age)
    )
}

/// Fetches the status and renders it.
pub async fn status(client: &control::Client, output: Output) -> anyhow::Result<String> {
    let slos = client.get_slo_status().await?.slos;
    if slos.is_empty() && output == Output::Table {
        eprintln!("no SLO resources (meshctl apply -f a file with kind = \"SLO\")");
    }
    Ok(match output {
        Output::Table => table(&slos, ctl::now_unix()),
        Output::Json => json(&slos),
    })
}

// === formatting ===

/// `SLO/shop/api` → `shop/api`: the column already says SLO.
fn name(slo: &str) -> &str {
    slo.strip_prefix("SLO/").unwrap_or(slo)
}

/// A percentage with up to three decimals and no trailing zeros: `99.5%`, `99.873%`, `100%`.
fn percent(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// A burn rate: one decimal below 10 (where 1 is the line that matters), whole above.
fn burn(v: f64) -> String {
    // 9.96 would print as "10.0" with one decimal.
    if v >= 9.95 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests;
