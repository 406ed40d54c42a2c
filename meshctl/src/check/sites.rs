//! The findings about other sites: a secondary registry following the primary for policy,
//! and each `[[peers]]` site's revocations imported here.

use mesh_api::proto::v1 as pb;

use super::{Check, Finding, Severity, ms};

/// How a secondary site's registry follows the primary: ok while its watch is open, a warning
/// while it is cut off (it keeps serving the revision it has), a failure when it never had one.
pub(super) fn follow(f: &pb::FollowStatus, now_unix: i64) -> Finding {
    let since = ms(u64::try_from(now_unix.saturating_sub(f.since_unix)).unwrap_or(0) * 1000);
    let error = (!f.error.is_empty()).then(|| format!("last error: {}", f.error));
    let (severity, summary) = match (f.connected, f.primary_revision) {
        (true, rev) => (
            Severity::Ok,
            format!(
                "follows {} for policy: at its revision {rev}, connected for {since}",
                f.primary
            ),
        ),
        (false, 0) => (
            Severity::Fail,
            format!(
                "has no policy from {} yet: this site's nodes get none until it answers",
                f.primary
            ),
        ),
        (false, rev) => (
            Severity::Warn,
            format!(
                "cut off from {} for {since}: this site enforces its revision {rev} and takes no change made since",
                f.primary
            ),
        ),
    };
    Finding::new(Check::Follow, severity, summary).with(error.into_iter().collect())
}

/// Importing the other sites' revocations: ok while every watch is open, a warning for a site
/// cut off (what it revoked up to then stays refused here, nothing since), a failure for a site
/// never imported (nothing it revokes is refused here).
pub(super) fn peers(peers: &[pb::PeerStatus], now_unix: i64) -> Finding {
    let ago = |t: i64| ms(u64::try_from(now_unix.saturating_sub(t)).unwrap_or(0) * 1000);
    let mut worst = Severity::Ok;
    let mut details = Vec::new();
    for p in peers {
        let error = if p.error.is_empty() {
            String::new()
        } else {
            format!(" (last error: {})", p.error)
        };
        let (severity, line) = match (p.connected, p.imported_unix) {
            (true, _) => continue,
            (false, 0) => (
                Severity::Fail,
                format!(
                    "site {}: never imported from {}: nothing it revokes is refused here{error}",
                    p.site, p.address
                ),
            ),
            (false, at) => (
                Severity::Warn,
                format!(
                    "site {}: cut off from {} for {}: what it revoked until {} ago stays refused, \
                     nothing since{error}",
                    p.site,
                    p.address,
                    ago(p.since_unix),
                    ago(at)
                ),
            ),
        };
        worst = worst.max(severity);
        details.push(line);
    }
    let sites: Vec<&str> = peers.iter().map(|p| p.site.as_str()).collect();
    let summary = if details.is_empty() {
        format!(
            "imports the revocations of site {}: current",
            sites.join(", ")
        )
    } else {
        format!(
            "{} of {} sites' revocations are not current here",
            details.len(),
            peers.len()
        )
    };
    Finding::new(Check::Peers, worst, summary).with(details)
}
