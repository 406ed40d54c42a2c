//! Tests for health checks: the tracker, status ranges, jitter and the gRPC codec as tables;
//! the runners and `spawn` against real loopback servers and real processes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::name::ServiceKey;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::probe::{decode_check_response, encode_check_request};
use super::*;

/// Longest wait for any condition; generous because CI machines stall.
const DEADLINE: Duration = Duration::from_secs(10);

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn web() -> ServiceKey {
    ServiceKey::parse("web").unwrap()
}

/// A check with short timers for tests: 100ms interval, 80ms timeout, thresholds 2/2.
fn check(name: &str, kind: CheckKind) -> Check {
    Check {
        name: name.to_owned(),
        kind,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(80),
        unhealthy_threshold: nz(2),
        healthy_threshold: nz(2),
    }
}

fn http_check(addr: SocketAddr, path: &str) -> Check {
    let kind = CheckKind::Http {
        url: format!("http://{addr}{path}").parse().unwrap(),
        expect_status: StatusRange::new(200, 399).unwrap(),
    };
    check("ready", kind)
}

fn command_check(argv: &[&str], timeout: Duration) -> Check {
    let argv = argv.iter().map(|s| (*s).to_owned()).collect();
    Check {
        timeout,
        interval: timeout * 2,
        ..check("command", CheckKind::Command { argv })
    }
}

fn no_shutdown() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    // Leaked on purpose: a dropped sender would count as shutdown.
    std::mem::forget(tx);
    rx
}

/// Waits until `pred` holds for the published health, failing the test after [`DEADLINE`].
async fn wait_until(
    rx: &mut watch::Receiver<ServiceHealth>,
    what: &str,
    pred: impl FnMut(&ServiceHealth) -> bool,
) -> ServiceHealth {
    let result = tokio::time::timeout(DEADLINE, rx.wait_for(pred))
        .await
        .map(|r| r.map(|h| h.clone()));
    match result {
        Ok(Ok(health)) => health,
        Ok(Err(_)) => panic!("health watch closed while waiting for {what}"),
        Err(_) => panic!("no {what} within {DEADLINE:?}; last: {:#?}", *rx.borrow()),
    }
}

fn reason(health: &ServiceHealth) -> &str {
    health.checks[0].reason.as_deref().unwrap_or_default()
}

// === tracker ===

fn outcome(c: char) -> Outcome {
    match c {
        'p' => Outcome::pass("status 200"),
        'f' => Outcome::fail("status 503"),
        _ => panic!("unknown result {c:?}"),
    }
}

fn state_letter(s: State) -> char {
    match s {
        State::Starting => 'S',
        State::Healthy => 'H',
        State::Unhealthy => 'U',
    }
}

fn tracker(thresholds: &[(u32, u32)]) -> Tracker {
    let checks: Vec<Check> = (thresholds.iter().enumerate())
        .map(|(i, (unhealthy, healthy))| Check {
            unhealthy_threshold: nz(*unhealthy),
            healthy_threshold: nz(*healthy),
            ..check(
                &format!("c{i}"),
                CheckKind::Tcp {
                    address: "x:1".to_owned(),
                },
            )
        })
        .collect();
    Tracker::new(web(), &checks)
}

#[test]
fn tracker_transitions() {
    // (unhealthy_threshold, healthy_threshold, results, state after each result)
    #[rustfmt::skip]
    let cases: &[(u32, u32, &str, &str)] = &[
        // Starting: one pass is enough, failures keep it starting.
        (3, 2, "p", "H"),
        (3, 2, "fffffp", "SSSSSH"),
        // Healthy: unhealthy after `unhealthy_threshold` failures in a row.
        (3, 2, "pfff", "HHHU"),
        (3, 2, "pffpfff", "HHHHHHU"),
        (3, 2, "pppp", "HHHH"),
        // Unhealthy: healthy again after `healthy_threshold` passes in a row.
        (3, 2, "pfffpp", "HHHUUH"),
        (3, 2, "pfffpfpp", "HHHUUUUH"),
        (3, 2, "pffffff", "HHHUUUU"),
        (2, 3, "pffppp", "HHUUUH"),
        // Thresholds of 1 follow every result.
        (1, 1, "pfpfp", "HUHUH"),
        // A start failure does not count towards `unhealthy_threshold` after the first pass.
        (2, 2, "ffpf", "SSHH"),
    ];
    for (unhealthy, healthy, results, expected) in cases {
        let mut t = tracker(&[(*unhealthy, *healthy)]);
        let states: String = (results.chars())
            .map(|r| {
                t.record(0, outcome(r), SystemTime::UNIX_EPOCH);
                state_letter(t.health().checks[0].state)
            })
            .collect();
        assert_eq!(
            &states, expected,
            "thresholds {unhealthy}/{healthy}, results {results}"
        );
        let status = &t.health().checks[0];
        assert_eq!(status.healthy, status.state == State::Healthy);
        assert_eq!(t.health().healthy, status.healthy, "one check decides");
    }
}

