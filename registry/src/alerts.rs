//! SLO alerting: the evaluator task that, every `slo_eval_interval`, evaluates every SLO of the
//! current policy over stored traffic (`slo` decides), persists alert transitions, logs them,
//! exports the SLO metrics and posts webhooks; and the SLO reads `GetSloStatus` shares with it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use mesh_api::policy::{Kind, Resource, Slo, Spec};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{error, info, info_span, warn};

use crate::slo::{self, Alert, Event, Measure, Severity};
use crate::store::{self, SloAlertRecord, Step, Store};

mod webhook;
pub use webhook::{Delivery, WEBHOOK_ATTEMPTS, WEBHOOK_BACKOFF, WEBHOOK_TIMEOUT};

/// An SLO resource of the current policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SloResource {
    /// `SLO/namespace/name`.
    pub name: String,
    /// `namespace/service`: the destination whose traffic it measures.
    pub service: String,
    /// The validated spec.
    pub slo: Slo,
}

/// An SLO and its status at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    /// The SLO.
    pub resource: SloResource,
    /// Its status.
    pub status: slo::Status,
}

/// Labels of the per-SLO gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SloLabels {
    /// `SLO/namespace/name`.
    pub slo: String,
}

/// Labels of the alert counter and the alerting gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabels {
    /// `SLO/namespace/name`.
    pub slo: String,
    /// `slow_burn` or `fast_burn`.
    pub severity: &'static str,
}

/// Labels of the burn-rate gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BurnLabels {
    /// `SLO/namespace/name`.
    pub slo: String,
    /// `5m`, `30m`, `1h` or `6h`.
    pub window: &'static str,
}

/// Labels of the webhook delivery counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `delivered` or `failed` (after every attempt).
    pub outcome: &'static str,
}

/// A gauge holding a float.
type FloatGauge = Gauge<f64, AtomicU64>;

/// SLO metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Alerts fired, by SLO and severity (`mesh_registry_slo_alerts_total`).
    pub alerts: Family<SeverityLabels, Counter>,
    /// Percent good in the window (`mesh_registry_slo_sli`).
    pub sli: Family<SloLabels, FloatGauge>,
    /// Share of the error budget left (`mesh_registry_slo_error_budget_remaining`).
    pub budget_remaining: Family<SloLabels, FloatGauge>,
    /// Burn rate per alert window (`mesh_registry_slo_burn_rate`).
    pub burn_rate: Family<BurnLabels, FloatGauge>,
    /// 1 while an alert of that severity fires, else 0 (`mesh_registry_slo_alerting`).
    pub alerting: Family<SeverityLabels, Gauge>,
    /// Webhook deliveries by outcome (`mesh_registry_slo_webhook_deliveries_total`).
    pub webhooks: Family<WebhookLabels, Counter>,
}

/// The evaluator task; see the module docs.
pub struct Evaluator {
    store: Arc<dyn Store>,
    metrics: Metrics,
    interval: Duration,
    delivery: Delivery,
    /// Becomes `true` when the registry drains; the task returns then.
    shutdown: watch::Receiver<bool>,
    /// SLOs whose gauges are exported, so a deleted SLO's series can be removed.
    exported: BTreeSet<String>,
}

/// One SLO after an evaluator tick.
struct Ticked {
    evaluated: Evaluated,
    alert: Option<Alert>,
    event: Option<Event>,
}

// === impl Metrics ===

