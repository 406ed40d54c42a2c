//! `meshd demo-app`: a tiny service for the dev mesh and tests. It answers HTTP requests with
//! "hello from NAME on NODE" and echoes any other bytes back until the client half-closes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::Instrument as _;

/// Largest HTTP request head (request line and headers) read before answering 431.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Most connections served at once; further clients wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a client gets to send a complete HTTP request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the first bytes may stay ambiguous (empty, or a prefix of an HTTP method) before the
/// connection is treated as an echo client.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);
/// Echo copy buffer.
const ECHO_BUFFER: usize = 16 * 1024;
/// After answering HTTP, unread request bytes (a body we ignore) are drained up to this many
/// bytes or [`LINGER`], so that closing does not reset the connection before the client has
/// read the answer.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER: Duration = Duration::from_secs(1);

/// Methods that mark a connection as HTTP, each with the space that follows it.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// `meshd demo-app` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Service name used in answers.
    #[arg(long)]
    pub name: String,
    /// Node name used in answers (default: the host name).
    #[arg(long)]
    pub node: Option<String>,
}

/// What the first bytes of a connection say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniff {
    Http,
    Echo,
    NeedMore,
}

/// Runs the demo app until SIGINT or SIGTERM; exit code 1 if it cannot start.
pub fn main(args: Args) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: demo-app: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: demo-app: listening on {}: {e}", args.listen);
                return ExitCode::from(1);
            }
        };
        let node = args.node.unwrap_or_else(host_name);
        tracing::info!(listen = %args.listen, name = %args.name, %node, "demo-app listening");
        let hello = format!("hello from {} on {node}\n", args.name);
        serve(listener, hello, async {
            if let Err(e) = mesh_runtime::signal::shutdown().await {
                // Without handlers the default signal action still ends the process.
                tracing::warn!(error = %e, "cannot listen for signals");
                std::future::pending::<()>().await;
            }
        })
        .await;
        tracing::info!("demo-app stopped");
        ExitCode::SUCCESS
    })
}

/// Serves connections from `listener` until `shutdown` resolves; open connections are then
/// dropped. `hello` is the body of every HTTP answer.
pub async fn serve(listener: TcpListener, hello: String, shutdown: impl Future<Output = ()>) {
    let hello: Arc<str> = hello.into();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Connection tasks; dropping the set on shutdown aborts the ones still open.
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let hello = hello.clone();
        conns.spawn(
            async move {
                let _permit = permit;
                if let Err(e) = handle(stream, &hello).await {
                    tracing::debug!(error = %e, "connection failed");
                }
            }
            .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
}

/// Serves one connection: HTTP if it starts like an HTTP request, echo otherwise.
async fn handle(mut stream: TcpStream, hello: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mode = loop {
        let s = sniff(&buf);
        if s != Sniff::NeedMore {
            break s;
        }
        match timeout(
            SNIFF_TIMEOUT,
            read_some(&mut stream, &mut buf, MAX_REQUEST_HEAD),
        )
        .await
        {
            Err(_) => break Sniff::Echo,
            Ok(Ok(0)) if buf.is_empty() => return Ok(()),
            Ok(Ok(0)) => break Sniff::Echo,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    match mode {
        Sniff::Http => http(stream, buf, hello).await,
        Sniff::Echo | Sniff::NeedMore => echo(stream, buf).await,
    }
}

fn sniff(buf: &[u8]) -> Sniff {
    let mut prefix = false;
    for m in METHODS {
        if buf.starts_with(m) {
            return Sniff::Http;
        }
        prefix |= m.starts_with(buf);
    }
    if prefix { Sniff::NeedMore } else { Sniff::Echo }
}

/// Reads once into `buf` without letting it grow past `limit`; `Ok(0)` means EOF (or full).
async fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let room = limit.saturating_sub(buf.len()).min(chunk.len());
    if room == 0 {
        return Ok(0);
    }
    let n = stream.read(&mut chunk[..room]).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

async fn http(mut stream: TcpStream, mut buf: Vec<u8>, hello: &str) -> io::Result<()> {
    let answer = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break answer(&buf[..end], hello);
        }
        if buf.len() >= MAX_REQUEST_HEAD {
            break status_answer(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            );
        }
        match timeout(
            HEAD_TIMEOUT,
            read_some(&mut stream, &mut buf, MAX_REQUEST_HEAD),
        )
        .await
        {
            Err(_) => return Ok(()),
            Ok(Ok(0)) => break status_answer("400 Bad Request", "incomplete request\n"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    stream.write_all(&answer).await?;
    stream.shutdown().await?;
    // Lingering close: read what the client still sends, bounded in bytes and time.
    let _ = timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    Ok(())
}

/// The answer to a complete request head (without the final blank line).
fn answer(head: &[u8], hello: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut request_line = text.lines().next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default();
    let target = request_line.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or_default();
    let body = if path == "/echo" {
        format!("{hello}{text}\r\n")
    } else {
        hello.to_owned()
    };
    let mut out = response_head("200 OK", body.len());
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn status_answer(status: &str, body: &str) -> Vec<u8> {
    let mut out = response_head(status, body.len());
    out.extend_from_slice(body.as_bytes());
    out
}

fn response_head(status: &str, content_length: usize) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {content_length}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Writes back `first` and then everything read, until EOF; then closes the write side.
async fn echo(mut stream: TcpStream, first: Vec<u8>) -> io::Result<()> {
    stream.write_all(&first).await?;
    drop(first);
    let mut buf = vec![0u8; ECHO_BUFFER];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
    }
    stream.shutdown().await
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(l, "hello from api on n2\n".to_owned(), async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    async fn round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    }

    #[test]
    fn sniffs_methods() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http);
        assert_eq!(sniff(b"GETX"), Sniff::Echo);
        assert_eq!(sniff(b"hello\n"), Sniff::Echo);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniff::Echo);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_http() {
        let (addr, _stop) = start().await;
        let out = round_trip(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhello from api on n2\n"), "{text}");

        let out = round_trip(addr, b"GET /echo?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("hello from api on n2\nGET /echo?x=1 HTTP/1.1"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rejects_oversized_and_incomplete_heads() {
        let (addr, _stop) = start().await;
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST_HEAD + 10, b'a');
        let out = round_trip(addr, &big).await;
        assert!(out.starts_with(b"HTTP/1.1 431 "));
        let out = round_trip(addr, b"GET / HTTP/1.1\r\n").await;
        assert!(out.starts_with(b"HTTP/1.1 400 "));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn echoes_other_bytes_until_half_close() {
        let (addr, _stop) = start().await;
        assert_eq!(round_trip(addr, b"ping\npong\n").await, b"ping\npong\n");
        assert_eq!(round_trip(addr, b"GE").await, b"GE");
        assert_eq!(round_trip(addr, b"").await, b"");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut out = Vec::new();
        let (_, read) = tokio::join!(write, r.read_to_end(&mut out));
        read.unwrap();
        assert_eq!(out, data);
    }
}
