//! The registry's TLS front: accepts TCP, runs each TLS handshake in its own task under a
//! timeout, records who the peer is, and hands finished connections to tonic.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_api::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

/// Most TLS handshakes in progress at once; more wait in the accept queue.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Who is on the other end of a registry connection; tonic puts it in request extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote socket address.
    pub addr: SocketAddr,
    /// Identity from the client certificate; `None` for a joining host without one.
    pub identity: Option<Identity>,
}

impl Default for PeerInfo {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            identity: None,
        }
    }
}

/// A TLS connection carrying its [`PeerInfo`].
pub struct MeshConn {
    tls: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl tonic::transport::server::Connected for MeshConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Accepts connections on `listener` until `shutdown` resolves, yielding handshaken ones.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<Result<MeshConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            // Fire-and-forget: bounded by the handshake timeout and the semaphore.
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(mesh_runtime::tls::peer_identity);
                        let _ = tx
                            .send(Ok(MeshConn {
                                tls,
                                peer: PeerInfo { addr, identity },
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        debug!(src.addr = %addr, error = %e, "registry tls handshake failed")
                    }
                    Err(_) => debug!(src.addr = %addr, "registry tls handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
