//! The sealed socket: chitchat's `Socket` that seals what chitchat sends and opens what it
//! receives, and the loopback codec that turns chitchat envelopes into bytes and back.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    DropReason, Keyring, Legacy, MAX_DATAGRAM_LEN, MAX_PLAINTEXT_LEN, Opener, SealStats, Sealer,
    open, seal,
};

/// A loopback round trip through the codec takes microseconds; this only fires if the kernel
/// lost a loopback datagram, and then the codec is rebuilt.
const CODEC_TIMEOUT: Duration = Duration::from_secs(1);
/// Start of the codec marker's cluster id, followed by 128 random bits no peer can know.
const CODEC_MARKER_PREFIX: &str = "meshd-gossip-seal-codec-marker-";

/// The socket [`super::SealedTransport`] opens.
/// Most format-1 peers remembered (a fleet being upgraded; only key holders get in).
const MAX_LEGACY_PEERS: usize = 8_192;

pub(super) struct SealedSocket {
    socket: Arc<tokio::net::UdpSocket>,
    /// Its bound address (the `from` of the fault layer).
    local: SocketAddr,
    /// The fault layer, if any (tests only).
    impair: Option<Arc<dyn super::impair::Impairment>>,
    pub(super) codec: Codec,
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
    /// An opened datagram on its way through the codec. `Socket::recv` must be cancellable
    /// (chitchat races it with its gossip timer), so the decode resumes from here.
    pub(super) pending: Option<Pending>,
}

pub(super) struct Pending {
    pub(super) from_addr: SocketAddr,
    pub(super) num_bytes_received: usize,
    pub(super) marker_sent: bool,
    pub(super) decoded: Option<ChitchatEnvelope>,
}

/// chitchat's own UDP socket on 127.0.0.1, used only to turn envelopes into bytes and back.
///
/// Encode: `chitchat` sends the envelope to `relay`, which is connected to `chitchat`, so the
/// kernel hands `relay` nothing else. Decode: `relay` sends the opened message to `chitchat`,
/// then the marker (a SYN with a cluster id no peer knows). chitchat's socket skips what it
/// cannot decode and waits for the next datagram; the marker ends the wait either way. What
/// reaches `chitchat` from another address is dropped, so local processes cannot inject through
/// it without raw-socket privileges (spoofing the relay's loopback source address).
pub(super) struct Codec {
    chitchat: chitchat::transport::UdpSocket,
    pub(super) relay: tokio::net::UdpSocket,
    relay_addr: SocketAddr,
    marker_cluster_id: String,
    marker: Vec<u8>,
    encode_buf: Box<[u8]>,
    /// The codec may hold a stale datagram (an encode was cancelled midway, or a round trip
    /// failed), which would be taken for the next message: it is rebuilt before its next use.
    /// Cancelled decodes do not count: they resume from `SealedSocket::pending`.
    pub(super) in_doubt: bool,
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
        self.rebuild_codec_if_in_doubt().await?;
        let plaintext = match self.codec.encode(envelope).await {
            Ok(plaintext) => plaintext,
            // Over 65,507 bytes even unsealed (a SYN's digest is not bounded by chitchat).
            Err(err) if is_message_too_long(&err) => {
                return Ok(self.refuse_oversized(to_addr, None));
            }
            Err(err) => {
                self.stats.record_drop(DropReason::CodecFailed);
                return Err(err);
            }
        };
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Ok(self.refuse_oversized(to_addr, Some(plaintext.len())));
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
                    self.stats.sealed.fetch_add(1, Ordering::Relaxed);
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
                    self.stats.sealed.fetch_add(1, Ordering::Relaxed);
                    return Ok(SendOutcome { num_bytes_sent });
                }
            }
        }
        let num_bytes_sent = self
            .socket
            .send_to(&datagram, to_addr)
            .await
            .context("failed to send sealed gossip datagram to peer")?;
        self.stats.sealed.fetch_add(1, Ordering::Relaxed);
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel-safe: every await is, and a decode in progress resumes from `pending`.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            self.rebuild_codec_if_in_doubt().await?;
            if self.pending.is_none() {
                let Some((from_addr, num_bytes_received, plaintext)) = self.recv_and_open().await?
                else {
                    continue;
                };
                if let Err(err) = self.codec.relay.send(&plaintext).await {
                    warn!(error = %err, "gossip codec failed, rebuilding it");
                    self.stats.record_drop(DropReason::CodecFailed);
                    self.codec.in_doubt = true;
                    continue;
                }
                self.pending = Some(Pending {
                    from_addr,
                    num_bytes_received,
                    marker_sent: false,
                    decoded: None,
                });
            }
            if let Some(outcome) = self.finish_pending().await? {
                return Ok(outcome);
            }
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
            codec: Codec::bind().await?,
            keyring_rx,
            stats,
            sealer: Sealer::new(),
            opener: Opener::new(legacy),
            legacy_peers: std::collections::HashSet::new(),
            pace: None,
            epoch: tokio::time::Instant::now(),
            recv_buf: vec![0; MAX_DATAGRAM_LEN + 1].into_boxed_slice(),
            pending: None,
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

    /// Finishes the decode in `pending`; `None` if chitchat could not decode it.
    async fn finish_pending(&mut self) -> anyhow::Result<Option<RecvOutcome>> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(None);
        };
        let finished = tokio::time::timeout(
            CODEC_TIMEOUT,
            self.codec.finish_decode(pending, &self.stats),
        )
        .await;
        if let Err(err) = finished.map_err(anyhow::Error::from).and_then(|res| res) {
            warn!(error = %err, "gossip codec failed, rebuilding it");
            // The rebuild counts the datagram in `pending` as lost.
            self.codec.in_doubt = true;
            return Ok(None);
        }
        let Some(Pending {
            from_addr,
            num_bytes_received,
            decoded,
            ..
        }) = self.pending.take()
        else {
            return Ok(None);
        };
        let Some(envelope) = decoded else {
            self.stats.record_drop(DropReason::Undecodable);
            debug!(
                src.addr = %from_addr,
                reason = DropReason::Undecodable.as_str(),
                "gossip datagram dropped"
            );
            return Ok(None);
        };
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Some(RecvOutcome {
            from_addr,
            envelope,
            num_bytes_received,
        }))
    }

    /// Replaces a codec in doubt; a decode in progress is lost and counted. If this is cancelled,
    /// the old codec stays in doubt and the next call rebuilds it.
    async fn rebuild_codec_if_in_doubt(&mut self) -> anyhow::Result<()> {
        if !self.codec.in_doubt {
            return Ok(());
        }
        if self.pending.take().is_some() {
            self.stats.record_drop(DropReason::CodecFailed);
        }
        self.codec = Codec::bind().await?;
        Ok(())
    }

    fn refuse_oversized(&self, to_addr: SocketAddr, len: Option<usize>) -> SendOutcome {
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

fn is_message_too_long(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|cause| cause.raw_os_error() == Some(libc::EMSGSIZE))
}

