//! Sealed gossip: the chitchat transport that encrypts and authenticates every datagram with a key from the gossip keyring.
//!
//! chitchat has no authentication of its own: anyone who can send UDP to the gossip port can
//! join the cluster or rewrite any node's state (the `cluster_id` string is no secret).
//! [`SealedTransport`] closes that hole: every datagram is sealed with ChaCha20-Poly1305 under
//! the keyring's primary key and opened with whichever key of the keyring it names, so only
//! holders of a key of the [`Keyring`] can join or inject state.
//!
//! # Wire format (version 1)
//!
//! ```text
//! | version | key id  | nonce    | ChaCha20-Poly1305(chitchat message) | tag      |
//! | 1 byte  | 4 bytes | 12 bytes | same length as the message          | 16 bytes |
//!  \____ AAD ______/
//! ```
//!
//! The key id is the first 4 bytes of SHA-256 of the key: it lets the receiver pick the key
//! without trial decryption and reveals nothing usable about the key. Version and key id are
//! the AAD, so relabelling a datagram fails authentication. Nonces are random: 96 bits keep the
//! chance of a repeat negligible for billions of datagrams per key, and rotation (see
//! [`Keyring`]) resets the count.
//!
//! Decisions are pure functions ([`seal`], [`open`]); [`SealedTransport`] is the I/O around them.
//! A rejected datagram is dropped, counted in [`SealStats`] and logged at debug; it is never
//! returned as an error, because an error from `Socket::recv` stops chitchat's gossip loop.
//!
//! # Datagram size
//!
//! chitchat 0.13 sizes its messages against `MAX_UDP_DATAGRAM_PAYLOAD_SIZE` = 65,507 bytes, a
//! crate-private constant that no setting changes (`ChitchatConfig` has no MTU field;
//! `ChannelTransport::with_mtu` only checks sizes, for tests). It cuts SYN-ACK and ACK deltas so
//! the whole message fits 65,507 bytes, and does not bound the SYN (it carries the full digest).
//! Sealing adds [`SEAL_OVERHEAD`] = 33 bytes, so a message longer than [`MAX_PLAINTEXT_LEN`] =
//! 65,474 bytes cannot travel sealed in one UDP datagram. Such a message is refused: not sent,
//! logged at warn, counted as [`DropReason::Oversized`]. It is never truncated (the peer could
//! not authenticate a truncated datagram anyway). What that means: only a delta that filled
//! chitchat's budget to within 33 bytes is hit; chitchat retries every round with a new digest
//! (heartbeats move, equally stale nodes are shuffled), so one refusal delays that peer's catch-up
//! by a round, but a peer tens of KiB behind may catch up slowly. meshd gossips a node record and
//! a service list, far below that; a growing `oversized` count means the gossiped state has
//! outgrown UDP gossip. (Messages that size travel as ~45 IP fragments and die with any one of
//! them, with or without sealing.)
//!
//! # chitchat 0.13 has no public message codec
//!
//! `ChitchatEnvelope::serialize`/`deserialize` are `pub(crate)` in 0.13, `ChitchatMessage` does
//! not implement the public `Serializable`/`Deserializable`, and the `Digest` inside SYN and
//! SYN-ACK can neither be encoded nor built outside the crate. The only public code that turns an
//! envelope into bytes and back is chitchat's own `transport::UdpSocket`, so each sealed socket
//! runs one privately on 127.0.0.1 as its codec (see `Codec`). Once chitchat exposes the
//! envelope codec again, `Codec` becomes two function calls and nothing else here changes.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use rand::Rng as _;
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use tokio::sync::watch;
use tracing::{debug, warn};

/// Length of a gossip key: ChaCha20-Poly1305 takes a 256-bit key.
pub const KEY_LEN: usize = 32;
/// Length of a key id on the wire: enough to tell the few keys of a keyring apart.
pub const KEY_ID_LEN: usize = 4;
/// Format version in the first byte. Not 0, so an all-zero datagram is no valid version.
/// Receivers reject versions they do not know, so a new layout needs a new number.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes sealing adds to a chitchat message: header (version, key id, nonce) and tag, 33.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest UDP payload over IPv4: 65,535 (IP total length) − 20 (IP header) − 8 (UDP header);
/// the same value as chitchat's crate-private `MAX_UDP_DATAGRAM_PAYLOAD_SIZE`.
pub const MAX_DATAGRAM_LEN: usize = 65_507;
/// Largest chitchat message that still fits one sealed datagram: 65,474 bytes.
pub const MAX_PLAINTEXT_LEN: usize = MAX_DATAGRAM_LEN - SEAL_OVERHEAD;

const VERSION_LEN: usize = 1;
const NONCE_LEN: usize = aead::NONCE_LEN;
/// Poly1305 tag length; ring only exposes it through a non-const fn (a test checks they agree).
const TAG_LEN: usize = 16;
/// The AAD is the version byte and the key id, the start of the header.
const AAD_LEN: usize = VERSION_LEN + KEY_ID_LEN;
const HEADER_LEN: usize = AAD_LEN + NONCE_LEN;
/// A loopback round trip through the codec takes microseconds; this only fires if the kernel
/// lost a loopback datagram, and then the codec is rebuilt.
const CODEC_TIMEOUT: Duration = Duration::from_secs(1);
/// Start of the codec marker's cluster id, followed by 128 random bits no peer can know.
const CODEC_MARKER_PREFIX: &str = "meshd-gossip-seal-codec-marker-";

/// Gossip key errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not standard base64.
    #[error(
        "gossip key is not valid base64: expected {KEY_LEN} bytes, base64 (standard alphabet, padded, 44 characters)"
    )]
    KeyNotBase64(#[source] base64::DecodeError),
    /// The text decodes to the wrong number of bytes.
    #[error("gossip key decodes to {len} bytes: expected {KEY_LEN} bytes, base64 (44 characters)")]
    KeyWrongLength {
        /// Decoded length.
        len: usize,
    },
    /// The keyring lists one key twice.
    #[error("gossip keyring lists key {key_id} more than once")]
    DuplicateKey {
        /// Id of the repeated key.
        key_id: KeyId,
    },
    /// Two different keys share an id, so a receiver could not tell which one to use.
    #[error("two different gossip keys share key id {key_id}; generate a new key")]
    KeyIdCollision {
        /// The shared id.
        key_id: KeyId,
    },
}

