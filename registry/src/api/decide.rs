//! Pure decisions of the registry API: token checks and which services a node may host.

use mesh_api::ServiceKey;
use mesh_api::name::{DEFAULT_NAMESPACE, Label};
use mesh_api::policy::{ExportedServices, ServiceExport};

use crate::store::TokenRecord;

/// Why a join token was refused before touching the store's atomic redeem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejected {
    /// The secret does not match the record.
    #[error("join token secret does not match")]
    BadSecret,
    /// Past its expiry.
    #[error("join token expired at unix time {0}")]
    Expired(i64),
    /// No uses left.
    #[error("join token has already been used (max_uses = {0})")]
    UsedUp(u32),
    /// Revoked by an operator.
    #[error("join token was revoked at unix time {0}")]
    Revoked(i64),
}

impl TokenRejected {
    /// Bounded reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadSecret => "bad_token_secret",
            Self::Expired(_) => "token_expired",
            Self::UsedUp(_) => "token_used_up",
            Self::Revoked(_) => "token_revoked",
        }
    }
}

/// Checks a presented secret against a token record at `now_unix`. The store re-checks expiry
/// and uses atomically when it redeems; this gives the early, specific answer.
pub(crate) fn check_token(
    record: &TokenRecord,
    secret: &str,
    now_unix: i64,
) -> Result<(), TokenRejected> {
    let presented = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let presented_hex: String = presented
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Constant-time comparison so the secret hash cannot be probed byte by byte.
    #[allow(deprecated)]
    let same = ring::constant_time::verify_slices_are_equal(
        presented_hex.as_bytes(),
        record.secret_sha256.as_bytes(),
    )
    .is_ok();
    if !same {
        return Err(TokenRejected::BadSecret);
    }
    if let Some(at) = record.revoked_unix {
        return Err(TokenRejected::Revoked(at));
    }
    if now_unix >= record.expires_unix {
        return Err(TokenRejected::Expired(record.expires_unix));
    }
    if record.max_uses != 0 && record.uses >= record.max_uses {
        return Err(TokenRejected::UsedUp(record.max_uses));
    }
    Ok(())
}

/// Normalises token service entries: `name` → `default/name`; `ns/name` and `ns/*` kept.
pub fn normalize_services(entries: &[String]) -> Result<Vec<String>, String> {
    if entries.is_empty() {
        return Err(
            "a join token must allow at least one service (e.g. --services web,api)".to_owned(),
        );
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let e = e.trim();
        let normalized = match e.split_once('/') {
            Some((ns, "*")) => Label::new(ns)
                .map(|ns| format!("{ns}/*"))
                .map_err(|err| format!("service {e:?}: namespace {err}"))?,
            Some(_) => ServiceKey::parse(e)
                .map(|k| k.to_string())
                .map_err(|err| format!("service {e:?}: {err}"))?,
            None if e == "*" => format!("{DEFAULT_NAMESPACE}/*"),
            None => ServiceKey::parse(e)
                .map(|k| k.to_string())
                .map_err(|err| format!("service {e:?}: {err}"))?,
        };
        if !out.contains(&normalized) {
            out.push(normalized);
        }
    }
    Ok(out)
}

/// Whether a node whose token allowed `allowed` may host `service`.
pub fn allows_service(allowed: &[String], service: &ServiceKey) -> bool {
    allowed.iter().any(|a| match a.split_once('/') {
        Some((ns, "*")) => ns == service.namespace.as_str(),
        Some((ns, name)) => ns == service.namespace.as_str() && name == service.name.as_str(),
        None => false,
    })
}

/// Whether a node whose token allowed `allowed` may report the edge `source` → `destination`:
/// the caller's side is its own service, or, for callers from outside the mesh (`external`),
/// the callee is. So a node cannot put traffic (and errors, and SLO pages) on other nodes'
/// services.
pub fn may_report_edge(allowed: &[String], source: &str, destination: &str) -> Result<(), String> {
    let own = if source == mesh_api::observe::EXTERNAL {
        destination
    } else {
        source
    };
    let key = ServiceKey::parse(own).map_err(|e| format!("{own:?}: {e}"))?;
    if allows_service(allowed, &key) {
        Ok(())
    } else {
        Err(format!(
            "edge {source} -> {destination}: {own} is not a service of this node (its join token allows {allowed:?})"
        ))
    }
}

