//! Traffic that nodes report: checking a report before anything is stored, the window a
//! topology request covers, and folding stored edge minutes into the service graph. Pure; the
//! API and the store wrap it.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api::name::Label;
use mesh_api::observe;
use mesh_api::proto::v1 as pb;

use crate::store::{
    CertExpiryRecord, EdgeKey, EdgeMinute, NodeReportRecord, Protocol, Traffic, WarningRecord,
};

/// Most edges one report may carry. A node reports each (caller, callee, mTLS, protocol) it
/// saw in one interval; thousands already means a scan or a bug, and every edge is a write.
pub const MAX_EDGES_PER_REPORT: usize = 4_096;
/// Most certificates one report may list (the node's and one per local workload).
pub const MAX_CERTIFICATES_PER_REPORT: usize = 1_024;
/// Longest free-text field (version, members digest, certificate identity), bytes.
pub const MAX_TEXT_LEN: usize = 512;
/// How long traffic is kept: a calendar-month SLO needs up to 31 days, plus margin.
pub const RETENTION: Duration = Duration::from_secs(35 * 86_400);
/// How long the per-service minute slots are kept: enough for every minute-resolution SLO
/// window (`slo::MINUTE_HISTORY`) and burn-rate window, with margin; hour slots cover the rest.
pub const SERVICE_MINUTE_RETENTION: Duration = Duration::from_secs(2 * 86_400);
/// Topology window when the request gives none.
pub const DEFAULT_TOPOLOGY_WINDOW: Duration = Duration::from_secs(300);

/// Why a report was refused; nothing of it was stored. Each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Too many edges.
    #[error("edges: {count} edges in one report, more than the {MAX_EDGES_PER_REPORT} allowed")]
    TooManyEdges {
        /// How many the report had.
        count: usize,
    },
    /// Too many certificates.
    #[error(
        "certificates: {count} certificates in one report, more than the \
         {MAX_CERTIFICATES_PER_REPORT} allowed"
    )]
    TooManyCertificates {
        /// How many the report had.
        count: usize,
    },
    /// Too many warnings.
    #[error(
        "warnings: {count} warnings in one report, more than the {} allowed",
        observe::MAX_WARNINGS
    )]
    TooManyWarnings {
        /// How many the report had.
        count: usize,
    },
    /// A warning code is not 1 to 64 of `[a-z0-9_]`.
    #[error(
        "{field}: {value:?} is not a warning code (1 to {} of a-z, 0-9 and '_')",
        observe::MAX_WARNING_CODE_LEN
    )]
    BadWarningCode {
        /// The field, e.g. `warnings[2].code`.
        field: String,
        /// What it held, shortened if long.
        value: String,
    },
    /// A warning message is too long or not one line of text.
    #[error("{field}: {why}")]
    BadWarningMessage {
        /// The field, e.g. `warnings[2].message`.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// A free-text field is too long.
    #[error("{field}: {len} bytes, longer than the {MAX_TEXT_LEN} allowed")]
    TextTooLong {
        /// The field, e.g. `version`.
        field: String,
        /// Its length.
        len: usize,
    },
    /// A service name is not `namespace/name` (or `external`, where a caller may be).
    #[error("{field}: {value:?} is not `namespace/name`{}", if *.external_allowed { " or \"external\"" } else { "" })]
    BadServiceName {
        /// The field, e.g. `edges[3].source`.
        field: String,
        /// What it held.
        value: String,
        /// Whether `external` would have been valid.
        external_allowed: bool,
    },
    /// The protocol is not one the registry counts.
    #[error("{field}: {value:?} is not \"http\" or \"tcp\"")]
    UnknownProtocol {
        /// The field, e.g. `edges[3].protocol`.
        field: String,
        /// What it held.
        value: String,
    },
    /// More duration buckets than `mesh_api::observe::LATENCY_BOUNDS_MS` has.
    #[error(
        "{field}: {len} buckets, more than the {} of mesh_api::observe::LATENCY_BOUNDS_MS",
        observe::BUCKETS
    )]
    TooManyBuckets {
        /// The field, e.g. `edges[3].latency_buckets`.
        field: String,
        /// How many it had.
        len: usize,
    },
    /// More errors than requests.
    #[error("{field}: {errors} errors, more than the {requests} requests")]
    ErrorsExceedRequests {
        /// The field, e.g. `edges[3].errors`.
        field: String,
        /// Errors reported.
        errors: u64,
        /// Requests reported.
        requests: u64,
    },
    /// A destination site that is not a label.
    #[error("{field}: {value:?} is not a site name (1 to 63 of a-z, 0-9 and '-'), nor empty")]
    InvalidSite {
        /// The field, e.g. `edges[3].destination_site`.
        field: String,
        /// What it held.
        value: String,
    },
}

