//! Trace context on the wire: W3C `traceparent`/`tracestate` and B3 (single `b3` header and
//! multi `x-b3-*` headers) read from and written to HTTP headers, and the sampling decision.
//! Everything here is pure; malformed input is never an error, it is "no context".

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng as _;

#[cfg(test)]
mod tests;

// Names as `HeaderName` constants: looked up on every proxied request, and a `&str` name is
// parsed and case-checked on each lookup.

/// W3C Trace Context parent header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C vendor state, passed through unchanged when the `traceparent` is continued.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3 single-header encoding: `{trace}-{span}[-{sampling}[-{parent}]]` or `{sampling}`.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi-header encoding: trace id.
pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// B3 multi-header encoding: span id of the sender.
pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// B3 multi-header encoding: the sender's parent (read past, never needed).
pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// B3 multi-header encoding: `1` accept, `0` deny, absent defer.
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// B3 multi-header encoding: `1` = debug (implies accept).
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every header that carries trace context; a hop that writes its own context removes all of
/// them first, so no stale parent of the upstream hop reaches the next one.
pub const CONTEXT_HEADERS: [HeaderName; 8] = [
    TRACEPARENT,
    TRACESTATE,
    B3,
    X_B3_TRACEID,
    X_B3_SPANID,
    X_B3_PARENTSPANID,
    X_B3_SAMPLED,
    X_B3_FLAGS,
];

/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
const TRACEPARENT_LEN: usize = 55;

/// A `tracestate` longer than this is dropped rather than copied into every exported span.
/// The W3C spec asks vendors to pass on at least 512 characters; 8 KiB is far above real use.
pub const MAX_TRACESTATE_LEN: usize = 8192;

/// W3C trace-flags bit: the caller recorded (sampled) its span.
const FLAG_SAMPLED: u8 = 0x01;

/// A 16-byte trace id, never all zeros. `Display` is 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id, never all zeros. `Display` is 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId([u8; 8]);

/// What upstream decided about recording this trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// The caller recorded its span (W3C flag `01`, B3 `1`).
    Sampled,
    /// The caller did not record (W3C flag `00`, B3 `0`); nor do we, nor does anyone after us.
    NotSampled,
    /// B3 debug (`d`, `x-b3-flags: 1`): recorded, and passed on as debug to B3 receivers.
    Debug,
    /// No decision arrived (no context, or B3 ids without a sampling state): we decide.
    Deferred,
}

/// Which B3 encoding the request carried; the next hop gets the same one, so apps that only
/// speak B3 keep their traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3Format {
    /// No B3 header arrived: only W3C is written.
    None,
    /// The `b3` header.
    Single,
    /// The `x-b3-*` headers.
    Multi,
}

/// The span that sent the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// Trace the request belongs to.
    pub trace_id: TraceId,
    /// The sender's span, our span's parent.
    pub span_id: SpanId,
}

/// Everything a request said about its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The remote parent, if a valid one arrived.
    pub parent: Option<Parent>,
    /// Upstream's decision (B3 can send a decision without ids).
    pub sampling: Sampling,
    /// `tracestate` of a valid `traceparent` (the W3C spec ties them: no parent, no state).
    pub trace_state: Option<String>,
    /// Which B3 encoding to write downstream.
    pub b3: B3Format,
}

/// The context a hop sends downstream: its own span as the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Trace id (continued or new).
    pub trace_id: TraceId,
    /// The span the next hop should name as its parent.
    pub span_id: SpanId,
    /// Recorded or not; written as flag `01`/`00` so the next hop follows.
    pub sampled: bool,
    /// B3 debug, kept for B3 receivers (W3C has no such flag).
    pub debug: bool,
    /// Passed through from the request.
    pub trace_state: Option<String>,
    /// B3 encoding to write besides `traceparent`.
    pub b3: B3Format,
}

// === impl TraceId ===

