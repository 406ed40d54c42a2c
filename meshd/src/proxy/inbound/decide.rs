//! Connection-level authorization on the inbound side: the decision for a new connection
//! (counted, AUDIT matches logged, denials logged and counted as rejections), and the record
//! (metrics, access log, edge) of a connection that reached authorization.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::policy::Snapshot;
use mesh_api::policy::authz::{Decision, REASON_MTLS_REQUIRED};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::super::authz::{self, Attrs};
use super::super::metrics::Direction;
use super::super::shared::Shared;
use super::super::{copy, observe};

/// Decides a new connection over the current policy: counts it, logs AUDIT matches at info and
/// denials at warn (the caller resets the connection).
pub fn admit(
    shared: &Shared,
    attrs: &Attrs<'_>,
    peer: SocketAddr,
    policy_rx: &mut watch::Receiver<Arc<Snapshot>>,
) -> Decision {
    let decision = attrs.decide(&policy_rx.borrow_and_update());
    let service = &attrs.service.key;
    shared.metrics.record_decision(service, &decision, false);
    if !decision.audit().is_empty() {
        info!(
            src.identity = %authz::caller_text(attrs.caller),
            src.addr = %peer,
            dst.service = %service,
            allowed = decision.is_allowed(),
            audit = ?decision.audit().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "connection matched an audit policy"
        );
    }
    if !decision.is_allowed() {
        let (_, reason) = authz::labels(&decision, false);
        // Plaintext refused under STRICT is a transport rejection, not a policy denial.
        let rejected = if reason == REASON_MTLS_REQUIRED {
            REASON_MTLS_REQUIRED
        } else {
            "denied_by_policy"
        };
        shared.metrics.reject(Direction::Inbound, rejected);
        warn!(
            src.identity = %authz::caller_text(attrs.caller),
            src.addr = %peer,
            dst.service = %service,
            policy = %authz::policy_of(&decision),
            reason,
            "connection denied by policy"
        );
    }
    decision
}

/// How a connection that reached authorization ended, for its access log line.
pub struct End<'a> {
    /// Bytes moved.
    pub transferred: copy::Transferred,
    /// The last decision.
    pub decision: &'a Decision,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Metrics, access-log event and edge count of a connection that reached authorization.
pub fn access_log(
    shared: &Shared,
    attrs: &Attrs<'_>,
    peer: SocketAddr,
    started: Instant,
    end: &End<'_>,
) {
    let rec = observe::Record {
        direction: Direction::Inbound,
        started,
        src_addr: peer,
        src_service: attrs.caller.and_then(authz::workload_service),
        src_identity: attrs.caller.cloned(),
        mtls: attrs.caller.is_some(),
        dst_service: attrs.service.key.clone(),
        dst_addr: Some(attrs.service.address),
        dst_site: None,
        kind: observe::Kind::Tcp {
            to_service: end.transferred.to_service,
            to_caller: end.transferred.to_caller,
            failed: end.error.is_some(),
        },
        decision: Some((
            if end.decision.is_allowed() {
                "allow"
            } else {
                "deny"
            },
            authz::policy_of(end.decision),
        )),
        trace_id: None,
        error: end.error.clone().unwrap_or_default(),
    };
    observe::finish(shared, rec);
}

/// Counts and logs a connection refused before authorization (or by the transport).
pub fn reject(
    shared: &Shared,
    peer: SocketAddr,
    reason: &'static str,
    detail: &dyn std::fmt::Display,
) {
    shared.metrics.reject(Direction::Inbound, reason);
    warn!(src.addr = %peer, reason, error = %detail, "inbound connection rejected");
}
