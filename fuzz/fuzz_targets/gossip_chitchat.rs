//! What chitchat decodes after `open`: the input is an opened gossip message (the plaintext of
//! an authentic datagram, so it tests a peer holding the key). It is sealed and sent over UDP to
//! a real `SealedTransport` socket on 127.0.0.1, which opens it and decodes it with chitchat's
//! own wire format exactly as meshd does.
//!
//! Invariants: never panics or wedges the socket; one that does not decode is counted as
//! `undecodable` and nothing else; a message without a delta that decodes, re-encoded by the
//! same transport and decoded again, gives the same envelope and the same bytes (encoding is
//! a fixed point; see below why deltas are left out).

#![no_main]

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chitchat::transport::{RecvOutcome, Socket, Transport as _};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use libfuzzer_sys::fuzz_target;
use meshd::gossip_seal::{
    DropReason, GossipKey, KEY_LEN, Keyring, Legacy, MAX_PLAINTEXT_LEN, Opener, SealStats,
    SealedTransport, Sealer, open, seal,
};
use tokio::net::UdpSocket;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// A wait that only a lost loopback datagram or a wedged socket would reach.
const WAIT: Duration = Duration::from_secs(5);
/// The cluster id of the message sent after each input: once it comes out, the input's turn
/// is over, whether it decoded or not.
const SENTINEL_CLUSTER: &str = "meshd-fuzz-sentinel";

struct Harness {
    runtime: Runtime,
    io: Io,
}

/// The sockets, driven by `Harness::runtime`.
struct Io {
    keyring: Arc<Keyring>,
    stats: Arc<SealStats>,
    /// The peer's sender instance: every datagram it sends is new to the socket under test.
    sealer: Sealer,
    /// The peer's replay state for what the socket under test sends.
    opener: Opener,
    /// The transport's socket under test (meshd's sealed socket).
    sealed: Box<dyn Socket>,
    sealed_addr: SocketAddr,
    /// Plays the peer: sends sealed datagrams and receives what `sealed` sends.
    peer: UdpSocket,
    peer_addr: SocketAddr,
    sentinel: Vec<u8>,
    /// Keeps the keyring channel open for the transport's lifetime.
    _keyring_tx: watch::Sender<Arc<Keyring>>,
}

thread_local! {
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::new());
}

impl Harness {
    fn new() -> Harness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let keyring = Arc::new(Keyring::single(GossipKey::from_bytes([1; KEY_LEN])));
        let (keyring_tx, keyring_rx) = watch::channel(Arc::clone(&keyring));
        let stats = Arc::new(SealStats::default());
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let (sealed, peer) = runtime.block_on(async {
            let transport = SealedTransport::new(keyring_rx, Arc::clone(&stats));
            let sealed = transport.open(loopback).await.expect("sealed socket binds");
            let peer = UdpSocket::bind(loopback).await.expect("peer binds");
            (sealed, peer)
        });
        let sealed_addr = sealed.local_addr().expect("sealed socket address");
        let peer_addr = peer.local_addr().expect("peer address");
        let mut io = Io {
            keyring,
            stats,
            sealer: Sealer::new(),
            opener: Opener::new(Legacy::Refuse),
            sealed,
            sealed_addr,
            peer,
            peer_addr,
            sentinel: Vec::new(),
            _keyring_tx: keyring_tx,
        };
        let sentinel = ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: SENTINEL_CLUSTER.to_owned(),
                digest: Default::default(),
            },
        };
        io.sentinel = runtime.block_on(io.encode(sentinel));
        Harness { runtime, io }
    }

    fn decode(&mut self, message: &[u8]) -> Option<ChitchatEnvelope> {
        self.runtime.block_on(self.io.decode(message))
    }

    fn encode(&mut self, envelope: ChitchatEnvelope) -> Vec<u8> {
        self.runtime.block_on(self.io.encode(envelope))
    }
}

