//! Writes the seed corpora under `seeds/<target>/` from the project's own code: join tokens from
//! `JoinToken::encode`, CSRs from meshd's `new_key_and_csr` (and the openssl CSRs of the CA's
//! tests), chitchat messages captured between two real chitchat nodes on 127.0.0.1 and sealed by
//! `gossip_seal::seal`, policy JSON from the policy TOML seeds (which come from the README and
//! the tests), and realistic trace headers, hosts and health answers.
//!
//! Run from `fuzz/`: `cargo run --example gen_seeds`. Seeds that depend on randomness (keys,
//! nonces) differ between runs; the set of shapes does not.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use chitchat::transport::{Socket as _, UdpSocket as ChitchatSocket, UdpTransport};
use chitchat::{
    ChitchatConfig, ChitchatEnvelope, ChitchatId, ChitchatMessage, FailureDetectorConfig,
    ProtocolVersion,
};
use mesh_api::gossip::{self, NodeInfo, NodeState, ServiceInfo};
use mesh_api::identity::{Identity, TrustDomain};
use mesh_api::name::{Label, NodeName};
use mesh_api::policy;
use mesh_api::token::{self, JoinToken};
use meshd::gossip_seal::{GossipKey, KEY_LEN, Keyring, Sealer, seal};
use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::net::UdpSocket;

const WEB: &str = "spiffe://mesh.internal/ns/default/svc/web";