impl TraceId {
    /// The id from its bytes; `None` for all zeros (invalid everywhere).
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(Self(bytes))
    }

    /// The raw bytes (as OTLP carries them).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// Parses exactly 32 lowercase hex digits, not all zeros.
    pub fn from_hex(s: &str) -> Option<Self> {
        Self::from_bytes(parse_hex(s.as_bytes())?)
    }

    /// A random non-zero id.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        loop {
            if let Some(id) = Self::from_bytes(rng.random()) {
                return id;
            }
        }
    }

    /// B3 trace ids are 64 or 128 bits; a 64-bit one is widened with leading zeros (as
    /// OpenTelemetry does), so an id whose upper half is zero came from one and is written
    /// back as 16 digits for B3 receivers that only know 64-bit ids.
    fn b3_hex(self) -> String {
        let s = self.to_string();
        match s.strip_prefix("0000000000000000") {
            Some(low) => low.to_owned(),
            None => s,
        }
    }

    /// The low 64 bits, which carry the randomness of both 64- and 128-bit ids.
    fn low_u64(self) -> u64 {
        let [.., a, b, c, d, e, f, g, h] = self.0;
        u64::from_be_bytes([a, b, c, d, e, f, g, h])
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

// === impl SpanId ===

impl SpanId {
    /// The id from its bytes; `None` for all zeros.
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        (bytes != [0; 8]).then_some(Self(bytes))
    }

    /// The raw bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    /// Parses exactly 16 lowercase hex digits, not all zeros.
    pub fn from_hex(s: &str) -> Option<Self> {
        Self::from_bytes(parse_hex(s.as_bytes())?)
    }

    /// A random non-zero id.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        loop {
            if let Some(id) = Self::from_bytes(rng.random()) {
                return id;
            }
        }
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

// === impl Outgoing ===

impl Outgoing {
    /// Replaces every context header in `headers` with this context: `traceparent` always,
    /// `tracestate` when one was continued, B3 in the encoding the request arrived with.
    pub fn inject(&self, headers: &mut HeaderMap) {
        for name in CONTEXT_HEADERS {
            headers.remove(name);
        }
        let parent = traceparent_bytes(self.trace_id, self.span_id, self.sampled);
        put_id(headers, TRACEPARENT, &parent);
        if let Some(state) = &self.trace_state {
            put(headers, TRACESTATE, state.clone());
        }
        match self.b3 {
            B3Format::None => {}
            B3Format::Single => put_id(
                headers,
                B3,
                format_b3_single(self.trace_id, self.span_id, self.sampled, self.debug).as_bytes(),
            ),
            B3Format::Multi => {
                put_id(headers, X_B3_TRACEID, self.trace_id.b3_hex().as_bytes());
                put_id(headers, X_B3_SPANID, self.span_id.to_string().as_bytes());
                // The B3 spec: debug implies accept, so `x-b3-sampled` is not sent with it.
                if self.debug {
                    put(headers, X_B3_FLAGS, "1".to_owned());
                } else {
                    put(
                        headers,
                        X_B3_SAMPLED,
                        sampled_digit(self.sampled).to_owned(),
                    );
                }
            }
        }
    }
}

/// Reads the trace context of a request. Precedence: a valid `traceparent`, then `b3`, then
/// `x-b3-*`; anything malformed counts as absent, so the hop starts a new trace.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let b3 = if headers.contains_key(B3) {
        B3Format::Single
    } else if [X_B3_TRACEID, X_B3_SPANID, X_B3_SAMPLED, X_B3_FLAGS]
        .iter()
        .any(|h| headers.contains_key(h))
    {
        B3Format::Multi
    } else {
        B3Format::None
    };
    if let Some((parent, sampling)) = only_value(headers, TRACEPARENT).and_then(parse_traceparent) {
        return Extracted {
            parent: Some(parent),
            sampling,
            trace_state: trace_state(headers),
            b3,
        };
    }
    let single = || only_value(headers, B3).and_then(parse_b3_single);
    let multi = || {
        parse_b3_multi(
            first_value(headers, X_B3_TRACEID),
            first_value(headers, X_B3_SPANID),
            first_value(headers, X_B3_SAMPLED),
            first_value(headers, X_B3_FLAGS),
        )
    };
    let (parent, sampling) = single()
        .or_else(multi)
        .unwrap_or((None, Sampling::Deferred));
    Extracted {
        parent,
        sampling,
        trace_state: None,
        b3,
    }
}

