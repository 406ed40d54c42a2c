//! Table tests for the wire formats and the sampling decision.

use super::*;

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";
const P: &str = "e457b5a2e4d86bd1";

fn tid(s: &str) -> TraceId {
    TraceId::from_hex(s).expect("test trace id")
}

fn sid(s: &str) -> SpanId {
    SpanId::from_hex(s).expect("test span id")
}

fn parent(t: &str, s: &str) -> Option<Parent> {
    Some(Parent {
        trace_id: tid(t),
        span_id: sid(s),
    })
}

/// What the B3 parsers return.
type Parsed = Option<(Option<Parent>, Sampling)>;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
            HeaderValue::from_str(v).expect("test header value"),
        );
    }
    h
}

#[test]
fn traceparent() {
    use Sampling::*;
    let long = format!("01-{T}-{S}-01-what-ever");
    let cases: &[(&str, Option<Sampling>)] = &[
        (&format!("00-{T}-{S}-01"), Some(Sampled)),
        (&format!("00-{T}-{S}-00"), Some(NotSampled)),
        // Only the sampled bit counts; other bits are ignored.
        (&format!("00-{T}-{S}-09"), Some(Sampled)),
        (&format!("00-{T}-{S}-02"), Some(NotSampled)),
        // Optional whitespace around the value.
        (&format!(" 00-{T}-{S}-01\t"), Some(Sampled)),
        // Future versions: parsed by the 00 layout, may carry more after a dash.
        (&format!("cc-{T}-{S}-01"), Some(Sampled)),
        (&long, Some(Sampled)),
        (&format!("01-{T}-{S}-01x"), None),
        (&format!("01-{T}-{S}-01-"), Some(Sampled)),
        // Version 00 must be exactly 55 characters.
        (&format!("00-{T}-{S}-01-"), None),
        (&format!("00-{T}-{S}-01-extra"), None),
        (&format!("ff-{T}-{S}-01"), None),
        (&format!("0-{T}-{S}-01"), None),
        (&format!("0g-{T}-{S}-01"), None),
        // Uppercase hex is invalid (the spec's HEXDIGLC).
        (&format!("00-{}-{S}-01", T.to_uppercase()), None),
        (&format!("00-{T}-{}-01", S.to_uppercase()), None),
        (&format!("00-{T}-{S}-0A"), None),
        (&format!("0A-{T}-{S}-01"), None),
        // All-zero ids.
        (&format!("00-{}-{S}-01", "0".repeat(32)), None),
        (&format!("00-{T}-{}-01", "0".repeat(16)), None),
        // Bad lengths and separators.
        (&format!("00-{}-{S}-01", &T[..31]), None),
        (&format!("00-{T}0-{S}-01"), None),
        (&format!("00-{T}-{}-01", &S[..15]), None),
        (&format!("00-{T}-{S}-1"), None),
        (&format!("00_{T}-{S}-01"), None),
        (&format!("00-{T}_{S}-01"), None),
        (&format!("00-{T}-{S}_01"), None),
        ("", None),
        ("00", None),
        ("garbage", None),
        // Non-ASCII must not panic on a char boundary.
        (&format!("00-{}é-{S}-01", &T[..31]), None),
        (&"é".repeat(40), None),
    ];
    for (input, want) in cases {
        let got = parse_traceparent(input);
        match want {
            Some(s) => assert_eq!(got, Some((parent(T, S).expect("p"), *s)), "{input:?}"),
            None => assert_eq!(got, None, "{input:?}"),
        }
    }
}

#[test]
fn traceparent_round_trip() {
    for sampled in [true, false] {
        let s = format_traceparent(tid(T), sid(S), sampled);
        assert_eq!(s.len(), 55);
        let want = if sampled {
            Sampling::Sampled
        } else {
            Sampling::NotSampled
        };
        assert_eq!(
            parse_traceparent(&s),
            Some((parent(T, S).expect("p"), want))
        );
    }
    assert_eq!(
        format_traceparent(tid(T), sid(S), true),
        format!("00-{T}-{S}-01")
    );
}

