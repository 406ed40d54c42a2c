//! One run of one check: the HTTP, TCP, gRPC health and command runners, each bounded by the
//! check's timeout, and the hand-written codec for the two tiny gRPC health messages.

use std::error::Error as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, USER_AGENT};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpStream;
use tokio::process::Command;

use super::{Check, CheckKind, StatusRange};

/// `User-Agent` of HTTP and gRPC checks, so the app can tell them apart in its logs.
const USER_AGENT_VALUE: &str = concat!("meshd-health/", env!("CARGO_PKG_VERSION"));
/// Path of the standard gRPC health method.
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
/// Largest gRPC health response read; the real one is a few bytes.
const MAX_GRPC_RESPONSE: usize = 64 * 1024;
/// Most stderr kept from a failing command; only its first line is reported.
const MAX_STDERR: u64 = 4 * 1024;
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run did not finish within the check's timeout.
    #[error("timed out after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// No TCP connection (the app is down, or listens elsewhere).
    #[error("cannot connect to {address}")]
    ConnectFailed {
        /// The address dialled.
        address: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange broke off (the app closed the connection, or spoke something else).
    #[error("HTTP exchange failed")]
    HttpFailed(#[source] hyper::Error),
    /// An HTTP check got a status outside its `expect_status`.
    #[error("status {status}, expected {expected}")]
    UnexpectedStatus {
        /// The status received.
        status: u16,
        /// What would have passed.
        expected: StatusRange,
    },
    /// The gRPC server answered with an HTTP error (often: it does not speak gRPC there).
    #[error("gRPC health check got HTTP status {0}")]
    GrpcHttpStatus(u16),
    /// The gRPC call failed; NOT_FOUND (5) means the server does not know the service, and
    /// UNIMPLEMENTED (12) that it has no health service.
    #[error("grpc-status {code}{}", if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    GrpcStatus {
        /// The `grpc-status` value.
        code: String,
        /// The `grpc-message` value, as sent.
        message: String,
    },
    /// The answer is not a well-formed `HealthCheckResponse`.
    #[error("malformed gRPC health response: {0}")]
    MalformedGrpcResponse(&'static str),
    /// The gRPC server's body could not be read.
    #[error("cannot read gRPC health response")]
    GrpcBodyFailed(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The health service answered with a status other than SERVING.
    #[error("{}", serving_status_name(*.0))]
    NotServing(u64),
    /// The command could not be started (not found, not executable).
    #[error("cannot start {program:?}")]
    SpawnFailed {
        /// `argv[0]`.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for the command failed.
    #[error("cannot wait for the command")]
    WaitFailed(#[source] io::Error),
    /// The command exited with a status other than 0.
    #[error("{status}{}", .stderr.as_deref().map(|l| format!(": {l}")).unwrap_or_default())]
    CommandFailed {
        /// How it ended.
        status: ExitStatus,
        /// The first line of its stderr, if any.
        stderr: Option<String>,
    },
    /// A command check without a program; config validation rejects these.
    #[error("empty command")]
    EmptyCommand,
}

/// Runs `check` once within its timeout. `Ok` carries what a passing run found, such as
/// "status 200"; on a timeout the run is abandoned (a command is killed).
pub async fn probe(check: &Check) -> Result<String, Error> {
    let run = async {
        match &check.kind {
            CheckKind::Http { url, expect_status } => http(url, *expect_status).await,
            CheckKind::Tcp { address } => tcp(address).await,
            CheckKind::Grpc { address, service } => grpc(*address, service).await,
            CheckKind::Command { argv } => command(argv).await,
        }
    };
    tokio::time::timeout(check.timeout, run)
        .await
        .unwrap_or(Err(Error::TimedOut(check.timeout)))
}

/// `e` and its sources joined with ": ", as one reason line.
pub(super) fn error_chain(e: &Error) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

async fn connect(address: &str) -> Result<TcpStream, Error> {
    TcpStream::connect(address)
        .await
        .map_err(|source| Error::ConnectFailed {
            address: address.to_owned(),
            source,
        })
}

async fn tcp(address: &str) -> Result<String, Error> {
    connect(address).await?;
    Ok("connected".to_owned())
}

async fn http(url: &Uri, expect: StatusRange) -> Result<String, Error> {
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    let address = match url.port() {
        Some(_) => authority.to_owned(),
        None => format!("{authority}:80"),
    };
    let stream = connect(&address).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Error::HttpFailed)?;
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(HOST, authority)
        .header(USER_AGENT, USER_AGENT_VALUE)
        // A fresh connection per run, like Kubernetes probes: a check should see the app
        // accept, not ride on a connection it accepted long ago.
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .expect("GET with a validated path and authority is a valid request");
    let response = drive(conn, async {
        sender
            .send_request(request)
            .await
            .map_err(Error::HttpFailed)
    })
    .await?;
    let status = response.status().as_u16();
    if expect.contains(status) {
        Ok(format!("status {status}"))
    } else {
        Err(Error::UnexpectedStatus {
            status,
            expected: expect,
        })
    }
}

async fn grpc(address: SocketAddr, service: &str) -> Result<String, Error> {
    let stream = connect(&address.to_string()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(Error::HttpFailed)?;
    let request = Request::post(format!("http://{address}{GRPC_HEALTH_PATH}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .body(Full::new(encode_check_request(service)))
        .expect("POST to a socket address is a valid request");
    let (headers, body, trailers) = drive(conn, async {
        let response = sender
            .send_request(request)
            .await
            .map_err(Error::HttpFailed)?;
        if response.status() != StatusCode::OK {
            return Err(Error::GrpcHttpStatus(response.status().as_u16()));
        }
        let (parts, body) = response.into_parts();
        let collected = Limited::new(body, MAX_GRPC_RESPONSE)
            .collect()
            .await
            .map_err(Error::GrpcBodyFailed)?;
        let trailers = collected.trailers().cloned();
        Ok((parts.headers, collected.to_bytes(), trailers))
    })
    .await?;
    // A trailers-only answer (an error without a message) carries grpc-status in the headers.
    grpc_status(trailers.as_ref().unwrap_or(&headers))?;
    match decode_check_response(&body)? {
        SERVING => Ok(serving_status_name(SERVING)),
        other => Err(Error::NotServing(other)),
    }
}

/// Ok when the gRPC answer's headers or trailers say `grpc-status: 0`; else why not.
pub fn grpc_status(headers: &HeaderMap) -> Result<(), Error> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    match text("grpc-status") {
        Some(code) if code == "0" => Ok(()),
        Some(code) => Err(Error::GrpcStatus {
            code,
            message: text("grpc-message").unwrap_or_default(),
        }),
        None => Err(Error::MalformedGrpcResponse("no grpc-status")),
    }
}

async fn command(argv: &[String]) -> Result<String, Error> {
    let (program, args) = argv.split_first().ok_or(Error::EmptyCommand)?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Dropped on timeout or shutdown: the process must not outlive its check.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::SpawnFailed {
            program: program.clone(),
            source,
        })?;
    let stderr = child.stderr.take();
    let (status, first_line) = tokio::join!(child.wait(), first_line(stderr));
    let status = status.map_err(Error::WaitFailed)?;
    if status.success() {
        Ok(status.to_string())
    } else {
        Err(Error::CommandFailed {
            status,
            stderr: first_line,
        })
    }
}

/// The first non-empty line of `stream` (from its first [`MAX_STDERR`] bytes); reads the rest
/// to the end so the child never blocks on a full pipe.
async fn first_line(stream: Option<impl AsyncRead + Unpin>) -> Option<String> {
    let mut stream = stream?;
    let mut head = Vec::new();
    // A read error only loses the reason; the exit status still decides.
    let _ = (&mut stream).take(MAX_STDERR).read_to_end(&mut head).await;
    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&head)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// Polls the connection `conn` while `work` uses it, and drops it when `work` is done (so a
/// server that keeps the connection open cannot hold the check).
async fn drive<T>(
    conn: impl Future<Output = Result<(), hyper::Error>>,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::pin!(conn);
    tokio::pin!(work);
    tokio::select! {
        biased;
        out = &mut work => out,
        conn_result = &mut conn => {
            // The connection ended first; the exchange has its answer or error by now, but
            // the connection's own error says more than "canceled".
            let out = work.await;
            match (out, conn_result) {
                (Err(_), Err(e)) => Err(Error::HttpFailed(e)),
                (out, _) => out,
            }
        }
    }
}

/// A `HealthCheckRequest { service }` in gRPC framing: a 0 (uncompressed) byte, the length as
/// a big-endian u32, then the protobuf message (field 1, length-delimited; omitted if empty).
pub(super) fn encode_check_request(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        message.put_u8(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(&message);
    framed.freeze()
}

/// The `status` (field 1) of the first gRPC-framed `HealthCheckResponse` in `body`; 0
/// (UNKNOWN) when absent, as protobuf defaults say.
pub fn decode_check_response(body: &[u8]) -> Result<u64, Error> {
    let malformed = Error::MalformedGrpcResponse;
    let [flag, a, b, c, d, rest @ ..] = body else {
        return Err(malformed("shorter than a gRPC frame header"));
    };
    if *flag != 0 {
        return Err(malformed("compressed message"));
    }
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    let mut message = rest
        .get(..len)
        .ok_or(malformed("message shorter than its frame says"))?;
    let mut status = 0;
    while !message.is_empty() {
        let key = take_varint(&mut message).ok_or(malformed("truncated field key"))?;
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            0 => {
                let value = take_varint(&mut message).ok_or(malformed("truncated varint"))?;
                if field == 1 {
                    status = value;
                }
            }
            // Fields other than `status` may come from a newer schema; skip them.
            1 | 5 => {
                let n = if wire_type == 1 { 8 } else { 4 };
                message = message.get(n..).ok_or(malformed("truncated fixed field"))?;
            }
            2 => {
                let n = take_varint(&mut message).ok_or(malformed("truncated length"))?;
                let n = usize::try_from(n).map_err(|_| malformed("field too long"))?;
                message = message.get(n..).ok_or(malformed("truncated field"))?;
            }
            _ => return Err(malformed("unknown wire type")),
        }
    }
    Ok(status)
}

fn put_varint(buf: &mut BytesMut, mut n: u64) {
    while n >= 0x80 {
        buf.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    buf.put_u8(n as u8);
}

fn take_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(n);
        }
    }
    None
}

/// The name of a `ServingStatus` value, as the proto spells it.
fn serving_status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".to_owned(),
        1 => "SERVING".to_owned(),
        2 => "NOT_SERVING".to_owned(),
        3 => "SERVICE_UNKNOWN".to_owned(),
        n => format!("serving status {n}"),
    }
}
