//! `[[checks]]` in a service file: the raw form and its validation into [`health::Check`],
//! with every address resolved against the service's `address`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::health::{self, CheckKind, StatusRange};

use super::check::{self, Checker};
use super::{
    DEFAULT_CHECK_EXPECT_STATUS, DEFAULT_CHECK_HEALTHY_THRESHOLD, DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT, DEFAULT_CHECK_UNHEALTHY_THRESHOLD,
};

/// The keys that declare a check's kind; a check sets exactly one.
const KINDS: &str = "http, tcp, grpc or command";
/// How to write an `http` check, for messages.
const HTTP_HINT: &str = "write a path such as \"/healthz\" (on the service's address) \
     or a URL such as \"http://127.0.0.1:8080/healthz\"";

/// One `[[checks]]` entry as written; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCheck {
    /// Optional label, unique in the service; the kind unless set.
    pub name: Option<String>,
    /// A path on the service's address, or an `http://host:port/path` URL.
    pub http: Option<String>,
    /// `true` (the service's address) or `host:port`.
    pub tcp: Option<RawTcpTarget>,
    /// gRPC service name to ask about; empty for the server as a whole.
    pub grpc: Option<String>,
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// `http` only: a status code or an inclusive range such as `"200-399"`, as a string or
    /// an integer.
    #[serde(deserialize_with = "status_text")]
    pub expect_status: Option<String>,
    /// Duration such as `"10s"`.
    pub interval: String,
    /// Duration such as `"1s"`; shorter than `interval`.
    pub timeout: String,
    /// At least 1.
    pub unhealthy_threshold: u32,
    /// At least 1.
    pub healthy_threshold: u32,
}

/// `tcp = true` or `tcp = "host:port"` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawTcpTarget {
    /// `true` means the service's address; `false` is an error.
    Flag(bool),
    /// `host:port`.
    Address(String),
}

struct TcpTargetVisitor;

struct StatusTextVisitor;

// === impl RawCheck ===

impl RawCheck {
    fn check(
        &self,
        c: &mut Checker<'_>,
        i: usize,
        address: Option<SocketAddr>,
    ) -> Option<health::Check> {
        let key = |field: &str| format!("checks[{i}].{field}");
        let expect_status = match (&self.expect_status, &self.http) {
            (None, _) => Some(DEFAULT_CHECK_EXPECT_STATUS),
            (Some(v), Some(_)) => c.parsed(&key("expect_status"), v, v.parse::<StatusRange>()),
            (Some(_), None) => {
                let message = "only applies to http checks; remove it or use an http check";
                c.push(key("expect_status"), message);
                None
            }
        };
        let kind = self.kind(c, i, address, expect_status);
        let name = match &self.name {
            Some(name) => match check::check_label_text(name) {
                Ok(()) => Some(name.clone()),
                Err(why) => {
                    c.push(key("name"), format!("{name:?} is invalid: {why}"));
                    None
                }
            },
            None => kind.as_ref().map(|k| k.as_str().to_owned()),
        };
        let interval = c.timeout(&key("interval"), &self.interval);
        let timeout = c.timeout(&key("timeout"), &self.timeout).and_then(|t| {
            let interval = interval?;
            if t < interval {
                return Some(t);
            }
            let message = format!(
                "{} is not shorter than interval ({}); a run must end before the next is due",
                humane(t),
                humane(interval)
            );
            c.push(key("timeout"), message);
            None
        });
        let unhealthy_threshold =
            threshold(c, key("unhealthy_threshold"), self.unhealthy_threshold);
        let healthy_threshold = threshold(c, key("healthy_threshold"), self.healthy_threshold);
        Some(health::Check {
            name: name?,
            kind: kind?,
            interval: interval?,
            timeout: timeout?,
            unhealthy_threshold: unhealthy_threshold?,
            healthy_threshold: healthy_threshold?,
        })
    }

    /// The one kind declared, resolved against the service's `address` (`None` when that is
    /// invalid, which is reported already).
    fn kind(
        &self,
        c: &mut Checker<'_>,
        i: usize,
        address: Option<SocketAddr>,
        expect_status: Option<StatusRange>,
    ) -> Option<CheckKind> {
        let declared: Vec<&str> = [
            ("http", self.http.is_some()),
            ("tcp", self.tcp.is_some()),
            ("grpc", self.grpc.is_some()),
            ("command", self.command.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, set)| set.then_some(kind))
        .collect();
        if declared.len() != 1 {
            let message = match declared.as_slice() {
                [] => format!("no check kind: set exactly one of {KINDS}"),
                many => format!("sets {}: set exactly one of {KINDS}", many.join(" and ")),
            };
            c.push(format!("checks[{i}]"), message);
            return None;
        }
        let key = |field: &str| format!("checks[{i}].{field}");
        if let Some(value) = &self.http {
            let url = http_url(c, &key("http"), value, address);
            return Some(CheckKind::Http {
                url: url?,
                expect_status: expect_status?,
            });
        }
        if let Some(target) = &self.tcp {
            let address = match target {
                RawTcpTarget::Flag(true) => address?.to_string(),
                RawTcpTarget::Flag(false) => {
                    let message = "false is not valid: write true for the service's address, \
                         or an address such as \"127.0.0.1:5432\"";
                    c.push(key("tcp"), message);
                    return None;
                }
                RawTcpTarget::Address(v) => c.host_port(&key("tcp"), v)?,
            };
            return Some(CheckKind::Tcp { address });
        }
        if let Some(service) = &self.grpc {
            return Some(CheckKind::Grpc {
                address: address?,
                service: service.clone(),
            });
        }
        let argv = self.command.clone().unwrap_or_default();
        if argv.first().is_none_or(|program| program.is_empty()) {
            let message = "must start with a program, then its arguments, \
                 e.g. [\"/usr/local/bin/check-db\", \"--quick\"]";
            c.push(key("command"), message);
            return None;
        }
        Some(CheckKind::Command { argv })
    }
}

