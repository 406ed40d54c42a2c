//! Sealed gossip: the chitchat transport that encrypts and authenticates every datagram with a key from the gossip keyring, and drops replays.
//!
//! chitchat has no authentication of its own: anyone who can send UDP to the gossip port can
//! join the cluster or rewrite any node's state (the `cluster_id` string is no secret).
//! [`SealedTransport`] closes that hole: every datagram is sealed with ChaCha20-Poly1305 under a
//! subkey of the keyring's primary key and opened with whichever key of the keyring it names, so
//! only holders of a key of the [`Keyring`] can join or inject state; and each authentic
//! datagram is accepted at most once, so a captured one cannot be sent again.
//!
//! # Wire format (version 2)
//!
//! ```text
//! | version=2 | key id  | instance id | counter   | send time | ChaCha20-Poly1305(message) | tag      |
//! | 1 byte    | 4 bytes | 16 bytes    | 8 bytes   | 8 bytes   | same length as the message | 16 bytes |
//!  \_____________________ header = AAD (37 bytes) ____________/
//! ```
//!
//! Integers are big-endian; the send time is Unix seconds. The key id is the first 4 bytes of
//! SHA-256 of the key: it lets the receiver pick the key without trial decryption and reveals
//! nothing usable about the key. The whole header is the AAD, so changing any byte of it fails
//! authentication.
//!
//! **Nonces never repeat, by construction.** Version 1 drew a random 96-bit nonce per datagram
//! under one fleet-wide key; a fleet of 1,000 nodes sends ~45k datagrams/s, which passes the safe
//! bound for random 96-bit nonces (about 2^32 messages per key, a collision chance of 2^-32)
//! within days, and one repeat under ChaCha20-Poly1305 leaks the XOR of two messages and lets
//! the Poly1305 key be recovered (forgery). In version 2 every sealed socket picks a random
//! 128-bit *instance id* when it opens and seals under its own subkey,
//! HKDF-SHA256(salt = "meshd gossip seal v2", key = the keyring key, info = instance id), with a
//! 64-bit counter as the nonce (`0u32 ‖ counter`). A counter is used once and never wraps (at
//! 2^64 − 1 the socket picks a new instance id), so no (subkey, nonce) pair repeats however many
//! datagrams the fleet sends; subkeys of different instances collide only if two 128-bit random
//! ids do. Restarts need no state on disk: a restarted process is a new instance. The key's
//! HKDF-Extract is done once per key, the subkey once per (key, instance) and cached, on both
//! sides; rotation (see [`Keyring`]) derives new subkeys as it goes.
//!
//! # Replay protection
//!
//! [`open`] accepts a datagram only after the tag verifies, and then only if:
//!
//! 1. its send time is within [`MAX_CLOCK_SKEW_SECS`] (60 s) of local time, otherwise it is
//!    dropped as [`DropReason::Stale`];
//! 2. its counter is new for its instance: a per-instance [`Window`] of [`WINDOW_LEN`] (1,024)
//!    counters below the highest one heard, as in IPsec and WireGuard, so reordering within the
//!    window is fine and anything heard before or older than the window is dropped as
//!    [`DropReason::Replayed`].
//!
//! Only authentic datagrams touch the replay state ([`Replay`]), so a forger can neither slide a
//! window past real traffic nor fill the table; a forgery is counted as
//! [`DropReason::AuthenticationFailed`] whatever its header says.
//!
//! The state is bounded: at most [`MAX_INSTANCES`] (8,192) instances are remembered. Forgetting
//! an instance is safe because of the time bound and a *floor*: forgetting raises the floor to
//! the instance's newest send time, and an instance heard for the first time (or again after
//! being forgotten) is accepted only with a send time above the floor in force when it was
//! admitted. Everything the forgotten instance had accepted was sent no later than that, so it
//! cannot be accepted again. Instances whose newest send time is more than 60 s in the past are
//! forgotten as time passes: all they ever sent is stale already, so the floor they leave never
//! stands in a fresh datagram's way. Only a table full of *live* instances (a flood from a key
//! holder, 8× a 1,000-node fleet) forgets a live one, the least recently heard (by its own
//! clock); then new instances must send later than its last datagram, at worst a minute away,
//! so such a flood can stall gossip while it lasts. (A key holder can rewrite gossip state
//! anyway; the cap is there to bound memory, not to fend off key holders.)
//!
//! What replay protection does not cover:
//!
//! * the window is per receiving socket, and the receiver is not in the AAD: a captured datagram
//!   can be delivered once to each *other* node within 60 s of its send time. Gossip content is
//!   the sender's versioned state, which every node may receive, so this only moves authentic
//!   data around earlier or later;
//! * the state is in memory: for 60 s after this node restarts, a datagram sent to it before the
//!   restart can be delivered once more;
//! * nodes need clocks within 60 s of each other: a node further off gossips with nobody, and
//!   its peers count its datagrams as `stale` (NTP keeps clocks within milliseconds).
//!
//! # Version 1 and upgrades
//!
//! Version 1 (`version | key id | random nonce`, see `legacy`) has no replay protection, so
//! its datagrams are dropped as [`DropReason::Legacy`] unless `gossip.legacy_peers` is
//! set ([`Legacy::Accept`]). meshd always seals version 2, which older meshd drop as an unknown
//! version. So the flag only lets upgraded nodes *hear* old ones: an old node's SYN reaches an
//! upgraded one (liveness of the nodes in its digest), but the upgraded node's SYN-ACK does not
//! reach the old node, so the old node's state never travels (chitchat sends it in the ACK).
//! During a rolling upgrade, upgraded and old nodes form two gossip groups that merge as the
//! last old node is upgraded.
//!
//! # Cost per datagram
//!
//! 53 bytes on the wire (37 header, 16 tag): 20 more than version 1. CPU, measured for a 1 KiB
//! message in release (`seal_open_cost` in the tests, one core of a shared VM): seal 0.95 µs
//! and open 0.90 µs, against 0.87 µs and 0.82 µs for version 1. Sealing is one
//! ChaCha20-Poly1305 pass over a 37-byte AAD (a counter replaces drawing 12 random bytes);
//! opening adds a hash-map lookup and a few bit operations of the window. The first datagram of
//! an instance (or of an instance under a new key) also derives its subkey, one HKDF-Expand
//! (0.9 µs), and adds a table entry: 1.7 µs in all. Memory per socket: about 500 bytes per
//! instance heard in the last minute (window, table entries, cached subkey), about 6 MiB with
//! the table full.
//!
//! # Pure decisions
//!
//! Decisions are pure functions ([`seal`], [`open`], [`Replay::accept`]) of their inputs and a
//! `now` in Unix seconds; [`SealedTransport`] is the I/O around them and reads the wall clock.
//! A rejected datagram is dropped, counted in [`SealStats`] and logged at debug; it is never
//! returned as an error, because an error from `Socket::recv` stops chitchat's gossip loop.
//!
//! # Datagram size
//!
//! chitchat 0.13 sizes its messages against `MAX_UDP_DATAGRAM_PAYLOAD_SIZE` = 65,507 bytes, a
//! crate-private constant that no setting changes (`ChitchatConfig` has no MTU field;
//! `ChannelTransport::with_mtu` only checks sizes, for tests). It cuts SYN-ACK and ACK deltas so
//! the whole message fits 65,507 bytes, and does not bound the SYN (it carries the full digest).
//! Sealing adds [`SEAL_OVERHEAD`] = 53 bytes, so a message longer than [`MAX_PLAINTEXT_LEN`] =
//! 65,454 bytes cannot travel sealed in one UDP datagram. Such a message is refused: not sent,
//! logged at warn, counted as [`DropReason::Oversized`]. It is never truncated (the peer could
//! not authenticate a truncated datagram anyway). What that means: only a delta that filled
//! chitchat's budget to within 53 bytes is hit; chitchat retries every round with a new digest
//! (heartbeats move, equally stale nodes are shuffled), so one refusal delays that peer's catch-up
//! by a round, but a peer tens of KiB behind may catch up slowly. meshd gossips a node record and
//! a service list, far below that; a growing `oversized` count means the gossiped state has
//! outgrown UDP gossip. (Messages that size travel as ~45 IP fragments and die with any one of
//! them, with or without sealing.)
//!
//! # The message codec
//!
//! chitchat 0.13 keeps `ChitchatEnvelope::serialize`/`deserialize` crate-private; the fork in
//! `third_party/chitchat` makes `serialize_to_vec` and `deserialize` public (an upstream-ready
//! change), and the sealed socket calls them. Until session 14 it borrowed chitchat's own UDP
//! socket on 127.0.0.1 as its codec instead: every message crossed loopback once more on each
//! side (plus a marker datagram per receive), which tripled what a loopback capture counted for
//! gossip and cost four system calls per message.
//!
//! # Traffic by message kind
//!
//! [`SealStats`] counts datagrams and their bytes on the wire (sealed UDP payload) per
//! [`MessageKind`], sent and received: `meshd_gossip_traffic_datagrams_total{direction,kind}`
//! and `meshd_gossip_traffic_bytes_total{direction,kind}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use ring::aead::{self, Aad, Nonce};
use tokio::sync::watch;

