//! Value types shared by several resource kinds: wildcard patterns, CIDR blocks, Route string
//! matches and humane durations, each with the reader that validates it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};
use serde_json::Value;

use super::decode::{self, Cx, Table};

/// A string pattern as Istio writes them: `*` (anything present), `prefix*`, `*suffix` or an
/// exact value. Used for principals, namespaces, paths and header values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `*`: any value (for principals: any authenticated peer).
    Any,
    /// No `*`: the whole value.
    Exact(String),
    /// `prefix*`: values starting with the prefix.
    Prefix(String),
    /// `*suffix`: values ending with the suffix.
    Suffix(String),
}

/// A CIDR block (`10.0.0.0/8`, `fd00::/8`); a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    addr: IpAddr,
    prefix_len: u8,
}

/// How a Route matches a string: exactly one of `exact`, `prefix`, `regex`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StringMatch {
    /// The whole value.
    Exact(String),
    /// Values starting with this.
    Prefix(String),
    /// An RE2-style regular expression matched against the whole value.
    Regex(String),
}

// === impl Pattern ===

impl Pattern {
    /// Parses `*`, `prefix*`, `*suffix` or an exact value; `*` elsewhere is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty; use \"*\" for any value".to_owned());
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let p = if let Some(rest) = s.strip_suffix('*') {
            Self::Prefix(rest.to_owned())
        } else if let Some(rest) = s.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else {
            Self::Exact(s.to_owned())
        };
        let inner = match &p {
            Self::Any => "",
            Self::Exact(x) | Self::Prefix(x) | Self::Suffix(x) => x,
        };
        if inner.contains('*') {
            return Err(format!(
                "{s:?}: `*` may only stand alone, end a prefix (\"abc*\") or start a suffix (\"*abc\")"
            ));
        }
        Ok(p)
    }

    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(x) => s == x,
            Self::Prefix(x) => s.starts_with(x.as_str()),
            Self::Suffix(x) => s.ends_with(x.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(x) => f.write_str(x),
            Self::Prefix(x) => write!(f, "{x}*"),
            Self::Suffix(x) => write!(f, "*{x}"),
        }
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Reads a [`Pattern`], then lets `check` refine it (returns what is wrong).
pub(crate) fn pattern(
    v: &Value,
    at: &str,
    cx: &mut Cx,
    check: fn(&Pattern) -> Result<(), String>,
) -> Option<Pattern> {
    let s = decode::string(v, at, cx)?;
    match Pattern::parse(&s).and_then(|p| check(&p).map(|()| p)) {
        Ok(p) => Some(p),
        Err(e) => {
            cx.error(at, e);
            None
        }
    }
}

// === impl IpBlock ===

impl IpBlock {
    /// Parses `addr/len` or a bare address; host bits beyond the prefix must be zero.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s.parse().map_err(|_| {
            format!("{s:?} is not a CIDR block; expected e.g. \"10.0.0.0/8\", \"fd00::/8\" or \"192.0.2.7\"")
        })?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len_s {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && !l.starts_with('+') => n,
                _ => return Err(format!("{s:?}: prefix length must be 0 to {max}")),
            },
        };
        let block = Self { addr, prefix_len };
        let network = block.network();
        if network != addr {
            return Err(format!(
                "{s:?} has bits set after the /{prefix_len} prefix; did you mean \"{network}/{prefix_len}\"?"
            ));
        }
        Ok(block)
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length (32 or 128 for a single address).
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies in the block. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, as seen
    /// on dual-stack sockets) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Reads an [`IpBlock`].
pub(crate) fn ip_block(v: &Value, at: &str, cx: &mut Cx) -> Option<IpBlock> {
    let s = decode::string(v, at, cx)?;
    match IpBlock::parse(&s) {
        Ok(b) => Some(b),
        Err(e) => {
            cx.error(at, e);
            None
        }
    }
}

// === impl StringMatch ===

/// Reads a table with exactly one of `exact`, `prefix`, `regex`.
pub(crate) fn string_match(v: &Value, at: &str, cx: &mut Cx) -> Option<StringMatch> {
    const KEYS: &[&str] = &["exact", "prefix", "regex"];
    let t = Table::new(v, at, KEYS, cx)?;
    let given: Vec<&str> = KEYS.iter().copied().filter(|k| t.has(k)).collect();
    if given.len() != 1 {
        cx.error(
            at,
            format!(
                "give exactly one of exact, prefix, regex (found {})",
                if given.is_empty() {
                    "none".to_owned()
                } else {
                    given.join(", ")
                }
            ),
        );
        return None;
    }
    let exact = t.opt("exact", cx, decode::string).map(StringMatch::Exact);
    let prefix = t
        .opt("prefix", cx, decode::nonempty)
        .map(StringMatch::Prefix);
    let regex = t
        .opt("regex", cx, |v, at, cx| {
            let re = decode::nonempty(v, at, cx)?;
            match check_regex(&re) {
                Ok(()) => Some(re),
                Err(e) => {
                    cx.error(at, e);
                    None
                }
            }
        })
        .map(StringMatch::Regex);
    exact.or(prefix).or(regex)
}

/// Largest compiled size of a Route regex: generous for real patterns, small enough that a
/// policy cannot make every meshd build a huge automaton.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Compiles a Route `regex`, anchored to the whole value (as Envoy's `safe_regex`), with a
/// bounded size. The registry validates with this and meshd matches with it, so a pattern
/// that is accepted always compiles on every host.
pub fn compile_regex(re: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regex {re:?} is invalid: {e}"))
}

fn check_regex(re: &str) -> Result<(), String> {
    compile_regex(re).map(|_| ())
}

// === durations ===

const UNITS: &[(&str, u64)] = &[
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses `"250ms"`, `"2s"`, `"1m30s"`, `"30d"` (units d, h, m, s, ms, us, ns).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (_, nanos) = UNITS.iter().find(|(u, _)| *u == &rest[..unit_len])?;
        total = total.checked_add(n.checked_mul(*nanos)?)?;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_nanos(total))
}

/// Formats a duration the way [`parse_duration`] reads it, largest units first (`"1m30s"`).
pub fn format_duration(d: Duration) -> String {
    let mut nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in UNITS {
        let size = u128::from(*size);
        if nanos >= size {
            out.push_str(&format!("{}{unit}", nanos / size));
            nanos %= size;
        }
    }
    out
}

/// serde helpers writing durations in the humane form.
pub(crate) mod humane {
    use std::time::Duration;

    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub(crate) mod opt {
        use std::time::Duration;

        use serde::Serializer;

        #[allow(clippy::ref_option)] // serde's `serialize_with` passes `&Option<T>`
        pub(crate) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

// === header names ===

/// Header names are matched lowercase (HTTP/2 and meshd both lowercase them).
pub(crate) fn check_header_name(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("header names must not be empty".to_owned());
    }
    if let Some(c) = k
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.!#$%&'*+^`|~".contains(*c)))
    {
        let hint = if k.chars().any(|c| c.is_ascii_uppercase()) {
            format!(
                "; header names are matched lowercase, write {:?}",
                k.to_ascii_lowercase()
            )
        } else {
            String::new()
        };
        return Err(format!(
            "{k:?} is not a valid header name (character {c:?}){hint}"
        ));
    }
    Ok(())
}

/// Reads a header name (a string value, as in `remove = ["x-debug"]`).
pub(crate) fn header_name(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let s = decode::string(v, at, cx)?;
    match check_header_name(&s) {
        Ok(()) => Some(s),
        Err(e) => {
            cx.error(at, e);
            None
        }
    }
}