#[test]
fn b3_single() {
    use Sampling::*;
    let t64 = &T[16..];
    let cases: &[(String, Parsed)] = &[
        (format!("{T}-{S}"), Some((parent(T, S), Deferred))),
        (format!("{T}-{S}-1"), Some((parent(T, S), Sampled))),
        (format!("{T}-{S}-0"), Some((parent(T, S), NotSampled))),
        (format!("{T}-{S}-d"), Some((parent(T, S), Debug))),
        (format!("{T}-{S}-1-{P}"), Some((parent(T, S), Sampled))),
        // 64-bit trace ids are widened with leading zeros.
        (
            format!("{t64}-{S}-1"),
            Some((parent(&format!("{}{t64}", "0".repeat(16)), S), Sampled)),
        ),
        // Decision only.
        ("0".into(), Some((None, NotSampled))),
        ("1".into(), Some((None, Sampled))),
        ("d".into(), Some((None, Debug))),
        // Malformed.
        ("".into(), None),
        ("2".into(), None),
        ("true".into(), None),
        (format!("{T}-{S}-2"), None),
        (format!("{T}-{S}-1-"), None),
        (format!("{T}-{S}-1-{P}-x"), None),
        (format!("{T}-{S}-1-{}", "0".repeat(16)), None),
        (format!("{T}-{S}-"), None),
        (T.to_owned(), None),
        (format!("{}-{S}", &T[..20]), None),
        (format!("{}-{S}", T.to_uppercase()), None),
        (format!("{}-{S}", "0".repeat(32)), None),
        (format!("{}-{S}", "0".repeat(16)), None),
        (format!("{T}-{}", "0".repeat(16)), None),
        (format!("{T}-{S}0"), None),
        ("é-é-1".into(), None),
    ];
    for (input, want) in cases {
        assert_eq!(parse_b3_single(input), *want, "{input:?}");
    }
}

#[test]
fn b3_multi() {
    use Sampling::*;
    type Case<'a> = (
        (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
        ),
        Parsed,
    );
    let cases: &[Case<'_>] = &[
        (
            (Some(T), Some(S), None, None),
            Some((parent(T, S), Deferred)),
        ),
        (
            (Some(T), Some(S), Some("1"), None),
            Some((parent(T, S), Sampled)),
        ),
        (
            (Some(T), Some(S), Some("true"), None),
            Some((parent(T, S), Sampled)),
        ),
        (
            (Some(T), Some(S), Some("0"), None),
            Some((parent(T, S), NotSampled)),
        ),
        (
            (Some(T), Some(S), Some("false"), None),
            Some((parent(T, S), NotSampled)),
        ),
        (
            (Some(T), Some(S), None, Some("1")),
            Some((parent(T, S), Debug)),
        ),
        // Debug wins over a deny.
        (
            (Some(T), Some(S), Some("0"), Some("1")),
            Some((parent(T, S), Debug)),
        ),
        (
            (Some(T), Some(S), Some("1"), Some("0")),
            Some((parent(T, S), Sampled)),
        ),
        ((None, None, Some("0"), None), Some((None, NotSampled))),
        ((None, None, None, Some("1")), Some((None, Debug))),
        ((None, None, None, None), None),
        ((Some(T), None, Some("1"), None), None),
        ((None, Some(S), Some("1"), None), None),
        ((Some(T), Some(S), Some("yes"), None), None),
        ((Some("xyz"), Some(S), None, None), None),
        ((Some(T), Some("0000000000000000"), None, None), None),
    ];
    for ((t, s, sampled, flags), want) in cases {
        assert_eq!(
            parse_b3_multi(*t, *s, *sampled, *flags),
            *want,
            "{t:?} {s:?} {sampled:?} {flags:?}"
        );
    }
}

