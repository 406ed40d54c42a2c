//! The access log's sinks: JSON lines on stdout, or native journal entries under systemd.
//! Either way the request path only formats the event and hands it over; one task does the
//! I/O (stdout in batches; one datagram per entry to the journal), and when it falls behind,
//! events are dropped and counted rather than the proxy slowed or blocked. Formatting each
//! event through `tracing`'s JSON layer with one write per line cost meshd ~40% more CPU per
//! request (BENCHMARKS.md, "The cost of observability"), and a blocking journal socket whose
//! queue is full would stall a proxy worker.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};

/// Written at least this often when there is anything to write.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// A buffer this full is written at once.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Beyond this much unwritten (stdout blocked), events are dropped and counted, not queued.
pub const MAX_BUFFERED_BYTES: usize = 8 * 1024 * 1024;

/// A JSON object being built: `{"k":v,...}`.
pub struct Line {
    buf: String,
    first: bool,
}

impl Line {
    /// Starts an event with its timestamp and message.
    pub fn new(message: &str) -> Line {
        let mut l = Line {
            buf: String::with_capacity(512),
            first: true,
        };
        l.key("timestamp");
        l.buf.push('"');
        timestamp_into(&mut l.buf, SystemTime::now());
        l.buf.push('"');
        l.str("target", "access");
        l.str("message", message);
        l
    }

    fn key(&mut self, key: &'static str) {
        // Keys are this crate's field names (`http.path`, ...; hence `'static`): nothing in them
        // needs escaping, and scanning ~15 of them per event for it showed in profiles.
        debug_assert!(
            key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
            "{key:?}"
        );
        self.buf.push(if self.first { '{' } else { ',' });
        self.first = false;
        self.buf.push('"');
        self.buf.push_str(key);
        self.buf.push_str("\":");
    }

    /// A string field.
    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Line {
        self.key(key);
        escape_into(&mut self.buf, value);
        self
    }

    /// A field written by its `Display`, escaped as it is written (no intermediate `String`:
    /// addresses and identities are formatted straight into the line).
    pub fn disp(&mut self, key: &'static str, value: &dyn std::fmt::Display) -> &mut Line {
        self.key(key);
        self.buf.push('"');
        let _ = write!(Escaper(&mut self.buf), "{value}");
        self.buf.push('"');
        self
    }

    /// A field written by its `Display`, whose text never needs escaping (addresses, hex ids):
    /// the escaping scan of every byte showed in profiles.
    pub fn plain(&mut self, key: &'static str, value: &dyn std::fmt::Display) -> &mut Line {
        self.key(key);
        self.buf.push('"');
        let start = self.buf.len();
        let _ = write!(self.buf, "{value}");
        debug_assert!(
            self.buf[start..]
                .bytes()
                .all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
            "{value}"
        );
        self.buf.push('"');
        self
    }

    /// An integer field.
    pub fn int(&mut self, key: &'static str, value: i64) -> &mut Line {
        self.key(key);
        let _ = write!(self.buf, "{value}");
        self
    }

    /// A float field to three decimals, the precision of a millisecond duration's microseconds
    /// (non-finite values are written as null, which JSON requires). Integer arithmetic: the
    /// shortest-representation float formatting showed in profiles of the request path.
    pub fn float(&mut self, key: &'static str, value: f64) -> &mut Line {
        self.key(key);
        if !value.is_finite() {
            self.buf.push_str("null");
        } else if value.abs() < 1e15 {
            let thousandths = (value.abs() * 1000.0).round() as u64;
            let sign = if value < 0.0 && thousandths > 0 {
                "-"
            } else {
                ""
            };
            let (whole, frac) = (thousandths / 1000, thousandths % 1000);
            let _ = write!(self.buf, "{sign}{whole}.{frac:03}");
        } else {
            let _ = write!(self.buf, "{value}");
        }
        self
    }

    /// A boolean field.
    pub fn bool(&mut self, key: &'static str, value: bool) -> &mut Line {
        self.key(key);
        self.buf.push_str(if value { "true" } else { "false" });
        self
    }

    /// The finished line, newline included.
    pub fn finish(mut self) -> String {
        if self.first {
            self.buf.push('{');
        }
        self.buf.push_str("}\n");
        self.buf
    }
}

/// Appends `now` in RFC 3339 with microseconds (`2026-12-07T06:54:59.123456Z`). The part up
/// to the second is formatted once per second per thread: every event of a busy second shares
/// it, and the calendar arithmetic showed in profiles of the request path.
pub fn timestamp_into(out: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let Ok(since) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        // Before 1970: not worth a cache.
        let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
        return;
    };
    SECOND.with_borrow_mut(|(secs, text)| {
        if *secs != since.as_secs() {
            *secs = since.as_secs();
            text.clear();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(*secs);
            // `YYYY-MM-DDTHH:MM:SSZ`: keep all but the `Z`.
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            text.pop();
        }
        out.push_str(text);
    });
    let _ = write!(out, ".{:06}Z", since.subsec_micros());
}

