//! The sealed socket: chitchat's `Socket` that seals what chitchat sends and opens what it
//! receives, (de)serializing chitchat's envelopes with chitchat's own wire format.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    DropReason, Keyring, Legacy, MAX_DATAGRAM_LEN, MAX_PLAINTEXT_LEN, MessageKind, Opener,
    SealStats, Sealer, open, seal,
};

/// The socket [`super::SealedTransport`] opens.
/// Most format-1 peers remembered (a fleet being upgraded; only key holders get in).
const MAX_LEGACY_PEERS: usize = 8_192;

pub(super) struct SealedSocket {
    socket: Arc<tokio::net::UdpSocket>,
    /// Its bound address (the `from` of the fault layer).
    local: SocketAddr,
    /// The fault layer, if any (tests only).
    impair: Option<Arc<dyn super::impair::Impairment>>,
    keyring_rx: watch::Receiver<Arc<Keyring>>,
    stats: Arc<SealStats>,
    /// This socket's sender instance and counter.
    sealer: Sealer,
    /// Replay windows of the instances this socket hears.
    opener: Opener,
    /// Peers whose last authentic datagram was format 1: answered in format 1.
    legacy_peers: std::collections::HashSet<SocketAddr>,
    /// Per-source pace of authentic datagrams, if set, and the start of its clock.
    pace: Option<super::pace::Pace>,
    epoch: tokio::time::Instant,
    /// One byte more than a valid datagram, so an over-long datagram is seen, not truncated.
    recv_buf: Box<[u8]>,
}

// === impl SealedSocket ===

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local)
    }

    /// `num_bytes_sent` counts bytes on the wire (sealed), 0 when the message was refused.
    async fn send(
        &mut self,
        to_addr: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let kind = MessageKind::of(&envelope.message);
        let plaintext = envelope.serialize_to_vec();
        // A SYN's digest is not bounded by chitchat: it may not fit.
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Ok(self.refuse_oversized(to_addr, plaintext.len()));
        }
        let keyring = Arc::clone(&self.keyring_rx.borrow());
        // A peer heard in format 1 (an older meshd, `legacy_peers` on) cannot open format 2.
        let datagram = if self.legacy_peers.contains(&to_addr) {
            super::legacy::seal(&keyring, &plaintext)
        } else {
            seal(&keyring, &mut self.sealer, unix_now(), &plaintext)
        };
        if let Some(layer) = &self.impair {
            use super::impair::Fate;
            match layer.fate(self.local, to_addr) {
                Fate::Deliver => {}
                Fate::Drop => {
                    self.stats.record_sent(kind, datagram.len());
                    return Ok(SendOutcome {
                        num_bytes_sent: datagram.len(),
                    });
                }
                Fate::Delay(after) => {
                    let (socket, num_bytes_sent) = (Arc::clone(&self.socket), datagram.len());
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = socket.send_to(&datagram, to_addr).await;
                    });
                    self.stats.record_sent(kind, num_bytes_sent);
                    return Ok(SendOutcome { num_bytes_sent });
                }
            }
        }
        let num_bytes_sent = self
            .socket
            .send_to(&datagram, to_addr)
            .await
            .context("failed to send sealed gossip datagram to peer")?;
        self.stats.record_sent(kind, num_bytes_sent);
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel-safe: the only await is the receive, and nothing is held across it.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let Some((from_addr, num_bytes_received, plaintext)) = self.recv_and_open().await?
            else {
                continue;
            };
            let envelope = match ChitchatEnvelope::deserialize(&mut plaintext.as_slice()) {
                Ok(envelope) => envelope,
                Err(err) => {
                    self.stats.record_drop(DropReason::Undecodable);
                    debug!(
                        src.addr = %from_addr,
                        reason = DropReason::Undecodable.as_str(),
                        error = %err,
                        "gossip datagram dropped"
                    );
                    continue;
                }
            };
            let kind = MessageKind::of(&envelope.message);
            self.stats.record_opened(kind, num_bytes_received);
            return Ok(RecvOutcome {
                from_addr,
                envelope,
                num_bytes_received,
            });
        }
    }
}