/// Why [`open`] rejected a datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short (or too long) to be a sealed datagram.
    #[error(
        "gossip datagram is malformed: {len} bytes, a sealed datagram has {SEAL_OVERHEAD} to {MAX_DATAGRAM_LEN}"
    )]
    Malformed {
        /// Datagram length.
        len: usize,
    },
    /// Sealed with a key this keyring does not hold.
    #[error(
        "gossip datagram is sealed with unknown key {key_id}, maybe the sender's keyring was rotated without this node"
    )]
    UnknownKey {
        /// Key id named by the datagram.
        key_id: KeyId,
    },
    /// The key is known but the tag does not match: tampered, or forged under a known key id.
    #[error("gossip datagram failed authentication (tampered or forged)")]
    AuthenticationFailed,
    /// A format version this node does not know.
    #[error(
        "gossip datagram has unknown format version {version}, expected {FORMAT_VERSION} (an unsealed chitchat peer, or a newer meshd)"
    )]
    UnknownVersion {
        /// First byte of the datagram.
        version: u8,
    },
}

/// Why a datagram or message was dropped; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Received: [`OpenError::Malformed`].
    Malformed,
    /// Received: [`OpenError::UnknownKey`].
    UnknownKey,
    /// Received: [`OpenError::AuthenticationFailed`].
    AuthenticationFailed,
    /// Received: [`OpenError::UnknownVersion`].
    UnknownVersion,
    /// Received: authentic, but chitchat cannot decode the message (e.g. a newer protocol).
    Undecodable,
    /// Sent: the message does not fit one sealed datagram, so it was not sent.
    Oversized,
    /// The loopback codec failed (a lost loopback datagram or a socket error).
    CodecFailed,
    /// A local process sent a datagram to the loopback codec socket.
    CodecInjected,
}

/// Counters of one gossip socket (or of several sharing the `Arc`).
#[derive(Debug, Default)]
pub struct SealStats {
    sealed: AtomicU64,
    opened: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

/// The key id: first [`KEY_ID_LEN`] bytes of SHA-256 of the key; printed as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

/// A 32-byte gossip key. Printed only on request ([`GossipKey::to_base64`]); `Debug` shows the id.
#[derive(Clone)]
pub struct GossipKey {
    bytes: [u8; KEY_LEN],
    id: KeyId,
    aead: LessSafeKey,
}

/// The keys a node gossips with: it seals with `primary` and opens with any key.
///
/// Accepting several keys is what makes rotation possible without a moment where two nodes
/// cannot talk. Rotate from key `old` to key `new` in three steps, each applied to every node
/// (in any order, one node at a time) before the next step starts:
///
/// 1. install `new` as a secondary key: `{primary: old, others: [new]}`. Everyone still seals
///    with `old`, and nodes already updated can open `new`;
/// 2. switch the primary: `{primary: new, others: [old]}`. Updated nodes seal with `new`, which
///    every node can open since step 1; nodes not yet updated still seal with `old`, which every
///    node still opens;
/// 3. remove the old key: `{primary: new}`. Nobody seals with `old` any more since step 2.
///
/// Skipping a step splits the cluster: a node at step 3 cannot open what a node at step 1 seals.
#[derive(Clone, Debug)]
pub struct Keyring {
    primary: GossipKey,
    others: Vec<GossipKey>,
}

/// chitchat transport that seals every datagram; see the module docs.
///
/// The keyring is read from `keyring_rx` on every send and receive, so a new keyring applies to
/// the next datagram without a restart.
pub struct SealedTransport {
    keyring_rx: watch::Receiver<Arc<Keyring>>,
    stats: Arc<SealStats>,
}

/// The socket [`SealedTransport::open`] returns.
struct SealedSocket {
    socket: tokio::net::UdpSocket,
    codec: Codec,
    keyring_rx: watch::Receiver<Arc<Keyring>>,
    stats: Arc<SealStats>,
    /// One byte more than a valid datagram, so an over-long datagram is seen, not truncated.
    recv_buf: Box<[u8]>,
    /// An opened datagram on its way through the codec. `Socket::recv` must be cancellable
    /// (chitchat races it with its gossip timer), so the decode resumes from here.
    pending: Option<Pending>,
}

struct Pending {
    from_addr: SocketAddr,
    num_bytes_received: usize,
    marker_sent: bool,
    decoded: Option<ChitchatEnvelope>,
}

/// chitchat's own UDP socket on 127.0.0.1, used only to turn envelopes into bytes and back.
///
/// Encode: `chitchat` sends the envelope to `relay`, which is connected to `chitchat`, so the
/// kernel hands `relay` nothing else. Decode: `relay` sends the opened message to `chitchat`,
/// then the marker (a SYN with a cluster id no peer knows). chitchat's socket skips what it
/// cannot decode and waits for the next datagram; the marker ends the wait either way. What
/// reaches `chitchat` from another address is dropped, so local processes cannot inject through
/// it without raw-socket privileges (spoofing the relay's loopback source address).
struct Codec {
    chitchat: chitchat::transport::UdpSocket,
    relay: tokio::net::UdpSocket,
    relay_addr: SocketAddr,
    marker_cluster_id: String,
    marker: Vec<u8>,
    encode_buf: Box<[u8]>,
    /// The codec may hold a stale datagram (an encode was cancelled midway, or a round trip
    /// failed), which would be taken for the next message: it is rebuilt before its next use.
    /// Cancelled decodes do not count: they resume from `SealedSocket::pending`.
    in_doubt: bool,
}

struct Header {
    version: u8,
    key_id: KeyId,
    nonce: [u8; NONCE_LEN],
}

/// Seals `plaintext` with the keyring's primary key into one datagram (see the module docs).
pub fn seal(keyring: &Keyring, plaintext: &[u8]) -> Vec<u8> {
    let key = keyring.primary();
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill(&mut nonce);
    let header = Header {
        version: FORMAT_VERSION,
        key_id: key.id,
        nonce,
    };
    let mut datagram = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    datagram.extend_from_slice(&header.encode());
    datagram.extend_from_slice(plaintext);
    let tag = key
        .aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header.aad()),
            &mut datagram[HEADER_LEN..],
        )
        .expect("ChaCha20-Poly1305 only refuses messages over 256 GiB, gossip is under 64 KiB");
    datagram.extend_from_slice(tag.as_ref());
    datagram
}