#[test]
fn tracker_counts_runs_and_keeps_the_last_result() {
    // (results, consecutive successes, consecutive failures, last reason)
    #[rustfmt::skip]
    let cases: &[(&str, u32, u32, &str)] = &[
        ("p", 1, 0, "status 200"),
        ("ppp", 3, 0, "status 200"),
        ("pppf", 0, 1, "status 503"),
        ("ffpff", 0, 2, "status 503"),
        ("fffp", 1, 0, "status 200"),
    ];
    for (results, successes, failures, reason) in cases {
        let mut t = tracker(&[(3, 2)]);
        for (i, r) in results.chars().enumerate() {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(i as u64);
            t.record(0, outcome(r), at);
        }
        let status = &t.health().checks[0];
        assert_eq!(status.consecutive_successes, *successes, "{results}");
        assert_eq!(status.consecutive_failures, *failures, "{results}");
        assert_eq!(status.reason.as_deref(), Some(*reason), "{results}");
        let last = SystemTime::UNIX_EPOCH + Duration::from_secs(results.len() as u64 - 1);
        assert_eq!(status.last_checked, Some(last), "{results}");
    }
}

#[test]
fn tracker_updates_say_what_changed() {
    use State::*;
    let update = |check, service, reason_changed| Update {
        check,
        service,
        reason_changed,
    };
    // (results before, result, what the result changed)
    #[rustfmt::skip]
    let cases: &[(&str, Outcome, Update)] = &[
        ("", outcome('p'), update(Some((Starting, Healthy)), Some(true), true)),
        ("", outcome('f'), update(None, None, true)),
        ("f", outcome('f'), update(None, None, false)),
        ("f", Outcome::fail("timed out after 1s"), update(None, None, true)),
        ("p", outcome('p'), update(None, None, false)),
        ("p", Outcome::pass("status 204"), update(None, None, true)),
        ("p", outcome('f'), update(None, None, true)),
        ("pf", outcome('f'), update(None, None, false)),
        ("pff", outcome('f'), update(Some((Healthy, Unhealthy)), Some(false), false)),
        ("pfff", outcome('p'), update(None, None, true)),
        ("pfffp", outcome('p'), update(Some((Unhealthy, Healthy)), Some(true), false)),
    ];
    for (before, result, expected) in cases {
        let mut t = tracker(&[(3, 2)]);
        for r in before.chars() {
            t.record(0, outcome(r), SystemTime::UNIX_EPOCH);
        }
        let got = t.record(0, result.clone(), SystemTime::now());
        assert_eq!(&got, expected, "after {before:?} then {result:?}");
        // Counters and times change on every run; only these wake readers.
        let notable = expected.check.is_some() || expected.service.is_some();
        assert_eq!(got.is_notable(), notable || expected.reason_changed);
    }
}

#[test]
fn service_is_healthy_iff_every_check_is() {
    let mut t = tracker(&[(1, 1), (1, 1)]);
    assert!(!t.health().healthy, "starts unhealthy");
    let at = SystemTime::UNIX_EPOCH;

    let u = t.record(0, outcome('p'), at);
    assert_eq!(u.service, None, "second check still starting");
    assert!(!t.health().healthy);

    let u = t.record(1, outcome('p'), at);
    assert_eq!(u.service, Some(true));
    assert!(t.health().healthy);

    let u = t.record(0, outcome('f'), at);
    assert_eq!(u.service, Some(false));
    assert_eq!(u.check, Some((State::Healthy, State::Unhealthy)));

    let u = t.record(1, outcome('f'), at);
    assert_eq!(u.service, None, "already unhealthy");
    assert_eq!(u.check, Some((State::Healthy, State::Unhealthy)));

    t.record(0, outcome('p'), at);
    assert!(!t.health().healthy, "check 1 still unhealthy");
    let u = t.record(1, outcome('p'), at);
    assert_eq!(u.service, Some(true));
}

