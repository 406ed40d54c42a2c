//! The pure decision: check results in, per-check and per-service health out.

use std::num::NonZeroU32;
use std::time::SystemTime;

use mesh_api::name::ServiceKey;

use super::{Check, CheckStatus, Outcome, ServiceHealth, State};

/// Applies each check's thresholds to its results and keeps the service's [`ServiceHealth`].
#[derive(Debug, Clone)]
pub struct Tracker {
    thresholds: Vec<Thresholds>,
    health: ServiceHealth,
}

/// What one result changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// The check's state before and after, if it changed.
    pub check: Option<(State, State)>,
    /// The service's health after, if it flipped.
    pub service: Option<bool>,
    /// The check's reason differs from the previous run's.
    pub reason_changed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Thresholds {
    unhealthy: NonZeroU32,
    healthy: NonZeroU32,
}

// === impl Tracker ===

impl Tracker {
    /// Every check starting (so the service is unhealthy), or a healthy service without checks.
    pub fn new(service: ServiceKey, checks: &[Check]) -> Tracker {
        let thresholds = (checks.iter())
            .map(|c| Thresholds {
                unhealthy: c.unhealthy_threshold,
                healthy: c.healthy_threshold,
            })
            .collect();
        let checks: Vec<CheckStatus> = (checks.iter())
            .map(|c| CheckStatus {
                name: c.name.clone(),
                state: State::Starting,
                healthy: false,
                reason: None,
                consecutive_successes: 0,
                consecutive_failures: 0,
                last_checked: None,
            })
            .collect();
        Tracker {
            thresholds,
            health: ServiceHealth {
                service,
                healthy: checks.is_empty(),
                checks,
            },
        }
    }

    /// Records the result of one run of check `index` (in the order given to [`Tracker::new`]),
    /// which ended at `at`. An index out of range is ignored.
    pub fn record(&mut self, index: usize, outcome: Outcome, at: SystemTime) -> Update {
        let (Some(status), Some(thresholds)) = (
            self.health.checks.get_mut(index),
            self.thresholds.get(index),
        ) else {
            debug_assert!(false, "result for check {index}, which does not exist");
            return Update::default();
        };
        let before = status.state;
        if outcome.passed {
            status.consecutive_successes = status.consecutive_successes.saturating_add(1);
            status.consecutive_failures = 0;
        } else {
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
            status.consecutive_successes = 0;
        }
        status.state = next_state(
            before,
            outcome.passed,
            status.consecutive_successes,
            status.consecutive_failures,
            *thresholds,
        );
        status.healthy = status.state == State::Healthy;
        let reason_changed = status.reason.as_deref() != Some(outcome.reason.as_str());
        status.reason = Some(outcome.reason);
        status.last_checked = Some(at);
        let after = status.state;

        let was_healthy = self.health.healthy;
        self.health.healthy = self.health.checks.iter().all(|c| c.healthy);
        Update {
            check: (before != after).then_some((before, after)),
            service: (was_healthy != self.health.healthy).then_some(self.health.healthy),
            reason_changed,
        }
    }

    /// The current health.
    pub fn health(&self) -> &ServiceHealth {
        &self.health
    }
}

// === impl Update ===

impl Update {
    /// Whether readers of the health watch should be woken: a state or the reason changed.
    /// Counters and times alone change on every run and are not worth a wake-up.
    pub fn is_notable(&self) -> bool {
        self.check.is_some() || self.service.is_some() || self.reason_changed
    }
}

/// The state after a run, given the run-length counters that already include it.
fn next_state(
    state: State,
    passed: bool,
    successes: u32,
    failures: u32,
    thresholds: Thresholds,
) -> State {
    match (state, passed) {
        // Like a readiness probe: a new instance takes traffic after its first pass.
        (State::Starting, true) => State::Healthy,
        (State::Starting, false) => State::Starting,
        (State::Healthy, true) => State::Healthy,
        (State::Healthy, false) if failures >= thresholds.unhealthy.get() => State::Unhealthy,
        (State::Healthy, false) => State::Healthy,
        (State::Unhealthy, true) if successes >= thresholds.healthy.get() => State::Healthy,
        (State::Unhealthy, _) => State::Unhealthy,
    }
}
