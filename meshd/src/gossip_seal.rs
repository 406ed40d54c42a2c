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
mod tests;