use keys::Subkey;
use socket::SealedSocket;

pub mod impair;
mod keys;
mod legacy;
pub mod pace;
mod replay;
mod socket;

pub use keys::{GossipKey, KeyId, Keyring};
pub use replay::{
    InstanceId, MAX_CLOCK_SKEW_SECS, MAX_INSTANCES, Rejection, Replay, WINDOW_LEN, Window,
};

/// Length of a gossip key: ChaCha20-Poly1305 takes a 256-bit key.
pub const KEY_LEN: usize = 32;
/// Length of a key id on the wire: enough to tell the few keys of a keyring apart.
pub const KEY_ID_LEN: usize = 4;
/// Length of a sender instance id on the wire: random, so 128 bits keep collisions out of reach.
pub const INSTANCE_ID_LEN: usize = 16;
/// Format version in the first byte. Not 0, so an all-zero datagram is no valid version.
/// Receivers reject versions they do not know, so a new layout needs a new number.
pub const FORMAT_VERSION: u8 = 2;
/// Bytes sealing adds to a chitchat message: the header (version, key id, instance id,
/// counter, send time) and the tag, 53.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest UDP payload over IPv4: 65,535 (IP total length) − 20 (IP header) − 8 (UDP header);
/// the same value as chitchat's crate-private `MAX_UDP_DATAGRAM_PAYLOAD_SIZE`.
pub const MAX_DATAGRAM_LEN: usize = 65_507;
/// Largest chitchat message that still fits one sealed datagram: 65,454 bytes.
pub const MAX_PLAINTEXT_LEN: usize = MAX_DATAGRAM_LEN - SEAL_OVERHEAD;

