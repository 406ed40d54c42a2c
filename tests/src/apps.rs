//! Test applications: an echo server that honours half-close, a recording TCP relay (to see
//! what crosses the wire between hosts), and client helpers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on `addr` running in the test's runtime; stops when dropped.
pub struct Echo {
    /// Bound address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Starts echoing on `addr` (port 0 allowed).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let l = TcpListener::bind(addr).await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    // Copies until the caller half-closes, then closes our write half.
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `data` to `addr`, half-closes, and reads everything back.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    exchange(TcpStream::connect(addr).await?, data).await
}

/// [`round_trip`] from the local address `src` (a client on another host, as policy sees it).
pub async fn round_trip_from(
    src: std::net::IpAddr,
    addr: SocketAddr,
    data: &[u8],
) -> anyhow::Result<Vec<u8>> {
    exchange(connect_from(src, addr).await?, data).await
}

/// Connects to `addr` from `src` (any port).
pub async fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match src {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(addr).await
}

/// Sends `data`, half-closes, and reads everything back.
async fn exchange(s: TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(crate::scaled(crate::CLIENT_TIMEOUT), exchange_now(s, data))
        .await
        .map_err(|_| anyhow::anyhow!("no echo within {:?}", crate::CLIENT_TIMEOUT))?
}

async fn exchange_now(mut s: TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let read = async {
        let mut out = Vec::with_capacity(data.len());
        r.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let (wr, out) = tokio::join!(write, read);
    wr?;
    Ok(out?)
}

/// Deterministic pseudo-random bytes (xorshift), so large transfers are checkable.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SHA-256 hex of `data`.
pub fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A TCP relay from `listen` to `target` that records every byte in both directions.
pub struct Relay {
    /// Bound address.
    pub addr: SocketAddr,
    /// Everything seen, both directions appended per chunk.
    pub seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Self> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((a, _)) = l.accept().await {
                let rec = rec.clone();
                tokio::spawn(async move {
                    let Ok(b) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ar, mut aw) = a.into_split();
                    let (mut br, mut bw) = b.into_split();
                    let r1 = rec.clone();
                    let up = async move {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = ar.read(&mut buf).await {
                            if n == 0 || bw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            r1.lock().expect("relay lock").extend_from_slice(&buf[..n]);
                        }
                        let _ = bw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = br.read(&mut buf).await {
                            if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            rec.lock().expect("relay lock").extend_from_slice(&buf[..n]);
                        }
                        let _ = aw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    /// Bytes recorded so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.seen.lock().expect("relay lock").clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