/// A report that passed [`check`]: the record to keep and its edges, each edge once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The node's state, without edges.
    pub record: NodeReportRecord,
    /// Traffic per edge; an edge listed twice is summed.
    pub edges: Vec<(EdgeKey, Traffic)>,
}

/// Checks `report` from `node`, received at `received_unix_ms` (registry clock). TCP edges
/// lose their duration buckets (TCP has none; a node sending zeros is harmless).
pub fn check(node: &str, report: &pb::NodeReport, received_unix_ms: u64) -> Result<Checked, Error> {
    if report.edges.len() > MAX_EDGES_PER_REPORT {
        return Err(Error::TooManyEdges {
            count: report.edges.len(),
        });
    }
    if report.certificates.len() > MAX_CERTIFICATES_PER_REPORT {
        return Err(Error::TooManyCertificates {
            count: report.certificates.len(),
        });
    }
    text("version", &report.version)?;
    text("members_digest", &report.members_digest)?;
    for (i, c) in report.certificates.iter().enumerate() {
        text(&format!("certificates[{i}].identity"), &c.identity)?;
    }
    let warnings = warnings(&report.warnings)?;
    let mut edges: BTreeMap<EdgeKey, Traffic> = BTreeMap::new();
    for (i, e) in report.edges.iter().enumerate() {
        let (key, traffic) = edge(i, e)?;
        edges.entry(key).or_default().add(&traffic);
    }
    // A node that sends no clock (0) gets no skew rather than one of decades.
    let clock_skew_ms = if report.sent_unix_ms == 0 {
        0
    } else {
        (i128::from(report.sent_unix_ms) - i128::from(received_unix_ms))
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    };
    let record = NodeReportRecord {
        node: node.to_owned(),
        received_unix_ms,
        clock_skew_ms,
        sent_unix_ms: report.sent_unix_ms,
        period_ms: report.period_ms,
        policy_revision: report.policy_revision,
        keyring_revision: report.keyring_revision,
        config_generation: report.config_generation,
        members: report.members,
        members_digest: report.members_digest.clone(),
        certificates: report
            .certificates
            .iter()
            .map(|c| CertExpiryRecord {
                identity: c.identity.clone(),
                not_after_unix: c.not_after_unix,
            })
            .collect(),
        version: report.version.clone(),
        warnings,
    };
    Ok(Checked {
        record,
        edges: edges.into_iter().collect(),
    })
}

/// A report's warnings, checked: bounded in number and length, codes as documented, messages
/// one line without control characters (they end up on operators' terminals).
fn warnings(warnings: &[pb::NodeWarning]) -> Result<Vec<WarningRecord>, Error> {
    if warnings.len() > observe::MAX_WARNINGS {
        return Err(Error::TooManyWarnings {
            count: warnings.len(),
        });
    }
    let mut out = Vec::with_capacity(warnings.len());
    for (i, w) in warnings.iter().enumerate() {
        if !observe::is_warning_code(&w.code) {
            return Err(Error::BadWarningCode {
                field: format!("warnings[{i}].code"),
                value: w.code.chars().take(observe::MAX_WARNING_CODE_LEN).collect(),
            });
        }
        warning_message(&w.message).map_err(|why| Error::BadWarningMessage {
            field: format!("warnings[{i}].message"),
            why,
        })?;
        out.push(WarningRecord {
            code: w.code.clone(),
            message: w.message.clone(),
        });
    }
    Ok(out)
}

/// A warning message is one non-empty line of at most `MAX_WARNING_LEN` bytes without control
/// characters; `Err` says what is wrong.
fn warning_message(message: &str) -> Result<(), String> {
    if message.is_empty() {
        return Err("empty".to_owned());
    }
    if message.len() > observe::MAX_WARNING_LEN {
        return Err(format!(
            "{} bytes, longer than the {} allowed",
            message.len(),
            observe::MAX_WARNING_LEN
        ));
    }
    match message.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("holds the control character {c:?}")),
        None => Ok(()),
    }
}