/// The wall clock in Unix seconds, the `now` of [`seal`] and [`open`]. A clock before 1970
/// reads as 0, so everything received is stale: loud in the metrics, never a panic.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

// === impl Codec ===

impl Codec {
    pub(super) async fn bind() -> anyhow::Result<Codec> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let chitchat = chitchat::transport::UdpSocket::open(loopback)
            .await
            .context("failed to bind the gossip codec socket")?;
        let relay = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("failed to bind the gossip codec relay socket")?;
        relay
            .connect(chitchat.local_addr()?)
            .await
            .context("failed to connect the gossip codec relay socket")?;
        let relay_addr = relay.local_addr()?;
        let marker_cluster_id = format!("{CODEC_MARKER_PREFIX}{:032x}", rand::random::<u128>());
        let mut codec = Codec {
            chitchat,
            relay,
            relay_addr,
            marker_cluster_id,
            marker: Vec::new(),
            encode_buf: vec![0; MAX_DATAGRAM_LEN + 1].into_boxed_slice(),
            in_doubt: false,
        };
        codec.marker = codec.encode(codec.marker_envelope()).await?;
        Ok(codec)
    }

    fn marker_envelope(&self) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: self.marker_cluster_id.clone(),
                digest: Default::default(),
            },
        }
    }

    fn is_marker(&self, envelope: &ChitchatEnvelope) -> bool {
        match &envelope.message {
            ChitchatMessage::Syn { cluster_id, .. } => *cluster_id == self.marker_cluster_id,
            _ => false,
        }
    }

    pub(super) async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<Vec<u8>> {
        self.in_doubt = true;
        if let Err(err) = self.chitchat.send(self.relay_addr, envelope).await {
            // Nothing was sent, so nothing stale can be left behind.
            self.in_doubt = false;
            return Err(err);
        }
        let len = tokio::time::timeout(CODEC_TIMEOUT, self.relay.recv(&mut self.encode_buf))
            .await
            .context("gossip codec did not return the encoded message")?
            .context("failed to receive from the gossip codec")?;
        self.in_doubt = false;
        Ok(self.encode_buf[..len].to_vec())
    }

    /// Sends the marker after the message (once) and reads until the marker comes back.
    pub(super) async fn finish_decode(
        &mut self,
        pending: &mut Pending,
        stats: &SealStats,
    ) -> anyhow::Result<()> {
        if !pending.marker_sent {
            self.relay
                .send(&self.marker)
                .await
                .context("failed to send the marker to the gossip codec")?;
            pending.marker_sent = true;
        }
        loop {
            let outcome = self.chitchat.recv().await?;
            if outcome.from_addr != self.relay_addr {
                stats.record_drop(DropReason::CodecInjected);
                debug!(
                    src.addr = %outcome.from_addr,
                    "datagram sent to the gossip codec socket dropped"
                );
                continue;
            }
            if self.is_marker(&outcome.envelope) {
                return Ok(());
            }
            pending.decoded = Some(outcome.envelope);
        }
    }
}
