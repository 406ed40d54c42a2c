//! Tests of sealing, keyrings and the sealed transport on real UDP sockets with real chitchat
//! instances.

use std::collections::HashMap;

use base64::Engine as _;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use proptest::prelude::*;
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

/// A keyring of 1 to 3 distinct random keys, the message sealed under its primary key, and
/// the message.
fn sealed_message() -> impl Strategy<Value = (Keyring, Vec<u8>, Vec<u8>)> {
    (
        proptest::collection::btree_set(any::<[u8; KEY_LEN]>(), 1..=3),
        proptest::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(keys, message)| {
            let mut keys = keys.into_iter().map(GossipKey::from_bytes);
            let primary = keys.next().expect("at least one key");
            let keyring = Keyring::new(primary, keys.collect()).expect("distinct random keys");
            let datagram = seal(&keyring, &message);
            (keyring, datagram, message)
        })
}

proptest! {
    #[test]
    fn sealed_datagram_opens_to_its_message((keyring, datagram, message) in sealed_message()) {
        prop_assert_eq!(datagram.len(), message.len() + SEAL_OVERHEAD);
        prop_assert_eq!(open(&keyring, &datagram), Ok(message));
    }

    /// Any one byte changed, anywhere (version, key id, nonce, ciphertext or tag), is refused.
    #[test]
    fn any_changed_byte_is_rejected(
        (keyring, datagram, _message) in sealed_message(),
        index in any::<proptest::sample::Index>(),
        mask in 1..=u8::MAX,
    ) {
        let at = index.index(datagram.len());
        let mut tampered = datagram;
        tampered[at] ^= mask;
        let result = open(&keyring, &tampered);
        if at == 0 {
            prop_assert_eq!(result, Err(OpenError::UnknownVersion { version: tampered[0] }));
        } else {
            prop_assert!(result.is_err(), "byte {at} ^ {mask:#04x} was accepted");
        }
    }

    #[test]
    fn any_truncation_is_rejected(
        (keyring, datagram, _message) in sealed_message(),
        index in any::<proptest::sample::Index>(),
    ) {
        let len = index.index(datagram.len());
        let result = open(&keyring, &datagram[..len]);
        if len < SEAL_OVERHEAD {
            prop_assert_eq!(result, Err(OpenError::Malformed { len }));
        } else {
            prop_assert_eq!(result, Err(OpenError::AuthenticationFailed));
        }
    }

    #[test]
    fn any_extension_is_rejected(
        (keyring, datagram, _message) in sealed_message(),
        extra in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let extended = [datagram, extra].concat();
        prop_assert_eq!(open(&keyring, &extended), Err(OpenError::AuthenticationFailed));
    }

    /// A keyring that does not hold the sealing key opens nothing, even with the id forged.
    #[test]
    fn other_keys_open_nothing(
        (keyring, datagram, _message) in sealed_message(),
        other in any::<[u8; KEY_LEN]>(),
    ) {
        let other = GossipKey::from_bytes(other);
        prop_assume!(keyring.key(other.id()).is_none());
        let stranger = Keyring::single(other.clone());
        prop_assert_eq!(
            open(&stranger, &datagram),
            Err(OpenError::UnknownKey { key_id: keyring.primary().id() })
        );
        let mut relabelled = datagram;
        relabelled[VERSION_LEN..AAD_LEN].copy_from_slice(other.id().as_bytes());
        prop_assert_eq!(open(&stranger, &relabelled), Err(OpenError::AuthenticationFailed));
    }
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
    let mut random_bytes = |len: usize| (0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>();
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
