//! Shared validation helpers: a problem collector that turns raw strings into typed values,
//! `host:port` and label checks, and the rendering of TOML syntax and type errors.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::Problem;

/// Collects every problem found in one file; each check returns `None` after recording one.
pub(super) struct Checker<'a> {
    file: &'a Path,
    problems: Vec<Problem>,
}

// === impl Checker ===

impl<'a> Checker<'a> {
    pub(super) fn new(file: &'a Path) -> Self {
        Self {
            file,
            problems: Vec::new(),
        }
    }

    /// Records a problem at `key`.
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems
            .push(Problem::new(self.file, key.into(), message.into()));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub(super) fn into_problems(self) -> Vec<Problem> {
        self.problems
    }

    /// `Ok` passes through; `Err` is recorded at `key` as "{value:?} is invalid: {err}".
    pub(super) fn parsed<T, E: fmt::Display>(
        &mut self,
        key: &str,
        value: &str,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(key, format!("{value:?} is invalid: {e}"));
                None
            }
        }
    }

    /// A key that has no default.
    pub(super) fn required<'v>(&mut self, key: &str, value: Option<&'v str>) -> Option<&'v str> {
        if value.is_none() {
            self.push(key, "missing required key");
        }
        value
    }

    /// A humane duration such as `"5s"` or `"200ms"`.
    pub(super) fn duration(&mut self, key: &str, value: &str) -> Option<Duration> {
        match humantime::parse_duration(value) {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(
                    key,
                    format!("{value:?} is not a duration ({e}); write e.g. \"5s\" or \"200ms\""),
                );
                None
            }
        }
    }

    /// A duration that must be greater than zero (timeouts).
    pub(super) fn timeout(&mut self, key: &str, value: &str) -> Option<Duration> {
        let d = self.duration(key, value)?;
        if d.is_zero() {
            self.push(key, "must be greater than zero");
            return None;
        }
        Some(d)
    }

    /// An IP address and port, e.g. `127.0.0.1:8080` or `[::1]:8080`.
    pub(super) fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    format!("{value:?} is not an IP address and port such as \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }

    /// A `host:port` where host is a DNS name or IP address and the port is not 0.
    pub(super) fn host_port(&mut self, key: &str, value: &str) -> Option<String> {
        match check_host_port(value) {
            Ok(()) => Some(value.to_owned()),
            Err(why) => {
                self.push(key, format!("{value:?} is not a valid host:port: {why}"));
                None
            }
        }
    }

    /// A path; relative paths are resolved against `base` (the config file's directory).
    pub(super) fn path(&mut self, key: &str, value: &str, base: &Path) -> Option<PathBuf> {
        if value.is_empty() {
            self.push(key, "must not be empty");
            return None;
        }
        Some(resolve(base, value))
    }
}

/// The directory relative paths in `file` are resolved against.
pub(super) fn base_dir(file: &Path) -> &Path {
    file.parent().unwrap_or_else(|| Path::new(""))
}

/// `value` resolved against `base`, unless it is absolute.
pub(super) fn resolve(base: &Path, value: &str) -> PathBuf {
    base.join(value)
}

fn check_host_port(value: &str) -> Result<(), String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err("port 0 is not allowed".to_owned()),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err("missing \":port\"".to_owned());
    };
    match port.parse::<u16>() {
        Ok(0) => return Err("port 0 is not allowed".to_owned()),
        Ok(_) => {}
        Err(_) => return Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
    if host.contains([':', '[', ']']) {
        return Err("IPv6 addresses must be written in brackets, e.g. \"[::1]:7700\"".to_owned());
    }
    check_dns_name(host)
}

fn check_dns_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("missing host".to_owned());
    }
    if host.len() > 253 {
        return Err(format!(
            "host name is {} characters, longer than 253",
            host.len()
        ));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("{host:?} is not a valid IP address or DNS name"));
        }
    }
    Ok(())
}

/// Checks a label name or value: non-empty, at most 63 characters of `[A-Za-z0-9._-]`.
pub(super) fn check_label_text(s: &str) -> Result<(), String> {
    const MAX: usize = 63;
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > MAX {
        return Err(format!(
            "{} characters is longer than the limit of {MAX}",
            s.len()
        ));
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "character {c:?} is not allowed (use letters, digits, '.', '_' and '-')"
        )),
        None => Ok(()),
    }
}

/// Whether two listeners would conflict: same port (not 0) on the same or a wildcard address.
pub(super) fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Deserializes `text`; a syntax, type or unknown-key error becomes one whole-file problem.
pub(super) fn from_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, Vec<Problem>> {
    toml::from_str(text).map_err(|e| {
        vec![Problem::new(
            file,
            String::new(),
            render_toml_error(text, &e),
        )]
    })
}

/// One readable line: "line 3, column 1: unknown field `x`, expected ... (in `x = 1`)".
fn render_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    let Some(span) = e.span() else {
        return message;
    };
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..start].chars().count() + 1;
    let source = text[line_start..].lines().next().unwrap_or("").trim();
    if source.is_empty() {
        format!("line {line}, column {column}: {message}")
    } else {
        let source: String = source.chars().take(80).collect();
        format!("line {line}, column {column}: {message} (in `{source}`)")
    }
}