fn write(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("create seed dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tokens();
    csrs();
    let messages = gossip_messages().await;
    gossip(&messages);
    policy_json();
    trace();
    hosts();
    health();
    paths();
}

fn tokens() {
    let sample = JoinToken {
        id: "a1b2c3d4e5f60718".into(),
        secret: "Zm9vYmFyYmF6cXV4cXV1eA".into(),
        ca: token::format_fingerprint(&[0xab; 32]),
        td: "mesh.internal".into(),
        registry: vec!["127.0.0.1:7700".into(), "[::1]:7700".into()],
        services: vec!["default/web".into(), "shop/*".into()],
        exp: 1_900_000_000,
    };
    write("join_token", "token", sample.encode());
    let minimal = JoinToken {
        registry: Vec::new(),
        services: vec!["*/*".into()],
        ..sample.clone()
    };
    write(
        "join_token",
        "token-minimal-newline",
        format!("{}\n", minimal.encode()),
    );
    write(
        "join_token",
        "fingerprint",
        token::format_fingerprint(&[0x5a; 32]),
    );
}

fn csrs() {
    let web = Identity::parse(WEB).expect("identity");
    let (_, web_pem) = mesh_runtime::tls::new_key_and_csr(&web).expect("csr");
    write("ca_csr", "web.pem", &web_pem);
    write("ca_csr", "web.der", der(&web_pem));
    let td = TrustDomain::new("mesh.internal").expect("trust domain");
    let node = Identity::node(&td, &NodeName::new("n1").expect("node name"));
    let (_, node_pem) = mesh_runtime::tls::new_key_and_csr(&node).expect("csr");
    write("ca_csr", "node-n1.der", der(&node_pem));
    // URI and an allowed DNS name, and no SAN at all.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, WEB);
    params.subject_alt_names = vec![
        SanType::URI(Ia5String::try_from(WEB).expect("ascii")),
        SanType::DnsName(Ia5String::try_from("web.default.svc.mesh").expect("ascii")),
    ];
    let pem = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    write("ca_csr", "web-dns.der", der(&pem));
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let pem = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    write("ca_csr", "no-san.der", der(&pem));
    for (file, name) in [
        ("../ca/src/csr/openssl-p256.csr.pem", "openssl-p256.der"),
        ("../ca/src/csr/rsa2048.csr.pem", "openssl-rsa2048.der"),
    ] {
        let pem = fs::read_to_string(file).expect("openssl csr");
        write("ca_csr", name, der(&pem));
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("csr pem")
        .as_ref()
        .to_vec()
}

/// Plaintext chitchat messages: SYN, SYN-ACK and ACK of two real nodes (one speaking protocol
/// V0, one V1) with meshd's gossip keys, captured by a relay between them; and a BadCluster.
async fn gossip_messages() -> BTreeMap<String, Vec<u8>> {
    // A V0 node with a V1 node (each answers in the other's version), then two V2 nodes (scoped
    // digests, sweeps, SWIM probes).
    let mut captured = capture_pair([ProtocolVersion::V0, ProtocolVersion::V1]).await;
    captured.extend(capture_pair([ProtocolVersion::V2, ProtocolVersion::V2]).await);
    for key in ["syn2-v2", "synack2-v2", "ack2-v2", "ping-v2", "pingack-v2"] {
        assert!(
            captured.contains_key(key),
            "no {key} in {:?}",
            captured.keys()
        );
    }
    // A PING-REQ goes out only when a probe fails: built here.
    let from = ChitchatId::new("n1".to_owned(), 1, loopback());
    let target = ChitchatId::new("n2".to_owned(), 1, loopback());
    let ping_req = ChitchatEnvelope {
        version: ProtocolVersion::V2,
        message: ChitchatMessage::PingReq {
            seq: 7,
            from,
            target,
            updates: Vec::new(),
        },
    };
    captured.insert("pingreq-v2".to_owned(), ping_req.serialize_to_vec());
    captured
}

/// Messages captured between two real chitchat nodes speaking `versions`.
async fn capture_pair(versions: [ProtocolVersion; 2]) -> BTreeMap<String, Vec<u8>> {
    // Node i advertises relays[i]: what arrives there is for node i, and is passed on from the
    // other relay, so node i answers the other node through the relays too.
    let relays = [
        UdpSocket::bind(loopback()).await.expect("relay binds"),
        UdpSocket::bind(loopback()).await.expect("relay binds"),
    ];
    let relay_addrs = relays
        .each_ref()
        .map(|r| r.local_addr().expect("relay address"));
    let mut handles = Vec::new();
    for (i, (name, version)) in [("n1", versions[0]), ("n2", versions[1])]
        .into_iter()
        .enumerate()
    {
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(name.to_owned(), 1, relay_addrs[i]),
            cluster_id: "mesh".to_owned(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: loopback(),
            seed_nodes: vec![relay_addrs[1 - i].to_string()],
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: version,
            admission: None,
            swim: Default::default(),
            sync: Default::default(),
        };
        let node = NodeInfo {
            v: gossip::VERSION,
            inbound: "127.0.0.1:15443".parse().expect("addr"),
            datacenter: Label::new("dc1").expect("label"),
            zone: Label::new("a").expect("label"),
            site: Some(Label::new("east").expect("label")),
            state: NodeState::Serving,
        };
        let service = ServiceInfo {
            v: gossip::VERSION,
            protocol: "http".to_owned(),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            healthy: true,
        };
        let initial = vec![
            (gossip::KEY_NODE.to_owned(), gossip::encode(&node)),
            (
                format!("{}default/{name}-api", gossip::SERVICE_PREFIX),
                gossip::encode(&service),
            ),
        ];
        let handle = chitchat::spawn_chitchat(config, initial, &UdpTransport)
            .await
            .expect("chitchat starts");
        handle
            .with_chitchat(|c| {
                c.self_node_state().set("svc/default/old", "{}");
                c.self_node_state().delete("svc/default/old");
            })
            .await;
        handles.push(handle);
    }
    // nodes[i]: node i's real address, learnt from what it sends to the other node's relay.
    let mut nodes: [Option<SocketAddr>; 2] = [None, None];
    let mut captured: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut bufs = [vec![0; 65_536], vec![0; 65_536]];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let [buf0, buf1] = &mut bufs;
        let (to, len, from) = tokio::select! {
            r = relays[0].recv_from(buf0) => { let (len, from) = r.expect("recv"); (0, len, from) }
            r = relays[1].recv_from(buf1) => { let (len, from) = r.expect("recv"); (1, len, from) }
            () = tokio::time::sleep_until(deadline) => break,
        };
        nodes[1 - to] = Some(from);
        let datagram = bufs[to][..len].to_vec();
        // Header: magic (2), protocol version (1), message type (1).
        let kind = match datagram.get(3) {
            Some(0) => "syn",
            Some(1) => "synack",
            Some(2) => "ack",
            Some(4) => "syn2",
            Some(5) => "synack2",
            Some(6) => "ack2",
            Some(7) => "ping",
            Some(9) => "pingack",
            _ => "other",
        };
        let name = format!("{kind}-v{}", datagram[2]);
        // Keep the largest of each kind: the one carrying the most state.
        if captured.get(&name).is_none_or(|c| c.len() < len) {
            captured.insert(name, datagram.clone());
        }
        if let Some(node) = nodes[to] {
            let _ = relays[1 - to].send_to(&datagram, node).await;
        }
    }
    drop(handles);
    assert!(
        captured.keys().any(|k| k.starts_with("synack")),
        "{captured:?}"
    );
    if versions[0] == ProtocolVersion::V2 {
        return captured;
    }
    captured.insert(
        "badcluster-v0".to_owned(),
        encode(ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        })
        .await,
    );
    captured.insert(
        "syn-empty-v1".to_owned(),
        encode(ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::Syn {
                cluster_id: "mesh".to_owned(),
                digest: Default::default(),
            },
        })
        .await,
    );
    captured
}

