//! `meshctl check`: one verdict on the whole mesh, for people and for scripts. [`gather`] asks
//! the registry for the joined nodes, every node's last report, the stored policy resources and
//! the SLO status; [`evaluate`] (pure) turns them into one [`Finding`] per check; [`render`]
//! prints one line per check with the failing nodes under it and [`exit_code`] gives 0 (all
//! ok), 1 (something failed) or 2 (only warnings).
//!
//! The checks: the registry answers; every joined node reported within N of its report
//! periods; the registry's root and intermediate CA certificates have not expired (fail) and
//! do not expire within [`CA_CERT_WARN`] (warn); no reported certificate has expired (fail) or
//! expires within the warning time (warn); node clocks are within the allowed skew of the
//! registry's; gossip converged (every reporting node has the same member digest and as many
//! members as there are reporting nodes); every reporting node enforces the registry's policy
//! and keyring revisions; no node reports a warning (a listener off loopback, ...: warns);
//! every stored policy resource validates; no SLO alert fires (fast burn fails, slow burn
//! warns).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::policy::Resource;
use mesh_api::proto::v1 as pb;

use crate as ctl;
use crate::slo;
use mesh_client::registry as control;

mod sites;
use sites::{follow, peers};

/// `--cert-warn`: certificates expiring sooner than this are a warning. meshd renews at
/// half-life (a 24 h workload certificate with 12 h left, a 30-day node certificate with 15 days
/// left), so one with under 2 h left has failed to renew for hours: a week would flag every
/// healthy workload certificate.
pub const DEFAULT_CERT_WARN: Duration = Duration::from_secs(2 * 3600);
/// The registry's root or intermediate CA certificate expiring sooner than this is a warning:
/// nothing renews them, and replacing one takes planning, so a month's notice.
pub const CA_CERT_WARN: Duration = Duration::from_secs(30 * 24 * 3600);
/// `--max-skew`: the largest node clock offset from the registry's that passes.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(2);
/// `--stale`: a node is stale after this many of its report periods without a report.
pub const DEFAULT_STALE_PERIODS: f64 = 3.0;
/// The period assumed for a report that states none (a node's first report covers no period).
pub const FALLBACK_REPORT_PERIOD: Duration = Duration::from_secs(10);

/// How bad a finding is; ordered, so the worst of several is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Healthy.
    Ok,
    /// Needs attention soon; `meshctl check` exits 2 when nothing is worse.
    Warn,
    /// Broken; `meshctl check` exits 1.
    Fail,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The registry answered every call.
    Registry,
    /// Every joined node reports.
    Reports,
    /// Expiry of the registry's CA certificates.
    Ca,
    /// Certificate expiry.
    Certificates,
    /// Clock skew.
    Clocks,
    /// Gossip convergence.
    Gossip,
    /// Policy and keyring revisions.
    Config,
    /// Warnings the nodes report.
    Warnings,
    /// Stored policy resources validate.
    Policies,
    /// SLO alerts.
    Slos,
    /// A secondary site's registry following the primary for policy.
    Follow,
    /// Importing the other sites' revocations (`[[peers]]`).
    Peers,
}

/// The outcome of one check: a one-line summary and, when not ok, one line per culprit.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Which check.
    pub check: Check,
    /// How bad.
    pub severity: Severity,
    /// One line.
    pub summary: String,
    /// One line per failing node, certificate, resource or SLO.
    pub details: Vec<String>,
}

/// The limits the checks apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Certificates valid for this long or less are a warning.
    pub cert_warn: Duration,
    /// Node clocks may be this far from the registry's.
    pub max_skew: Duration,
    /// A report older than this many of its periods is stale (at least 1).
    pub stale_periods: f64,
}