#[test]
fn service_without_checks_is_healthy() {
    let t = Tracker::new(web(), &[]);
    assert!(t.health().healthy);
    assert!(t.health().checks.is_empty());
}

#[test]
fn health_serializes_for_the_admin_endpoint() {
    let mut t = tracker(&[(3, 2)]);
    t.record(0, outcome('p'), SystemTime::UNIX_EPOCH);
    let json = serde_json::to_value(t.health()).unwrap();
    assert_eq!(json["service"], "default/web");
    assert_eq!(json["healthy"], true);
    assert_eq!(json["checks"][0]["state"], "healthy");
    assert_eq!(json["checks"][0]["reason"], "status 200");
    assert_eq!(
        json["checks"][0]["last_checked"],
        "1970-01-01T00:00:00.000Z"
    );

    let check = http_check("127.0.0.1:8080".parse().unwrap(), "/healthz");
    let json = serde_json::to_value(&check).unwrap();
    assert_eq!(json["kind"]["http"]["url"], "http://127.0.0.1:8080/healthz");
    assert_eq!(json["kind"]["http"]["expect_status"], "200-399");
    assert_eq!(json["interval"], "100ms");
}

// === pure helpers ===

#[test]
fn status_ranges() {
    // (text, lowest and highest code in the range)
    #[rustfmt::skip]
    let valid: &[(&str, u16, u16)] = &[
        ("200", 200, 200),
        ("200-399", 200, 399),
        (" 204 - 204 ", 204, 204),
        ("100-599", 100, 599),
    ];
    for (text, min, max) in valid {
        let r: StatusRange = text.parse().unwrap();
        assert_eq!(Some(r), StatusRange::new(*min, *max), "{text}");
        assert!(r.contains(*min) && r.contains(*max), "{text}");
        assert!(!r.contains(min - 1) && !r.contains(max + 1), "{text}");
    }
    // (text, fragment of the error)
    #[rustfmt::skip]
    let invalid: &[(&str, &str)] = &[
        ("abc", "\"abc\" is not a number"),
        ("200-", "\"\" is not a number"),
        ("2xx", "not a number"),
        ("99", "99 is not an HTTP status code"),
        ("600", "600 is not an HTTP status code"),
        ("70000", "70000 is not an HTTP status code"),
        ("399-200", "399 is greater than 200"),
        ("-200", "not a number"),
    ];
    for (text, fragment) in invalid {
        let e = text.parse::<StatusRange>().unwrap_err();
        assert!(e.to_string().contains(fragment), "{text}: {e}");
    }
    assert_eq!(StatusRange::new(200, 399).unwrap().to_string(), "200-399");
    assert_eq!(StatusRange::new(204, 204).unwrap().to_string(), "204");
    assert_eq!(StatusRange::new(99, 200), None);
    assert_eq!(StatusRange::new(300, 200), None);
}

#[test]
fn jitter_only_shortens_the_interval_by_up_to_ten_percent() {
    let interval = Duration::from_secs(10);
    #[rustfmt::skip]
    let cases: &[(f64, Duration)] = &[
        (0.0, Duration::from_secs(10)),
        (0.5, Duration::from_millis(9500)),
        (1.0, Duration::from_secs(9)),
        (-3.0, Duration::from_secs(10)),
        (7.0, Duration::from_secs(9)),
    ];
    for (r, expected) in cases {
        let delay = next_delay(interval, *r);
        let diff = delay.abs_diff(*expected);
        assert!(diff < Duration::from_micros(1), "r={r}: {delay:?}");
    }
}

