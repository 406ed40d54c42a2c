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

/// Target of access-log events (one per HTTP request or TCP connection). They bypass the log
/// filter (`MESHD_LOG`): whether they are emitted at all is the daemon's configuration.
pub const ACCESS_TARGET: &str = "access";

/// Installs the global subscriber. Under systemd (`JOURNAL_STREAM` set and the journal socket
/// present) events go to the journal with their fields (`journalctl MESHD_SRC_IDENTITY=...`);
/// otherwise logs go to stderr and access events to stdout as JSON lines. Safe to call more
/// than once (later calls are ignored).
pub fn init(settings: &Settings) {
    use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};

    let filter = || {
        std::env::var(ENV_LOG)
            .or_else(|_| std::env::var("RUST_LOG"))
            .ok()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .unwrap_or_else(|| EnvFilter::new(settings.default_filter))
    };
    // The daemon's log: the configured filter, without access events.
    let logs = move || filter().and(filter_fn(|m| m.target() != ACCESS_TARGET));
    let access = || Targets::new().with_target(ACCESS_TARGET, tracing::Level::INFO);
    let json = std::env::var(ENV_LOG_FORMAT).is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = || {
        tracing_journald::layer().ok().map(|l| {
            // syslog's meaning of the levels (the crate's default makes INFO "notice"), so
            // `journalctl -p notice` hides the per-request access logs, as expected.
            let priorities = tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            };
            l.with_syslog_identifier(settings.identifier.to_owned())
                .with_field_prefix(Some("MESHD".to_owned()))
                .with_priority_mappings(priorities)
        })
    };
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let mut layers: Vec<Boxed> = Vec::new();
    // Two journal layers (each its own socket) so each keeps its own filter.
    let journal = under_journal
        .then(|| Some((journald()?, journald()?)))
        .flatten();
    if let Some((for_logs, for_access)) = journal {
        layers.push(for_logs.with_filter(logs()).boxed());
        layers.push(for_access.with_filter(access()).boxed());
    } else {
        layers.push(if json {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_filter(logs())
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(logs())
                .boxed()
        });
        // Access events as JSON lines, one object per event with its fields at the top level.
        layers.push(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(std::io::stdout)
                .with_filter(access())
                .boxed(),
        );
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
}