const VERSION_LEN: usize = 1;
const COUNTER_LEN: usize = 8;
const SEND_TIME_LEN: usize = 8;
const NONCE_LEN: usize = aead::NONCE_LEN;
/// Poly1305 tag length; ring only exposes it through a non-const fn (a test checks they agree).
const TAG_LEN: usize = 16;
/// Offsets of the header fields; the header is the AAD.
const KEY_ID_AT: usize = VERSION_LEN;
const INSTANCE_AT: usize = KEY_ID_AT + KEY_ID_LEN;
const COUNTER_AT: usize = INSTANCE_AT + INSTANCE_ID_LEN;
const SEND_TIME_AT: usize = COUNTER_AT + COUNTER_LEN;
const HEADER_LEN: usize = SEND_TIME_AT + SEND_TIME_LEN;

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
    /// Version 1, refused because it has no replay protection.
    #[error(
        "gossip datagram is sealed with format version 1, which has no replay protection (an older meshd; gossip.legacy_peers = true accepts it during an upgrade)"
    )]
    Legacy,
    /// Authentic, but sent too long ago (or too far in the future).
    #[error(
        "gossip datagram was sent at {send_time}, more than {MAX_CLOCK_SKEW_SECS}s from local time {now} (a replay, or clocks out of sync)"
    )]
    Stale {
        /// Send time in the header, Unix seconds.
        send_time: u64,
        /// Local time, Unix seconds.
        now: u64,
    },
    /// Authentic, but accepted before (or possibly before: see the module docs).
    #[error(
        "gossip datagram {counter} of sender instance {instance} was received before (a replay)"
    )]
    Replayed {
        /// The sender instance.
        instance: InstanceId,
        /// Its counter.
        counter: u64,
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
    /// Received: [`OpenError::Legacy`].
    Legacy,
    /// Received: [`OpenError::Stale`].
    Stale,
    /// Received: [`OpenError::Replayed`].
    Replayed,
    /// Received: authentic, but its source sent more than its pace (see [`pace`]).
    Paced,
    /// Received: authentic, but chitchat cannot decode the message (e.g. a newer protocol).
    Undecodable,
    /// Sent: the message does not fit one sealed datagram, so it was not sent.
    Oversized,
}