impl Metrics {
    /// Registers the metrics under `registry`.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mesh_registry_slo_alerts",
            "SLO alerts fired (or escalated), by SLO and severity",
            m.alerts.clone(),
        );
        registry.register(
            "mesh_registry_slo_sli",
            "Percent of good requests in the SLO's window (100 without traffic)",
            m.sli.clone(),
        );
        registry.register(
            "mesh_registry_slo_error_budget_remaining",
            "Share of the SLO's error budget left: 1 untouched, negative overspent",
            m.budget_remaining.clone(),
        );
        registry.register(
            "mesh_registry_slo_burn_rate",
            "How many times faster than allowed the SLO's error budget burns, per window",
            m.burn_rate.clone(),
        );
        registry.register(
            "mesh_registry_slo_alerting",
            "1 while the SLO's alert of this severity fires",
            m.alerting.clone(),
        );
        registry.register(
            "mesh_registry_slo_webhook_deliveries",
            "SLO alert webhook deliveries by outcome (failed: every attempt failed)",
            m.webhooks.clone(),
        );
        m
    }

    /// Exports `e`'s status and the alert state `alert`.
    fn export(&self, e: &Evaluated, alert: Option<Alert>) {
        let slo = || e.resource.name.clone();
        self.sli
            .get_or_create(&SloLabels { slo: slo() })
            .set(e.status.sli);
        self.budget_remaining
            .get_or_create(&SloLabels { slo: slo() })
            .set(e.status.budget_remaining);
        for (window, rate) in e.status.burn.by_window() {
            self.burn_rate
                .get_or_create(&BurnLabels { slo: slo(), window })
                .set(rate);
        }
        for severity in [Severity::SlowBurn, Severity::FastBurn] {
            let firing = alert.is_some_and(|a| a.severity == severity);
            self.alerting
                .get_or_create(&SeverityLabels {
                    slo: slo(),
                    severity: severity.as_str(),
                })
                .set(i64::from(firing));
        }
    }

    /// Removes the gauges of an SLO that no longer exists (its alert counter stays).
    fn forget(&self, slo: &str) {
        let slo = slo.to_owned();
        self.sli.remove(&SloLabels { slo: slo.clone() });
        self.budget_remaining
            .remove(&SloLabels { slo: slo.clone() });
        for (window, _) in slo::BURN_WINDOWS {
            self.burn_rate.remove(&BurnLabels {
                slo: slo.clone(),
                window,
            });
        }
        for severity in [Severity::SlowBurn, Severity::FastBurn] {
            self.alerting.remove(&SeverityLabels {
                slo: slo.clone(),
                severity: severity.as_str(),
            });
        }
    }
}

// === impl Evaluator ===

impl Evaluator {
    /// Evaluates every `interval` until `shutdown` holds `true`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Metrics,
        interval: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let delivery = Delivery::new(metrics.webhooks.clone(), shutdown.clone());
        Self {
            store,
            metrics,
            interval,
            delivery,
            shutdown,
            exported: BTreeSet::new(),
        }
    }

    /// Runs until the registry drains.
    pub async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.interval);
        // A slow store delays the next evaluation rather than causing a burst of them.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = mesh_runtime::drain::until_true(&mut self.shutdown) => return,
                _ = ticks.tick() => {}
            }
            let store = self.store.clone();
            let now = unix_now();
            match tokio::task::spawn_blocking(move || tick(store.as_ref(), now)).await {
                Ok(Ok((ticked, dropped))) => self.announce(ticked, &dropped),
                Ok(Err(e)) => warn!(error = %e, "slo evaluation failed; retrying next interval"),
                Err(e) => warn!(error = %e, "slo evaluation task failed"),
            }
        }
    }

    /// Exports metrics, logs transitions and sends webhooks for one tick's outcome.
    fn announce(&mut self, ticked: Vec<Ticked>, dropped: &[String]) {
        let current: BTreeSet<String> = ticked
            .iter()
            .map(|t| t.evaluated.resource.name.clone())
            .collect();
        for gone in self.exported.difference(&current) {
            self.metrics.forget(gone);
        }
        for slo in dropped {
            info!(slo = %slo, "slo deleted while alerting; its alert is dropped");
        }
        for t in &ticked {
            self.metrics.export(&t.evaluated, t.alert);
            if let Some(event) = t.event {
                self.on_event(&t.evaluated, event);
            }
        }
        self.exported = current;
    }

    fn on_event(&self, e: &Evaluated, event: Event) {
        let r = &e.resource;
        let s = &e.status;
        let (severity, since_unix) = match event {
            Event::Firing {
                severity,
                since_unix,
            } => {
                self.metrics
                    .alerts
                    .get_or_create(&SeverityLabels {
                        slo: r.name.clone(),
                        severity: severity.as_str(),
                    })
                    .inc();
                error!(
                    slo = %r.name,
                    service = %r.service,
                    severity = severity.as_str(),
                    burn_5m = s.burn.m5,
                    burn_30m = s.burn.m30,
                    burn_1h = s.burn.h1,
                    burn_6h = s.burn.h6,
                    budget_remaining = s.budget_remaining,
                    "slo alert firing"
                );
                (severity.as_str(), since_unix)
            }
            Event::Resolved { was, since_unix } => {
                info!(
                    slo = %r.name,
                    service = %r.service,
                    severity = "resolved",
                    was = was.as_str(),
                    burn_5m = s.burn.m5,
                    burn_30m = s.burn.m30,
                    burn_1h = s.burn.h1,
                    burn_6h = s.burn.h6,
                    budget_remaining = s.budget_remaining,
                    "slo alert resolved"
                );
                ("resolved", since_unix)
            }
        };
        if let Some(url) = &r.slo.alerting.webhook {
            let body = webhook_body(e, severity, since_unix);
            info_span!("slo_webhook", slo = %r.name)
                .in_scope(|| self.delivery.spawn(url.clone(), body));
        }
    }
}