impl SealedSocket {
    pub(super) async fn bind(
        listen_addr: SocketAddr,
        keyring_rx: watch::Receiver<Arc<Keyring>>,
        stats: Arc<SealStats>,
        legacy: Legacy,
    ) -> anyhow::Result<SealedSocket> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for sealed gossip"))?;
        if legacy == Legacy::Accept {
            warn!(
                "gossip talks format version 1 with older meshd, which has no replay protection, \
                 and uses unsigned state of nodes never seen signed (gossip.legacy_peers); turn it \
                 off once every node is upgraded"
            );
        }
        let local = socket
            .local_addr()
            .context("failed to get sealed gossip socket address")?;
        Ok(SealedSocket {
            socket: Arc::new(socket),
            local,
            impair: None,
            keyring_rx,
            stats,
            sealer: Sealer::new(),
            opener: Opener::new(legacy),
            legacy_peers: std::collections::HashSet::new(),
            pace: None,
            epoch: tokio::time::Instant::now(),
            recv_buf: vec![0; MAX_DATAGRAM_LEN + 1].into_boxed_slice(),
        })
    }

    /// Puts the fault layer `layer` under this socket (`None`: none).
    pub(super) fn impaired(mut self, layer: Option<Arc<dyn super::impair::Impairment>>) -> Self {
        self.impair = layer;
        self
    }

    /// Paces authentic datagrams per source for gossip rounds every `interval` (`None`: not).
    pub(super) fn paced(mut self, interval: Option<std::time::Duration>) -> Self {
        self.pace = interval.map(super::pace::Pace::new);
        self
    }

    /// Remembers which format an authentic datagram from `addr` used, so replies match it
    /// (only format-1 peers are kept, at most [`MAX_LEGACY_PEERS`]; only `legacy_peers` lets a
    /// format-1 datagram open at all).
    fn note_format(&mut self, addr: SocketAddr, legacy: bool) {
        if legacy {
            if self.legacy_peers.len() < MAX_LEGACY_PEERS {
                self.legacy_peers.insert(addr);
            }
        } else if !self.legacy_peers.is_empty() {
            self.legacy_peers.remove(&addr);
        }
    }

    /// Receives one datagram and opens it; `None` if it was dropped.
    async fn recv_and_open(&mut self) -> anyhow::Result<Option<(SocketAddr, usize, Vec<u8>)>> {
        let (len, from_addr) = match self.socket.recv_from(&mut self.recv_buf).await {
            Ok(received) => received,
            Err(err) if is_transient_io_error(&err) => {
                warn!(error = %err, "transient UDP recv error on the sealed gossip socket");
                return Ok(None);
            }
            Err(err) => {
                return Err(err).context("fatal UDP recv error on the sealed gossip socket");
            }
        };
        let keyring = Arc::clone(&self.keyring_rx.borrow());
        let version = self.recv_buf.first().copied();
        match open(
            &keyring,
            &mut self.opener,
            unix_now(),
            &self.recv_buf[..len],
        ) {
            Ok(plaintext) => {
                let now_ms = self.epoch.elapsed().as_millis() as u64;
                if let Some(pace) = &mut self.pace
                    && !pace.admit(from_addr, now_ms)
                {
                    self.stats.record_drop(DropReason::Paced);
                    debug!(src.addr = %from_addr, "gossip datagram dropped: source past its pace");
                    return Ok(None);
                }
                self.note_format(from_addr, version == Some(super::legacy::VERSION));
                Ok(Some((from_addr, len, plaintext)))
            }
            Err(err) => {
                self.stats.record_drop(err.reason());
                debug!(
                    src.addr = %from_addr,
                    reason = err.reason().as_str(),
                    error = %err,
                    "gossip datagram dropped"
                );
                Ok(None)
            }
        }
    }

    fn refuse_oversized(&self, to_addr: SocketAddr, len: usize) -> SendOutcome {
        self.stats.record_drop(DropReason::Oversized);
        warn!(
            dst.addr = %to_addr,
            len,
            max = MAX_PLAINTEXT_LEN,
            "gossip message too large to seal into one UDP datagram, not sent"
        );
        SendOutcome { num_bytes_sent: 0 }
    }
}

/// The errors chitchat's own UDP socket treats as transient.
fn is_transient_io_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::OutOfMemory
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The wall clock in Unix seconds, the `now` of [`seal`] and [`open`]. A clock before 1970
/// reads as 0, so everything received is stale: loud in the metrics, never a panic.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