/// Which chitchat message a datagram carries: a round is a SYN (the initiator's digest), a
/// SYN-ACK (the peer's digest and what the initiator lacks) and an ACK (what the peer lacks);
/// SWIM probes (protocol V2) are a PING, PING-REQs when it goes unanswered, and PING-ACKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Digest (every member in V1, a bounded scope in V2).
    Syn,
    /// Digest and delta.
    SynAck,
    /// Delta.
    Ack,
    /// "Wrong cluster".
    BadCluster,
    /// SWIM direct probe.
    Ping,
    /// SWIM indirect probe request.
    PingReq,
    /// Answer to a probe.
    PingAck,
}

/// Counters of one gossip socket (or of several sharing the `Arc`).
#[derive(Debug, Default)]
pub struct SealStats {
    sealed: AtomicU64,
    opened: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Datagrams and their bytes on the wire (sealed UDP payload), per kind, sent.
    sent_kind: [(AtomicU64, AtomicU64); MessageKind::ALL.len()],
    /// The same, received and opened.
    opened_kind: [(AtomicU64, AtomicU64); MessageKind::ALL.len()],
}

/// What [`open`] does with version-1 datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Legacy {
    /// Drop them as [`DropReason::Legacy`]: the default.
    #[default]
    Refuse,
    /// Open them, without replay protection (`gossip.legacy_peers = true`).
    Accept,
}

/// The sending side of one socket: its instance id, its next counter, its subkey.
#[derive(Debug)]
pub struct Sealer {
    instance: InstanceId,
    next_counter: u64,
    /// The subkey of `instance` under the last primary key sealed with.
    subkey: Option<Subkey>,
}

/// The receiving side of one socket: replay state and the subkeys of the instances it hears.
#[derive(Debug, Default)]
pub struct Opener {
    replay: Replay,
    /// Subkeys of accepted instances, under the last key each used. Entries of forgotten
    /// instances are swept when it holds twice [`MAX_INSTANCES`].
    subkeys: HashMap<InstanceId, Subkey>,
    legacy: Legacy,
}

/// chitchat transport that seals every datagram; see the module docs.
///
/// The keyring is read from `keyring_rx` on every send and receive, so a new keyring applies to
/// the next datagram without a restart. Each socket it opens is a new sender instance with its
/// own replay state.
pub struct SealedTransport {
    keyring_rx: watch::Receiver<Arc<Keyring>>,
    stats: Arc<SealStats>,
    legacy: Legacy,
    /// Gossip interval the per-source pace is set for; `None`: unpaced.
    pace: Option<std::time::Duration>,
    /// A fault layer (tests only).
    impair: Option<Arc<dyn impair::Impairment>>,
}

/// The fields of a version-2 header after the version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    key_id: KeyId,
    instance: InstanceId,
    counter: u64,
    send_time: u64,
}