/// Appends `s` as a JSON string (quotes, escapes, control characters as \u00XX).
pub fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    let _ = Escaper(out).write_str_escaped(s);
    out.push('"');
}

/// Writes what it is given into a JSON string's body, escaped.
struct Escaper<'a>(&'a mut String);

impl Escaper<'_> {
    fn write_str_escaped(&mut self, s: &str) -> std::fmt::Result {
        // Nearly every value needs no escape: one branch-free pass (vectorized) decides.
        let needs = (s.bytes()).fold(false, |acc, b| {
            acc | (b < 0x20) | (b == b'"') | (b == b'\\')
        });
        if !needs {
            self.0.push_str(s);
            return Ok(());
        }
        // Runs of plain characters are copied whole. Everything escaped is ASCII, so bytes are
        // scanned (a UTF-8 continuation byte is never below 0x80), not chars.
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.push_str(&s[plain..i]);
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.push_str(escaped);
            }
            plain = i + 1;
        }
        self.0.push_str(&s[plain..]);
        Ok(())
    }
}

impl std::fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.write_str_escaped(s)
    }
}

/// The shared buffer and its writer.
#[derive(Default)]
pub struct JsonSink {
    buf: Mutex<Vec<u8>>,
    full: Notify,
    /// `meshd_access_log_dropped_total`.
    dropped: prometheus_client::metrics::counter::Counter,
}

impl JsonSink {
    /// Queues one line; drops it (counted) if stdout has fallen far behind.
    pub fn push(&self, line: &str) {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() + line.len() > MAX_BUFFERED_BYTES {
            self.dropped.inc();
            return;
        }
        buf.extend_from_slice(line.as_bytes());
        if buf.len() >= FLUSH_BYTES {
            self.full.notify_one();
        }
    }

    /// A sink counting its drops in `meshd_access_log_dropped_total` of `reg`.
    pub fn new(reg: &mut prometheus_client::registry::Registry) -> JsonSink {
        let s = JsonSink::default();
        reg.register(
            "meshd_access_log_dropped",
            "Access-log events dropped because stdout fell behind",
            s.dropped.clone(),
        );
        s
    }

    /// Events dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// The queued bytes, leaving an empty buffer as large as the last batch (capped): growing
    /// a fresh one from nothing to a batch's size again on every flush copied each event a
    /// second time on average.
    fn take(&self) -> Vec<u8> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let next = Vec::with_capacity(buf.len().min(FLUSH_BYTES * 2));
        std::mem::replace(&mut *buf, next)
    }

    /// Writes batches to stdout until `shutdown`, then what is left.
    pub async fn run(self: std::sync::Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => false,
                _ = self.full.notified() => false,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => true,
            };
            let batch = self.take();
            if !batch.is_empty() {
                // stdout may be a pipe to a slow reader: block a pool thread, not a worker.
                let written = tokio::task::spawn_blocking(move || {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&batch).and_then(|()| out.flush())
                })
                .await;
                if let Ok(Err(e)) = written {
                    tracing::warn!(error = %e, "writing the access log to stdout failed");
                }
            }
            if stop {
                return;
            }
        }
    }
}

/// Where access-log events go.
pub enum Sink {
    /// JSON lines on stdout.
    Json(std::sync::Arc<JsonSink>),
    /// Native journal entries.
    Journal(JournalSink),
}

/// Where journald listens for native entries.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Journal entries waiting to be sent at most; beyond, dropped and counted.
pub const JOURNAL_QUEUE: usize = 8192;

/// A native journal entry being built (`KEY=value` lines; values with a newline in the
/// length-prefixed binary form). Field names are `MESHD_` + the upper-cased key with `.` → `_`,
/// as the daemon's other journal entries.
pub struct Entry {
    buf: Vec<u8>,
}

impl Entry {
    /// An info-level entry from meshd with `message`.
    pub fn new(message: &str) -> Entry {
        let mut e = Entry {
            buf: Vec::with_capacity(512),
        };
        e.raw("PRIORITY", "6");
        e.raw("SYSLOG_IDENTIFIER", "meshd");
        e.raw("MESSAGE", message);
        e.field("target", "access");
        e
    }

    fn raw(&mut self, name: &str, value: &str) {
        self.buf.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            self.buf.push(b'\n');
            self.buf
                .extend_from_slice(&(value.len() as u64).to_le_bytes());
            self.buf.extend_from_slice(value.as_bytes());
        } else {
            self.buf.push(b'=');
            self.buf.extend_from_slice(value.as_bytes());
        }
        self.buf.push(b'\n');
    }

    /// A field written by its `Display`.
    pub fn field_disp(&mut self, key: &str, value: &dyn std::fmt::Display) -> &mut Entry {
        self.field(key, &value.to_string())
    }

    /// A field named after `key` (`src.identity` → `MESHD_SRC_IDENTITY`).
    pub fn field(&mut self, key: &str, value: &str) -> &mut Entry {
        let name: String = std::iter::once("MESHD_".to_owned())
            .chain(std::iter::once(
                key.chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect(),
            ))
            .collect();
        self.raw(&name, value);
        self
    }

    /// The datagram.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Sends entries to the journal from one task.