/// chitchat's own encoding of `envelope` (its UDP socket is the only public encoder).
async fn encode(envelope: ChitchatEnvelope) -> Vec<u8> {
    let mut socket = ChitchatSocket::open(loopback()).await.expect("bind");
    let sink = UdpSocket::bind(loopback()).await.expect("bind");
    socket
        .send(sink.local_addr().expect("addr"), envelope)
        .await
        .expect("send");
    let mut buf = vec![0; 65_536];
    let len = sink.recv(&mut buf).await.expect("recv");
    buf.truncate(len);
    buf
}

fn gossip(messages: &BTreeMap<String, Vec<u8>>) {
    let key1 = GossipKey::from_bytes([1; KEY_LEN]);
    let key2 = GossipKey::from_bytes([2; KEY_LEN]);
    let by_key1 = Keyring::single(key1.clone());
    let by_key2 = Keyring::new(key2, vec![key1]).expect("keyring");
    let stranger = Keyring::single(GossipKey::from_bytes([3; KEY_LEN]));
    for (name, message) in messages {
        write("gossip_chitchat", name, message);
    }
    let pick = |prefix: &str| {
        messages
            .iter()
            .find(|(k, _)| k.starts_with(prefix))
            .map(|(_, m)| m.as_slice())
            .expect("captured")
    };
    // Mode byte 0: a datagram from the network.
    let network = |keyring: &Keyring, message: &[u8]| {
        let d = seal(keyring, &mut Sealer::new(), 1_750_000_000, message);
        [&[0u8][..], &d].concat()
    };
    write(
        "gossip_open",
        "sealed-syn-key1",
        network(&by_key1, pick("syn-")),
    );
    write(
        "gossip_open",
        "sealed-synack-key2",
        network(&by_key2, pick("synack")),
    );
    write(
        "gossip_open",
        "sealed-ack-unknown-key",
        network(&stranger, pick("ack")),
    );
    write(
        "gossip_open",
        "unsealed-chitchat",
        [&[0u8][..], pick("syn-")].concat(),
    );
    // Mode byte 1 (odd): byte to flip (u16 LE), xor mask, then the plaintext.
    write(
        "gossip_open",
        "roundtrip-synack",
        [&[1u8, 7, 0, 0x01][..], pick("synack")].concat(),
    );
    write("gossip_open", "roundtrip-empty", [3u8, 0, 0, 0x80]);
}

fn policy_json() {
    let mut entries: Vec<_> = fs::read_dir("seeds/policy_toml")
        .expect("policy_toml seeds (from the README and tests)")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    let mut seen = std::collections::BTreeSet::new();
    for path in entries {
        let text = fs::read_to_string(&path).expect("read");
        let Ok(resources) = policy::parse_file("seed.toml", &text) else {
            continue;
        };
        for r in resources {
            // One seed per kind and shape is enough; keep the first few of each kind.
            let kind_index = policy::Kind::ALL
                .iter()
                .position(|k| *k == r.key.kind)
                .expect("a kind of ALL");
            let json = r.spec_json();
            if !seen.insert(json.clone()) {
                continue;
            }
            let mut seed = vec![u8::try_from(kind_index).expect("few kinds")];
            seed.extend_from_slice(
                format!("{}\n{}\n{json}", r.key.namespace, r.key.name).as_bytes(),
            );
            write(
                "policy_json",
                &format!("{}-{}-{}", r.key.kind, r.key.namespace, r.key.name),
                seed,
            );
        }
    }
    // The kind spelled out (selector 8 = the first line names it).
    write(
        "policy_json",
        "kind-by-alias",
        b"\x08ap\nshop\ndeny-admin\n{\"action\":\"deny\",\"rules\":[{\"to\":[{\"paths\":[\"/admin*\"]}]}]}",
    );
}

