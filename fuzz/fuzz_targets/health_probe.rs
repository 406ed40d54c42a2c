//! Health probe decoders (`meshd::health`): what a local app answers to a health check.
//!
//! The first input byte picks the decoder. Even: the rest is a gRPC health answer, a header
//! block (`name: value` lines) and a blank line and then the gRPC-framed body, read by
//! `grpc_status` and `decode_check_response`. Odd: the rest is the raw bytes a local HTTP app
//! sends back; a real `probe` of an HTTP check runs against a one-shot server on 127.0.0.1 that
//! answers with them, so the status line is parsed where meshd parses it (hyper's HTTP/1.1
//! client as the probe sets it up).
//!
//! Invariants: never panics; a decoded serving status is the last `status` field of the framed
//! message; a passing HTTP check reports a status inside its expected range and a failing one
//! a status outside it.

#![no_main]

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meshd::health::{
    Check, CheckKind, Error, StatusRange, decode_check_response, grpc_status, probe,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

struct Harness {
    runtime: Runtime,
    listener: TcpListener,
    check: Check,
    expect: StatusRange,
}

thread_local! {
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::new());
}

impl Harness {
    fn new() -> Harness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(TcpListener::bind(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                0,
            ))))
            .expect("listener binds");
        let port = listener.local_addr().expect("listener address").port();
        let expect: StatusRange = "200-399".parse().expect("status range");
        let one = NonZeroU32::new(1).expect("non-zero");
        let check = Check {
            name: "http".to_owned(),
            kind: CheckKind::Http {
                url: format!("http://127.0.0.1:{port}/healthz")
                    .parse()
                    .expect("url"),
                expect_status: expect,
            },
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            unhealthy_threshold: one,
            healthy_threshold: one,
        };
        Harness {
            runtime,
            listener,
            check,
            expect,
        }
    }

    /// Runs the HTTP check once against a server answering `response` and closing.
    fn http(&self, response: &[u8]) -> Result<String, Error> {
        self.runtime.block_on(async {
            let serve = async {
                let (mut conn, _) = self.listener.accept().await.expect("accept");
                // Errors only mean the probe hung up first, which it may.
                let _ = conn.write_all(response).await;
                let _ = conn.shutdown().await;
                // Read until the probe closes, so the TIME_WAIT stays on the client side
                // (reused on loopback) and ports do not run out over millions of runs.
                let mut sink = [0u8; 4096];
                while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            let (result, ()) = tokio::join!(probe(&self.check), serve);
            result
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        grpc(rest);
    } else {
        HARNESS.with_borrow(|h| match h.http(rest) {
            Ok(found) => {
                let status: u16 = found
                    .strip_prefix("status ")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("a passing check said {found:?}"));
                assert!(h.expect.contains(status), "{status} passed");
            }
            Err(Error::UnexpectedStatus { status, expected }) => {
                assert_eq!(expected, h.expect);
                assert!(!h.expect.contains(status), "{status} failed");
            }
            Err(Error::HttpFailed(_)) => {}
            Err(Error::TimedOut(_)) => panic!("the probe hung on a closed connection"),
            Err(other) => panic!("unexpected error {other:?}"),
        });
    }
});

fn grpc(data: &[u8]) {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (&data[..0], data),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = &line[colon + 1..];
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let status_ok = grpc_status(&headers);
    let zero = headers.get("grpc-status").map(|v| v.as_bytes() == b"0");
    match (&status_ok, zero) {
        (Ok(()), Some(true)) => {}
        (Err(Error::GrpcStatus { .. }), Some(false)) => {}
        (Err(Error::MalformedGrpcResponse(_)), None) => {}
        (result, zero) => panic!("grpc_status gave {result:?} for grpc-status zero={zero:?}"),
    }
    match decode_check_response(body) {
        Ok(status) => {
            assert_eq!(body[0], 0, "a compressed message decoded");
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            assert!(5 + len <= body.len());
            // A framed message holding only this status decodes to it.
            let mut message = vec![0x08];
            let mut n = status;
            while n >= 0x80 {
                message.push((n as u8) | 0x80);
                n >>= 7;
            }
            message.push(n as u8);
            let mut framed = vec![0];
            framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
            framed.extend_from_slice(&message);
            assert_eq!(decode_check_response(&framed).ok(), Some(status));
            // Anything after the first message is not read.
            framed.extend_from_slice(&body[5 + len..]);
            assert_eq!(decode_check_response(&framed).ok(), Some(status));
        }
        Err(Error::MalformedGrpcResponse(_)) => {}
        Err(other) => panic!("decode_check_response gave {other:?}"),
    }
}