/// Seals `plaintext` into one datagram: the keyring's primary key, `sealer`'s instance and next
/// counter, `now` (Unix seconds) as the send time. See the module docs.
pub fn seal(keyring: &Keyring, sealer: &mut Sealer, now: u64, plaintext: &[u8]) -> Vec<u8> {
    let key = keyring.primary();
    let (instance, counter) = sealer.next();
    let header = Header {
        key_id: key.id(),
        instance,
        counter,
        send_time: now,
    }
    .encode();
    let subkey = sealer.subkey(key);
    let mut datagram = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    datagram.extend_from_slice(&header);
    datagram.extend_from_slice(plaintext);
    let tag = subkey
        .aead()
        .seal_in_place_separate_tag(
            nonce(counter),
            Aad::from(header),
            &mut datagram[HEADER_LEN..],
        )
        .expect("ChaCha20-Poly1305 only refuses messages over 256 GiB, gossip is under 64 KiB");
    datagram.extend_from_slice(tag.as_ref());
    datagram
}

/// Opens a datagram sealed by [`seal`] with any key of `keyring`, at `now` (Unix seconds), at
/// most once: `opener` remembers what it accepted. Checks, in order: version, length, key id,
/// tag, send time, counter.
pub fn open(
    keyring: &Keyring,
    opener: &mut Opener,
    now: u64,
    datagram: &[u8],
) -> Result<Vec<u8>, OpenError> {
    // The version decides the layout, so it is checked before the length.
    match (datagram.first(), opener.legacy) {
        (None, _) => Err(OpenError::Malformed { len: 0 }),
        (Some(&FORMAT_VERSION), _) => opener.open(keyring, now, datagram),
        (Some(&legacy::VERSION), Legacy::Accept) => legacy::open(keyring, datagram),
        (Some(&legacy::VERSION), Legacy::Refuse) => Err(OpenError::Legacy),
        (Some(&version), _) => Err(OpenError::UnknownVersion { version }),
    }
}

/// Counter `counter` as a 96-bit nonce: four zero bytes, then the counter big-endian.
fn nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[NONCE_LEN - COUNTER_LEN..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(nonce)
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
            Self::Legacy => DropReason::Legacy,
            Self::Stale { .. } => DropReason::Stale,
            Self::Replayed { .. } => DropReason::Replayed,
        }
    }
}

// === impl DropReason ===

impl DropReason {
    /// Every reason, in declaration order (which indexes the counters).
    pub const ALL: [DropReason; 10] = [
        Self::Malformed,
        Self::UnknownKey,
        Self::AuthenticationFailed,
        Self::UnknownVersion,
        Self::Legacy,
        Self::Stale,
        Self::Replayed,
        Self::Paced,
        Self::Undecodable,
        Self::Oversized,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::AuthenticationFailed => "authentication_failed",
            Self::UnknownVersion => "unknown_version",
            Self::Legacy => "legacy",
            Self::Stale => "stale",
            Self::Replayed => "replayed",
            Self::Paced => "paced",
            Self::Undecodable => "undecodable",
            Self::Oversized => "oversized",
        }
    }
}

// === impl MessageKind ===

impl MessageKind {
    /// Every kind, in metric order.
    pub const ALL: [MessageKind; 7] = [
        Self::Syn,
        Self::SynAck,
        Self::Ack,
        Self::BadCluster,
        Self::Ping,
        Self::PingReq,
        Self::PingAck,
    ];

