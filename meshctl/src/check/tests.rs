//! The mesh verdict: a healthy mesh, each failure mode on its own (table), the boundaries of
//! every threshold (the CA's 30 days among them), what a stale node is left out of, exit codes,
//! and the printed report.

use super::*;

/// 2026-01-01T00:00:00Z, on both the operator's and the registry's clock.
const NOW: i64 = 1_767_225_600;
const NOW_MS: u64 = NOW as u64 * 1000;
const DAY: i64 = 86_400;
const POLICY: u64 = 42;
const KEYRING: u64 = 3;
const PERIOD_MS: u64 = 10_000;

/// The fixtures lay certificate expiries out around a 7-day horizon (a wider `--cert-warn` than
/// the default, so "warns" and "passes" cases sit days apart).
fn thresholds() -> Thresholds {
    Thresholds {
        cert_warn: Duration::from_secs(7 * 24 * 3600),
        ..Thresholds::default()
    }
}

#[test]
fn the_default_certificate_horizon_is_hours_not_days() {
    // A healthy 24 h workload certificate renewed at half-life never has under 12 h left.
    assert_eq!(
        Thresholds::default().cert_warn,
        Duration::from_secs(2 * 3600)
    );
}

#[test]
fn ca_certificates_warn_a_month_ahead() {
    assert_eq!(CA_CERT_WARN, Duration::from_secs(30 * 24 * 3600));
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW as u64)
}

fn record(name: &str) -> pb::NodeRecord {
    pb::NodeRecord {
        name: name.into(),
        ..Default::default()
    }
}

/// A node that reported 2s ago and agrees with everything.
fn state(name: &str) -> pb::NodeReportState {
    let cert = |identity: &str, days: i64| pb::CertExpiry {
        identity: identity.into(),
        not_after_unix: NOW + days * DAY,
    };
    pb::NodeReportState {
        node: name.into(),
        received_unix_ms: NOW_MS - 2_000,
        clock_skew_ms: 15,
        report: Some(pb::NodeReport {
            sent_unix_ms: NOW_MS - 2_000,
            period_ms: PERIOD_MS,
            policy_revision: POLICY,
            keyring_revision: KEYRING,
            config_generation: 1,
            members: 3,
            members_digest: "9f86d081884c7d65".into(),
            certificates: vec![
                cert(&format!("spiffe://mesh.internal/node/{name}"), 30),
                cert(
                    &format!("spiffe://mesh.internal/ns/shop/svc/{name}-app"),
                    20,
                ),
            ],
            edges: vec![],
            version: "0.1.0".into(),
            warnings: vec![],
        }),
    }
}

fn resource(kind: &str, name: &str, spec_json: &str) -> pb::Resource {
    pb::Resource {
        kind: kind.into(),
        namespace: "shop".into(),
        name: name.into(),
        spec_json: spec_json.into(),
        revision: POLICY,
        ..Default::default()
    }
}

fn slo(name: &str, alert: &str) -> pb::SloStatus {
    pb::SloStatus {
        slo: format!("SLO/shop/{name}"),
        service: "shop/api".into(),
        alert: alert.into(),
        alert_since_unix: if alert == slo::ALERT_OK { 0 } else { NOW - 600 },
        ..Default::default()
    }
}

fn ca_cert(kind: &str, not_after_unix: i64) -> pb::CaCertExpiry {
    pb::CaCertExpiry {
        kind: kind.into(),
        not_after_unix,
    }
}