/// The window of a topology request: `requested_secs` (0: the default), at most what is
/// retained, at least one second.
pub fn topology_window(requested_secs: u64) -> Duration {
    match requested_secs {
        0 => DEFAULT_TOPOLOGY_WINDOW,
        s => Duration::from_secs(s).min(RETENTION),
    }
}

/// Start of the first minute a window of `window` ending at `now_unix` overlaps: the minute in
/// progress is always included, since reports arrive continuously.
pub fn first_minute(now_unix: u64, window: Duration) -> u64 {
    let from = now_unix.saturating_sub(window.as_secs());
    from - from % 60
}

/// The service graph over `window` from the edge minutes in it (the caller reads those from
/// [`first_minute`] on): one edge per (source, destination, mTLS, protocol), sorted.
pub fn topology(minutes: &[EdgeMinute], window: Duration) -> pb::Topology {
    let mut sums: BTreeMap<&EdgeKey, Traffic> = BTreeMap::new();
    for m in minutes {
        sums.entry(&m.edge).or_default().add(&m.traffic);
    }
    let secs = window.as_secs().max(1);
    let edges = sums
        .into_iter()
        .map(|(key, t)| {
            let quantile = |q| match key.protocol {
                Protocol::Http => observe::quantile_ms(&t.latency_buckets, q).unwrap_or(0.0),
                Protocol::Tcp => 0.0,
            };
            pb::Edge {
                source: key.source.clone(),
                destination: key.destination.clone(),
                mtls: key.mtls,
                protocol: key.protocol.as_str().to_owned(),
                requests: t.requests,
                errors: t.errors,
                requests_per_second: t.requests as f64 / secs as f64,
                error_rate: if t.requests == 0 {
                    0.0
                } else {
                    t.errors as f64 / t.requests as f64
                },
                p50_ms: quantile(0.5),
                p99_ms: quantile(0.99),
                bytes: t.bytes,
                destination_site: key.destination_site.clone(),
            }
        })
        .collect();
    pb::Topology {
        window_seconds: secs,
        edges,
    }
}

fn edge(i: usize, e: &pb::EdgeStats) -> Result<(EdgeKey, Traffic), Error> {
    let field = |name: &str| format!("edges[{i}].{name}");
    service_name(&field("source"), &e.source, true)?;
    service_name(&field("destination"), &e.destination, false)?;
    let protocol = Protocol::parse(&e.protocol).ok_or_else(|| Error::UnknownProtocol {
        field: field("protocol"),
        value: e.protocol.clone(),
    })?;
    if e.latency_buckets.len() > observe::BUCKETS {
        return Err(Error::TooManyBuckets {
            field: field("latency_buckets"),
            len: e.latency_buckets.len(),
        });
    }
    if e.errors > e.requests {
        return Err(Error::ErrorsExceedRequests {
            field: field("errors"),
            errors: e.errors,
            requests: e.requests,
        });
    }
    if !e.destination_site.is_empty() && Label::new(&e.destination_site).is_err() {
        return Err(Error::InvalidSite {
            field: field("destination_site"),
            value: e.destination_site.clone(),
        });
    }
    let key = EdgeKey {
        source: e.source.clone(),
        destination: e.destination.clone(),
        mtls: e.mtls,
        protocol,
        destination_site: e.destination_site.clone(),
    };
    let traffic = Traffic {
        requests: e.requests,
        errors: e.errors,
        bytes: e.bytes,
        latency_buckets: match protocol {
            Protocol::Http => e.latency_buckets.clone(),
            Protocol::Tcp => Vec::new(),
        },
    };
    Ok((key, traffic))
}

/// `namespace/name` with two valid labels, or `external` where allowed.
fn service_name(field: &str, value: &str, external_allowed: bool) -> Result<(), Error> {
    let valid = match value.split_once('/') {
        Some((ns, name)) => Label::new(ns).is_ok() && Label::new(name).is_ok(),
        None => external_allowed && value == observe::EXTERNAL,
    };
    if valid {
        Ok(())
    } else {
        Err(Error::BadServiceName {
            field: field.to_owned(),
            value: value.to_owned(),
            external_allowed,
        })
    }
}

fn text(field: &str, value: &str) -> Result<(), Error> {
    if value.len() > MAX_TEXT_LEN {
        return Err(Error::TextTooLong {
            field: field.to_owned(),
            len: value.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
