//! Logging setup for the daemons: `tracing` to the systemd journal with structured fields when
//! stderr is the journal, otherwise to stderr as plain text or JSON lines.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Environment variable with the log filter (falls back to `RUST_LOG`).
pub const ENV_LOG: &str = "MESHD_LOG";
/// Environment variable choosing `plain` (default) or `json` output on stderr.
pub const ENV_LOG_FORMAT: &str = "MESHD_LOG_FORMAT";

/// What to log and how.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Filter used when neither `MESHD_LOG` nor `RUST_LOG` is set.
    pub default_filter: &'static str,
    /// The syslog identifier under systemd.
    pub identifier: &'static str,
}

static TO_JOURNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`init`] sends the log to the journal; a daemon's other records (meshd's access log)
/// follow it there.
pub fn to_journal() -> bool {
    TO_JOURNAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber. Under systemd (`JOURNAL_STREAM` set and the journal socket
/// present) events go to the journal with their fields (`journalctl MESHD_SRC_ADDR=...`);
/// otherwise to stderr. Safe to call more than once (later calls are ignored).
pub fn init(settings: &Settings) {
    let filter = std::env::var(ENV_LOG)
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(settings.default_filter));
    let json = std::env::var(ENV_LOG_FORMAT).is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = under_journal
        .then(|| {
            tracing_journald::layer().ok().map(|l| {
                // syslog's meaning of the levels (the crate's default makes INFO "notice"), so
                // `journalctl -p notice` shows warnings and errors only, as expected.
                let priorities = tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                };
                l.with_syslog_identifier(settings.identifier.to_owned())
                    .with_field_prefix(Some("MESHD".to_owned()))
                    .with_priority_mappings(priorities)
            })
        })
        .flatten();
    TO_JOURNAL.store(journald.is_some(), std::sync::atomic::Ordering::Relaxed);
    let stderr = journald.is_none().then(|| {
        if json {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .boxed()
        }
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
}
