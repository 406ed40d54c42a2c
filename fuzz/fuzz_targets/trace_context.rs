//! Trace context parsing (`meshd::trace`): `traceparent`, `tracestate`, `b3` and `x-b3-*` as
//! they arrive on a request from an app or a peer.
//!
//! Input: header lines `name: value` (`\n`-separated; names are lowercased, unusable lines are
//! skipped). Invariants: never panics; each parsed `traceparent`/`b3` value round-trips
//! through its formatter; and what a hop injects downstream, read back by the next hop, is
//! the trace it continued (same trace id, our span as parent, the same decision, the same
//! `tracestate` and B3 encoding), whatever other context headers the request carried.

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meshd::trace::{
    B3Format, Outgoing, Parent, Sampling, SpanId, TraceId, decide, extract, format_b3_single,
    format_traceparent, parse_b3_multi, parse_b3_single, parse_traceparent,
};

/// `meshd::trace::context::MAX_TRACESTATE_LEN` (the module is private).
const MAX_TRACESTATE_LEN: usize = 8192;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&name.to_ascii_lowercase()),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    for value in headers.values() {
        if let Ok(text) = value.to_str() {
            check_traceparent(text);
            check_b3_single(text);
        }
    }
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some((parent, sampling)) = parse_b3_multi(
        get("x-b3-traceid"),
        get("x-b3-spanid"),
        get("x-b3-sampled"),
        get("x-b3-flags"),
    ) {
        assert!(parent.is_some() || sampling != Sampling::Deferred);
    }
    check_next_hop(&headers);
});

fn check_traceparent(text: &str) {
    let Some((parent, sampling)) = parse_traceparent(text) else {
        return;
    };
    let sampled = match sampling {
        Sampling::Sampled => true,
        Sampling::NotSampled => false,
        other => panic!("traceparent gave {other:?}"),
    };
    let formatted = format_traceparent(parent.trace_id, parent.span_id, sampled);
    assert_eq!(formatted.len(), 55);
    assert_eq!(parse_traceparent(&formatted), Some((parent, sampling)));
}

fn check_b3_single(text: &str) {
    let Some((parent, sampling)) = parse_b3_single(text) else {
        return;
    };
    let Some(parent) = parent else {
        assert_ne!(
            sampling,
            Sampling::Deferred,
            "a b3 header that says nothing"
        );
        return;
    };
    let (sampled, debug) = match sampling {
        Sampling::Sampled => (true, false),
        Sampling::NotSampled => (false, false),
        Sampling::Debug => (true, true),
        // Written with a decision, so it reads back with one.
        Sampling::Deferred => return,
    };
    let formatted = format_b3_single(parent.trace_id, parent.span_id, sampled, debug);
    assert_eq!(parse_b3_single(&formatted), Some((Some(parent), sampling)));
}

fn check_next_hop(headers: &HeaderMap) {
    let extracted = extract(headers);
    if extracted.parent.is_none() {
        assert_eq!(
            extracted.trace_state, None,
            "tracestate without a traceparent"
        );
    }
    if let Some(state) = &extracted.trace_state {
        assert!(!state.is_empty() && state.len() <= MAX_TRACESTATE_LEN);
    }
    let trace_id = extracted.parent.map_or_else(
        || TraceId::from_bytes([0xab; 16]).expect("non-zero"),
        |p| p.trace_id,
    );
    let span_id = SpanId::from_bytes([0xcd; 8]).expect("non-zero");
    let sampled = decide(extracted.sampling, trace_id, 0.5);
    let outgoing = Outgoing {
        trace_id,
        span_id,
        sampled,
        debug: extracted.sampling == Sampling::Debug,
        trace_state: extracted.trace_state.clone(),
        b3: extracted.b3,
    };
    // Injected over the request's own headers: every old context header must be replaced.
    let mut onward = headers.clone();
    outgoing.inject(&mut onward);
    let mut clean = HeaderMap::new();
    outgoing.inject(&mut clean);
    let next = extract(&onward);
    assert_eq!(
        next,
        extract(&clean),
        "stale context headers changed what the next hop reads"
    );
    assert_eq!(next.parent, Some(Parent { trace_id, span_id }));
    let expected = if sampled {
        Sampling::Sampled
    } else {
        Sampling::NotSampled
    };
    assert_eq!(next.sampling, expected);
    assert_eq!(next.trace_state, extracted.trace_state);
    assert_eq!(next.b3, extracted.b3);
    if extracted.b3 != B3Format::None {
        // A B3-only next hop (no traceparent) reads the same trace and decision.
        clean.remove("traceparent");
        clean.remove("tracestate");
        let b3_only = extract(&clean);
        assert_eq!(b3_only.parent, Some(Parent { trace_id, span_id }));
        let expected = match (outgoing.debug, sampled) {
            (true, _) => Sampling::Debug,
            (false, true) => Sampling::Sampled,
            (false, false) => Sampling::NotSampled,
        };
        assert_eq!(b3_only.sampling, expected);
    }
}