#[test]
fn grpc_request_encoding() {
    assert_eq!(&encode_check_request("")[..], &[0, 0, 0, 0, 0]);
    assert_eq!(
        &encode_check_request("db")[..],
        &[0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']
    );
    let long = "s".repeat(200);
    let encoded = encode_check_request(&long);
    // 200 needs a two-byte varint: 0xc8 0x01.
    assert_eq!(&encoded[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
    assert_eq!(encoded.len(), 5 + 3 + 200);
}

#[test]
fn grpc_response_decoding() {
    #[rustfmt::skip]
    let cases: &[(&[u8], Result<u64, &str>)] = &[
        (&[0, 0, 0, 0, 2, 0x08, 1], Ok(1)),
        (&[0, 0, 0, 0, 2, 0x08, 2], Ok(2)),
        // Proto3 omits the default: UNKNOWN.
        (&[0, 0, 0, 0, 0], Ok(0)),
        // Unknown fields of every wire type are skipped.
        (&[0, 0, 0, 0, 18, 0x10, 0x96, 0x01, 0x1a, 2, b'h', b'i', 0x21, 1, 2, 3, 4, 5, 6, 7, 8, 0x08, 1], Ok(1)),
        (&[0, 0, 0, 0, 17, 0x10, 0x96, 0x01, 0x1a, 2, b'h', b'i', 0x21, 1, 2, 3, 4, 5, 6, 7, 8, 0x08, 1], Err("truncated varint")),
        (&[0, 0, 0, 0, 7, 0x2d, 1, 2, 3, 4, 0x08, 3], Ok(3)),
        (&[0, 0, 0, 0], Err("shorter than a gRPC frame header")),
        (&[1, 0, 0, 0, 2, 0x08, 1], Err("compressed")),
        (&[0, 0, 0, 0, 9, 0x08, 1], Err("shorter than its frame says")),
        (&[0, 0, 0, 0, 2, 0x08, 0x80], Err("truncated varint")),
        (&[0, 0, 0, 0, 2, 0x0b, 1], Err("unknown wire type")),
    ];
    for (body, expected) in cases {
        match (decode_check_response(body), expected) {
            (Ok(status), Ok(want)) => assert_eq!(status, *want, "{body:?}"),
            (Err(e), Err(fragment)) => assert!(e.to_string().contains(fragment), "{body:?}: {e}"),
            (got, _) => panic!("{body:?}: got {got:?}, expected {expected:?}"),
        }
    }
}

// === test servers ===

/// An HTTP/1.1 app answering every request with the status in the returned cell, and keeping
/// the last request head.
async fn http_app(status: u16) -> (SocketAddr, Arc<AtomicU16>, Arc<Mutex<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(status));
    let last_request = Arc::new(Mutex::new(String::new()));
    let (status_in, last_in) = (status.clone(), last_request.clone());
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (status, last) = (status_in.clone(), last_in.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                *last.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
                let code = status.load(Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 {code} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, status, last_request)
}

/// A listener that accepts connections and never answers.
async fn silent_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    addr
}

/// Accepts and drops connections until the returned task is aborted, which closes the
/// listener.
fn tcp_app(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    })
}

/// `service name -> ServingStatus` of the test gRPC server; names not in the map get
/// grpc-status 5 (NOT_FOUND), as grpc-go's health server answers.
type Statuses = Arc<Mutex<HashMap<String, u64>>>;

type GrpcBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A gRPC health server over h2c, written with hyper so the client is tested against an
/// independent encoder and decoder.
async fn grpc_app(statuses: Statuses) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let statuses = statuses.clone();
            let service = hyper::service::service_fn(move |req| grpc_answer(req, statuses.clone()));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

async fn grpc_answer(
    req: http::Request<Incoming>,
    statuses: Statuses,
) -> Result<http::Response<GrpcBody>, Infallible> {
    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
    assert_eq!(req.headers()["content-type"], "application/grpc");
    assert_eq!(req.headers()["te"], "trailers");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // Frame header, then an optional field 1 with a one-byte length.
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    assert_eq!(body.len(), 5 + len);
    let service = match len {
        0 => String::new(),
        _ => {
            assert_eq!(body[5], 0x0a);
            String::from_utf8(body[7..7 + usize::from(body[6])].to_vec()).unwrap()
        }
    };
    let status = statuses.lock().unwrap().get(&service).copied();
    let response = http::Response::builder().header("content-type", "application/grpc");
    let response = match status {
        Some(status) => {
            let message = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status as u8]);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = vec![Ok(Frame::data(message)), Ok(Frame::trailers(trailers))];
            response.body(StreamBody::new(futures::stream::iter(frames)))
        }
        None => response
            .header("grpc-status", "5")
            .header("grpc-message", "unknown service")
            .body(StreamBody::new(futures::stream::iter(Vec::new()))),
    };
    Ok(response.unwrap())
}