#[test]
fn extract_precedence() {
    use Sampling::*;
    let tp = format!("00-{T}-{S}-01");
    let other = "0af7651916cd43dd8448eb211c80319c";
    let b3 = format!("{other}-{P}-0");
    let cases: Vec<(Vec<(&str, &str)>, Extracted)> = vec![
        (
            vec![],
            Extracted {
                parent: None,
                sampling: Deferred,
                trace_state: None,
                b3: B3Format::None,
            },
        ),
        // traceparent wins over b3; the b3 encoding is remembered for writing.
        (
            vec![
                ("traceparent", tp.as_str()),
                ("b3", &b3),
                ("tracestate", "a=1"),
            ],
            Extracted {
                parent: parent(T, S),
                sampling: Sampled,
                trace_state: Some("a=1".into()),
                b3: B3Format::Single,
            },
        ),
        // A malformed traceparent falls back to B3, and its tracestate goes with it.
        (
            vec![
                ("traceparent", "00-bad"),
                ("b3", b3.as_str()),
                ("tracestate", "a=1"),
            ],
            Extracted {
                parent: parent(other, P),
                sampling: NotSampled,
                trace_state: None,
                b3: B3Format::Single,
            },
        ),
        // Duplicate traceparent headers are invalid.
        (
            vec![("traceparent", tp.as_str()), ("traceparent", &tp)],
            Extracted {
                parent: None,
                sampling: Deferred,
                trace_state: None,
                b3: B3Format::None,
            },
        ),
        // tracestate split across headers is joined.
        (
            vec![
                ("traceparent", tp.as_str()),
                ("tracestate", "a=1"),
                ("tracestate", "b=2"),
            ],
            Extracted {
                parent: parent(T, S),
                sampling: Sampled,
                trace_state: Some("a=1,b=2".into()),
                b3: B3Format::None,
            },
        ),
        // A malformed b3 falls back to x-b3-*.
        (
            vec![
                ("b3", "garbage"),
                ("x-b3-traceid", other),
                ("x-b3-spanid", P),
                ("x-b3-sampled", "1"),
            ],
            Extracted {
                parent: parent(other, P),
                sampling: Sampled,
                trace_state: None,
                b3: B3Format::Single,
            },
        ),
        (
            vec![("x-b3-traceid", other), ("x-b3-spanid", P)],
            Extracted {
                parent: parent(other, P),
                sampling: Deferred,
                trace_state: None,
                b3: B3Format::Multi,
            },
        ),
        (
            vec![("b3", "0")],
            Extracted {
                parent: None,
                sampling: NotSampled,
                trace_state: None,
                b3: B3Format::Single,
            },
        ),
        // Malformed multi: no context, but B3 is still what the app speaks.
        (
            vec![("x-b3-traceid", "nope")],
            Extracted {
                parent: None,
                sampling: Deferred,
                trace_state: None,
                b3: B3Format::Multi,
            },
        ),
    ];
    for (pairs, want) in cases {
        assert_eq!(extract(&headers(&pairs)), want, "{pairs:?}");
    }
}

#[test]
fn extract_ignores_non_ascii_values() {
    let mut h = HeaderMap::new();
    h.insert(
        TRACEPARENT,
        HeaderValue::from_bytes(b"00-\xff\xfe").expect("opaque bytes are a valid value"),
    );
    h.insert(
        B3,
        HeaderValue::from_bytes(b"\xe9-\xe9").expect("opaque bytes are a valid value"),
    );
    let got = extract(&h);
    assert_eq!(got.parent, None);
    assert_eq!(got.sampling, Sampling::Deferred);
}