/// Everything `evaluate` judges; each call's answer or why it failed.
#[derive(Debug, Clone)]
pub struct CheckInputs {
    /// The registry's address, for messages.
    pub registry: String,
    /// `ListNodes`: every node that joined.
    pub nodes: Result<Vec<pb::NodeRecord>, String>,
    /// `GetNodeReports`: every node's last report and the registry's revisions, clock and CA
    /// certificates.
    pub reports: Result<pb::NodeReportsResponse, String>,
    /// `GetResources`: every stored policy resource.
    pub resources: Result<Vec<pb::Resource>, String>,
    /// `GetSloStatus`.
    pub slos: Result<Vec<pb::SloStatus>, String>,
}

/// A node with a report.
struct Reporting<'a> {
    node: &'a str,
    state: &'a pb::NodeReportState,
    report: &'a pb::NodeReport,
}

// === impl Check ===

impl Check {
    /// The name printed in front of the finding.
    pub fn name(self) -> &'static str {
        match self {
            Self::Registry => "registry",
            Self::Reports => "reports",
            Self::Ca => "ca",
            Self::Certificates => "certificates",
            Self::Clocks => "clocks",
            Self::Gossip => "gossip",
            Self::Config => "config",
            Self::Warnings => "warnings",
            Self::Policies => "policies",
            Self::Slos => "slos",
            Self::Follow => "follow",
            Self::Peers => "peers",
        }
    }
}

// === impl Finding ===

impl Finding {
    fn new(check: Check, severity: Severity, summary: impl Into<String>) -> Self {
        Self {
            check,
            severity,
            summary: summary.into(),
            details: Vec::new(),
        }
    }

    fn with(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
}

// === impl Thresholds ===

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            cert_warn: DEFAULT_CERT_WARN,
            max_skew: DEFAULT_MAX_SKEW,
            stale_periods: DEFAULT_STALE_PERIODS,
        }
    }
}

/// Parses `--stale`: a multiple of the report period, `3x` or `3` (at least 1; fractions such
/// as `1.5x` are fine).
pub fn parse_stale(s: &str) -> Result<f64, String> {
    let n = s.strip_suffix(['x', 'X']).unwrap_or(s);
    match n.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 1.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a multiple of the report period of at least 1, e.g. 3x or 1.5x"
        )),
    }
}

// === evaluation (pure) ===

/// The verdict: one finding per check, in a fixed order. `now` judges certificate expiry;
/// staleness is judged on the registry's clock (`now_unix_ms` of the reports), which is the
/// clock `received_unix_ms` was read from. Checks whose call failed are left out; the
/// registry finding says which calls failed.
pub fn evaluate(inputs: &CheckInputs, now: SystemTime, t: &Thresholds) -> Vec<Finding> {
    let now_unix = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut out = vec![registry(inputs)];
    if let Ok(reports) = &inputs.reports {
        let registry_now_ms = match reports.now_unix_ms {
            0 => now_unix as u64 * 1000,
            ms => ms,
        };
        let mut all: Vec<Reporting<'_>> = (reports.nodes.iter())
            .filter_map(|state| {
                (state.report.as_ref()).map(|report| Reporting {
                    node: &state.node,
                    state,
                    report,
                })
            })
            .collect();
        all.sort_by(|a, b| a.node.cmp(b.node));
        let fresh: Vec<&Reporting<'_>> = (all.iter())
            .filter(|r| age_ms(r, registry_now_ms) <= stale_after_ms(r, t))
            .collect();
        if let Ok(nodes) = &inputs.nodes {
            out.push(reporting(nodes, &all, registry_now_ms, t));
        }
        out.push(ca_certificates(reports, now_unix));
        out.push(certificates(&all, now_unix, t));
        out.push(clocks(&fresh, t));
        out.push(gossip(&fresh));
        out.push(config(&fresh, reports));
        out.push(warnings(&all));
        if let Some(f) = &reports.follow {
            out.push(follow(f, now_unix));
        }
        if !reports.peers.is_empty() {
            out.push(peers(&reports.peers, now_unix));
        }
    }
    if let Ok(resources) = &inputs.resources {
        out.push(policies(resources));
    }
    if let Ok(slos) = &inputs.slos {
        out.push(slo_alerts(slos, now_unix));
    }
    out
}