// === runners ===

#[tokio::test]
async fn http_probe_passes_on_expected_status() {
    let (addr, status, last_request) = http_app(200).await;
    let check = http_check(addr, "/healthz?full=1");
    assert_eq!(probe(&check).await.unwrap(), "status 200");
    let request = last_request.lock().unwrap().to_lowercase();
    assert!(
        request.starts_with("get /healthz?full=1 http/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains(&format!("host: {addr}\r\n")), "{request}");
    assert!(request.contains("user-agent: meshd-health/"), "{request}");

    // (status served, expect_status, result)
    #[rustfmt::skip]
    let cases: &[(u16, &str, Result<&str, &str>)] = &[
        (204, "200-399", Ok("status 204")),
        (301, "200-399", Ok("status 301")),
        (503, "200-399", Err("status 503, expected 200-399")),
        (404, "200-399", Err("status 404, expected 200-399")),
        (503, "503", Ok("status 503")),
        (200, "204", Err("status 200, expected 204")),
    ];
    for (served, expect, expected) in cases {
        status.store(*served, Ordering::SeqCst);
        let check = Check {
            kind: CheckKind::Http {
                url: format!("http://{addr}/").parse().unwrap(),
                expect_status: expect.parse().unwrap(),
            },
            timeout: Duration::from_secs(5),
            ..check.clone()
        };
        let outcome = Outcome::from(probe(&check).await);
        match expected {
            Ok(reason) => assert_eq!(outcome, Outcome::pass(*reason)),
            Err(reason) => assert_eq!(outcome, Outcome::fail(*reason)),
        }
    }
}

#[tokio::test]
async fn http_probe_fails_when_refused_or_silent() {
    // A port nobody listens on: bind, note it, close.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let refused = Outcome::from(probe(&http_check(closed, "/")).await);
    assert!(!refused.passed);
    assert!(
        refused
            .reason
            .starts_with(&format!("cannot connect to {closed}: ")),
        "{}",
        refused.reason
    );

    let silent = silent_app().await;
    let outcome = Outcome::from(probe(&http_check(silent, "/")).await);
    assert_eq!(outcome, Outcome::fail("timed out after 80ms"));
}

#[tokio::test]
async fn tcp_probe_connects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let check = check(
        "tcp",
        CheckKind::Tcp {
            address: addr.to_string(),
        },
    );
    assert_eq!(probe(&check).await.unwrap(), "connected");
    drop(listener);
    let outcome = Outcome::from(probe(&check).await);
    assert!(!outcome.passed);
    assert!(
        outcome.reason.contains("cannot connect"),
        "{}",
        outcome.reason
    );
}

#[tokio::test]
async fn grpc_probe_asks_the_health_service() {
    let statuses: Statuses = Arc::new(Mutex::new(HashMap::from([
        (String::new(), 1),
        ("db".to_owned(), 2),
        ("cache".to_owned(), 3),
    ])));
    let addr = grpc_app(statuses).await;
    let grpc = |service: &str| Check {
        timeout: Duration::from_secs(5),
        ..check(
            "grpc",
            CheckKind::Grpc {
                address: addr,
                service: service.to_owned(),
            },
        )
    };
    #[rustfmt::skip]
    let cases: &[(&str, Outcome)] = &[
        ("", Outcome::pass("SERVING")),
        ("db", Outcome::fail("NOT_SERVING")),
        ("cache", Outcome::fail("SERVICE_UNKNOWN")),
        ("nope", Outcome::fail("grpc-status 5 (unknown service)")),
    ];
    for (service, expected) in cases {
        let outcome = Outcome::from(probe(&grpc(service)).await);
        assert_eq!(&outcome, expected, "service {service:?}");
    }

    // An HTTP/1.1-only app is not a gRPC server.
    let (http_addr, _, _) = http_app(200).await;
    let check = Check {
        kind: CheckKind::Grpc {
            address: http_addr,
            service: String::new(),
        },
        ..grpc("")
    };
    let outcome = Outcome::from(probe(&check).await);
    assert!(!outcome.passed);
    assert!(
        outcome.reason.starts_with("HTTP exchange failed"),
        "{}",
        outcome.reason
    );
}

#[tokio::test]
async fn command_probe_uses_the_exit_status_and_stderr() {
    let long = Duration::from_secs(5);
    #[rustfmt::skip]
    let cases: &[(&[&str], Outcome)] = &[
        (&["true"], Outcome::pass("exit status: 0")),
        (&["false"], Outcome::fail("exit status: 1")),
        (&["sh", "-c", "echo ignored; printf '\\n  db down  \\nmore\\n' >&2; exit 3"],
            Outcome::fail("exit status: 3: db down")),
        (&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x >&2; exit 4"],
            Outcome::fail(format!("exit status: 4: {}", "x".repeat(4096)))),
    ];
    for (argv, expected) in cases {
        let outcome = Outcome::from(probe(&command_check(argv, long)).await);
        assert_eq!(&outcome, expected, "{argv:?}");
    }

    let missing = command_check(&["/nonexistent/check-db"], long);
    let outcome = Outcome::from(probe(&missing).await);
    assert!(!outcome.passed);
    assert!(
        outcome
            .reason
            .starts_with("cannot start \"/nonexistent/check-db\": "),
        "{}",
        outcome.reason
    );
}

#[tokio::test]
async fn command_probe_kills_the_process_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 5", pid_file.display());
    let check = command_check(&["sh", "-c", &script], Duration::from_millis(300));

    let started = tokio::time::Instant::now();
    let outcome = Outcome::from(probe(&check).await);
    assert_eq!(outcome, Outcome::fail("timed out after 300ms"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for sleep"
    );

    // The process is killed (then reaped in the background): gone, or a zombie meanwhile.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let dead = || match std::fs::read_to_string(&stat) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !dead() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sleep {pid} still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === spawn ===

#[tokio::test]
async fn http_check_turns_service_unhealthy_and_back() {
    let (addr, status, _) = http_app(200).await;
    let mut health_rx = spawn(web(), vec![http_check(addr, "/healthz")], no_shutdown());
    assert!(!health_rx.borrow().healthy, "starts unhealthy");
    assert_eq!(health_rx.borrow().checks[0].state, State::Starting);

    let health = wait_until(&mut health_rx, "first pass", |h| h.healthy).await;
    assert_eq!(reason(&health), "status 200");

    status.store(503, Ordering::SeqCst);
    let health = wait_until(&mut health_rx, "unhealthy", |h| !h.healthy).await;
    assert_eq!(health.checks[0].state, State::Unhealthy);
    assert_eq!(reason(&health), "status 503, expected 200-399");
    assert!(health.checks[0].consecutive_failures >= 2);

    status.store(200, Ordering::SeqCst);
    let health = wait_until(&mut health_rx, "recovery", |h| h.healthy).await;
    assert!(health.checks[0].consecutive_successes >= 2, "{health:#?}");
}

#[tokio::test]
async fn tcp_check_follows_the_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tcp_app(listener);
    let check = check(
        "tcp",
        CheckKind::Tcp {
            address: addr.to_string(),
        },
    );
    let mut health_rx = spawn(web(), vec![check], no_shutdown());
    wait_until(&mut health_rx, "healthy", |h| h.healthy).await;

    app.abort();
    let health = wait_until(&mut health_rx, "unhealthy", |h| !h.healthy).await;
    assert!(reason(&health).starts_with("cannot connect"), "{health:#?}");

    let _app = tcp_app(TcpListener::bind(addr).await.unwrap());
    let health = wait_until(&mut health_rx, "healthy again", |h| h.healthy).await;
    assert_eq!(reason(&health), "connected");
}

#[tokio::test]
async fn grpc_check_follows_the_serving_status() {
    let statuses: Statuses = Arc::new(Mutex::new(HashMap::from([("web".to_owned(), 2)])));
    let addr = grpc_app(statuses.clone()).await;
    let kind = CheckKind::Grpc {
        address: addr,
        service: "web".to_owned(),
    };
    let mut health_rx = spawn(web(), vec![check("grpc", kind)], no_shutdown());
    let health = wait_until(&mut health_rx, "a result", |h| h.checks[0].reason.is_some()).await;
    assert_eq!(reason(&health), "NOT_SERVING");
    assert_eq!(health.checks[0].state, State::Starting);

    statuses.lock().unwrap().insert("web".to_owned(), 1);
    let health = wait_until(&mut health_rx, "serving", |h| h.healthy).await;
    assert_eq!(reason(&health), "SERVING");

    statuses.lock().unwrap().insert("web".to_owned(), 2);
    wait_until(&mut health_rx, "not serving", |h| !h.healthy).await;
}

#[tokio::test]
async fn command_checks_pass_fail_and_time_out() {
    let timeout = Duration::from_millis(200);
    let checks = vec![
        Check {
            name: "true".to_owned(),
            ..command_check(&["true"], timeout)
        },
        Check {
            name: "false".to_owned(),
            ..command_check(&["false"], timeout)
        },
        Check {
            name: "sleep".to_owned(),
            ..command_check(&["sleep", "5"], timeout)
        },
    ];
    let mut health_rx = spawn(web(), checks, no_shutdown());
    let health = wait_until(&mut health_rx, "every check run", |h| {
        h.checks.iter().all(|c| c.reason.is_some())
    })
    .await;
    let by_name = |name: &str| health.checks.iter().find(|c| c.name == name).unwrap();
    assert_eq!(by_name("true").state, State::Healthy);
    assert_eq!(by_name("false").state, State::Starting);
    assert_eq!(by_name("false").reason.as_deref(), Some("exit status: 1"));
    assert_eq!(
        by_name("sleep").reason.as_deref(),
        Some("timed out after 200ms")
    );
    assert!(!health.healthy);
}

#[tokio::test]
async fn first_run_is_immediate() {
    let check = Check {
        interval: Duration::from_secs(3600),
        ..command_check(&["true"], Duration::from_secs(5))
    };
    let mut health_rx = spawn(web(), vec![check], no_shutdown());
    wait_until(&mut health_rx, "healthy long before the interval", |h| {
        h.healthy
    })
    .await;
}

#[tokio::test]
async fn repeated_results_update_counters_without_waking_readers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _app = tcp_app(listener);
    // A timeout close to the interval: a spurious timeout on a busy machine would change the
    // reason and wake the reader.
    let check = Check {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(95),
        ..check(
            "tcp",
            CheckKind::Tcp {
                address: addr.to_string(),
            },
        )
    };
    let mut health_rx = spawn(web(), vec![check], no_shutdown());
    let first = wait_until(&mut health_rx, "healthy", |h| h.healthy).await;

    // Counters move in place; poll them, since no notification is expected.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while health_rx.borrow().checks[0].consecutive_successes < 3 {
        assert!(tokio::time::Instant::now() < deadline, "counter stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !health_rx.has_changed().unwrap(),
        "same result, same reason: readers must not be woken"
    );
    let last = health_rx.borrow().checks[0].last_checked;
    assert!(last > first.checks[0].last_checked, "{last:?}");
}

#[tokio::test]
async fn shutdown_stops_the_checks() {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let checks = vec![
        command_check(&["true"], Duration::from_millis(200)),
        Check {
            name: "slow".to_owned(),
            ..command_check(&["sleep", "5"], Duration::from_secs(60))
        },
    ];
    let mut health_rx = spawn(web(), checks, shutdown_rx);
    wait_until(&mut health_rx, "first result", |h| {
        h.checks[0].reason.is_some()
    })
    .await;

    shutdown_tx.send(true).unwrap();
    let stopped = tokio::time::timeout(DEADLINE, async {
        while health_rx.changed().await.is_ok() {}
    })
    .await;
    assert!(stopped.is_ok(), "health task still running after shutdown");
}

#[tokio::test]
async fn service_without_checks_is_always_healthy() {
    let mut health_rx = spawn(web(), Vec::new(), no_shutdown());
    assert!(health_rx.borrow().healthy);
    assert!(
        health_rx.changed().await.is_err(),
        "nothing will ever change"
    );
}