/// Whether `destination` is a service some registered node may host (`known` holds every
/// node's allowed `ns/name` and `ns/*` entries): a node may report calls only to services
/// that exist, so its reports cannot invent services (and grow the store without bound).
/// `external` callers' edges name the reporting node's own service, checked by
/// [`may_report_edge`].
pub fn is_known_destination(known: &[String], destination: &str) -> Result<(), String> {
    let key = ServiceKey::parse(destination).map_err(|e| format!("{destination:?}: {e}"))?;
    if allows_service(known, &key) {
        Ok(())
    } else {
        Err(format!(
            "destination {destination} is not a service any registered node may host"
        ))
    }
}

/// What a report's edges may name (see [`is_known_edge`]), read from the store every
/// `KNOWN_SERVICES_TTL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownServices {
    /// Every registered node's allowed `ns/name` and `ns/*` entries.
    pub local: Vec<String>,
    /// What the policy's ServiceExports export, in the same form: the services another site's
    /// instances may be called as.
    pub exported: Vec<String>,
    /// The sites of this registry's `[[peers]]`.
    pub sites: Vec<Label>,
}

/// Whether an edge to `destination` in `site` (empty: the reporting node's own) may be kept:
/// in this site, a service some registered node may host; in another, an exported service of
/// a site this registry peers with. So a node's reports cannot invent services or sites (and
/// grow the store without bound).
pub fn is_known_edge(known: &KnownServices, destination: &str, site: &str) -> Result<(), String> {
    if site.is_empty() {
        return is_known_destination(&known.local, destination);
    }
    let key = ServiceKey::parse(destination).map_err(|e| format!("{destination:?}: {e}"))?;
    if !known.sites.iter().any(|s| s.as_str() == site) {
        return Err(format!(
            "site {site:?} is not one of this registry's [[peers]]"
        ));
    }
    if !allows_service(&known.exported, &key) {
        return Err(format!(
            "destination {destination} in site {site} is not an exported service"
        ));
    }
    Ok(())
}

/// The `ns/name` (or `ns/*`) entries a ServiceExport of `namespace` exports.
pub fn exported_entries(namespace: &str, export: &ServiceExport) -> Vec<String> {
    match &export.services {
        ExportedServices::All => vec![format!("{namespace}/*")],
        ExportedServices::Names(names) => {
            (names.iter()).map(|n| format!("{namespace}/{n}")).collect()
        }
    }
}

/// Reports a node may send at once (a restart's first report, a retry, the final report of
/// a drain) before its pace applies.
pub const REPORT_BURST: f64 = 5.0;
/// Sustained reports per report interval a node may send (meshd sends one).
pub const REPORTS_PER_INTERVAL: f64 = 2.0;

/// A node's report allowance: tokens left, and when it was last topped up (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportBucket {
    tokens: f64,
    at_ms: u64,
}