/// Parses a `traceparent` per W3C Trace Context: version 00 is exactly 55 characters; a
/// higher version (never `ff`) may be longer, is read by the version-00 layout, and must have
/// a `-` after the flags if anything follows. Lowercase hex only; all-zero ids are invalid.
/// Only the sampled bit of the flags is used.
pub fn parse_traceparent(value: &str) -> Option<(Parent, Sampling)> {
    let b = value.trim_matches([' ', '\t']).as_bytes();
    if b.len() < TRACEPARENT_LEN {
        return None;
    }
    let [version] = parse_hex::<1>(&b[0..2])?;
    match version {
        0xff => return None,
        0 if b.len() != TRACEPARENT_LEN => return None,
        _ if b.len() > TRACEPARENT_LEN && b[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_bytes(parse_hex(&b[3..35])?)?;
    let span_id = SpanId::from_bytes(parse_hex(&b[36..52])?)?;
    let [flags] = parse_hex::<1>(&b[53..55])?;
    let sampling = if flags & FLAG_SAMPLED != 0 {
        Sampling::Sampled
    } else {
        Sampling::NotSampled
    };
    Some((trace_id_parent(trace_id, span_id), sampling))
}

/// Formats a version-00 `traceparent`.
pub fn format_traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> String {
    let b = traceparent_bytes(trace_id, span_id, sampled);
    // Only ASCII was written.
    String::from_utf8_lossy(&b).into_owned()
}

/// A version-00 `traceparent` in a stack buffer: written on every proxied request of a
/// tracing meshd, where `format!` and its `String` showed in profiles.
fn traceparent_bytes(trace_id: TraceId, span_id: SpanId, sampled: bool) -> [u8; TRACEPARENT_LEN] {
    let mut b = [b'-'; TRACEPARENT_LEN];
    b[..2].copy_from_slice(b"00");
    hex_into(&mut b[3..35], &trace_id.0);
    hex_into(&mut b[36..52], &span_id.0);
    b[53] = b'0';
    b[54] = if sampled { b'1' } else { b'0' };
    b
}

/// Writes `bytes` as lowercase hex into `out` (exactly twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (o, b) in out.chunks_exact_mut(2).zip(bytes) {
        o[0] = DIGITS[usize::from(b >> 4)];
        o[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Parses a `b3` header: `{trace}-{span}`, `{trace}-{span}-{sampling}`,
/// `{trace}-{span}-{sampling}-{parent}`, or a lone `{sampling}` (`0` = deny). The trace id
/// is 16 or 32 lowercase hex digits, ids are never all zeros.
pub fn parse_b3_single(value: &str) -> Option<(Option<Parent>, Sampling)> {
    let v = value.trim_matches([' ', '\t']).as_bytes();
    if let Some(sampling) = sampling_state(v) {
        return Some((None, sampling));
    }
    let mut parts = v.split(|c| *c == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = SpanId::from_bytes(parse_hex(parts.next()?)?)?;
    let sampling = match parts.next() {
        None => Sampling::Deferred,
        Some(s) => sampling_state(s)?,
    };
    if let Some(parent) = parts.next() {
        // Not needed, but a malformed one makes the whole header malformed.
        SpanId::from_bytes(parse_hex(parent)?)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((Some(trace_id_parent(trace_id, span_id)), sampling))
}

/// Parses the `x-b3-*` headers (trace id, span id, sampled, flags). Ids come as a pair or not
/// at all; a lone decision (`x-b3-sampled: 0`) is valid. `x-b3-sampled` also accepts the
/// `true`/`false` that old clients send.
pub fn parse_b3_multi(
    trace_id: Option<&str>,
    span_id: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<(Option<Parent>, Sampling)> {
    let sampling = if flags.map(str::trim) == Some("1") {
        Sampling::Debug
    } else {
        match sampled.map(str::trim) {
            None => Sampling::Deferred,
            Some("1" | "true") => Sampling::Sampled,
            Some("0" | "false") => Sampling::NotSampled,
            Some(_) => return None,
        }
    };
    match (trace_id, span_id) {
        (None, None) if sampling == Sampling::Deferred => None,
        (None, None) => Some((None, sampling)),
        (Some(t), Some(s)) => {
            let trace_id = b3_trace_id(t.trim().as_bytes())?;
            let span_id = SpanId::from_bytes(parse_hex(s.trim().as_bytes())?)?;
            Some((Some(trace_id_parent(trace_id, span_id)), sampling))
        }
        _ => None,
    }
}

/// Formats a `b3` header without the parent (optional in the spec, and what OpenTelemetry
/// writes): sampling state `d` for debug, else `1`/`0`.
pub fn format_b3_single(trace_id: TraceId, span_id: SpanId, sampled: bool, debug: bool) -> String {
    let state = if debug { "d" } else { sampled_digit(sampled) };
    format!("{}-{span_id}-{state}", trace_id.b3_hex())
}

/// Whether a span is recorded: upstream's decision when there is one (parent-based), else
/// `ratio` of new traces (0.0 none, 1.0 all), decided on the trace id's low 64 bits as
/// OpenTelemetry's `TraceIdRatioBased` does, so every hop that must decide on the same trace
/// with the same ratio agrees.
pub fn decide(sampling: Sampling, trace_id: TraceId, ratio: f64) -> bool {
    match sampling {
        Sampling::Sampled | Sampling::Debug => true,
        Sampling::NotSampled => false,
        Sampling::Deferred => ratio_sampled(trace_id, ratio),
    }
}

/// `ratio` of trace ids, by threshold on the low 63 bits; NaN and values ≤ 0 sample nothing.
fn ratio_sampled(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    // 2^63 keeps the product inside u64; `as` saturates, never wraps.
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    (trace_id.low_u64() >> 1) < bound
}

fn trace_id_parent(trace_id: TraceId, span_id: SpanId) -> Parent {
    Parent { trace_id, span_id }
}

/// A 16- (widened with leading zeros) or 32-digit B3 trace id.
fn b3_trace_id(s: &[u8]) -> Option<TraceId> {
    match s.len() {
        16 => {
            let low: [u8; 8] = parse_hex(s)?;
            let mut bytes = [0; 16];
            bytes[8..].copy_from_slice(&low);
            TraceId::from_bytes(bytes)
        }
        _ => TraceId::from_bytes(parse_hex(s)?),
    }
}

fn sampling_state(s: &[u8]) -> Option<Sampling> {
    match s {
        b"0" => Some(Sampling::NotSampled),
        b"1" => Some(Sampling::Sampled),
        b"d" => Some(Sampling::Debug),
        _ => None,
    }
}

fn sampled_digit(sampled: bool) -> &'static str {
    if sampled { "1" } else { "0" }
}

/// Exactly `2 * N` lowercase hex digits (the W3C and B3 specs both say lowercase).
fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Ids are written on every traced request (the context header, the access log): digits by
/// table into one buffer and one write, not a formatting call per byte.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.chunks(16) {
        let mut buf = [0u8; 32];
        hex_into(&mut buf[..chunk.len() * 2], chunk);
        // Only ASCII hex digits were written.
        let hex = std::str::from_utf8(&buf[..chunk.len() * 2]).map_err(|_| fmt::Error)?;
        f.write_str(hex)?;
    }
    Ok(())
}

/// The header's value if it appears exactly once (W3C: duplicated `traceparent` headers are
/// invalid and restart the trace).
fn only_value(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

fn first_value(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// All `tracestate` headers joined with `,` (the spec allows splitting it across headers);
/// `None` when absent, empty, not visible ASCII or longer than [`MAX_TRACESTATE_LEN`].
fn trace_state(headers: &HeaderMap) -> Option<String> {
    let mut parts = Vec::new();
    for v in headers.get_all(TRACESTATE) {
        let s = v.to_str().ok()?.trim();
        if !s.is_empty() {
            parts.push(s);
        }
    }
    let joined = parts.join(",");
    (!joined.is_empty() && joined.len() <= MAX_TRACESTATE_LEN).then_some(joined)
}

/// Puts a per-request id (`traceparent`, B3 ids) marked sensitive, which HPACK encodes as a
/// never-indexed literal: an id that never repeats would otherwise enter the HTTP/2 link's
/// dynamic table on every request and evict the entries that do repeat (`:authority`, the
/// path, `user-agent`), so every header of every request went out as a literal again.
fn put_id(headers: &mut HeaderMap, name: HeaderName, value: &[u8]) {
    // Hex and digits only (see `put`).
    if let Ok(mut v) = HeaderValue::from_bytes(value) {
        v.set_sensitive(true);
        headers.insert(name, v);
    }
}

fn put(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Values built here are hex, digits and a passed-through visible-ASCII tracestate, so
    // the conversion cannot fail; if it ever did, leaving the header out is the safe side.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}