/// Three nodes, all reporting and agreeing; a root for ten years and an intermediate for 200
/// days; two valid resources; one quiet SLO.
fn healthy() -> CheckInputs {
    CheckInputs {
        registry: "10.0.0.2:7700".into(),
        nodes: Ok(vec![record("node-a"), record("node-b"), record("node-c")]),
        reports: Ok(pb::NodeReportsResponse {
            now_unix_ms: NOW_MS,
            policy_revision: POLICY,
            keyring_revision: KEYRING,
            nodes: vec![state("node-c"), state("node-a"), state("node-b")],
            ca_certificates: vec![
                ca_cert("root", NOW + 3650 * DAY),
                ca_cert("intermediate", NOW + 200 * DAY),
            ],
            follow: None,
            peers: Vec::new(),
        }),
        resources: Ok(vec![
            resource("AuthorizationPolicy", "allow-web", "{}"),
            resource("PeerAuthentication", "strict", r#"{"mode":"strict"}"#),
        ]),
        slos: Ok(vec![slo("api-availability", slo::ALERT_OK)]),
    }
}

fn reports(i: &mut CheckInputs) -> &mut pb::NodeReportsResponse {
    i.reports.as_mut().unwrap()
}

fn node<'a>(i: &'a mut CheckInputs, name: &str) -> &'a mut pb::NodeReportState {
    (reports(i).nodes.iter_mut())
        .find(|n| n.node == name)
        .unwrap()
}

fn report<'a>(i: &'a mut CheckInputs, name: &str) -> &'a mut pb::NodeReport {
    node(i, name).report.as_mut().unwrap()
}

/// The `notAfter` of the registry's CA certificate of `kind`.
fn ca_expiry<'a>(i: &'a mut CheckInputs, kind: &str) -> &'a mut i64 {
    let ca = reports(i).ca_certificates.iter_mut();
    &mut ca
        .into_iter()
        .find(|c| c.kind == kind)
        .unwrap()
        .not_after_unix
}

/// node-c went quiet 31s ago; the others' gossip already dropped it.
fn c_down(i: &mut CheckInputs) {
    node(i, "node-c").received_unix_ms = NOW_MS - 31_000;
    for n in ["node-a", "node-b"] {
        report(i, n).members = 2;
        report(i, n).members_digest = "60303ae22b998861".into();
    }
}

/// A finding that is not ok: which check, how bad, and its details.
type Problem = (Check, Severity, Vec<String>);

/// The findings that are not ok, with their severity and details.
fn problems(findings: &[Finding]) -> Vec<Problem> {
    (findings.iter())
        .filter(|f| f.severity != Severity::Ok)
        .map(|f| (f.check, f.severity, f.details.clone()))
        .collect()
}

fn warning(code: &str, message: &str) -> pb::NodeWarning {
    pb::NodeWarning {
        code: code.into(),
        message: message.into(),
    }
}

/// What meshd reports for an upstream bound on every address (see `config::OffLoopback`).
const OFF_LOOPBACK: &str = "/etc/meshd/services.d/web.toml: upstreams[0].bind: 0.0.0.0:9001 \
                            is not on loopback (it listens on every address of this host); any \
                            host that can reach it can call default/api with default/web's \
                            identity";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn a_healthy_mesh_passes_every_check() {
    let findings = evaluate(&healthy(), now(), &thresholds());
    let checks: Vec<Check> = findings.iter().map(|f| f.check).collect();
    use Check::*;
    assert_eq!(
        checks,
        [
            Registry,
            Reports,
            Ca,
            Certificates,
            Clocks,
            Gossip,
            Config,
            Warnings,
            Policies,
            Slos
        ]
    );
    assert_eq!(problems(&findings), []);
    assert_eq!(exit_code(&findings), 0);
    let summaries: Vec<&str> = findings.iter().map(|f| f.summary.as_str()).collect();
    assert_eq!(
        summaries,
        [
            "registry at 10.0.0.2:7700 answers",
            "3 joined nodes reported within 3x their report period",
            "valid for more than 30d: root until 2035-12-30T00:00:00Z, intermediate until \
             2026-07-20T00:00:00Z",
            "valid for more than 7d: 6 certificates on 3 nodes",
            "within 2s of the registry's clock: 3 reporting nodes",
            "converged: 3 reporting nodes with the same view of 3 members",
            "at the registry's policy revision 42, keyring revision 3: 3 reporting nodes",
            "none from 3 reporting nodes",
            "valid: 2 stored policy resources",
            "no alert firing (1 SLO)",
        ]
    );
}