/// Whether a report received at `now_ms` fits the node's quota (a token bucket of
/// [`REPORT_BURST`] refilled at [`REPORTS_PER_INTERVAL`] per `interval_ms`), and the bucket
/// after it. A clock going back refills nothing.
pub fn report_quota(
    bucket: Option<ReportBucket>,
    now_ms: u64,
    interval_ms: u64,
) -> (bool, ReportBucket) {
    let b = bucket.unwrap_or(ReportBucket {
        tokens: REPORT_BURST,
        at_ms: now_ms,
    });
    let elapsed = now_ms.saturating_sub(b.at_ms) as f64;
    let refill = elapsed * REPORTS_PER_INTERVAL / interval_ms.max(1) as f64;
    let tokens = (b.tokens + refill).min(REPORT_BURST);
    let at_ms = now_ms.max(b.at_ms);
    if tokens >= 1.0 {
        (
            true,
            ReportBucket {
                tokens: tokens - 1.0,
                at_ms,
            },
        )
    } else {
        (false, ReportBucket { tokens, at_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_to_other_sites_name_a_peer_and_an_exported_service() {
        let names = |v: &[&str]| v.iter().map(|l| Label::new(l).unwrap()).collect();
        let known = KnownServices {
            local: vec!["bank/web".to_owned()],
            exported: [
                exported_entries(
                    "bank",
                    &ServiceExport {
                        services: ExportedServices::Names(names(&["users"])),
                    },
                ),
                exported_entries(
                    "shop",
                    &ServiceExport {
                        services: ExportedServices::All,
                    },
                ),
            ]
            .concat(),
            sites: names(&["b"]),
        };
        assert_eq!(known.exported, ["bank/users", "shop/*"]);
        for (destination, site, ok) in [
            ("bank/web", "", true),
            ("bank/users", "", false), // runs in no node of this site
            ("bank/users", "b", true),
            ("shop/cart", "b", true),
            ("bank/web", "b", false),   // not exported
            ("bank/users", "c", false), // not a peer
            ("not a key", "b", false),
        ] {
            let got = is_known_edge(&known, destination, site);
            assert_eq!(got.is_ok(), ok, "{destination} in {site:?}: {got:?}");
        }
        let e = is_known_edge(&known, "bank/users", "c").unwrap_err();
        assert!(e.contains("[[peers]]"), "{e}");
    }

    #[test]
    fn destinations_must_exist_and_reports_keep_their_pace() {
        let known = vec!["shop/*".to_owned(), "default/api".to_owned()];
        assert!(is_known_destination(&known, "shop/cart").is_ok());
        assert!(is_known_destination(&known, "default/api").is_ok());
        assert!(is_known_destination(&known, "default/ghost").is_err());
        assert!(is_known_destination(&known, "not a key").is_err());
        // A burst, then one per half interval.
        let mut b = None;
        let mut sent = 0;
        for _ in 0..10 {
            let (ok, next) = report_quota(b, 1_000, 10_000);
            sent += usize::from(ok);
            b = Some(next);
        }
        assert_eq!(sent, REPORT_BURST as usize);
        assert!(!report_quota(b, 5_999, 10_000).0);
        let (ok, next) = report_quota(b, 6_000, 10_000);
        assert!(ok);
        assert!(
            !report_quota(Some(next), 1_000, 10_000).0,
            "a clock going back is no credit"
        );
    }

    fn token(max_uses: u32, uses: u32) -> TokenRecord {
        let hash = ring::digest::digest(&ring::digest::SHA256, b"s3cret");
        TokenRecord {
            id: "t".into(),
            secret_sha256: hash.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            services: vec!["default/web".into()],
            created_unix: 0,
            expires_unix: 100,
            max_uses,
            uses,
            created_by: "spiffe://m/admin/op".into(),
            replace_node: None,
            revoked_unix: None,
            revoked_by: String::new(),
        }
    }

    #[test]
    fn token_checks() {
        let cases = [
            (token(1, 0), "s3cret", 50, Ok(())),
            (token(1, 0), "wrong", 50, Err(TokenRejected::BadSecret)),
            (token(1, 0), "s3cret", 100, Err(TokenRejected::Expired(100))),
            (token(1, 1), "s3cret", 50, Err(TokenRejected::UsedUp(1))),
            (token(0, 99), "s3cret", 50, Ok(())),
            (token(3, 2), "s3cret", 50, Ok(())),
            (
                TokenRecord {
                    revoked_unix: Some(40),
                    ..token(0, 0)
                },
                "s3cret",
                50,
                Err(TokenRejected::Revoked(40)),
            ),
            (
                TokenRecord {
                    revoked_unix: Some(40),
                    ..token(0, 0)
                },
                "wrong",
                50,
                Err(TokenRejected::BadSecret),
            ),
        ];
        for (i, (rec, secret, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(check_token(&rec, secret, now), want, "case {i}");
        }
    }

    #[test]
    fn service_entries() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            normalize_services(&s(&["web", "shop/api", "ops/*", "web"])).unwrap(),
            s(&["default/web", "shop/api", "ops/*"])
        );
        assert_eq!(normalize_services(&s(&["*"])).unwrap(), s(&["default/*"]));
        assert!(normalize_services(&s(&[])).is_err());
        assert!(
            normalize_services(&s(&["Web"]))
                .unwrap_err()
                .contains("\"Web\"")
        );
        assert!(normalize_services(&s(&["a/b/c"])).is_err());
        assert!(normalize_services(&s(&["*/web"])).is_err());
    }

    #[test]
    fn who_reports_which_edges() {
        let allowed = vec!["default/web".to_owned(), "ops/*".to_owned()];
        // (source, destination, may report)
        let cases = [
            ("default/web", "default/api", true),
            ("ops/cron", "default/api", true),
            ("default/api", "default/db", false),
            ("external", "default/web", true),
            ("external", "default/api", false),
        ];
        for (src, dst, want) in cases {
            assert_eq!(
                may_report_edge(&allowed, src, dst).is_ok(),
                want,
                "{src} -> {dst}"
            );
        }
    }

    #[test]
    fn allowed_services() {
        let allowed = vec!["default/web".to_owned(), "ops/*".to_owned()];
        let cases = [
            ("web", true),
            ("default/api", false),
            ("ops/anything", true),
            ("shop/web", false),
        ];
        for (svc, want) in cases {
            assert_eq!(
                allows_service(&allowed, &ServiceKey::parse(svc).unwrap()),
                want,
                "{svc}"
            );
        }
    }
}