impl Default for RawCheck {
    fn default() -> Self {
        Self {
            name: None,
            http: None,
            tcp: None,
            grpc: None,
            command: None,
            expect_status: None,
            interval: humane(DEFAULT_CHECK_INTERVAL),
            timeout: humane(DEFAULT_CHECK_TIMEOUT),
            unhealthy_threshold: DEFAULT_CHECK_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_CHECK_HEALTHY_THRESHOLD,
        }
    }
}

// === impl RawTcpTarget ===

impl<'de> Deserialize<'de> for RawTcpTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TcpTargetVisitor)
    }
}

// === impl TcpTargetVisitor ===

impl Visitor<'_> for TcpTargetVisitor {
    type Value = RawTcpTarget;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("true or an address such as \"127.0.0.1:8080\"")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawTcpTarget, E> {
        Ok(RawTcpTarget::Flag(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTcpTarget, E> {
        Ok(RawTcpTarget::Address(v.to_owned()))
    }
}

// === impl StatusTextVisitor ===

impl Visitor<'_> for StatusTextVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a status code such as 200 or a range such as \"200-399\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<String>, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<String>, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
        Ok(Some(v.to_owned()))
    }
}

/// Every check of one service, or `None` after recording problems, among them names used
/// twice (explicit or defaulted).
pub(super) fn check_all(
    c: &mut Checker<'_>,
    raw: &[RawCheck],
    address: Option<SocketAddr>,
) -> Option<Vec<health::Check>> {
    // Check every entry before giving up on any, so all problems are reported.
    let checks: Vec<Option<health::Check>> = (raw.iter().enumerate())
        .map(|(i, r)| r.check(c, i, address))
        .collect();
    let mut first_use: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unique = true;
    for (i, check) in checks.iter().enumerate() {
        let Some(check) = check else { continue };
        let Some(first) = first_use.get(check.name.as_str()).copied() else {
            first_use.insert(&check.name, i);
            continue;
        };
        let defaulted = match raw.get(i).and_then(|r| r.name.as_ref()) {
            Some(_) => String::new(),
            None => format!(" (the default name of {} checks)", check.kind.as_str()),
        };
        let message = format!(
            "{:?}{defaulted} is already the name of checks[{first}]; \
             set a unique name on each check",
            check.name
        );
        c.push(format!("checks[{i}].name"), message);
        unique = false;
    }
    let checks: Vec<health::Check> = checks.into_iter().collect::<Option<_>>()?;
    unique.then_some(checks)
}

/// `http`: a path is taken relative to the service's address.
fn http_url(
    c: &mut Checker<'_>,
    key: &str,
    value: &str,
    address: Option<SocketAddr>,
) -> Option<Uri> {
    let text = if value.starts_with('/') {
        format!("http://{}{value}", address?)
    } else {
        value.to_owned()
    };
    let url = match text.parse::<Uri>() {
        Ok(url) => url,
        Err(e) => {
            c.push(key, format!("{value:?} is invalid: {e}; {HTTP_HINT}"));
            return None;
        }
    };
    let problem = match (url.scheme_str(), url.host(), url.port_u16()) {
        (Some("http"), Some(host), port) if !host.is_empty() && port != Some(0) => {
            return Some(url);
        }
        (Some("http"), _, Some(0)) => format!("{value:?}: port 0 is not allowed"),
        (Some("https"), ..) => format!(
            "{value:?}: https is not supported; checks talk to the app on this host in \
             plaintext, e.g. \"http://127.0.0.1:8080/healthz\""
        ),
        _ => format!("{value:?} is neither a path nor an http URL; {HTTP_HINT}"),
    };
    c.push(key, problem);
    None
}

fn threshold(c: &mut Checker<'_>, key: String, value: u32) -> Option<NonZeroU32> {
    let n = NonZeroU32::new(value);
    if n.is_none() {
        c.push(key, "must be at least 1");
    }
    n
}

fn status_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(StatusTextVisitor)
}

fn humane(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