pub struct JournalSink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl JournalSink {
    /// The sink and the task that sends (spawn it; it ends at `shutdown` after sending what is
    /// queued, or when the sink is dropped).
    pub fn new(
        reg: &mut prometheus_client::registry::Registry,
    ) -> (JournalSink, tokio::sync::mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(JOURNAL_QUEUE);
        let dropped = prometheus_client::metrics::counter::Counter::default();
        reg.register(
            "meshd_access_log_dropped",
            "Access-log events dropped because their writer fell behind",
            dropped.clone(),
        );
        (JournalSink { tx, dropped }, rx)
    }

    /// Queues one entry, or drops it (counted) if the journal has fallen behind.
    pub fn push(&self, entry: Vec<u8>) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }

    /// Sends queued entries until `shutdown`, then those still queued.
    pub async fn run(
        mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let socket = match tokio::net::UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no socket for the journal; access events are lost");
                return;
            }
        };
        let mut stopping = false;
        loop {
            let entry = if stopping {
                match rx.try_recv() {
                    Ok(e) => e,
                    Err(_) => return,
                }
            } else {
                tokio::select! {
                    e = rx.recv() => match e { Some(e) => e, None => return },
                    _ = mesh_runtime::drain::until_true(&mut shutdown) => { stopping = true; continue }
                }
            };
            // Waits while journald's queue is full: the channel bounds what piles up here.
            if let Err(e) = socket.send_to(&entry, JOURNAL_SOCKET).await {
                tracing::debug!(error = %e, "journal entry not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn timestamps_match_rfc3339_across_seconds_and_days() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_601_599); // a day's last second
        for micros in [
            0u64,
            1,
            999_999,
            1_000_000,
            1_000_001,
            86_400_000_000,
            7_999_999,
        ] {
            let t = base + Duration::from_micros(micros);
            let mut got = String::new();
            timestamp_into(&mut got, t);
            assert_eq!(
                got,
                humantime::format_rfc3339_micros(t).to_string(),
                "{micros}"
            );
        }
        // The cached second is not reused for another second of the same value modulo anything.
        let (a, b) = (base, base + Duration::from_secs(60));
        let (mut x, mut y) = (String::new(), String::new());
        timestamp_into(&mut x, a);
        timestamp_into(&mut y, b);
        assert_ne!(x, y);
    }
    use super::*;

    #[test]
    fn journal_entries() {
        let mut e = Entry::new("request");
        e.field("src.identity", "spiffe://t/ns/default/svc/web")
            .field("error", "two\nlines");
        let got = e.finish();
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("PRIORITY=6\nSYSLOG_IDENTIFIER=meshd\nMESSAGE=request\n"),
            "{text}"
        );
        assert!(text.contains("MESHD_TARGET=access\n"));
        assert!(text.contains("MESHD_SRC_IDENTITY=spiffe://t/ns/default/svc/web\n"));
        let mut binary = b"MESHD_ERROR\n".to_vec();
        binary.extend_from_slice(&9u64.to_le_bytes());
        binary.extend_from_slice(b"two\nlines\n");
        assert!(got.ends_with(&binary), "{text}");
    }

    #[test]
    fn floats_to_three_decimals() {
        for (v, want) in [
            (1.5, "1.500"),
            (0.0, "0.000"),
            (0.0004, "0.000"),
            (0.0005, "0.001"),
            (12.3456, "12.346"),
            (-2.25, "-2.250"),
            (-0.0001, "0.000"),
            (999.9999, "1000.000"),
            (1e16, "10000000000000000"),
            (f64::INFINITY, "null"),
        ] {
            let mut l = Line::new("m");
            l.float("x", v);
            let text = l.finish();
            assert!(text.ends_with(&format!(",\"x\":{want}}}\n")), "{v}: {text}");
        }
    }

    #[test]
    fn lines_are_json() {
        let mut l = Line::new("request");
        l.str("http.path", "/a\"b\\c\n\u{1}é")
            .int("http.status", 200)
            .float("duration_ms", 1.5)
            .float("nan", f64::NAN)
            .bool("mtls", true);
        let text = l.finish();
        assert!(text.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["http.path"], "/a\"b\\c\n\u{1}é");
        assert_eq!(v["http.status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v["nan"].is_null());
        assert_eq!(v["mtls"], true);
        assert_eq!(v["target"], "access");
        assert_eq!(v["message"], "request");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let s = JsonSink::default();
        let big = "x".repeat(MAX_BUFFERED_BYTES / 2 + 1);
        s.push(&big);
        s.push(&big);
        assert_eq!(s.dropped(), 1);
        assert_eq!(s.take().len(), big.len());
        s.push(&big);
        assert_eq!(s.dropped(), 1, "room again once written");
    }
}