/// 0 when every finding is ok, 1 when any failed, 2 when the worst is a warning.
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.severity).max() {
        None | Some(Severity::Ok) => 0,
        Some(Severity::Fail) => 1,
        Some(Severity::Warn) => 2,
    }
}

fn registry(inputs: &CheckInputs) -> Finding {
    let calls = [
        ("ListNodes", inputs.nodes.as_ref().err()),
        ("GetNodeReports", inputs.reports.as_ref().err()),
        ("GetResources", inputs.resources.as_ref().err()),
        ("GetSloStatus", inputs.slos.as_ref().err()),
    ];
    // Calls that failed the same way (an unreachable registry fails them all) share a line.
    let mut failed: Vec<(Vec<&str>, &String)> = Vec::new();
    for (rpc, e) in calls {
        let Some(e) = e else { continue };
        match failed.iter_mut().find(|(_, seen)| *seen == e) {
            Some((rpcs, _)) => rpcs.push(rpc),
            None => failed.push((vec![rpc], e)),
        }
    }
    let addr = &inputs.registry;
    if failed.is_empty() {
        return Finding::new(
            Check::Registry,
            Severity::Ok,
            format!("registry at {addr} answers"),
        );
    }
    let count: usize = failed.iter().map(|(rpcs, _)| rpcs.len()).sum();
    Finding::new(
        Check::Registry,
        Severity::Fail,
        format!(
            "registry at {addr}: {count} of {} calls failed; the checks that need them were \
             skipped",
            calls.len()
        ),
    )
    .with(
        (failed.into_iter())
            .map(|(rpcs, e)| format!("{}: {e}", rpcs.join(", ")))
            .collect(),
    )
}

fn age_ms(r: &Reporting<'_>, registry_now_ms: u64) -> u64 {
    registry_now_ms.saturating_sub(r.state.received_unix_ms)
}

fn period_ms(r: &Reporting<'_>) -> u64 {
    match r.report.period_ms {
        0 => FALLBACK_REPORT_PERIOD.as_millis() as u64,
        ms => ms,
    }
}

fn stale_after_ms(r: &Reporting<'_>, t: &Thresholds) -> u64 {
    (period_ms(r) as f64 * t.stale_periods.max(1.0)) as u64
}

fn ms(ms: u64) -> String {
    ctl::short_duration(Duration::from_millis(ms))
}