#[test]
fn inject_replaces_context_headers() {
    let short = "0000000000000000a3ce929d0e0e4736";
    let base = |b3, debug, sampled, trace: &str, state: Option<&str>| Outgoing {
        trace_id: tid(trace),
        span_id: sid(P),
        sampled,
        debug,
        trace_state: state.map(str::to_owned),
        b3,
    };
    let tp = |s: &str, f: &str| ("traceparent", format!("00-{s}-{P}-{f}"));
    let cases: Vec<(Outgoing, Vec<(&str, String)>)> = vec![
        (
            base(B3Format::None, false, true, T, Some("k=v")),
            vec![tp(T, "01"), ("tracestate", "k=v".into())],
        ),
        (
            base(B3Format::None, false, false, T, None),
            vec![tp(T, "00")],
        ),
        (
            base(B3Format::Single, false, true, T, None),
            vec![tp(T, "01"), ("b3", format!("{T}-{P}-1"))],
        ),
        (
            base(B3Format::Single, true, true, T, None),
            vec![tp(T, "01"), ("b3", format!("{T}-{P}-d"))],
        ),
        (
            base(B3Format::Single, false, false, short, None),
            vec![tp(short, "00"), ("b3", format!("a3ce929d0e0e4736-{P}-0"))],
        ),
        (
            base(B3Format::Multi, false, true, short, None),
            vec![
                tp(short, "01"),
                ("x-b3-traceid", "a3ce929d0e0e4736".into()),
                ("x-b3-spanid", P.into()),
                ("x-b3-sampled", "1".into()),
            ],
        ),
        (
            base(B3Format::Multi, true, true, T, None),
            vec![
                tp(T, "01"),
                ("x-b3-traceid", T.into()),
                ("x-b3-spanid", P.into()),
                ("x-b3-flags", "1".into()),
            ],
        ),
    ];
    let incoming = format!("00-{T}-{S}-01");
    for (out, want) in cases {
        let mut h = headers(&[
            ("traceparent", incoming.as_str()),
            ("traceparent", "dup"),
            ("tracestate", "stale=1"),
            ("b3", "stale"),
            ("x-b3-traceid", "stale"),
            ("x-b3-spanid", "stale"),
            ("x-b3-parentspanid", "stale"),
            ("x-b3-sampled", "stale"),
            ("x-b3-flags", "stale"),
            ("x-app", "kept"),
        ]);
        out.inject(&mut h);
        let mut want = want;
        want.push(("x-app", "kept".into()));
        let mut got: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect();
        let mut want: Vec<(String, String)> =
            want.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{out:?}");
        // Ids differ on every request: never indexed by HPACK, so they cannot evict the
        // headers that repeat from the link's table. What repeats stays indexable.
        for (k, v) in &h {
            let id = ["traceparent", "b3", "x-b3-traceid", "x-b3-spanid"].contains(&k.as_str());
            assert_eq!(v.is_sensitive(), id, "{k}");
        }
        // What we wrote reads back as our span.
        let back = extract(&h);
        assert_eq!(back.parent.map(|p| p.span_id), Some(out.span_id));
        assert_eq!(back.parent.map(|p| p.trace_id), Some(out.trace_id));
    }
}

#[test]
fn decision() {
    use Sampling::*;
    // Low 64 bits 0 → lowest position; all ones → highest.
    let low = tid("ffffffffffffffff0000000000000001");
    let high = tid("0000000000000001ffffffffffffffff");
    // Low 64 bits 2^63: exactly the 0.5 threshold after the shift, so 0.5 excludes it.
    let mid = tid("00000000000000018000000000000000");
    let cases = [
        // Parent-based: the ratio does not matter.
        (Sampled, high, 0.0, true),
        (Debug, high, 0.0, true),
        (NotSampled, low, 1.0, false),
        // Deferred: by ratio on the trace id.
        (Deferred, low, 1.0, true),
        (Deferred, high, 1.0, true),
        (Deferred, low, 0.0, false),
        (Deferred, high, 0.5, false),
        (Deferred, low, 0.5, true),
        // However small the ratio, the lowest ids are in.
        (Deferred, low, 1e-18, true),
        (Deferred, mid, 0.5, false),
        (Deferred, mid, 0.51, true),
        (Deferred, high, 0.999_999, false),
        // Out of range / NaN never panic.
        (Deferred, low, -1.0, false),
        (Deferred, low, f64::NAN, false),
        (Deferred, high, 7.0, true),
    ];
    for (sampling, trace_id, ratio, want) in cases {
        assert_eq!(
            decide(sampling, trace_id, ratio),
            want,
            "{sampling:?} {trace_id} {ratio}"
        );
    }
}

#[test]
fn ratio_is_roughly_the_probability() {
    let n = 20_000;
    let hits = (0..n)
        .filter(|_| decide(Sampling::Deferred, TraceId::random(), 0.25))
        .count();
    // 0.25 ± 5 sigma (sigma ≈ 0.003 at n = 20k): never flaky, still catches a wrong scale.
    let p = hits as f64 / n as f64;
    assert!((0.235..0.265).contains(&p), "sampled {p}");
}

#[test]
fn ids() {
    assert_eq!(TraceId::from_bytes([0; 16]), None);
    assert_eq!(SpanId::from_bytes([0; 8]), None);
    assert_eq!(tid(T).to_string(), T);
    assert_eq!(sid(S).to_string(), S);
    assert_eq!(TraceId::from_hex(&T.to_uppercase()), None);
    for _ in 0..100 {
        let (t, s) = (TraceId::random(), SpanId::random());
        assert_eq!(TraceId::from_hex(&t.to_string()), Some(t));
        assert_eq!(SpanId::from_hex(&s.to_string()), Some(s));
    }
}
