//! `h2-backend`: the benchmark backend for HTTP/2 and gRPC in `bench/h2.sh`. Serves HTTP/1.1 and
//! HTTP/2 with prior knowledge (h2c) on one port: `GET /1k` answers 1,024 bytes, and any `POST`
//! with `content-type: application/grpc` is a unary gRPC echo (the one request message comes
//! back framed the same way, then `grpc-status: 0`). Prints `ready` on stdout once listening.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Buf as _, Bytes};
use clap::Parser;
use http::header::{CONTENT_TYPE, HeaderValue, TRAILER};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// HTTP/1.1 + h2c backend: `GET /1k` and a gRPC unary echo on every `POST` with
/// `content-type: application/grpc`.
#[derive(Parser, Debug)]
#[command(name = "h2-backend", version)]
struct Args {
    /// Listen address, e.g. 127.0.0.1:18090.
    #[arg(long)]
    addr: SocketAddr,
    /// Tokio worker threads. 1 (the default) runs everything on one thread, like the single
    /// app process behind a sidecar; more makes the backend less likely to be the bottleneck.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// The `/1k` body: static, so answering it copies nothing.
static ONE_K: [u8; 1024] = [b'x'; 1024];

/// gRPC's default maximum message size (4 MiB) plus the 5-byte frame header: a bigger request is
/// not a unary message any real client would send, and the limit keeps a runaway client from
/// growing the buffer without bound.
const MAX_GRPC_BODY: usize = 4 * 1024 * 1024 + 5;

/// Length-prefixed-message header: 1-byte compressed flag + 4-byte big-endian length.
const GRPC_HEADER_LEN: usize = 5;

/// gRPC status INTERNAL: what the gRPC spec prescribes for a malformed message frame.
const GRPC_INTERNAL: &str = "13";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    // A current-thread runtime for one thread: no work-stealing machinery and no hand-off
    // between the accepting thread and a worker, which is what a single-threaded app has.
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("cannot build the tokio runtime")?;
    runtime.block_on(serve(args.addr))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    {
        // The benchmark script waits for this line before it starts anything that needs us.
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready").context("cannot write to stdout")?;
        out.flush().context("cannot flush stdout")?;
    }
    // The auto builder reads the first bytes of each connection: the HTTP/2 preface selects
    // HTTP/2 (prior knowledge, no upgrade), anything else is served as HTTP/1.1.
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE under a connection storm: keep serving the connections we
                // have, and back off a little rather than spin on the failing accept.
                eprintln!("h2-backend: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small responses must not wait for Nagle: latency is what is being measured.
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("h2-backend: TCP_NODELAY: {e}");
        }
        let builder = builder.clone();
        tokio::spawn(async move {
            // Errors here are clients going away mid-connection (h2load closes its connections
            // abruptly when its duration ends); there is nobody to report them to.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Reply>, Infallible> {
    if req.method() == Method::POST && is_grpc(req.headers()) {
        return Ok(grpc_echo(req).await);
    }
    if req.method() == Method::GET && req.uri().path() == "/1k" {
        let mut resp = Response::new(Reply::data(Bytes::from_static(&ONE_K)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(resp);
    }
    let mut resp = Response::new(Reply::empty());
    *resp.status_mut() = StatusCode::NOT_FOUND;
    Ok(resp)
}

/// `application/grpc`, optionally with a `+format` suffix or parameters, as the spec allows.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

async fn grpc_echo(req: Request<Incoming>) -> Response<Reply> {
    let encoding = req.headers().get("grpc-encoding").cloned();
    let http1 = req.version() < Version::HTTP_2;
    let body = match Limited::new(req.into_body(), MAX_GRPC_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return grpc_error(&format!("cannot read the request: {e}")),
    };
    if let Err(problem) = check_unary_frame(&body, encoding.is_some()) {
        return grpc_error(&problem);
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    // The request message goes back unchanged, frame header included: the same bytes are the
    // same message framed the same way. A compressed one stays valid only under the client's
    // own encoding, so that is echoed too.
    let mut resp = Response::new(Reply {
        data: Some(body),
        trailers: Some(trailers),
    });
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    if let Some(encoding) = encoding {
        headers.insert("grpc-encoding", encoding);
    }
    if http1 {
        // hyper's HTTP/1.1 encoder only sends trailer fields announced in a `trailer` header;
        // HTTP/2 needs no announcement, so its responses stay as small as a gRPC server's.
        headers.insert(TRAILER, HeaderValue::from_static("grpc-status"));
    }
    resp
}

/// A unary request body is exactly one length-prefixed message; the error says what is wrong.
fn check_unary_frame(body: &Bytes, has_encoding: bool) -> Result<(), String> {
    if body.len() < GRPC_HEADER_LEN {
        return Err(format!(
            "request body of {} bytes is shorter than a gRPC message header",
            body.len()
        ));
    }
    let mut header = &body[..GRPC_HEADER_LEN];
    let flag = header.get_u8();
    let len = header.get_u32() as usize;
    match flag {
        0 => {}
        // The spec makes a compressed message without a grpc-encoding a protocol error.
        1 if !has_encoding => {
            return Err("compressed flag set without grpc-encoding".to_owned());
        }
        1 => {}
        other => return Err(format!("invalid compressed flag {other}")),
    }
    let got = body.len() - GRPC_HEADER_LEN;
    if got != len {
        return Err(format!(
            "expected one message of {len} bytes, the body carries {got} bytes after the header"
        ));
    }
    Ok(())
}

/// A trailers-only response: HTTP 200 whose headers carry the gRPC status, no body.
fn grpc_error(message: &str) -> Response<Reply> {
    let mut resp = Response::new(Reply::empty());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static(GRPC_INTERNAL));
    // Percent-encoded, so it is always a valid header value.
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", v);
    }
    resp
}

/// grpc-message encoding: bytes outside printable ASCII, and '%' itself, become %XX.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A response body of at most one data frame followed by optional trailers. Written out rather
/// than boxed combinators so each response is one small allocation-free value.
struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn data(data: Bytes) -> Self {
        Self {
            data: Some(data),
            trailers: None,
        }
    }

    fn empty() -> Self {
        Self {
            data: None,
            trailers: None,
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        // Lets hyper end the stream on the HEADERS frame of a trailers-only response.
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let len = self.data.as_ref().map_or(0, |d| d.len() as u64);
        if self.trailers.is_some() {
            // Not exact: hyper would send content-length, and HTTP/1.1 then has no way to carry
            // the trailers (chunked encoding does); gRPC servers send no content-length either.
            let mut hint = SizeHint::new();
            hint.set_lower(len);
            hint
        } else {
            // An exact length lets HTTP/1.1 send content-length rather than chunked encoding.
            SizeHint::with_exact(len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, payload: &[u8]) -> Bytes {
        let mut v = vec![flag];
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        Bytes::from(v)
    }

    #[test]
    fn accepts_one_message() {
        assert!(check_unary_frame(&framed(0, &[7; 100]), false).is_ok());
        assert!(check_unary_frame(&framed(0, &[]), false).is_ok());
        assert!(check_unary_frame(&framed(1, b"zz"), true).is_ok());
    }

    #[test]
    fn rejects_malformed_frames() {
        assert!(check_unary_frame(&Bytes::from_static(b"\0\0\0"), false).is_err());
        assert!(check_unary_frame(&framed(2, b"x"), false).is_err());
        assert!(check_unary_frame(&framed(1, b"x"), false).is_err());
        let mut two = framed(0, b"ab").to_vec();
        two.extend_from_slice(&framed(0, b"cd"));
        assert!(check_unary_frame(&Bytes::from(two), false).is_err());
        let short = framed(0, b"abcd").slice(..7);
        assert!(check_unary_frame(&short, false).is_err());
    }

    #[test]
    fn grpc_content_types() {
        let ct = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&h)
        };
        assert!(ct("application/grpc"));
        assert!(ct("application/grpc+proto"));
        assert!(!ct("application/grpcx"));
        assert!(!ct("application/json"));
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a 100% é"), "a 100%25 %C3%A9");
    }

    #[test]
    fn reply_sends_data_then_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let mut r = Reply {
            data: Some(Bytes::from_static(b"hi")),
            trailers: Some(t),
        };
        assert_eq!(r.size_hint().exact(), None);
        assert_eq!(r.size_hint().lower(), 2);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Poll::Ready(Some(Ok(f))) = Pin::new(&mut r).poll_frame(&mut cx) else {
            panic!("no data frame")
        };
        assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"hi"));
        let Poll::Ready(Some(Ok(f))) = Pin::new(&mut r).poll_frame(&mut cx) else {
            panic!("no trailers")
        };
        assert_eq!(f.into_trailers().unwrap()["grpc-status"], "0");
        assert!(r.is_end_stream());
    }
}
