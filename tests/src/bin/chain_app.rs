//! A test app that calls the next service, like a Bank-of-Anthos tier: it answers HTTP with its
//! name (header `x-app`, first body line) after calling `--call` (an HTTP upstream: its body
//! follows) and, for paths under `/account`, after a query on `--postgres` (a TCP upstream to a
//! real PostgreSQL with trust authentication: a startup, `SELECT 1`, a terminate — the wire
//! protocol spoken here so the test needs no client library). A failed call answers 502 (HTTP)
//! or 503 (database), naming what failed.
//!
//! Usage: chain_app --listen ADDR --name NAME [--call ADDR] [--postgres ADDR]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Time one downstream call (HTTP or database) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Args {
    listen: SocketAddr,
    name: String,
    call: Option<SocketAddr>,
    postgres: Option<SocketAddr>,
}

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut listen, mut name, mut call, mut postgres) = (None, None, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let addr = || {
            value
                .parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--listen" => listen = Some(addr()?),
            "--name" => name = Some(value.clone()),
            "--call" => call = Some(addr()?),
            "--postgres" => postgres = Some(addr()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        name: name.ok_or("--name is required")?,
        call,
        postgres,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chain_app: {e}");
            std::process::exit(64);
        }
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chain_app: listening on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (args, client) = (args.clone(), client.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(args.clone(), client.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn answer(
    args: Args,
    client: Client,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut body = format!("{}\n", args.name);
    if let (Some(pg), true) = (args.postgres, path.starts_with("/account")) {
        match tokio::time::timeout(CALL_TIMEOUT, select_one(pg)).await {
            Ok(Ok(())) => body.push_str("db ok\n"),
            Ok(Err(e)) => {
                return Ok(reply(
                    &args.name,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("db: {e}\n"),
                ));
            }
            Err(_) => {
                return Ok(reply(
                    &args.name,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "db: timed out\n".to_owned(),
                ));
            }
        }
    }
    if let Some(next) = args.call {
        match tokio::time::timeout(CALL_TIMEOUT, call(&client, next, &path)).await {
            Ok(Ok((200, text))) => body.push_str(&text),
            Ok(Ok((status, text))) => {
                return Ok(reply(
                    &args.name,
                    StatusCode::BAD_GATEWAY,
                    format!("call: {status} {text}"),
                ));
            }
            Ok(Err(e)) => {
                return Ok(reply(
                    &args.name,
                    StatusCode::BAD_GATEWAY,
                    format!("call: {e}\n"),
                ));
            }
            Err(_) => {
                return Ok(reply(
                    &args.name,
                    StatusCode::BAD_GATEWAY,
                    "call: timed out\n".to_owned(),
                ));
            }
        }
    }
    Ok(reply(&args.name, StatusCode::OK, body))
}

fn reply(name: &str, status: StatusCode, body: String) -> Response<Full<Bytes>> {
    if status != StatusCode::OK {
        // The test prints this log when a scenario fails.
        eprintln!("{name}: answering {status}: {}", body.trim_end());
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(name) {
        r.headers_mut().insert("x-app", v);
    }
    r
}

async fn call(client: &Client, next: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let req = Request::get(format!("http://{next}{path}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// One PostgreSQL session over `addr`: startup as `postgres` (trust), `SELECT 1`, terminate.
async fn select_one(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut startup = Vec::new();
    startup.extend_from_slice(&(8 + params.len() as u32).to_be_bytes());
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(params);
    s.write_all(&startup).await.map_err(|e| e.to_string())?;
    until_ready(&mut s, false).await?;
    let sql = b"SELECT 1\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&(4 + sql.len() as u32).to_be_bytes());
    query.extend_from_slice(sql);
    s.write_all(&query).await.map_err(|e| e.to_string())?;
    until_ready(&mut s, true).await?;
    s.write_all(&[b'X', 0, 0, 0, 4])
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads messages until ReadyForQuery; fails on an error or an authentication request other
/// than AuthenticationOk, and (`want_row`) when no DataRow came.
async fn until_ready(s: &mut TcpStream, want_row: bool) -> Result<(), String> {
    let mut row = false;
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            return Err(format!("bad message length {len}"));
        }
        let mut payload = vec![0u8; len - 4];
        s.read_exact(&mut payload)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        match head[0] {
            b'R' if payload.get(..4) != Some(&[0, 0, 0, 0]) => {
                return Err("the server asks for a password (trust expected)".to_owned());
            }
            b'E' => {
                return Err(format!(
                    "server error: {}",
                    String::from_utf8_lossy(&payload)
                ));
            }
            b'D' => row = true,
            b'Z' if want_row && !row => return Err("no row".to_owned()),
            b'Z' => return Ok(()),
            _ => {}
        }
    }
}
