//! Bidirectional byte copy between two connections with bounded buffers, half-close
//! propagation (EOF on one side becomes a shutdown of the other's write half) and abortive
//! close (RST) of the plain TCP side when the other side fails, so errors reach the app.

use tokio::io::{AsyncRead, AsyncWrite};
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