fn reporting(
    nodes: &[pb::NodeRecord],
    all: &[Reporting<'_>],
    registry_now_ms: u64,
    t: &Thresholds,
) -> Finding {
    if nodes.is_empty() {
        return Finding::new(
            Check::Reports,
            Severity::Warn,
            "no node has joined the registry yet",
        );
    }
    let mut names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut details = Vec::new();
    for name in &names {
        let Some(r) = all.iter().find(|r| r.node == *name) else {
            details.push(format!("{name}: never reported"));
            continue;
        };
        let (age, limit) = (age_ms(r, registry_now_ms), stale_after_ms(r, t));
        if age > limit {
            details.push(format!(
                "{name}: stale: last report {} ago, reports every {} (stale after {})",
                ms(age),
                ms(period_ms(r)),
                ms(limit)
            ));
        }
    }
    let periods = t.stale_periods;
    if details.is_empty() {
        Finding::new(
            Check::Reports,
            Severity::Ok,
            format!(
                "{} reported within {periods}x their report period",
                plural(names.len(), "joined node")
            ),
        )
    } else {
        Finding::new(
            Check::Reports,
            Severity::Fail,
            format!(
                "not reporting within {periods}x their report period: {} of {}",
                details.len(),
                plural(names.len(), "joined node")
            ),
        )
        .with(details)
    }
}

/// Expired and soon-expiring certificates, one line each.
#[derive(Default)]
struct Expiries {
    expired: Vec<String>,
    expiring: Vec<String>,
}

impl Expiries {
    /// Files `what` under expired (its `notAfter` is past) or expiring (at most `warn` left).
    fn judge(&mut self, what: &str, not_after_unix: i64, now_unix: i64, warn: Duration) {
        let left = not_after_unix - now_unix;
        let at = rfc3339(not_after_unix);
        let d = ctl::short_duration(Duration::from_secs(left.unsigned_abs()));
        if left < 0 {
            self.expired.push(format!("{what} expired {d} ago ({at})"));
        } else if left <= warn.as_secs() as i64 {
            self.expiring.push(format!("{what} expires in {d} ({at})"));
        }
    }

    /// Ok with `ok` as summary when nothing was filed; a warning when only expiring ones were;
    /// failed when any expired. The lines list the expired ones first.
    fn finding(self, check: Check, warn: Duration, noun: &str, ok: String) -> Finding {
        let warn = ctl::short_duration(warn);
        let (severity, summary) = match (self.expired.len(), self.expiring.len()) {
            (0, 0) => (Severity::Ok, ok),
            (0, n) => (
                Severity::Warn,
                format!("expiring within {warn}: {}", plural(n, noun)),
            ),
            (n, 0) => (Severity::Fail, format!("expired: {}", plural(n, noun))),
            (n, m) => (
                Severity::Fail,
                format!(
                    "expired: {}; expiring within {warn}: {m} more",
                    plural(n, noun)
                ),
            ),
        };
        let mut details = self.expired;
        details.extend(self.expiring);
        Finding::new(check, severity, summary).with(details)
    }
}

/// The registry's CA certificates against [`CA_CERT_WARN`], on the operator's clock like the
/// node certificates.
fn ca_certificates(reports: &pb::NodeReportsResponse, now_unix: i64) -> Finding {
    let certs = &reports.ca_certificates;
    if certs.is_empty() {
        return Finding::new(
            Check::Ca,
            Severity::Warn,
            "the registry did not say when its CA certificates expire (a registry older than \
             meshctl?)",
        );
    }
    let mut judged = Expiries::default();
    for c in certs {
        judged.judge(&c.kind, c.not_after_unix, now_unix, CA_CERT_WARN);
    }
    let until: Vec<String> = (certs.iter())
        .map(|c| format!("{} until {}", c.kind, rfc3339(c.not_after_unix)))
        .collect();
    let ok = format!(
        "valid for more than {}: {}",
        ctl::short_duration(CA_CERT_WARN),
        until.join(", ")
    );
    judged.finding(Check::Ca, CA_CERT_WARN, "CA certificate", ok)
}

fn certificates(all: &[Reporting<'_>], now_unix: i64, t: &Thresholds) -> Finding {
    let (mut judged, mut total) = (Expiries::default(), 0);
    for r in all {
        for c in &r.report.certificates {
            total += 1;
            let what = format!("{}: {}", r.node, c.identity);
            judged.judge(&what, c.not_after_unix, now_unix, t.cert_warn);
        }
    }
    let ok = format!(
        "valid for more than {}: {} on {}",
        ctl::short_duration(t.cert_warn),
        plural(total, "certificate"),
        plural(all.len(), "node")
    );
    judged.finding(Check::Certificates, t.cert_warn, "certificate", ok)
}

fn clocks(fresh: &[&Reporting<'_>], t: &Thresholds) -> Finding {
    let max = t.max_skew.as_millis() as i64;
    let details: Vec<String> = (fresh.iter())
        .filter(|r| r.state.clock_skew_ms.abs() > max)
        .map(|r| {
            let skew = r.state.clock_skew_ms;
            let dir = if skew > 0 { "ahead of" } else { "behind" };
            format!(
                "{}: clock {:.1}s {dir} the registry's",
                r.node,
                skew.unsigned_abs() as f64 / 1000.0
            )
        })
        .collect();
    let limit = ctl::short_duration(t.max_skew);
    if details.is_empty() {
        Finding::new(
            Check::Clocks,
            Severity::Ok,
            format!(
                "within {limit} of the registry's clock: {}",
                plural(fresh.len(), "reporting node")
            ),
        )
    } else {
        Finding::new(
            Check::Clocks,
            Severity::Fail,
            format!(
                "off by more than {limit} from the registry's clock: {} (certificate validity \
                 and report ages depend on clocks)",
                plural(details.len(), "node")
            ),
        )
        .with(details)
    }
}

fn gossip(fresh: &[&Reporting<'_>]) -> Finding {
    let n = fresh.len();
    let mut views: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in fresh {
        views
            .entry(r.report.members_digest.as_str())
            .or_default()
            .push(r.node);
    }
    let mut details = Vec::new();
    if views.len() > 1 {
        for (digest, holders) in &views {
            let digest = if digest.is_empty() { "(none)" } else { digest };
            let short: String = digest.chars().take(12).collect();
            details.push(format!("view {short} held by {}", holders.join(", ")));
        }
    }
    for r in fresh.iter().filter(|r| r.report.members as usize != n) {
        details.push(format!(
            "{}: sees {} live members, {n} nodes are reporting",
            r.node, r.report.members
        ));
    }
    if details.is_empty() {
        Finding::new(
            Check::Gossip,
            Severity::Ok,
            format!(
                "converged: {} with the same view of {}",
                plural(n, "reporting node"),
                plural(n, "member")
            ),
        )
    } else {
        let summary = if views.len() > 1 {
            format!("not converged: {} different member views", views.len())
        } else {
            "not converged: member counts differ from the reporting nodes".to_owned()
        };
        Finding::new(Check::Gossip, Severity::Fail, summary).with(details)
    }
}

fn config(fresh: &[&Reporting<'_>], reports: &pb::NodeReportsResponse) -> Finding {
    let (policy, keyring) = (reports.policy_revision, reports.keyring_revision);
    let mut details = Vec::new();
    for r in fresh {
        let mut off = Vec::new();
        if r.report.policy_revision != policy {
            off.push(format!("policy revision {}", r.report.policy_revision));
        }
        if r.report.keyring_revision != keyring {
            off.push(format!("keyring revision {}", r.report.keyring_revision));
        }
        if !off.is_empty() {
            details.push(format!("{}: {}", r.node, off.join(", ")));
        }
    }
    let current = format!("policy revision {policy}, keyring revision {keyring}");
    if details.is_empty() {
        Finding::new(
            Check::Config,
            Severity::Ok,
            format!(
                "at the registry's {current}: {}",
                plural(fresh.len(), "reporting node")
            ),
        )
    } else {
        Finding::new(
            Check::Config,
            Severity::Fail,
            format!(
                "not at the registry's {current}: {} (nodes catch up within a report period \
                 of a change)",
                plural(details.len(), "node")
            ),
        )
        .with(details)
    }
}

/// The warnings of each node's last report, one line each (a stale node's too: they are the
/// last word on it).
fn warnings(all: &[Reporting<'_>]) -> Finding {
    let details: Vec<String> = (all.iter())
        .flat_map(|r| {
            (r.report.warnings.iter()).map(|w| format!("{}: {}: {}", r.node, w.code, w.message))
        })
        .collect();
    let nodes = all.iter().filter(|r| !r.report.warnings.is_empty()).count();
    if details.is_empty() {
        Finding::new(
            Check::Warnings,
            Severity::Ok,
            format!("none from {}", plural(all.len(), "reporting node")),
        )
    } else {
        Finding::new(
            Check::Warnings,
            Severity::Warn,
            format!(
                "{} from {}",
                plural(details.len(), "warning"),
                plural(nodes, "node")
            ),
        )
        .with(details)
    }
}

fn policies(resources: &[pb::Resource]) -> Finding {
    let live: Vec<&pb::Resource> = resources.iter().filter(|r| !r.deleted).collect();
    let mut bad = 0;
    let mut details = Vec::new();
    for r in &live {
        if let Err(problems) = Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
            bad += 1;
            // Each problem names the resource (`Kind/ns/name`) and the key.
            details.extend(problems.iter().map(ToString::to_string));
        }
    }
    if bad == 0 {
        Finding::new(
            Check::Policies,
            Severity::Ok,
            format!("valid: {}", plural(live.len(), "stored policy resource")),
        )
    } else {
        Finding::new(
            Check::Policies,
            Severity::Fail,
            format!(
                "not valid: {bad} of {} (fix with meshctl apply -f, or meshctl delete)",
                plural(live.len(), "stored policy resource")
            ),
        )
        .with(details)
    }
}

fn slo_alerts(slos: &[pb::SloStatus], now_unix: i64) -> Finding {
    let firing: Vec<&pb::SloStatus> = (slo::sorted(slos).into_iter())
        .filter(|s| !matches!(s.alert.as_str(), "" | slo::ALERT_OK))
        .collect();
    let details: Vec<String> = (firing.iter())
        .map(|s| format!("{}: {}", s.slo, slo::alert(s, now_unix)))
        .collect();
    let fast = (firing.iter())
        .filter(|s| s.alert != slo::ALERT_SLOW_BURN)
        .count();
    let (severity, summary) = match (firing.len(), fast) {
        (0, _) => (
            Severity::Ok,
            format!("no alert firing ({})", plural(slos.len(), "SLO")),
        ),
        (n, 0) => (
            Severity::Warn,
            format!("slow burn: {} (meshctl slo status)", plural(n, "SLO")),
        ),
        (n, f) => (
            Severity::Fail,
            format!(
                "alerting: {}, {f} burning fast (meshctl slo status)",
                plural(n, "SLO")
            ),
        ),
    };
    Finding::new(Check::Slos, severity, summary).with(details)
}

/// `1 node`, `3 nodes`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn rfc3339(unix: i64) -> String {
    let t = if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

// === output ===

/// One line per check (`✓` ok, `!` warning, `✗` failed) with its details indented under it,
/// then the verdict.
pub fn render(findings: &[Finding]) -> String {
    let width = findings
        .iter()
        .map(|f| f.check.name().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for f in findings {
        let mark = match f.severity {
            Severity::Ok => "✓",
            Severity::Warn => "!",
            Severity::Fail => "✗",
        };
        let _ = writeln!(out, "{mark} {:<width$}   {}", f.check.name(), f.summary);
        for d in &f.details {
            let _ = writeln!(out, "    {d}");
        }
    }
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let (failed, warned) = (count(Severity::Fail), count(Severity::Warn));
    let all = plural(findings.len(), "check");
    let verdict = match (failed, warned) {
        (0, 0) => format!("healthy: {all} passed"),
        (0, w) => format!("healthy with warnings: {w} of {all} warned"),
        (f, 0) => format!("unhealthy: {f} of {all} failed"),
        (f, w) => format!("unhealthy: {f} of {all} failed, {w} warned"),
    };
    let _ = writeln!(out, "{verdict}");
    out
}

// === I/O ===

/// Asks the registry everything `evaluate` needs, all at once; a failed call is kept as its
/// error so the other checks still run.
pub async fn gather(client: &control::Client, registry: &str) -> CheckInputs {
    let text = |e: control::Error| e.to_string();
    let resources = async {
        client
            .get_resources(pb::GetResourcesRequest::default())
            .await
            .map(|r| r.resources)
    };
    let (nodes, reports, resources, slos) = tokio::join!(
        client.list_nodes(),
        client.get_node_reports(),
        resources,
        client.get_slo_status(),
    );
    CheckInputs {
        registry: registry.to_owned(),
        nodes: nodes.map(|n| n.nodes).map_err(text),
        reports: reports.map_err(text),
        resources: resources.map_err(text),
        slos: slos.map(|s| s.slos).map_err(text),
    }
}

/// Runs every check; returns the printed report and the exit code.
pub async fn run(client: &control::Client, registry: &str, t: &Thresholds) -> (String, u8) {
    let inputs = gather(client, registry).await;
    let findings = evaluate(&inputs, SystemTime::now(), t);
    (render(&findings), exit_code(&findings))
}

#[cfg(test)]
mod tests;
