//! Bidirectional byte copy between two connections with bounded buffers, half-close
//! propagation (EOF on one side becomes a shutdown of the other's write half) and abortive
//! close (RST) of the plain TCP side when the other side fails, so errors reach the app.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Per-direction buffer: large enough for bulk transfers, small enough that 10k connections
/// stay in tens of MB.
pub const BUF_SIZE: usize = 32 * 1024;

/// Bytes moved by a finished copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    /// From the caller towards the service.
    pub to_service: u64,
    /// From the service back to the caller.
    pub to_caller: u64,
}

/// Copies until both directions have closed. On error the TCP side is reset.
pub async fn bidirectional<T>(
    tcp: &mut TcpStream,
    other: &mut T,
    tcp_is_caller: bool,
) -> std::io::Result<Transferred>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(tcp, other, BUF_SIZE, BUF_SIZE).await {
        Ok((from_tcp, from_other)) => Ok(if tcp_is_caller {
            Transferred {
                to_service: from_tcp,
                to_caller: from_other,
            }
        } else {
            Transferred {
                to_service: from_other,
                to_caller: from_tcp,
            }
        }),
        Err(e) => {
            reset(tcp);
            Err(e)
        }
    }
}

/// Makes the next close of `tcp` send RST instead of FIN, so the peer sees a failure.
pub fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// A stream that remembers whether a read or write on it failed, so a failed copy can be
/// blamed on the side that failed (an upstream's reset counts against that endpoint; the
/// app's does not).
#[derive(Debug)]
pub struct Blamed<T> {
    inner: T,
    failed: bool,
}

impl<T> Blamed<T> {
    /// Wraps `inner`; nothing has failed yet.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            failed: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Whether a read or write on it returned an error.
    pub fn failed(&self) -> bool {
        self.failed
    }

    fn note<R>(&mut self, poll: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if let Poll::Ready(Err(_)) = &poll {
            self.failed = true;
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Blamed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(poll)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Blamed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(poll)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The copy's error is blamed on the side that failed, not on the one that saw it last.
    #[tokio::test]
    async fn a_failed_copy_is_blamed_on_the_side_that_failed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut app, mut app_peer) = {
            let c = TcpStream::connect(addr).await.unwrap();
            (listener.accept().await.unwrap().0, c)
        };
        let (upstream, upstream_peer) = {
            let c = TcpStream::connect(addr).await.unwrap();
            (c, listener.accept().await.unwrap().0)
        };
        let mut upstream = Blamed::new(upstream);
        assert!(!upstream.failed());
        let copy = tokio::spawn(async move {
            let r = bidirectional(&mut app, &mut upstream, true).await;
            (r.is_err(), upstream.failed())
        });
        app_peer.write_all(b"hello").await.unwrap();
        let mut upstream_peer = upstream_peer;
        let mut buf = [0u8; 5];
        upstream_peer.read_exact(&mut buf).await.unwrap();
        // The upstream resets: the copy fails, and the upstream is to blame.
        reset(&upstream_peer);
        drop(upstream_peer);
        let (copy_failed, upstream_failed) = copy.await.unwrap();
        assert!(copy_failed && upstream_failed);
        drop(app_peer);
    }
}
