//! One HTTP/1.1 keep-alive client connection on a blocking socket (plaintext, or TLS for an
//! HTTPS target): sends a GET, reads exactly one response (Content-Length bodies only) and
//! checks its status and length.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

/// TLS towards an HTTPS target: the client settings and the name sent as SNI (and checked).
#[derive(Clone)]
pub struct Tls {
    /// Trusts the target's CA.
    pub config: Arc<ClientConfig>,
    /// SNI and the name the certificate must carry.
    pub name: ServerName<'static>,
}

/// The socket, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Largest response head accepted before giving up on a response.
const MAX_HEAD: usize = 16 * 1024;

/// A response that was not what the benchmark expects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connect, read or write failed (including timeouts).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before a whole response arrived.
    #[error("connection closed mid-response")]
    Closed,
    /// Status other than 200.
    #[error("status {0}")]
    Status(u16),
    /// Body length differs from `--expect-len`.
    #[error("body is {got} bytes, expected {want}")]
    Length {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
    /// Not a response this client can read (no Content-Length, chunked, garbage).
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// A keep-alive connection to the target.
pub struct Conn {
    stream: Stream,
    request: Vec<u8>,
    buf: Vec<u8>,
    /// The server asked to close after the last response; reconnect before the next one.
    pub closing: bool,
}

impl Conn {
    /// Connects (and with `tls`, handshakes) and prepares the request for `path`.
    pub fn connect(
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
        tls: Option<&Tls>,
    ) -> Result<Self, Error> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let (stream, host) = match tls {
            None => (Stream::Plain(tcp), addr.to_string()),
            Some(t) => {
                let conn = ClientConnection::new(t.config.clone(), t.name.clone())
                    .map_err(std::io::Error::other)?;
                let mut s = StreamOwned::new(conn, tcp);
                // Handshake now, so the measured requests do not pay for it.
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                (Stream::Tls(Box::new(s)), t.name.to_str().into_owned())
            }
        };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-bench\r\n\r\n");
        Ok(Self {
            stream,
            request: request.into_bytes(),
            buf: Vec::with_capacity(8 * 1024),
            closing: false,
        })
    }

    /// Sends one request and reads its response; `Ok` only for a 200 of the expected length.
    pub fn exchange(&mut self, expect_len: Option<usize>) -> Result<(), Error> {
        self.stream.write_all(&self.request)?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Error::Malformed("response head too large"));
            }
            self.fill()?;
        };
        let head = parse_head(&self.buf[..head_end])?;
        self.closing = head.close;
        while self.buf.len() < head_end + head.content_length {
            self.fill()?;
        }
        if self.buf.len() > head_end + head.content_length {
            return Err(Error::Malformed("bytes after the response body"));
        }
        if head.status != 200 {
            return Err(Error::Status(head.status));
        }
        match expect_len {
            Some(want) if want != head.content_length => Err(Error::Length {
                got: head.content_length,
                want,
            }),
            _ => Ok(()),
        }
    }

    fn fill(&mut self) -> Result<(), Error> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::Closed);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// What the benchmark needs from a response head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: usize,
    close: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, Error> {
    let text = std::str::from_utf8(head).map_err(|_| Error::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Malformed("not an HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(Error::Malformed("bad status code"))?;
    let mut content_length = None;
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(Error::Malformed("header without ':'"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse()
                    .map_err(|_| Error::Malformed("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::Malformed("Transfer-Encoding is not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(Head {
        status,
        content_length: content_length.ok_or(Error::Malformed("no Content-Length"))?,
        close,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nginx_head() {
        let h = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(
            parse_head(h).unwrap(),
            Head {
                status: 200,
                content_length: 1024,
                close: false
            }
        );
    }

    #[test]
    fn close_and_errors() {
        let h = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\nconnection: Close\r\n\r\n";
        assert_eq!(
            parse_head(h).unwrap(),
            Head {
                status: 403,
                content_length: 5,
                close: true
            }
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
    }
}