/// Opens a datagram sealed by [`seal`] with any key of `keyring`.
pub fn open(keyring: &Keyring, datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
    let malformed = OpenError::Malformed {
        len: datagram.len(),
    };
    // The version decides the layout, so it is checked before the length.
    match datagram.first() {
        None => return Err(malformed),
        Some(&version) if version != FORMAT_VERSION => {
            return Err(OpenError::UnknownVersion { version });
        }
        Some(_) => {}
    }
    if datagram.len() < SEAL_OVERHEAD || datagram.len() > MAX_DATAGRAM_LEN {
        return Err(malformed);
    }
    let Some((header, sealed)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(malformed);
    };
    let header = Header::decode(header);
    let key = keyring.key(header.key_id).ok_or(OpenError::UnknownKey {
        key_id: header.key_id,
    })?;
    let mut in_out = sealed.to_vec();
    let plaintext_len = key
        .aead
        .open_in_place(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(header.aad()),
            &mut in_out,
        )
        .map_err(|_| OpenError::AuthenticationFailed)?
        .len();
    in_out.truncate(plaintext_len);
    Ok(in_out)
}

// === impl OpenError ===

impl OpenError {
    /// The counter this rejection goes to.
    pub fn reason(&self) -> DropReason {
        match self {
            Self::Malformed { .. } => DropReason::Malformed,
            Self::UnknownKey { .. } => DropReason::UnknownKey,
            Self::AuthenticationFailed => DropReason::AuthenticationFailed,
            Self::UnknownVersion { .. } => DropReason::UnknownVersion,
        }
    }
}

// === impl DropReason ===

impl DropReason {
    /// Every reason, in declaration order (which indexes the counters).
    pub const ALL: [DropReason; 8] = [
        Self::Malformed,
        Self::UnknownKey,
        Self::AuthenticationFailed,
        Self::UnknownVersion,
        Self::Undecodable,
        Self::Oversized,
        Self::CodecFailed,
        Self::CodecInjected,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::AuthenticationFailed => "authentication_failed",
            Self::UnknownVersion => "unknown_version",
            Self::Undecodable => "undecodable",
            Self::Oversized => "oversized",
            Self::CodecFailed => "codec_failed",
            Self::CodecInjected => "codec_injected",
        }
    }
}

// === impl SealStats ===