type Mutation = fn(&mut CheckInputs);

#[test]
fn each_failure_mode() {
    use Check::*;
    use Severity::{Fail, Warn};
    let cases: Vec<(&str, Mutation, Vec<Problem>)> = vec![
        (
            "a joined node never reported",
            |i| i.nodes.as_mut().unwrap().push(record("node-d")),
            vec![(Reports, Fail, strings(&["node-d: never reported"]))],
        ),
        (
            "a report state without a report is no report",
            |i| node(i, "node-b").report = None,
            vec![
                (Reports, Fail, strings(&["node-b: never reported"])),
                (
                    Gossip,
                    Fail,
                    strings(&[
                        "node-a: sees 3 live members, 2 nodes are reporting",
                        "node-c: sees 3 live members, 2 nodes are reporting",
                    ]),
                ),
            ],
        ),
        (
            "a node stopped reporting",
            c_down,
            vec![(
                Reports,
                Fail,
                strings(&[
                    "node-c: stale: last report 31s ago, reports every 10s (stale after 30s)",
                ]),
            )],
        ),
        (
            "the intermediate expires within 30 days",
            |i| *ca_expiry(i, "intermediate") = NOW + 12 * DAY,
            vec![(
                Ca,
                Warn,
                strings(&["intermediate expires in 12d (2026-01-13T00:00:00Z)"]),
            )],
        ),
        (
            "the root expired, the intermediate with it",
            |i| {
                *ca_expiry(i, "root") = NOW - DAY;
                *ca_expiry(i, "intermediate") = NOW - DAY;
            },
            vec![(
                Ca,
                Fail,
                strings(&[
                    "root expired 1d ago (2025-12-31T00:00:00Z)",
                    "intermediate expired 1d ago (2025-12-31T00:00:00Z)",
                ]),
            )],
        ),
        (
            "the root expired and the intermediate expires soon: expired first",
            |i| {
                *ca_expiry(i, "intermediate") = NOW + 30 * DAY;
                *ca_expiry(i, "root") = NOW - 60;
            },
            vec![(
                Ca,
                Fail,
                strings(&[
                    "root expired 1m ago (2025-12-31T23:59:00Z)",
                    "intermediate expires in 30d (2026-01-31T00:00:00Z)",
                ]),
            )],
        ),
        (
            "a registry that does not say when its CA expires",
            |i| reports(i).ca_certificates.clear(),
            vec![(Ca, Warn, vec![])],
        ),
        (
            "a certificate expired",
            |i| report(i, "node-b").certificates[1].not_after_unix = NOW - 2 * 3600,
            vec![(
                Certificates,
                Fail,
                strings(&[
                    "node-b: spiffe://mesh.internal/ns/shop/svc/node-b-app expired 2h ago \
                     (2025-12-31T22:00:00Z)",
                ]),
            )],
        ),
        (
            "a certificate expires soon",
            |i| report(i, "node-a").certificates[0].not_after_unix = NOW + 3 * DAY + 3600,
            vec![(
                Certificates,
                Warn,
                strings(&[
                    "node-a: spiffe://mesh.internal/node/node-a expires in 3d1h \
                     (2026-01-04T01:00:00Z)",
                ]),
            )],
        ),
        (
            "expired comes before expiring",
            |i| {
                report(i, "node-a").certificates[0].not_after_unix = NOW + DAY;
                report(i, "node-c").certificates[0].not_after_unix = NOW - 60;
            },
            vec![(
                Certificates,
                Fail,
                strings(&[
                    "node-c: spiffe://mesh.internal/node/node-c expired 1m ago \
                     (2025-12-31T23:59:00Z)",
                    "node-a: spiffe://mesh.internal/node/node-a expires in 1d \
                     (2026-01-02T00:00:00Z)",
                ]),
            )],
        ),
        (
            "clocks off both ways",
            |i| {
                node(i, "node-a").clock_skew_ms = 3_400;
                node(i, "node-c").clock_skew_ms = -2_500;
            },
            vec![(
                Clocks,
                Fail,
                strings(&[
                    "node-a: clock 3.4s ahead of the registry's",
                    "node-c: clock 2.5s behind the registry's",
                ]),
            )],
        ),
        (
            "gossip split in two views",
            |i| {
                for n in ["node-a", "node-b"] {
                    report(i, n).members = 2;
                    report(i, n).members_digest = "aaaaaaaaaaaaaaaaaaaa".into();
                }
                report(i, "node-c").members = 1;
                report(i, "node-c").members_digest = "cccc".into();
            },
            vec![(
                Gossip,
                Fail,
                strings(&[
                    "view aaaaaaaaaaaa held by node-a, node-b",
                    "view cccc held by node-c",
                    "node-a: sees 2 live members, 3 nodes are reporting",
                    "node-b: sees 2 live members, 3 nodes are reporting",
                    "node-c: sees 1 live members, 3 nodes are reporting",
                ]),
            )],
        ),
        (
            "same digest but a member short",
            |i| {
                for n in ["node-a", "node-b", "node-c"] {
                    report(i, n).members = 2;
                }
            },
            vec![(
                Gossip,
                Fail,
                strings(&[
                    "node-a: sees 2 live members, 3 nodes are reporting",
                    "node-b: sees 2 live members, 3 nodes are reporting",
                    "node-c: sees 2 live members, 3 nodes are reporting",
                ]),
            )],
        ),
        (
            "a node behind on policy, another on the keyring, one ahead on both",
            |i| {
                report(i, "node-a").policy_revision = POLICY - 1;
                report(i, "node-b").keyring_revision = KEYRING - 1;
                report(i, "node-c").policy_revision = POLICY + 1;
                report(i, "node-c").keyring_revision = KEYRING + 1;
            },
            vec![(
                Config,
                Fail,
                strings(&[
                    "node-a: policy revision 41",
                    "node-b: keyring revision 2",
                    "node-c: policy revision 43, keyring revision 4",
                ]),
            )],
        ),
        (
            "a node reports a listener off loopback",
            |i| report(i, "node-b").warnings = vec![warning("listener_off_loopback", OFF_LOOPBACK)],
            vec![(
                Warnings,
                Warn,
                vec![format!("node-b: listener_off_loopback: {OFF_LOOPBACK}")],
            )],
        ),
        (
            "warnings of several nodes and kinds, a stale node's included",
            |i| {
                c_down(i);
                report(i, "node-a").warnings = vec![
                    warning(
                        "listener_off_loopback",
                        "meshd.toml: admin.bind: 10.0.0.5:15000",
                    ),
                    warning(
                        "policy_kind_skipped",
                        "Gateway/shop/edge: kind unknown, skipped",
                    ),
                ];
                report(i, "node-c").warnings = vec![warning("listener_off_loopback", "x")];
            },
            vec![
                (
                    Reports,
                    Fail,
                    strings(&[
                        "node-c: stale: last report 31s ago, reports every 10s (stale after 30s)",
                    ]),
                ),
                (
                    Warnings,
                    Warn,
                    strings(&[
                        "node-a: listener_off_loopback: meshd.toml: admin.bind: 10.0.0.5:15000",
                        "node-a: policy_kind_skipped: Gateway/shop/edge: kind unknown, skipped",
                        "node-c: listener_off_loopback: x",
                    ]),
                ),
            ],
        ),
        (
            "a stored resource does not validate; a deleted one is not looked at",
            |i| {
                let rs = i.resources.as_mut().unwrap();
                rs.push(resource(
                    "AuthorizationPolicy",
                    "bad",
                    r#"{"action":"maybe"}"#,
                ));
                let mut gone = resource("Route", "gone", "not json");
                gone.deleted = true;
                rs.push(gone);
            },
            vec![(
                Policies,
                Fail,
                strings(&[
                    "AuthorizationPolicy/shop/bad: action: unknown value \"maybe\"; expected \
                     one of: allow, deny, audit",
                ]),
            )],
        ),
        (
            "an SLO burns slowly",
            |i| {
                i.slos
                    .as_mut()
                    .unwrap()
                    .push(slo("web", slo::ALERT_SLOW_BURN))
            },
            vec![(
                Slos,
                Warn,
                strings(&["SLO/shop/web: SLOW BURN since 2025-12-31T23:50:00Z (10m)"]),
            )],
        ),
        (
            "an SLO burns fast",
            |i| {
                let slos = i.slos.as_mut().unwrap();
                slos.push(slo("web", slo::ALERT_SLOW_BURN));
                slos.push(slo("api-latency", slo::ALERT_FAST_BURN));
            },
            vec![(
                Slos,
                Fail,
                strings(&[
                    "SLO/shop/api-latency: FAST BURN since 2025-12-31T23:50:00Z (10m)",
                    "SLO/shop/web: SLOW BURN since 2025-12-31T23:50:00Z (10m)",
                ]),
            )],
        ),
        (
            "no node joined yet",
            |i| {
                i.nodes = Ok(vec![]);
                reports(i).nodes.clear();
            },
            vec![(Reports, Warn, vec![])],
        ),
        (
            "one call fails: its check is skipped, the registry check says why",
            |i| i.slos = Err("registry call failed (Unimplemented): not yet".into()),
            vec![(
                Registry,
                Fail,
                strings(&["GetSloStatus: registry call failed (Unimplemented): not yet"]),
            )],
        ),
    ];
    let mut failures = Vec::new();
    for (name, mutate, want) in cases {
        let mut inputs = healthy();
        mutate(&mut inputs);
        let got = problems(&evaluate(&inputs, now(), &thresholds()));
        if got != want {
            failures.push(format!("{name}:\n   got {got:?}\n  want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn an_unreachable_registry_is_one_failure_naming_its_address() {
    let down = "registry call failed (Unavailable): tcp connect error: Connection refused";
    let denied = "registry call failed (PermissionDenied): viewers may not read resources";
    let inputs = CheckInputs {
        nodes: Err(down.into()),
        reports: Err(down.into()),
        resources: Err(denied.into()),
        slos: Err(down.into()),
        ..healthy()
    };
    let findings = evaluate(&inputs, now(), &thresholds());
    assert_eq!(findings.len(), 1, "{findings:?}");
    let f = &findings[0];
    assert_eq!((f.check, f.severity), (Check::Registry, Severity::Fail));
    assert_eq!(
        f.summary,
        "registry at 10.0.0.2:7700: 4 of 4 calls failed; the checks that need them were skipped"
    );
    assert_eq!(
        f.details,
        [
            format!("ListNodes, GetNodeReports, GetSloStatus: {down}"),
            format!("GetResources: {denied}"),
        ]
    );
    assert_eq!(exit_code(&findings), 1);
}

#[test]
fn thresholds_at_their_boundaries() {
    use Check::{Ca, Certificates, Clocks, Reports};
    use Severity::{Fail, Ok, Warn};
    type Case = (&'static str, Thresholds, Mutation, Check, Severity);
    let t = thresholds;
    let cases: Vec<Case> = vec![
        (
            "30s is 3 periods: fresh",
            t(),
            |i| node(i, "node-c").received_unix_ms = NOW_MS - 30_000,
            Reports,
            Ok,
        ),
        (
            "a millisecond more is stale",
            t(),
            |i| node(i, "node-c").received_unix_ms = NOW_MS - 30_001,
            Reports,
            Fail,
        ),
        (
            "--stale 1.5x",
            Thresholds {
                stale_periods: 1.5,
                ..t()
            },
            |i| node(i, "node-c").received_unix_ms = NOW_MS - 15_001,
            Reports,
            Fail,
        ),
        (
            "no period yet: 10s assumed",
            t(),
            |i| {
                report(i, "node-c").period_ms = 0;
                node(i, "node-c").received_unix_ms = NOW_MS - 29_000;
            },
            Reports,
            Ok,
        ),
        (
            "no period yet, 31s",
            t(),
            |i| {
                report(i, "node-c").period_ms = 0;
                node(i, "node-c").received_unix_ms = NOW_MS - 31_000;
            },
            Reports,
            Fail,
        ),
        (
            "a report from the registry's future is fresh",
            t(),
            |i| node(i, "node-c").received_unix_ms = NOW_MS + 5_000,
            Reports,
            Ok,
        ),
        (
            "7d left warns",
            t(),
            |i| report(i, "node-a").certificates[0].not_after_unix = NOW + 7 * DAY,
            Certificates,
            Warn,
        ),
        (
            "7d1s left passes",
            t(),
            |i| report(i, "node-a").certificates[0].not_after_unix = NOW + 7 * DAY + 1,
            Certificates,
            Ok,
        ),
        (
            "the last valid second warns",
            t(),
            |i| report(i, "node-a").certificates[0].not_after_unix = NOW,
            Certificates,
            Warn,
        ),
        (
            "a second later fails",
            t(),
            |i| report(i, "node-a").certificates[0].not_after_unix = NOW - 1,
            Certificates,
            Fail,
        ),
        (
            "--cert-warn 1d",
            Thresholds {
                cert_warn: Duration::from_secs(DAY as u64),
                ..t()
            },
            |i| report(i, "node-a").certificates[0].not_after_unix = NOW + 3 * DAY,
            Certificates,
            Ok,
        ),
        (
            "30d left on the intermediate warns",
            t(),
            |i| *ca_expiry(i, "intermediate") = NOW + 30 * DAY,
            Ca,
            Warn,
        ),
        (
            "30d1s left on the intermediate passes",
            t(),
            |i| *ca_expiry(i, "intermediate") = NOW + 30 * DAY + 1,
            Ca,
            Ok,
        ),
        (
            "30d left on the root warns",
            t(),
            |i| *ca_expiry(i, "root") = NOW + 30 * DAY,
            Ca,
            Warn,
        ),
        (
            "the intermediate's last valid second warns",
            t(),
            |i| *ca_expiry(i, "intermediate") = NOW,
            Ca,
            Warn,
        ),
        (
            "a second later the intermediate fails",
            t(),
            |i| *ca_expiry(i, "intermediate") = NOW - 1,
            Ca,
            Fail,
        ),
        (
            "a second past the root fails",
            t(),
            |i| *ca_expiry(i, "root") = NOW - 1,
            Ca,
            Fail,
        ),
        (
            "--cert-warn does not move the CA's 30 days",
            Thresholds {
                cert_warn: Duration::from_secs(DAY as u64),
                ..t()
            },
            |i| *ca_expiry(i, "intermediate") = NOW + 20 * DAY,
            Ca,
            Warn,
        ),
        (
            "2s skew passes",
            t(),
            |i| node(i, "node-b").clock_skew_ms = -2_000,
            Clocks,
            Ok,
        ),
        (
            "2.001s fails",
            t(),
            |i| node(i, "node-b").clock_skew_ms = 2_001,
            Clocks,
            Fail,
        ),
        (
            "--max-skew 5s",
            Thresholds {
                max_skew: Duration::from_secs(5),
                ..t()
            },
            |i| node(i, "node-b").clock_skew_ms = 4_999,
            Clocks,
            Ok,
        ),
    ];
    let mut failures = Vec::new();
    for (name, th, mutate, check, want) in cases {
        let mut inputs = healthy();
        mutate(&mut inputs);
        let findings = evaluate(&inputs, now(), &th);
        let got = findings
            .iter()
            .find(|f| f.check == check)
            .map(|f| f.severity);
        if got != Some(want) {
            failures.push(format!("{name}: {check:?} got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_stale_node_only_fails_the_reports_check() {
    // Its last report is old news: its clock, revisions and gossip view are not judged.
    let mut inputs = healthy();
    c_down(&mut inputs);
    node(&mut inputs, "node-c").clock_skew_ms = 60_000;
    report(&mut inputs, "node-c").policy_revision = 1;
    let got: Vec<Check> = problems(&evaluate(&inputs, now(), &thresholds()))
        .into_iter()
        .map(|(c, _, _)| c)
        .collect();
    assert_eq!(got, [Check::Reports]);
}

#[test]
fn a_reporting_node_the_registry_does_not_list_still_counts_for_gossip() {
    let mut inputs = healthy();
    inputs.nodes.as_mut().unwrap().pop();
    let got = problems(&evaluate(&inputs, now(), &thresholds()));
    assert_eq!(got, [], "node-c reports and is a member: 3 of 3");
}

#[test]
fn the_registry_clock_judges_staleness_and_ours_certificates() {
    let mut inputs = healthy();
    // Our clock is a day ahead: reports are still fresh by the registry's clock...
    let later = now() + Duration::from_secs(DAY as u64);
    assert_eq!(problems(&evaluate(&inputs, later, &thresholds())), []);
    // ...and without the registry's clock ours is used.
    reports(&mut inputs).now_unix_ms = 0;
    let got = problems(&evaluate(&inputs, later, &thresholds()));
    assert_eq!(got[0].0, Check::Reports);
    assert_eq!(got[0].2.len(), 3);
}

#[test]
fn exit_codes() {
    let f = |s| Finding::new(Check::Gossip, s, "x");
    use Severity::*;
    for (severities, want) in [
        (vec![], 0),
        (vec![Ok, Ok], 0),
        (vec![Ok, Warn], 2),
        (vec![Warn, Fail, Ok], 1),
        (vec![Fail], 1),
    ] {
        let findings: Vec<Finding> = severities.iter().map(|s| f(*s)).collect();
        assert_eq!(exit_code(&findings), want, "{severities:?}");
    }
}

#[test]
fn the_report_has_one_line_per_check_and_the_culprits_under_it() {
    let mut inputs = healthy();
    c_down(&mut inputs);
    report(&mut inputs, "node-a").certificates[0].not_after_unix = NOW + DAY;
    *ca_expiry(&mut inputs, "intermediate") = NOW + 12 * DAY;
    let findings = evaluate(&inputs, now(), &thresholds());
    assert_eq!(
        render(&findings),
        "\
✓ registry       registry at 10.0.0.2:7700 answers
✗ reports        not reporting within 3x their report period: 1 of 3 joined nodes
    node-c: stale: last report 31s ago, reports every 10s (stale after 30s)
! ca             expiring within 30d: 1 CA certificate
    intermediate expires in 12d (2026-01-13T00:00:00Z)
! certificates   expiring within 7d: 1 certificate
    node-a: spiffe://mesh.internal/node/node-a expires in 1d (2026-01-02T00:00:00Z)
✓ clocks         within 2s of the registry's clock: 2 reporting nodes
✓ gossip         converged: 2 reporting nodes with the same view of 2 members
✓ config         at the registry's policy revision 42, keyring revision 3: 2 reporting nodes
✓ warnings       none from 3 reporting nodes
✓ policies       valid: 2 stored policy resources
✓ slos           no alert firing (1 SLO)
unhealthy: 1 of 10 checks failed, 2 warned
"
    );
    let ok = render(&evaluate(&healthy(), now(), &thresholds()));
    assert!(ok.ends_with("healthy: 10 checks passed\n"), "{ok}");
}

#[test]
fn node_warnings_are_a_warning_line_per_node_and_exit_2() {
    let mut inputs = healthy();
    report(&mut inputs, "node-b").warnings = vec![warning("listener_off_loopback", OFF_LOOPBACK)];
    let findings = evaluate(&inputs, now(), &thresholds());
    assert_eq!(exit_code(&findings), 2, "a warning, not a failure");
    let out = render(&findings);
    assert!(
        out.contains(&format!(
            "! warnings       1 warning from 1 node\n    node-b: listener_off_loopback: \
             {OFF_LOOPBACK}\n"
        )),
        "{out}"
    );
    assert!(
        out.ends_with("healthy with warnings: 1 of 10 checks warned\n"),
        "{out}"
    );
}

#[test]
fn stale_multiples() {
    for (arg, want) in [
        ("3x", Some(3.0)),
        ("3", Some(3.0)),
        ("1.5X", Some(1.5)),
        ("1x", Some(1.0)),
    ] {
        assert_eq!(parse_stale(arg).ok(), want, "{arg}");
    }
    for bad in ["0.5x", "x", "", "-2x", "three", "infx", "NaN"] {
        let e = parse_stale(bad).unwrap_err();
        assert!(e.contains("e.g. 3x"), "{bad}: {e}");
    }
}

#[test]
fn a_follower_is_ok_connected_warned_cut_off_failed_empty() {
    let now = 1_000_000;
    let status = |connected, primary_revision, since_unix, error: &str| pb::FollowStatus {
        primary: "reg-a:7700".to_owned(),
        primary_revision,
        connected,
        since_unix,
        error: error.to_owned(),
    };
    let f = follow(&status(true, 12, now - 90, ""), now);
    assert_eq!(f.severity, Severity::Ok);
    assert!(
        f.summary.contains("at its revision 12") && f.summary.contains("1m30s"),
        "{}",
        f.summary
    );
    let f = follow(&status(false, 12, now - 200, "transport error"), now);
    assert_eq!(f.severity, Severity::Warn);
    assert!(
        f.summary.contains("cut off from reg-a:7700 for 3m20s")
            && f.summary.contains("revision 12"),
        "{}",
        f.summary
    );
    assert_eq!(f.details, ["last error: transport error"]);
    let f = follow(&status(false, 0, now - 5, "refused"), now);
    assert_eq!(f.severity, Severity::Fail);
}

#[test]
fn peers_are_ok_connected_warned_cut_off_failed_never_imported() {
    let now = 1_000_000;
    let peer = |site: &str, connected, since_unix, imported_unix, error: &str| pb::PeerStatus {
        site: site.to_owned(),
        address: format!("reg-{site}:7700"),
        connected,
        since_unix,
        imported_unix,
        error: error.to_owned(),
    };
    let f = peers(&[peer("b", true, now - 60, now - 1, "")], now);
    assert_eq!(f.severity, Severity::Ok);
    assert_eq!(f.summary, "imports the revocations of site b: current");
    let all = [
        peer("b", true, now - 60, now - 1, ""),
        peer("c", false, now - 200, now - 230, "transport error"),
    ];
    let f = peers(&all, now);
    assert_eq!(f.severity, Severity::Warn);
    assert_eq!(f.summary, "1 of 2 sites' revocations are not current here");
    assert_eq!(
        f.details,
        [
            "site c: cut off from reg-c:7700 for 3m20s: what it revoked until 3m50s ago stays \
          refused, nothing since (last error: transport error)"
        ]
    );
    let f = peers(&[peer("d", false, now - 5, 0, "refused")], now);
    assert_eq!(f.severity, Severity::Fail);
    assert!(f.details[0].contains("never imported"), "{:?}", f.details);
}