fn trace() {
    let seeds: [(&str, &str); 8] = [
        (
            "w3c",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\ntracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\n",
        ),
        (
            "w3c-unsampled",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\n",
        ),
        (
            "w3c-future-version",
            "traceparent: cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-holds\n",
        ),
        (
            "b3-single",
            "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90\n",
        ),
        (
            "b3-single-64bit-debug",
            "b3: 64fe8b2a57d3eff7-e457b5a2e4d86bd1-d\n",
        ),
        ("b3-deny", "b3: 0\n"),
        (
            "b3-multi",
            "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\nx-b3-spanid: e457b5a2e4d86bd1\nx-b3-parentspanid: 05e3ac9a4f6e3b90\nx-b3-sampled: 1\n",
        ),
        (
            "mixed-duplicated",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\nx-b3-flags: 1\ntracestate: a=1\ntracestate: b=2\n",
        ),
    ];
    for (name, text) in seeds {
        write("trace_context", name, text);
    }
}

fn hosts() {
    for (name, host) in [
        ("short", "api.mesh"),
        ("namespaced-port", "api.payments.mesh:8080"),
        ("svc-trailing-dot", "API.Payments.SVC.Mesh."),
        ("not-mesh", "api.example.com"),
        ("ipv6", "[::1]:15001"),
    ] {
        write("host_service", name, host);
    }
}

fn health() {
    // Mode byte odd: an HTTP/1.1 answer.
    let http: [(&str, &[u8]); 5] = [
        (
            "http-200",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        (
            "http-503",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ),
        (
            "http-100-then-204",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        ),
        (
            "http-chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        (
            "http-1.0",
            b"HTTP/1.0 301 Moved Permanently\r\nlocation: /ready\r\n\r\n",
        ),
    ];
    for (name, answer) in http {
        write("health_probe", name, [&[1u8][..], answer].concat());
    }
    // Mode byte even: gRPC headers or trailers, a blank line, the framed body.
    let framed = |message: &[u8]| {
        let mut body = vec![0];
        body.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
        body.extend_from_slice(message);
        body
    };
    let grpc: [(&str, &[u8], Vec<u8>); 4] = [
        ("grpc-serving", b"grpc-status: 0\n\n", framed(&[0x08, 0x01])),
        (
            "grpc-not-serving",
            b"grpc-status: 0\ngrpc-message: \n\n",
            framed(&[0x08, 0x02]),
        ),
        (
            "grpc-unknown-fields",
            b"grpc-status: 0\n\n",
            framed(&[0x12, 0x03, b'a', b'b', b'c', 0x08, 0x01, 0x1d, 1, 2, 3, 4]),
        ),
        (
            "grpc-unimplemented",
            b"grpc-status: 12\ngrpc-message: unknown service\n\n",
            Vec::new(),
        ),
    ];
    for (name, head, body) in grpc {
        write("health_probe", name, [&[0u8][..], head, &body].concat());
    }
}

fn paths() {
    // First byte: mode (bits 0-1: none, base, merge_slashes, decode_and_merge_slashes) and
    // escaped slashes (bit 2: reject, keep). The bypass spellings and their kin.
    let seeds: [(&str, u8, &str); 12] = [
        ("double-slash", 2, "//admin"),
        ("dot", 2, "/./admin"),
        ("dot-dot", 2, "/x/../admin"),
        ("encoded-a", 2, "/%61dmin"),
        ("encoded-slash-reject", 2, "/admin%2Fsecrets"),
        ("encoded-slash-keep", 6, "/admin%2fsecrets/%5C"),
        ("encoded-slash-decode", 3, "/x%2F..%2Fadmin"),
        ("backslash", 1, "\\admin\\..\\x"),
        ("climb-above-root", 1, "/a/b/../../../../etc/passwd/."),
        ("utf8-and-reserved", 2, "/caf%c3%a9/%7e%20a+b;c=d"),
        ("asterisk", 2, "*"),
        ("bad-escape", 2, "/a%4"),
    ];
    for (name, selector, path) in seeds {
        write(
            "path_normalize",
            name,
            [&[selector][..], path.as_bytes()].concat(),
        );
    }
}