    /// The kind of `message`.
    pub fn of(message: &chitchat::ChitchatMessage) -> Self {
        match message {
            chitchat::ChitchatMessage::Syn { .. } | chitchat::ChitchatMessage::Syn2 { .. } => {
                Self::Syn
            }
            chitchat::ChitchatMessage::SynAck { .. }
            | chitchat::ChitchatMessage::SynAck2 { .. } => Self::SynAck,
            chitchat::ChitchatMessage::Ack { .. } | chitchat::ChitchatMessage::Ack2 { .. } => {
                Self::Ack
            }
            chitchat::ChitchatMessage::BadCluster => Self::BadCluster,
            chitchat::ChitchatMessage::Ping { .. } => Self::Ping,
            chitchat::ChitchatMessage::PingReq { .. } => Self::PingReq,
            chitchat::ChitchatMessage::PingAck { .. } => Self::PingAck,
        }
    }

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syn => "syn",
            Self::SynAck => "syn_ack",
            Self::Ack => "ack",
            Self::BadCluster => "bad_cluster",
            Self::Ping => "ping",
            Self::PingReq => "ping_req",
            Self::PingAck => "ping_ack",
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

    /// `(kind, datagrams, bytes)` sent, for every kind.
    pub fn sent_by_kind(&self) -> [(MessageKind, u64, u64); MessageKind::ALL.len()] {
        MessageKind::ALL.map(|k| {
            let (n, bytes) = &self.sent_kind[k as usize];
            (k, n.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed))
        })
    }

    /// `(kind, datagrams, bytes)` received and opened, for every kind.
    pub fn opened_by_kind(&self) -> [(MessageKind, u64, u64); MessageKind::ALL.len()] {
        MessageKind::ALL.map(|k| {
            let (n, bytes) = &self.opened_kind[k as usize];
            (k, n.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed))
        })
    }

    fn record_drop(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn record_sent(&self, kind: MessageKind, bytes: usize) {
        self.sealed.fetch_add(1, Ordering::Relaxed);
        let (n, b) = &self.sent_kind[kind as usize];
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn record_opened(&self, kind: MessageKind, bytes: usize) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let (n, b) = &self.opened_kind[kind as usize];
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

// === impl Sealer ===

impl Sealer {
    /// A new sender instance (random id), starting at counter 0.
    pub fn new() -> Self {
        Self::starting_at(InstanceId::random(), 0)
    }

    /// Instance `instance` whose next counter is `counter` (tests, fuzzing). Two sealers must
    /// never share an instance id under one key: that would repeat nonces.
    pub fn starting_at(instance: InstanceId, counter: u64) -> Self {
        Self {
            instance,
            next_counter: counter,
            subkey: None,
        }
    }

    /// The instance the next datagram is sealed as.
    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// The instance and counter of the next datagram. Counter `u64::MAX` is never used: reaching
    /// it starts a new instance, so a counter never wraps under one subkey.
    fn next(&mut self) -> (InstanceId, u64) {
        if self.next_counter == u64::MAX {
            *self = Self::new();
        }
        let counter = self.next_counter;
        self.next_counter += 1;
        (self.instance, counter)
    }

    /// This instance's subkey under `key`, derived on first use and after a key change.
    fn subkey(&mut self, key: &GossipKey) -> &Subkey {
        if !self.subkey.as_ref().is_some_and(|subkey| subkey.is_of(key)) {
            self.subkey = Some(key.subkey(&self.instance));
        }
        self.subkey.as_ref().expect("set just above if missing")
    }
}

impl Default for Sealer {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Opener ===

impl Opener {
    /// Nothing heard yet; version-1 datagrams handled as `legacy` says.
    pub fn new(legacy: Legacy) -> Self {
        Self {
            legacy,
            ..Self::default()
        }
    }

    /// The replay state.
    pub fn replay(&self) -> &Replay {
        &self.replay
    }

    /// Opens a version-2 datagram.
    fn open(&mut self, keyring: &Keyring, now: u64, datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
        if datagram.len() < SEAL_OVERHEAD || datagram.len() > MAX_DATAGRAM_LEN {
            return Err(OpenError::Malformed {
                len: datagram.len(),
            });
        }
        let Some((header_bytes, sealed)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(OpenError::Malformed {
                len: datagram.len(),
            });
        };
        let header = Header::decode(header_bytes);
        let key = keyring.key(header.key_id).ok_or(OpenError::UnknownKey {
            key_id: header.key_id,
        })?;
        let cached = self
            .subkeys
            .get(&header.instance)
            .filter(|subkey| subkey.is_of(key));
        let derived = match cached {
            Some(_) => None,
            None => Some(key.subkey(&header.instance)),
        };
        let subkey = cached.or(derived.as_ref()).expect("cached or derived");
        let mut in_out = sealed.to_vec();
        let plaintext_len = subkey
            .aead()
            .open_in_place(nonce(header.counter), Aad::from(header_bytes), &mut in_out)
            .map_err(|_| OpenError::AuthenticationFailed)?
            .len();
        in_out.truncate(plaintext_len);
        // Authentic from here on: only now may the replay state change.
        self.replay
            .accept(header.instance, header.counter, header.send_time, now)
            .map_err(|rejection| match rejection {
                Rejection::Stale => OpenError::Stale {
                    send_time: header.send_time,
                    now,
                },
                Rejection::Replayed => OpenError::Replayed {
                    instance: header.instance,
                    counter: header.counter,
                },
            })?;
        if let Some(subkey) = derived {
            self.cache_subkey(header.instance, subkey);
        }
        Ok(in_out)
    }

    fn cache_subkey(&mut self, instance: InstanceId, subkey: Subkey) {
        if self.subkeys.len() >= 2 * MAX_INSTANCES {
            let replay = &self.replay;
            self.subkeys.retain(|known, _| replay.contains(known));
        }
        self.subkeys.insert(instance, subkey);
    }
}

// === impl SealedTransport ===

impl SealedTransport {
    /// A transport sealing with the current keyring of `keyring_rx`, counting into `stats`,
    /// refusing version-1 datagrams.
    pub fn new(keyring_rx: watch::Receiver<Arc<Keyring>>, stats: Arc<SealStats>) -> Self {
        Self {
            keyring_rx,
            stats,
            legacy: Legacy::Refuse,
            pace: None,
            impair: None,
        }
    }

    /// Puts `layer` under every socket: it decides which sealed datagrams are sent, lost or
    /// delayed (the gossip scenario tests' lossy, slow and partitioned links).
    pub fn impaired(mut self, layer: Arc<dyn impair::Impairment>) -> Self {
        self.impair = Some(layer);
        self
    }

    /// Drops authentic datagrams from a source past its pace for gossip rounds every
    /// `interval` (see [`pace`]); unpaced without it.
    pub fn paced(mut self, interval: std::time::Duration) -> Self {
        self.pace = Some(interval);
        self
    }

    /// Also opens version-1 datagrams if `accept` (`gossip.legacy_peers`).
    pub fn legacy_peers(mut self, accept: bool) -> Self {
        self.legacy = if accept {
            Legacy::Accept
        } else {
            Legacy::Refuse
        };
        self
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
            self.legacy,
        )
        .await?
        .paced(self.pace)
        .impaired(self.impair.clone());
        Ok(Box::new(socket))
    }
}

// === impl Header ===

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0] = FORMAT_VERSION;
        bytes[KEY_ID_AT..INSTANCE_AT].copy_from_slice(self.key_id.as_bytes());
        bytes[INSTANCE_AT..COUNTER_AT].copy_from_slice(self.instance.as_bytes());
        bytes[COUNTER_AT..SEND_TIME_AT].copy_from_slice(&self.counter.to_be_bytes());
        bytes[SEND_TIME_AT..].copy_from_slice(&self.send_time.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let field = |at: usize| -> [u8; 8] {
            bytes[at..at + 8]
                .try_into()
                .expect("counter and send time are 8 bytes")
        };
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&bytes[KEY_ID_AT..INSTANCE_AT]);
        let mut instance = [0u8; INSTANCE_ID_LEN];
        instance.copy_from_slice(&bytes[INSTANCE_AT..COUNTER_AT]);
        Header {
            key_id: KeyId(key_id),
            instance: InstanceId(instance),
            counter: u64::from_be_bytes(field(COUNTER_AT)),
            send_time: u64::from_be_bytes(field(SEND_TIME_AT)),
        }
    }
}

#[cfg(test)]
mod tests;