/// The webhook's JSON: `{"slo","service","severity","burn_rates","budget_remaining",
/// "since_unix","sli"}`; `severity` is `fast_burn`, `slow_burn` or `resolved`, `since_unix`
/// when the alert (or this severity) began.
pub fn webhook_body(e: &Evaluated, severity: &str, since_unix: i64) -> Vec<u8> {
    let burn: serde_json::Map<String, serde_json::Value> = e
        .status
        .burn
        .by_window()
        .into_iter()
        .map(|(w, rate)| (w.to_owned(), serde_json::json!(rate)))
        .collect();
    let body = serde_json::json!({
        "slo": e.resource.name,
        "service": e.resource.service,
        "severity": severity,
        "burn_rates": burn,
        "budget_remaining": e.status.budget_remaining,
        "since_unix": since_unix,
        "sli": e.status.sli,
    });
    body.to_string().into_bytes()
}

/// Every SLO resource of the current policy. Stored specs were validated when applied; one that
/// no longer parses (written by a newer registry) is skipped with a warning.
pub fn current_slos(store: &dyn Store) -> Result<Vec<SloResource>, store::Error> {
    let (_, records) = store.list_policies()?;
    let slos = records
        .iter()
        .filter(|r| r.kind == Kind::Slo.as_str())
        .filter_map(
            |r| match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
                Ok(Resource {
                    key,
                    spec: Spec::Slo(slo),
                }) => Some(SloResource {
                    name: key.to_string(),
                    service: format!("{}/{}", key.namespace, slo.service),
                    slo,
                }),
                Ok(_) | Err(_) => {
                    warn!(
                        slo = %format!("{}/{}/{}", r.kind, r.namespace, r.name),
                        "stored SLO does not parse; skipping it"
                    );
                    None
                }
            },
        )
        .collect();
    Ok(slos)
}

/// Evaluates `r` at `now_unix` over its service's stored traffic.
pub fn evaluate(
    store: &dyn Store,
    r: &SloResource,
    now_unix: u64,
) -> Result<slo::Status, store::Error> {
    let measure = Measure::of(&r.slo);
    let reads = slo::reads(r.slo.window, now_unix);
    let minutes = store.service_slots(&r.service, Step::Minute, reads.minutes_from)?;
    let hours = match reads.hours_from {
        Some(from) => store.service_slots(&r.service, Step::Hour, from)?,
        None => Vec::new(),
    };
    Ok(slo::evaluate(
        &r.slo,
        now_unix,
        &measure.series(&minutes),
        &measure.series(&hours),
    ))
}

/// Every SLO of the current policy evaluated at `now_unix`.
pub fn evaluate_all(store: &dyn Store, now_unix: u64) -> Result<Vec<Evaluated>, store::Error> {
    current_slos(store)?
        .into_iter()
        .map(|resource| {
            let status = evaluate(store, &resource, now_unix)?;
            Ok(Evaluated { resource, status })
        })
        .collect()
}

/// One evaluation of every SLO: each alert transition is persisted (durably) before it is
/// returned to be announced, so a crash loses at most an announcement, never repeats one. A
/// transition that cannot be persisted is neither kept nor announced (the next tick tries
/// again), so the others still go out. Alerts of SLOs that no longer exist are deleted and
/// returned by name.
fn tick(store: &dyn Store, now_unix: u64) -> Result<(Vec<Ticked>, Vec<String>), store::Error> {
    let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
    let mut alerts: BTreeMap<String, SloAlertRecord> = store
        .slo_alerts()?
        .into_iter()
        .map(|a| (a.slo.clone(), a))
        .collect();
    let mut ticked = Vec::new();
    for evaluated in evaluate_all(store, now_unix)? {
        let name = &evaluated.resource.name;
        let current = alerts.remove(name).map(|a| Alert {
            severity: a.severity,
            since_unix: a.since_unix,
        });
        let (mut alert, mut event) = slo::next_alert(current, evaluated.status.condition, now);
        if alert != current {
            let persisted = match alert {
                Some(a) => store.put_slo_alert(&SloAlertRecord {
                    slo: name.clone(),
                    severity: a.severity,
                    since_unix: a.since_unix,
                }),
                None => store.delete_slo_alert(name),
            };
            if let Err(e) = persisted {
                warn!(slo = %name, error = %e, "could not persist an slo alert change; retrying next interval");
                (alert, event) = (current, None);
            }
        }
        ticked.push(Ticked {
            evaluated,
            alert,
            event,
        });
    }
    let mut dropped = Vec::new();
    for slo in alerts.into_keys() {
        match store.delete_slo_alert(&slo) {
            Ok(()) => dropped.push(slo),
            Err(e) => warn!(slo = %slo, error = %e, "could not delete the alert of a deleted slo"),
        }
    }
    Ok((ticked, dropped))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