impl SealStats {
    /// Datagrams sealed and handed to the kernel.
    pub fn sealed(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Datagrams opened and handed to chitchat.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Datagrams or messages dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// `(reason, count)` for every drop reason, for metrics export.
    pub fn drops(&self) -> [(DropReason, u64); DropReason::ALL.len()] {
        DropReason::ALL.map(|reason| (reason, self.dropped(reason)))
    }

    fn record_drop(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

// === impl KeyId ===

impl KeyId {
    /// The id as it appears on the wire.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// === impl GossipKey ===

impl GossipKey {
    /// A new random key (from the thread-local CSPRNG, seeded by the OS).
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rng().fill(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        // The id the registry and meshctl use for the same key.
        let id = mesh_api::gossip_key::KeyMaterial::from_bytes(bytes).id().0;
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .expect("a KEY_LEN-byte key is a valid ChaCha20-Poly1305 key");
        Self {
            bytes,
            id: KeyId(id),
            aead: LessSafeKey::new(unbound),
        }
    }

    /// Parses standard padded base64 (surrounding whitespace, such as a key file's final
    /// newline, is ignored).
    pub fn from_base64(text: &str) -> Result<Self, Error> {
        let decoded = BASE64.decode(text.trim()).map_err(Error::KeyNotBase64)?;
        let bytes = <[u8; KEY_LEN]>::try_from(decoded.as_slice())
            .map_err(|_| Error::KeyWrongLength { len: decoded.len() })?;
        Ok(Self::from_bytes(bytes))
    }

    /// The key as standard base64: secret material, for key files only.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.bytes)
    }

    /// The id that names this key on the wire.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Same key material (a configuration-time check, so constant time is not needed).
    fn same_material(&self, other: &GossipKey) -> bool {
        self.bytes == other.bytes
    }
}

impl FromStr for GossipKey {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        Self::from_base64(text)
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GossipKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

// === impl Keyring ===

impl Keyring {
    /// A keyring sealing with `primary` and also opening with `others`; no key may appear twice,
    /// and distinct keys must have distinct ids.
    pub fn new(primary: GossipKey, others: Vec<GossipKey>) -> Result<Self, Error> {
        let keyring = Self { primary, others };
        let keys: Vec<&GossipKey> = keyring.keys().collect();
        for (i, key) in keys.iter().enumerate() {
            for earlier in &keys[..i] {
                if key.same_material(earlier) {
                    return Err(Error::DuplicateKey { key_id: key.id });
                }
                if key.id == earlier.id {
                    return Err(Error::KeyIdCollision { key_id: key.id });
                }
            }
        }
        Ok(keyring)
    }

    /// A keyring of one key: the state outside rotations.
    pub fn single(primary: GossipKey) -> Self {
        Self {
            primary,
            others: Vec::new(),
        }
    }

    /// The key that seals.
    pub fn primary(&self) -> &GossipKey {
        &self.primary
    }

    /// The keys that only open.
    pub fn others(&self) -> &[GossipKey] {
        &self.others
    }

    /// The key named `id`, if held.
    pub fn key(&self, id: KeyId) -> Option<&GossipKey> {
        self.keys().find(|key| key.id == id)
    }

    fn keys(&self) -> impl Iterator<Item = &GossipKey> {
        std::iter::once(&self.primary).chain(&self.others)
    }
}

// === impl SealedTransport ===

impl SealedTransport {
    /// A transport sealing with the current keyring of `keyring_rx`, counting into `stats`.
    pub fn new(keyring_rx: watch::Receiver<Arc<Keyring>>, stats: Arc<SealStats>) -> Self {
        Self { keyring_rx, stats }
    }

    /// The counters this transport's sockets update.
    pub fn stats(&self) -> &Arc<SealStats> {
        &self.stats
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = SealedSocket::bind(
            listen_addr,
            self.keyring_rx.clone(),
            Arc::clone(&self.stats),
        )
        .await?;
        Ok(Box::new(socket))
    }
}

// === impl SealedSocket ===

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket
            .local_addr()
            .context("failed to get sealed gossip socket address")
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
        let datagram = seal(&keyring, &plaintext);
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
    async fn bind(
        listen_addr: SocketAddr,
        keyring_rx: watch::Receiver<Arc<Keyring>>,
        stats: Arc<SealStats>,
    ) -> anyhow::Result<SealedSocket> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for sealed gossip"))?;
        Ok(SealedSocket {
            socket,
            codec: Codec::bind().await?,
            keyring_rx,
            stats,
            recv_buf: vec![0; MAX_DATAGRAM_LEN + 1].into_boxed_slice(),
            pending: None,
        })
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
        match open(&keyring, &self.recv_buf[..len]) {
            Ok(plaintext) => Ok(Some((from_addr, len, plaintext))),
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

// === impl Codec ===

impl Codec {
    async fn bind() -> anyhow::Result<Codec> {
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

    async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<Vec<u8>> {
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
    async fn finish_decode(
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

// === impl Header ===

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..AAD_LEN].copy_from_slice(&self.aad());
        bytes[AAD_LEN..].copy_from_slice(&self.nonce);
        bytes
    }

    fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&bytes[VERSION_LEN..AAD_LEN]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[AAD_LEN..]);
        Header {
            version: bytes[0],
            key_id: KeyId(key_id),
            nonce,
        }
    }

    fn aad(&self) -> [u8; AAD_LEN] {
        let mut aad = [0u8; AAD_LEN];
        aad[0] = self.version;
        aad[VERSION_LEN..].copy_from_slice(&self.key_id.0);
        aad
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use base64::Engine as _;
    use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
    use rand::Rng as _;

    use super::*;

    const GOSSIP_INTERVAL: Duration = Duration::from_millis(50);
    const POLL_INTERVAL: Duration = Duration::from_millis(20);
    const WAIT_DEADLINE: Duration = Duration::from_secs(10);
    const CLUSTER_ID: &str = "gossip-seal-test";
    const NAME_KEY: &str = "name";
    /// Attempts at binding a reserved port another test may have taken in the meantime.
    const BIND_ATTEMPTS: usize = 10;
    /// Forged datagrams of each kind sent in `forged_datagrams_are_counted_and_dropped`.
    const FORGED_PER_KIND: u64 = 5;

    fn key(byte: u8) -> GossipKey {
        GossipKey::from_bytes([byte; KEY_LEN])
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    fn syn(cluster_id: String) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id,
                digest: Default::default(),
            },
        }
    }

    fn total_drops(stats: &SealStats) -> u64 {
        stats.drops().iter().map(|(_, count)| count).sum()
    }

    #[test]
    fn key_id_is_the_sha256_prefix_of_the_key() {
        // sha256 of 32 zero bytes = 66687aad f862bd77...
        assert_eq!(key(0).id().to_string(), "66687aad");
        assert_eq!(key(0).id().as_bytes(), &[0x66, 0x68, 0x7a, 0xad]);
        assert_ne!(key(1).id(), key(2).id());
    }

    #[test]
    fn key_base64_round_trips_and_debug_hides_the_material() {
        let key = GossipKey::generate();
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        let parsed: GossipKey = text.parse().unwrap();
        assert_eq!(parsed.to_base64(), text);
        assert_eq!(parsed.id(), key.id());
        let debug = format!("{key:?} {:?}", Keyring::single(key.clone()));
        assert!(!debug.contains(&text), "{debug}");
        assert!(!debug.contains(&text[..8]), "{debug}");
        assert!(debug.contains(&key.id().to_string()), "{debug}");
    }

    #[test]
    fn key_parse_errors_say_what_is_valid() {
        enum Expect {
            Valid,
            NotBase64,
            WrongLength(usize),
        }
        let valid = BASE64.encode([7u8; KEY_LEN]);
        let cases = [
            ("valid", valid.clone(), Expect::Valid),
            ("trailing newline", format!("{valid}\n"), Expect::Valid),
            ("empty", String::new(), Expect::WrongLength(0)),
            ("not base64", "not base64!".to_owned(), Expect::NotBase64),
            (
                "16 bytes",
                BASE64.encode([7u8; 16]),
                Expect::WrongLength(16),
            ),
            (
                "33 bytes",
                BASE64.encode([7u8; 33]),
                Expect::WrongLength(33),
            ),
            (
                "url-safe alphabet",
                base64::engine::general_purpose::URL_SAFE.encode([0xffu8; KEY_LEN]),
                Expect::NotBase64,
            ),
            (
                "unpadded",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode([7u8; KEY_LEN]),
                Expect::NotBase64,
            ),
        ];
        for (name, text, expect) in cases {
            let result = GossipKey::from_base64(&text);
            match (expect, result) {
                (Expect::Valid, Ok(key)) => assert_eq!(key.to_base64(), valid, "{name}"),
                (Expect::NotBase64, Err(err @ Error::KeyNotBase64(_))) => {
                    assert!(
                        err.to_string().contains("32 bytes, base64"),
                        "{name}: {err}"
                    );
                }
                (Expect::WrongLength(len), Err(err @ Error::KeyWrongLength { len: got })) => {
                    assert_eq!(got, len, "{name}");
                    assert!(
                        err.to_string().contains("32 bytes, base64"),
                        "{name}: {err}"
                    );
                }
                (_, other) => panic!("{name}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn keyring_rejects_duplicate_keys_and_id_collisions() {
        assert!(Keyring::new(key(1), vec![key(2), key(3)]).is_ok());
        for others in [vec![key(1)], vec![key(2), key(2)], vec![key(2), key(1)]] {
            let err = Keyring::new(key(1), others).unwrap_err();
            assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
        }
        // Birthday search for two keys sharing a 4-byte id: about 2^16 keys, deterministic.
        let mut seen: HashMap<KeyId, GossipKey> = HashMap::new();
        let (first, second) = (0u64..)
            .find_map(|n| {
                let mut bytes = [0u8; KEY_LEN];
                bytes[..8].copy_from_slice(&n.to_le_bytes());
                let key = GossipKey::from_bytes(bytes);
                seen.insert(key.id(), key.clone())
                    .map(|earlier| (earlier, key))
            })
            .unwrap();
        let err = Keyring::new(first, vec![second]).unwrap_err();
        assert!(matches!(err, Error::KeyIdCollision { .. }), "{err}");
    }

    #[test]
    fn open_table() {
        let plaintext = b"hello gossip".to_vec();
        let keyring = Keyring::new(key(1), vec![key(2)]).unwrap();
        let good = seal(&keyring, &plaintext);
        let tampered = |index: usize, value: Option<u8>| {
            let mut datagram = good.clone();
            datagram[index] = value.unwrap_or(datagram[index] ^ 0x01);
            datagram
        };
        let relabelled = {
            let mut datagram = good.clone();
            datagram[VERSION_LEN..AAD_LEN].copy_from_slice(key(2).id().as_bytes());
            datagram
        };
        let mut flipped_id = *key(1).id().as_bytes();
        flipped_id[0] ^= 0x01;
        let malformed = |len: usize| Err(OpenError::Malformed { len });
        /// (name, datagram, what `open` returns)
        type Case = (&'static str, Vec<u8>, Result<Vec<u8>, OpenError>);
        let cases: Vec<Case> = vec![
            ("good", good.clone(), Ok(plaintext.clone())),
            ("empty plaintext", seal(&keyring, b""), Ok(Vec::new())),
            (
                "sealed with a secondary key",
                seal(&Keyring::single(key(2)), &plaintext),
                Ok(plaintext.clone()),
            ),
            (
                "tampered ciphertext",
                tampered(HEADER_LEN, None),
                Err(OpenError::AuthenticationFailed),
            ),
            (
                "tampered tag",
                tampered(good.len() - 1, None),
                Err(OpenError::AuthenticationFailed),
            ),
            (
                "tampered nonce",
                tampered(AAD_LEN, None),
                Err(OpenError::AuthenticationFailed),
            ),
            (
                "relabelled to another key of the keyring",
                relabelled,
                Err(OpenError::AuthenticationFailed),
            ),
            (
                "tampered key id",
                tampered(VERSION_LEN, None),
                Err(OpenError::UnknownKey {
                    key_id: KeyId(flipped_id),
                }),
            ),
            (
                "sealed with a key not in the keyring",
                seal(&Keyring::single(key(3)), &plaintext),
                Err(OpenError::UnknownKey {
                    key_id: key(3).id(),
                }),
            ),
            (
                "unknown version",
                tampered(0, Some(FORMAT_VERSION + 1)),
                Err(OpenError::UnknownVersion {
                    version: FORMAT_VERSION + 1,
                }),
            ),
            (
                "version 0",
                tampered(0, Some(0)),
                Err(OpenError::UnknownVersion { version: 0 }),
            ),
            ("empty", Vec::new(), malformed(0)),
            ("version byte only", vec![FORMAT_VERSION], malformed(1)),
            (
                "truncated in the header",
                good[..HEADER_LEN - 1].to_vec(),
                malformed(HEADER_LEN - 1),
            ),
            (
                "truncated below the overhead",
                good[..SEAL_OVERHEAD - 1].to_vec(),
                malformed(SEAL_OVERHEAD - 1),
            ),
            (
                "truncated by one byte",
                good[..good.len() - 1].to_vec(),
                Err(OpenError::AuthenticationFailed),
            ),
            (
                "longer than a UDP datagram",
                [&good[..], &vec![0; MAX_DATAGRAM_LEN][..]].concat(),
                malformed(good.len() + MAX_DATAGRAM_LEN),
            ),
        ];
        for (name, datagram, expected) in cases {
            assert_eq!(open(&keyring, &datagram), expected, "{name}");
        }
    }

    #[test]
    fn seal_uses_the_primary_key_and_a_fresh_nonce() {
        let keyring = Keyring::new(key(1), vec![key(2)]).unwrap();
        let first = seal(&keyring, b"same");
        let second = seal(&keyring, b"same");
        assert_eq!(first.len(), b"same".len() + SEAL_OVERHEAD);
        assert_eq!(first[0], FORMAT_VERSION);
        assert_eq!(&first[VERSION_LEN..AAD_LEN], key(1).id().as_bytes());
        assert_ne!(first[AAD_LEN..HEADER_LEN], second[AAD_LEN..HEADER_LEN]);
        assert_ne!(first[HEADER_LEN..], second[HEADER_LEN..]);
    }

    #[test]
    fn largest_sealable_message_fills_one_udp_datagram() {
        assert_eq!(TAG_LEN, CHACHA20_POLY1305.tag_len());
        assert_eq!(SEAL_OVERHEAD, 33);
        let datagram = seal(&Keyring::single(key(1)), &vec![0; MAX_PLAINTEXT_LEN]);
        assert_eq!(datagram.len(), MAX_DATAGRAM_LEN);
        assert_eq!(
            open(&Keyring::single(key(1)), &datagram).unwrap().len(),
            MAX_PLAINTEXT_LEN
        );
    }

    #[test]
    fn rotation_steps_keep_every_pair_of_nodes_talking() {
        let (old, new) = (key(1), key(2));
        let states = [
            Keyring::single(old.clone()),
            Keyring::new(old.clone(), vec![new.clone()]).unwrap(),
            Keyring::new(new.clone(), vec![old.clone()]).unwrap(),
            Keyring::single(new),
        ];
        // During step n, every node is either in state n-1 or in state n.
        for step in 1..states.len() {
            let mixed = [&states[step - 1], &states[step]];
            for sender in mixed {
                for receiver in mixed {
                    let datagram = seal(sender, b"state");
                    assert_eq!(
                        open(receiver, &datagram).as_deref(),
                        Ok(&b"state"[..]),
                        "step {step}: {sender:?} -> {receiver:?}"
                    );
                }
            }
        }
        // Skipping steps is what splits a cluster.
        let datagram = seal(&states[0], b"state");
        assert_eq!(
            open(&states[3], &datagram),
            Err(OpenError::UnknownKey { key_id: old.id() })
        );
    }

    #[test]
    fn drop_reasons_index_their_own_counters() {
        let stats = SealStats::default();
        for (index, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, index, "{reason:?}");
            for _ in 0..=index {
                stats.record_drop(reason);
            }
        }
        let drops = stats.drops();
        for (index, (reason, count)) in drops.into_iter().enumerate() {
            assert_eq!(count, index as u64 + 1, "{}", reason.as_str());
        }
        let mut labels: Vec<_> = DropReason::ALL.map(DropReason::as_str).to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn codec_round_trips_and_survives_undecodable_plaintext() {
        let mut codec = Codec::bind().await.unwrap();
        let stats = SealStats::default();
        let envelope = syn("cluster-a".to_owned());
        let bytes = codec.encode(syn("cluster-a".to_owned())).await.unwrap();
        for (plaintext, expected) in [
            (bytes.clone(), Some(&envelope)),
            (b"not a chitchat message".to_vec(), None),
            (bytes, Some(&envelope)),
        ] {
            codec.relay.send(&plaintext).await.unwrap();
            let mut pending = Pending {
                from_addr: loopback(),
                num_bytes_received: 0,
                marker_sent: false,
                decoded: None,
            };
            codec.finish_decode(&mut pending, &stats).await.unwrap();
            assert_eq!(pending.decoded.as_ref(), expected);
        }
        assert_eq!(total_drops(&stats), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn oversized_message_is_refused_and_counted_not_truncated() {
        let (_keyring_tx, keyring_rx) = watch::channel(Arc::new(Keyring::single(key(1))));
        let stats = Arc::new(SealStats::default());
        let transport = SealedTransport::new(keyring_rx, Arc::clone(&stats));
        let mut sender = transport.open(loopback()).await.unwrap();
        let mut receiver = transport.open(loopback()).await.unwrap();
        let to = receiver.local_addr().unwrap();
        // A SYN's length is a fixed part plus its cluster id; measure the fixed part.
        let mut codec = Codec::bind().await.unwrap();
        let fixed_len = codec.encode(syn(String::new())).await.unwrap().len();
        let largest = "x".repeat(MAX_PLAINTEXT_LEN - fixed_len);

        let sent = sender.send(to, syn(largest.clone())).await.unwrap();
        assert_eq!(sent.num_bytes_sent, MAX_DATAGRAM_LEN);
        let received = receiver.recv().await.unwrap();
        assert_eq!(received.envelope, syn(largest.clone()));
        assert_eq!(received.num_bytes_received, MAX_DATAGRAM_LEN);

        // One byte over the sealed limit, then over the UDP limit even unsealed.
        for (extra, refused) in [(1, 1), (MAX_DATAGRAM_LEN - MAX_PLAINTEXT_LEN + 1, 2)] {
            let too_large = syn(format!("{largest}{}", "x".repeat(extra)));
            let sent = sender.send(to, too_large).await.unwrap();
            assert_eq!(sent.num_bytes_sent, 0);
            assert_eq!(stats.dropped(DropReason::Oversized), refused);
        }
        assert_eq!(stats.sealed(), 1);

        // Nothing of the refused messages reached the receiver: the next datagram is this one.
        sender.send(to, syn("small".to_owned())).await.unwrap();
        let received = receiver.recv().await.unwrap();
        assert_eq!(received.envelope, syn("small".to_owned()));
        assert_eq!(stats.opened(), 2);
        assert_eq!(total_drops(&stats), 2);
    }

    /// Two sealed sockets on loopback sharing one keyring and one `SealStats`.
    async fn socket_pair() -> (SealedSocket, SealedSocket, Arc<SealStats>) {
        let (_keyring_tx, keyring_rx) = watch::channel(Arc::new(Keyring::single(key(1))));
        let stats = Arc::new(SealStats::default());
        let bind = || SealedSocket::bind(loopback(), keyring_rx.clone(), Arc::clone(&stats));
        (
            bind().await.unwrap(),
            bind().await.unwrap(),
            Arc::clone(&stats),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn recv_resumes_a_decode_cut_short_by_cancellation() {
        let (_sender, mut receiver, stats) = socket_pair().await;
        let peer: SocketAddr = ([192, 0, 2, 7], 7000).into();
        // The state a cancelled recv leaves: the message is in the codec, the marker not yet.
        let plaintext = receiver
            .codec
            .encode(syn("cut-short".to_owned()))
            .await
            .unwrap();
        receiver.codec.relay.send(&plaintext).await.unwrap();
        receiver.pending = Some(Pending {
            from_addr: peer,
            num_bytes_received: plaintext.len() + SEAL_OVERHEAD,
            marker_sent: false,
            decoded: None,
        });
        let received = receiver.recv().await.unwrap();
        assert_eq!(received.envelope, syn("cut-short".to_owned()));
        assert_eq!(received.from_addr, peer);
        assert_eq!(received.num_bytes_received, plaintext.len() + SEAL_OVERHEAD);
        assert_eq!(stats.opened(), 1);
        assert_eq!(total_drops(&stats), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn codec_in_doubt_is_rebuilt_so_stale_messages_are_never_attributed() {
        let (mut sender, mut receiver, stats) = socket_pair().await;
        // A stale message sits in the receiver's codec, with a decode in progress, when the
        // codec is found in doubt.
        let stale = receiver
            .codec
            .encode(syn("stale".to_owned()))
            .await
            .unwrap();
        receiver.codec.relay.send(&stale).await.unwrap();
        receiver.pending = Some(Pending {
            from_addr: loopback(),
            num_bytes_received: 0,
            marker_sent: false,
            decoded: None,
        });
        receiver.codec.in_doubt = true;

        let to = receiver.local_addr().unwrap();
        sender.send(to, syn("fresh".to_owned())).await.unwrap();
        let received = receiver.recv().await.unwrap();
        assert_eq!(received.envelope, syn("fresh".to_owned()));
        assert_eq!(received.from_addr, sender.local_addr().unwrap());
        assert_eq!(stats.dropped(DropReason::CodecFailed), 1);
        assert!(!receiver.codec.in_doubt);
    }

    struct TestNode {
        handle: ChitchatHandle,
        keyring_tx: watch::Sender<Arc<Keyring>>,
        stats: Arc<SealStats>,
    }

    impl TestNode {
        async fn spawn(name: &str, keyring: &Keyring, seeds: &[SocketAddr]) -> TestNode {
            let mut last_err = None;
            for _ in 0..BIND_ATTEMPTS {
                // chitchat advertises its address before binding it: reserve a port, release it
                // and let the transport bind it (retried if another test took it meanwhile).
                let addr = std::net::UdpSocket::bind(loopback())
                    .unwrap()
                    .local_addr()
                    .unwrap();
                let (keyring_tx, keyring_rx) = watch::channel(Arc::new(keyring.clone()));
                let stats = Arc::new(SealStats::default());
                let transport = SealedTransport::new(keyring_rx, Arc::clone(&stats));
                let config = ChitchatConfig {
                    chitchat_id: ChitchatId::new(name, 0, addr),
                    cluster_id: CLUSTER_ID.to_owned(),
                    gossip_interval: GOSSIP_INTERVAL,
                    listen_addr: addr,
                    seed_nodes: seeds.iter().map(SocketAddr::to_string).collect(),
                    failure_detector_config: FailureDetectorConfig {
                        initial_interval: GOSSIP_INTERVAL,
                        ..FailureDetectorConfig::default()
                    },
                    marked_for_deletion_grace_period: Duration::from_secs(3600),
                    catchup_callback: None,
                    extra_liveness_predicate: None,
                    protocol_version: ProtocolVersion::V0,
                };
                let initial = vec![(NAME_KEY.to_owned(), name.to_owned())];
                match chitchat::spawn_chitchat(config, initial, &transport).await {
                    Ok(handle) => {
                        return TestNode {
                            handle,
                            keyring_tx,
                            stats,
                        };
                    }
                    Err(err) => last_err = Some(err),
                }
            }
            panic!("chitchat node {name} did not start: {last_err:?}");
        }

        fn id(&self) -> &ChitchatId {
            self.handle.chitchat_id()
        }

        fn addr(&self) -> SocketAddr {
            self.id().gossip_advertise_addr
        }

        async fn set(&self, key: &str, value: &str) {
            self.handle
                .with_chitchat(|chitchat| chitchat.self_node_state().set(key, value))
                .await;
        }

        async fn sees(&self, node: &ChitchatId, key: &str, value: &str) -> bool {
            self.handle
                .with_chitchat(|chitchat| {
                    chitchat.node_state(node).and_then(|state| state.get(key)) == Some(value)
                })
                .await
        }

        async fn knows(&self, node: &ChitchatId) -> bool {
            self.handle
                .with_chitchat(|chitchat| chitchat.node_state(node).is_some())
                .await
        }
    }

    async fn spawn_cluster(keyring: &Keyring) -> Vec<TestNode> {
        let first = TestNode::spawn("node-0", keyring, &[]).await;
        let seeds = [first.addr()];
        let mut nodes = vec![first];
        for name in ["node-1", "node-2"] {
            nodes.push(TestNode::spawn(name, keyring, &seeds).await);
        }
        nodes
    }

    async fn all_see(nodes: &[TestNode], writer: &ChitchatId, key: &str, value: &str) -> bool {
        for node in nodes {
            if !node.sees(writer, key, value).await {
                return false;
            }
        }
        true
    }

    /// Every node sees every node's name.
    async fn converged(nodes: &[TestNode]) -> bool {
        for writer in nodes {
            if !all_see(nodes, writer.id(), NAME_KEY, &writer.id().node_id).await {
                return false;
            }
        }
        true
    }

    async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
        let waited = tokio::time::timeout(WAIT_DEADLINE, async {
            while !condition().await {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "timed out after {WAIT_DEADLINE:?} waiting for {what}"
        );
    }

    /// Sets `key=value` on `writer` and waits until every node sees it.
    async fn write_and_propagate(nodes: &[TestNode], writer: &TestNode, key: &str, value: &str) {
        writer.set(key, value).await;
        let what = format!("{key}={value} from {:?} to reach every node", writer.id());
        eventually(&what, async || {
            all_see(nodes, writer.id(), key, value).await
        })
        .await;
    }

    async fn shutdown(nodes: Vec<TestNode>) {
        for node in nodes {
            node.handle.shutdown().await.unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn cluster_with_one_key_converges() {
        let nodes = spawn_cluster(&Keyring::single(GossipKey::generate())).await;
        eventually("the cluster to converge", async || converged(&nodes).await).await;
        for node in &nodes {
            assert!(node.stats.sealed() > 0 && node.stats.opened() > 0);
            assert_eq!(total_drops(&node.stats), 0, "{:?}", node.stats.drops());
        }
        shutdown(nodes).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn node_with_another_key_is_never_admitted() {
        let nodes = spawn_cluster(&Keyring::single(GossipKey::generate())).await;
        eventually("the cluster to converge", async || converged(&nodes).await).await;
        let seeds: Vec<SocketAddr> = nodes.iter().map(TestNode::addr).collect();
        let outsider_keyring = Keyring::single(GossipKey::generate());
        let outsider = TestNode::spawn("outsider", &outsider_keyring, &seeds).await;

        eventually(
            "every member to reject the outsider's datagrams",
            async || {
                for node in &nodes {
                    assert!(
                        !node.knows(outsider.id()).await,
                        "{:?} admitted the outsider",
                        node.id()
                    );
                    assert!(
                        !outsider.knows(node.id()).await,
                        "the outsider learnt {:?}",
                        node.id()
                    );
                }
                let min_rejected = 3;
                nodes
                    .iter()
                    .all(|node| node.stats.dropped(DropReason::UnknownKey) >= min_rejected)
            },
        )
        .await;
        assert!(outsider.stats.sealed() > 0);
        for node in &nodes {
            let unknown_key = node.stats.dropped(DropReason::UnknownKey);
            assert_eq!(
                total_drops(&node.stats),
                unknown_key,
                "{:?}",
                node.stats.drops()
            );
        }
        write_and_propagate(&nodes, &nodes[1], "after-outsider", "still-talking").await;
        shutdown(nodes).await;
        outsider.handle.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn forged_datagrams_are_counted_and_dropped() {
        let keyring = Keyring::single(GossipKey::generate());
        let nodes = spawn_cluster(&keyring).await;
        eventually("the cluster to converge", async || converged(&nodes).await).await;
        let target = nodes[0].addr();
        let forger = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let mut rng = rand::rng();
        let mut random_bytes =
            |len: usize| (0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>();
        let real_id = *keyring.primary().id().as_bytes();
        let mut other_id = real_id;
        other_id[0] ^= 0xff;
        for i in 0..FORGED_PER_KIND as usize {
            let body_len = TAG_LEN + i * 100;
            let forged = [
                // Malformed: shorter than any sealed datagram (the first one is empty).
                [&[FORMAT_VERSION][..], &random_bytes(SEAL_OVERHEAD - 2)][..i.min(2)].concat(),
                // Unknown version: random bytes after a first byte that is not FORMAT_VERSION.
                [&[FORMAT_VERSION + 1 + i as u8][..], &random_bytes(body_len)].concat(),
                // Unknown key id.
                [
                    &[FORMAT_VERSION][..],
                    &other_id,
                    &random_bytes(NONCE_LEN + body_len),
                ]
                .concat(),
                // The real key id with a random nonce, ciphertext and tag.
                [
                    &[FORMAT_VERSION][..],
                    &real_id,
                    &random_bytes(NONCE_LEN + body_len),
                ]
                .concat(),
            ];
            for datagram in forged {
                forger.send_to(&datagram, target).await.unwrap();
            }
        }
        // An unsealed chitchat peer: its messages start with chitchat's magic number.
        let mut unsealed = chitchat::transport::UdpTransport
            .open(loopback())
            .await
            .unwrap();
        unsealed
            .send(target, syn(CLUSTER_ID.to_owned()))
            .await
            .unwrap();

        let expected = [
            (DropReason::Malformed, FORGED_PER_KIND),
            (DropReason::UnknownVersion, FORGED_PER_KIND + 1),
            (DropReason::UnknownKey, FORGED_PER_KIND),
            (DropReason::AuthenticationFailed, FORGED_PER_KIND),
        ];
        let stats = &nodes[0].stats;
        eventually("the forged datagrams to be counted", async || {
            expected
                .iter()
                .all(|(reason, count)| stats.dropped(*reason) == *count)
        })
        .await;
        let expected_total: u64 = expected.iter().map(|(_, count)| count).sum();
        assert_eq!(total_drops(stats), expected_total, "{:?}", stats.drops());
        for writer in &nodes {
            write_and_propagate(&nodes, writer, "after-forgery", "still-talking").await;
        }
        shutdown(nodes).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn key_rotation_mid_flight_stays_converged() {
        let (old, new) = (GossipKey::generate(), GossipKey::generate());
        let nodes = spawn_cluster(&Keyring::single(old.clone())).await;
        eventually("the cluster to converge", async || converged(&nodes).await).await;
        let steps = [
            Keyring::new(old.clone(), vec![new.clone()]).unwrap(),
            Keyring::new(new.clone(), vec![old.clone()]).unwrap(),
            Keyring::single(new.clone()),
        ];
        for (step, keyring) in steps.iter().enumerate() {
            for (updated, node) in nodes.iter().enumerate() {
                node.keyring_tx.send_replace(Arc::new(keyring.clone()));
                // The next node writes, so updated and not-yet-updated nodes both send.
                let writer = &nodes[(updated + 1) % nodes.len()];
                let value = format!("step-{}-node-{updated}-updated", step + 1);
                write_and_propagate(&nodes, writer, "rotation", &value).await;
            }
        }
        for node in &nodes {
            assert_eq!(total_drops(&node.stats), 0, "{:?}", node.stats.drops());
        }
        // The keyring in force is the last one sent: a SYN sealed with the new key is accepted,
        // one sealed with the old key is rejected. They arrive in order, so once the second is
        // counted the first was handled.
        let syn_bytes = Codec::bind()
            .await
            .unwrap()
            .encode(syn(CLUSTER_ID.to_owned()))
            .await
            .unwrap();
        let forger = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        for sealing_key in [new, old] {
            let datagram = seal(&Keyring::single(sealing_key), &syn_bytes);
            forger.send_to(&datagram, nodes[0].addr()).await.unwrap();
        }
        let stats = &nodes[0].stats;
        eventually("the old key to be rejected", async || {
            stats.dropped(DropReason::UnknownKey) == 1
        })
        .await;
        assert_eq!(total_drops(stats), 1, "{:?}", stats.drops());
        shutdown(nodes).await;
    }
}