impl Io {
    /// The plaintext chitchat message the sealed socket sends for `envelope`.
    async fn encode(&mut self, envelope: ChitchatEnvelope) -> Vec<u8> {
        self.sealed
            .send(self.peer_addr, envelope)
            .await
            .expect("sealed socket sends");
        let mut buf = vec![0; 65_536];
        let len = tokio::time::timeout(WAIT, self.peer.recv(&mut buf))
            .await
            .expect("sealed datagram arrives")
            .expect("peer receives");
        open(&self.keyring, &mut self.opener, unix_now(), &buf[..len])
            .expect("the transport's datagram opens, once")
    }

    /// What the sealed socket decodes from `message`, or `None` if it dropped it as
    /// undecodable. The sentinel follows the message; the drop counter, not the content, tells
    /// whether the first envelope out is the message's, so an input that decodes to something
    /// like the sentinel cannot confuse the harness.
    async fn decode(&mut self, message: &[u8]) -> Option<ChitchatEnvelope> {
        let now = unix_now();
        let datagram = seal(&self.keyring, &mut self.sealer, now, message);
        let sentinel = seal(&self.keyring, &mut self.sealer, now, &self.sentinel);
        let undecodable = self.stats.dropped(DropReason::Undecodable);
        for d in [&datagram, &sentinel] {
            self.peer
                .send_to(d, self.sealed_addr)
                .await
                .expect("peer sends");
        }
        let first = self.recv().await;
        let dropped = self.stats.dropped(DropReason::Undecodable) - undecodable;
        let decoded = match dropped {
            // The message was dropped: `first` is the sentinel.
            1 => None,
            0 => {
                assert_eq!(first.num_bytes_received, datagram.len());
                let sentinel = self.recv().await;
                assert!(is_sentinel(&sentinel.envelope), "{:?}", sentinel.envelope);
                Some(first.envelope)
            }
            n => panic!("{n} datagrams dropped as undecodable for one message"),
        };
        for reason in [
            DropReason::Malformed,
            DropReason::AuthenticationFailed,
            DropReason::Replayed,
            DropReason::Stale,
        ] {
            assert_eq!(self.stats.dropped(reason), 0, "{reason:?}");
        }
        decoded
    }

    async fn recv(&mut self) -> RecvOutcome {
        let outcome = tokio::time::timeout(WAIT, self.sealed.recv())
            .await
            .expect("the sealed socket hands over the next message (wedged?)")
            .expect("the sealed socket keeps working");
        assert_eq!(outcome.from_addr, self.peer_addr);
        outcome
    }
}

/// The wall clock in Unix seconds, as the sealed socket reads it.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn is_sentinel(envelope: &ChitchatEnvelope) -> bool {
    matches!(&envelope.message, ChitchatMessage::Syn { cluster_id, .. } if cluster_id == SENTINEL_CLUSTER)
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_PLAINTEXT_LEN {
        return;
    }
    HARNESS.with_borrow_mut(|h| {
        let Some(envelope) = h.decode(data) else {
            return;
        };
        // chitchat 0.13 re-serializes a received delta only if it compresses back to exactly
        // the length it was read from (`Delta::serialize` asserts it): true of chitchat's own
        // output, not of every valid input. Nothing re-sends a received delta (chitchat applies
        // it; meshd only decodes), so only deltaless messages are put through the round trip.
        if matches!(
            envelope.message,
            ChitchatMessage::SynAck { .. }
                | ChitchatMessage::Ack { .. }
                | ChitchatMessage::SynAck2 { .. }
                | ChitchatMessage::Ack2 { .. }
        ) {
            return;
        }
        let first = format!("{envelope:?}");
        let bytes = h.encode(envelope);
        let again = h.decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(format!("{again:?}"), first, "decode(encode(m)) != m");
        assert_eq!(h.encode(again), bytes, "encoding is not a fixed point");
    });
});
