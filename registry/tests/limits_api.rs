//! In-process tests of the registry's limits under abuse, on real loopback sockets: a registry
//! from `init::run` + `app::build`, attacked with idle TCP sockets, silent and slow TLS
//! handshakes, and a hand-written HTTP/2 client that opens more streams than allowed, resets
//! streams in bursts, never answers pings or never sends a request body; while a legitimate
//! client (tonic over mTLS, like meshd's) keeps being served.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::proto::v1 as pb;
use mesh_api::proto::v1::registry_client::RegistryClient;
use mesh_api::{Identity, NodeName, TrustDomain};
use mesh_ca::{Authority, SignRequest};
use mesh_registry::config::Config;
use mesh_runtime::tls::{self, CertSlot, SpiffeVerifier};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use common::{Running, TIMEOUT, metrics};

/// A loopback address other than the registry's clients' 127.0.0.1 (Linux routes all of
/// 127/8 to `lo`), for "another host".
const OTHER_HOST: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to `addr` from `source` (port chosen by the kernel).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The client TLS config of a mesh member with `identity` (issued by the registry's CA), or
/// of a joining host without a certificate.
fn tls_config(r: &Running, identity: Option<Identity>) -> Arc<rustls::ClientConfig> {
    let files = mesh_registry::init::CaPaths::new(&r.data).read().unwrap();
    let ca = Authority::load(&r.td, &files, std::time::SystemTime::now()).unwrap();
    let roots = tls::root_store(&ca.trust_bundle_pem()).unwrap();
    let verifier = SpiffeVerifier::exact(roots, Identity::registry(&r.td));
    let cert = identity.map(|identity| {
        let (issued, key) = ca
            .issue(&SignRequest {
                identity,
                dns_names: Vec::new(),
                ttl: Duration::from_secs(3600),
                now: std::time::SystemTime::now(),
            })
            .unwrap();
        let slot = CertSlot::new(Some(tls::certified_key(&issued.chain_pem, &key).unwrap()));
        slot as Arc<dyn rustls::client::ResolvesClientCert>
    });
    Arc::new(tls::client_config(Arc::new(verifier), cert, &[b"h2"]).unwrap())
}

fn node_identity(td: &TrustDomain) -> Identity {
    Identity::node(td, &NodeName::new("node-1").unwrap())
}

/// A tonic client like meshd's, connecting from `source`.
fn grpc_client_from(
    source: IpAddr,
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> RegistryClient<Channel> {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let channel = Endpoint::from_static("http://registry.mesh.invalid")
        .connect_timeout(TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = connect_from(source, addr).await?;
                let name = ServerName::try_from("registry.mesh.invalid").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
    RegistryClient::new(channel)
}

/// A raw TLS connection (for the hand-written HTTP/2 client).
async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("registry.mesh.invalid").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Waits until the peer closes `io` (EOF or reset), discarding anything it sends; returns how
/// long that took, or `None` if it stayed open for `within`.
async fn closed_within(io: &mut (impl AsyncRead + Unpin), within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// `value` of the sample `name{labels}` in a Prometheus text scrape (0 when absent).
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn trust_bundle(client: &mut RegistryClient<Channel>) -> Result<(), tonic::Status> {
    tokio::time::timeout(TIMEOUT, client.get_trust_bundle(pb::TrustBundleRequest {}))
        .await
        .expect("answered within the timeout")
        .map(drop)
}

/// Idle TCP connections beyond `max_connections_per_ip` are closed at accept and counted; a
/// client from another address is served meanwhile, and the limit frees up as sockets close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_refuses_excess_and_serves_other_hosts() {
    let r = common::start_with(|c: &mut Config| {
        c.max_connections_per_ip = 4;
        c.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let here: IpAddr = [127, 0, 0, 1].into();

    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_from(here, r.addr).await.unwrap());
    }
    // The fifth from the same address is accepted and closed at once.
    let mut fifth = connect_from(here, r.addr).await.unwrap();
    let took = closed_within(&mut fifth, TIMEOUT).await;
    assert!(
        took.is_some(),
        "the fifth connection from one address was kept"
    );

    // Another host gets its RPC answered.
    let mut other = grpc_client_from(
        OTHER_HOST.into(),
        r.addr,
        tls_config(&r, Some(node_identity(&r.td))),
    );
    trust_bundle(&mut other).await.unwrap();

    let scrape = metrics(r.admin_addr).await;
    assert_eq!(
        sample(
            &scrape,
            "mesh_registry_connections_refused_total{reason=\"per_ip\"}"
        ),
        1.0,
        "{scrape}"
    );
    // 4 idle sockets + the other host's connection.
    assert_eq!(sample(&scrape, "mesh_registry_connections_open"), 5.0);

    // Closing the idle sockets frees the address again.
    drop(idle);
    let mut node = r.node.clone();
    common::eventually("127.0.0.1 admitted again", || {
        let mut node = node.clone();
        async move { trust_bundle(&mut node).await.ok() }
    })
    .await;
    trust_bundle(&mut node).await.unwrap();
}

/// With 300 silent sockets mid-handshake (more than the old 256-slot handshake queue) and a long
/// handshake timeout, a real client still completes its handshake and call at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_delay_other_handshakes() {
    let r = common::start_with(|c: &mut Config| {
        c.max_connections_per_ip = 1000;
        c.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut silent = Vec::new();
    for i in 0..300u32 {
        // Spread over a few addresses, as a flood from several hosts would be.
        let source: IpAddr = [127, 0, 1, (i % 10) as u8 + 1].into();
        silent.push(connect_from(source, r.addr).await.unwrap());
    }
    common::eventually("all silent sockets accepted", || async {
        let scrape = metrics(r.admin_addr).await;
        (sample(&scrape, "mesh_registry_connections_open") >= 300.0).then_some(())
    })
    .await;

    let start = Instant::now();
    let mut node = r.node.clone();
    trust_bundle(&mut node).await.unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a handshake waited behind silent sockets: {took:?}"
    );
    drop(silent);
}

/// At `max_connections`, a client that completes its handshake takes the place of the oldest
/// socket still in a handshake; only when every connection is established are newcomers
/// refused at accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_registry_evicts_handshakes_before_refusing() {
    let r = common::start_with(|c: &mut Config| {
        c.max_connections = 3;
        c.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(r.addr).await.unwrap());
        // Admission order is the eviction order.
        common::eventually("silent socket admitted", || async {
            let scrape = metrics(r.admin_addr).await;
            let open = sample(&scrape, "mesh_registry_connections_open") as usize;
            (open == silent.len()).then_some(())
        })
        .await;
    }

    // A member's call gets through: its connection evicts the oldest silent socket.
    let mut node = r.node.clone();
    trust_bundle(&mut node).await.unwrap();
    assert!(
        closed_within(&mut silent[0], TIMEOUT).await.is_some(),
        "oldest silent socket kept"
    );
    // Two more established connections take the other two places.
    let member = tls_config(&r, Some(node_identity(&r.td)));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = h2::Conn::open(tls_connect(r.addr, member.clone()).await).await;
        // The server's SETTINGS: its side of the handshake is over too (not evictable).
        assert!(matches!(conn.next().await, h2::Event::Other), "settings");
        held.push(conn);
    }
    for s in &mut silent[1..] {
        assert!(
            closed_within(s, TIMEOUT).await.is_some(),
            "silent socket kept"
        );
    }
    // Now every place is an established connection: a newcomer is closed at accept.
    let mut late = TcpStream::connect(r.addr).await.unwrap();
    assert!(
        closed_within(&mut late, TIMEOUT).await.is_some(),
        "fourth connection kept"
    );
    trust_bundle(&mut node).await.unwrap();

    let scrape = metrics(r.admin_addr).await;
    let refused = |reason: &str| {
        sample(
            &scrape,
            &format!("mesh_registry_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refused("evicted"), 3.0, "{scrape}");
    assert_eq!(refused("total"), 1.0, "{scrape}");
}

/// A socket that never sends a ClientHello, and one that sends it a byte at a time, are both
/// closed once `handshake_timeout` has passed, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_closes_silent_and_slow_sockets() {
    let timeout = Duration::from_millis(500);
    let r = common::start_with(|c: &mut Config| c.handshake_timeout = timeout).await;

    let mut silent = TcpStream::connect(r.addr).await.unwrap();
    let mut slow = TcpStream::connect(r.addr).await.unwrap();
    // A TLS record header announcing a ClientHello, then a byte every 100 ms.
    let dribble = async {
        for b in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]
            .into_iter()
            .cycle()
            .take(100)
        {
            if slow.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (silent_closed, ()) = tokio::join!(closed_within(&mut silent, TIMEOUT), dribble);
    let silent_closed = silent_closed.expect("silent socket closed");
    assert!(
        silent_closed >= timeout - Duration::from_millis(50) && silent_closed < timeout * 4,
        "closed after {silent_closed:?}"
    );
    let slow_closed = closed_within(&mut slow, TIMEOUT).await;
    assert!(slow_closed.is_some(), "dribbling socket kept open");

    let scrape = metrics(r.admin_addr).await;
    assert_eq!(
        sample(
            &scrape,
            "mesh_registry_tls_handshake_failures_total{reason=\"timeout\"}"
        ),
        2.0,
        "{scrape}"
    );
    assert_eq!(sample(&scrape, "mesh_registry_connections_open"), 0.0);
}

/// Connections without a client certificate beyond `max_unauthenticated_connections` are closed
/// after the handshake; members with certificates still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_limit_leaves_room_for_members() {
    let r = common::start_with(|c: &mut Config| c.max_unauthenticated_connections = 2).await;
    let anonymous = tls_config(&r, None);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tls = tls_connect(r.addr, anonymous.clone()).await;
        tls.write_all(h2::PREFACE).await.unwrap();
        tls.flush().await.unwrap();
        held.push(tls);
    }
    common::eventually("two unauthenticated connections open", || async {
        let scrape = metrics(r.admin_addr).await;
        (sample(&scrape, "mesh_registry_connections_open") >= 2.0).then_some(())
    })
    .await;
    let mut third = tls_connect(r.addr, anonymous).await;
    assert!(
        closed_within(&mut third, TIMEOUT).await.is_some(),
        "third unauthenticated connection kept"
    );
    let mut node = r.node.clone();
    trust_bundle(&mut node).await.unwrap();
    let scrape = metrics(r.admin_addr).await;
    assert_eq!(
        sample(
            &scrape,
            "mesh_registry_connections_refused_total{reason=\"unauthenticated\"}"
        ),
        1.0,
        "{scrape}"
    );
}

/// A client opening more streams than `max_concurrent_streams` gets the excess refused with
/// `REFUSED_STREAM`; its other streams are still served, and so is everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused() {
    let r = common::start_with(|c: &mut Config| {
        c.max_concurrent_streams = 4;
        c.request_timeout = Duration::from_secs(60);
    })
    .await;
    let mut conn =
        h2::Conn::open(tls_connect(r.addr, tls_config(&r, Some(node_identity(&r.td)))).await).await;
    // Seven unary calls whose request bodies never come: four stay open, three are refused.
    let ids: Vec<u32> = (0..7).map(|i| 1 + 2 * i).collect();
    for &id in &ids {
        conn.headers(id, h2::GET_TRUST_BUNDLE, false).await;
    }
    let mut refused = Vec::new();
    while refused.len() < 3 {
        match conn.next().await {
            h2::Event::Reset { stream, code } => refused.push((stream, code)),
            h2::Event::GoAway { code } => panic!("goaway {code}"),
            _ => {}
        }
    }
    refused.sort();
    assert_eq!(
        refused,
        [9, 11, 13].map(|s| (s, h2::REFUSED_STREAM)),
        "refused streams"
    );

    // Everyone else is served.
    let mut node = r.node.clone();
    trust_bundle(&mut node).await.unwrap();
    // And so are this connection's open streams once their requests complete.
    conn.data(1, &[0, 0, 0, 0, 0], true).await;
    loop {
        match conn.next().await {
            h2::Event::Headers { stream: 1, .. } => break,
            h2::Event::Reset { stream: 1, code } => panic!("stream 1 reset ({code})"),
            h2::Event::GoAway { code } => panic!("goaway {code}"),
            h2::Event::Closed => panic!("connection closed"),
            _ => {}
        }
    }
}

/// A burst of HEADERS + RST_STREAM pairs (HTTP/2 rapid reset) gets the connection closed with
/// `GOAWAY(ENHANCE_YOUR_CALM)`; other clients are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_burst_gets_goaway() {
    let r =
        common::start_with(|c: &mut Config| c.http2_max_pending_accept_reset_streams = 10).await;
    let mut conn = h2::Conn::open(tls_connect(r.addr, tls_config(&r, None)).await).await;
    let mut burst = Vec::new();
    for i in 0..100u32 {
        let id = 1 + 2 * i;
        h2::headers_frame(&mut burst, id, h2::GET_TRUST_BUNDLE, false);
        h2::frame(&mut burst, h2::RST_STREAM, 0, id, &h2::CANCEL.to_be_bytes());
    }
    conn.write(&burst).await;
    let code = loop {
        match conn.next().await {
            h2::Event::GoAway { code } => break code,
            h2::Event::Closed => panic!("closed without GOAWAY"),
            _ => {}
        }
    };
    assert_eq!(code, h2::ENHANCE_YOUR_CALM);
    let mut node = r.node.clone();
    trust_bundle(&mut node).await.unwrap();
}

/// A peer that stops answering pings is dropped after interval + timeout; a unary call whose
/// body never arrives ends with the request timeout; a watch outlives both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_drops_dead_peers_and_request_timeout_spares_watches() {
    let r = common::start_with(|c: &mut Config| {
        c.http2_keepalive_interval = Duration::from_millis(300);
        c.http2_keepalive_timeout = Duration::from_millis(300);
        c.request_timeout = Duration::from_millis(700);
    })
    .await;
    let mut node = r.node.clone();
    let mut watch = node
        .watch_gossip_keys(pb::WatchGossipKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    // A unary call without a body: the registry answers it (trailers-only, END_STREAM) once the
    // request timeout passes, and the connection stays usable.
    let mut conn = h2::Conn::open(tls_connect(r.addr, tls_config(&r, None)).await).await;
    let start = Instant::now();
    conn.headers(1, h2::GET_TRUST_BUNDLE, false).await;
    loop {
        match conn.next().await {
            h2::Event::Headers {
                stream: 1,
                end_stream: true,
            } => break,
            h2::Event::Ping => conn.pong().await,
            h2::Event::Closed | h2::Event::GoAway { .. } => panic!("connection closed"),
            _ => {}
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(3),
        "stalled call ended after {took:?}"
    );

    // Now stop answering pings: the registry closes the connection.
    let start = Instant::now();
    let ended = tokio::time::timeout(TIMEOUT, async {
        loop {
            match conn.next().await {
                h2::Event::Closed | h2::Event::GoAway { .. } => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a peer that ignores pings was kept");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // The watch (whose client answers pings) outlived the request timeout several times over
    // and still delivers.
    let mut admin = r.admin.clone();
    admin
        .change_gossip_keys(pb::ChangeGossipKeysRequest {
            action: pb::change_gossip_keys_request::Action::Install as i32,
            key: String::new(),
        })
        .await
        .unwrap();
    let next = tokio::time::timeout(TIMEOUT, watch.message())
        .await
        .unwrap();
    assert_eq!(next.unwrap().unwrap().revision, 2);
}

/// Policy routes totalling `bytes` or more, in applies of at most 200 resources each.
async fn apply_routes(admin: &mut RegistryClient<Channel>, bytes: usize) {
    let spec = r#"{"service":"web","http":[{"timeout":"2s"}]}"#.to_owned();
    let mut total = 0;
    let mut i = 0;
    while total < bytes {
        let mut batch = Vec::new();
        for _ in 0..200 {
            let r = pb::Resource {
                kind: "Route".to_owned(),
                namespace: "shop".to_owned(),
                name: format!("route-{i:05}"),
                spec_json: spec.clone(),
                ..Default::default()
            };
            total += r.name.len() + r.spec_json.len() + 10;
            batch.push(r);
            i += 1;
        }
        admin
            .apply(pb::ApplyRequest {
                resources: batch,
                dry_run: false,
            })
            .await
            .unwrap();
    }
}

/// A request over `max_request_message_size` is refused with `OUT_OF_RANGE` before any handler
/// runs; what would make a response over `max_response_message_size` comes in pages (resource
/// listings) or parts (the policy watch) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_with_a_clear_status() {
    let limit = 64 * 1024;
    let r = common::start_with(|c: &mut Config| {
        c.max_request_message_size = limit;
        c.max_response_message_size = limit;
    })
    .await;
    let mut admin = r.admin.clone();
    let big = pb::Resource {
        kind: "Route".to_owned(),
        namespace: "shop".to_owned(),
        name: "big".to_owned(),
        spec_json: format!(r#"{{"service":"web","pad":"{}"}}"#, "x".repeat(limit)),
        ..Default::default()
    };
    let err = admin
        .apply(pb::ApplyRequest {
            resources: vec![big],
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("message length too large") && err.message().contains("65536"),
        "{err:?}"
    );

    // Responses: a resource listing over the limit comes in pages, each within it.
    apply_routes(&mut admin, limit + 1).await;
    let mut listed = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .get_resources(pb::GetResourcesRequest {
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(
            prost::Message::encoded_len(&page) <= limit,
            "page {pages} over the limit"
        );
        listed.extend(page.resources.into_iter().map(|r| r.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(pages > 1, "{pages} page(s)");
    let want: Vec<String> = (0..listed.len()).map(|i| format!("route-{i:05}")).collect();
    assert_eq!(listed, want, "every resource once, in order");

    // A full snapshot over the limit is streamed in parts, each within it: never refused.
    let mut node = r.node.clone();
    let mut stream = node
        .watch_policy(pb::WatchPolicyRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    let mut parts = 0;
    loop {
        let part = stream.message().await.unwrap().expect("a part");
        parts += 1;
        assert!(part.full_snapshot);
        assert!(
            prost::Message::encoded_len(&part) <= limit,
            "part {parts} over the limit"
        );
        names.extend(part.resources.iter().map(|r| r.name.clone()));
        if !part.more {
            break;
        }
    }
    assert!(parts > 1, "{parts} part(s)");
    let want: Vec<String> = (0..names.len()).map(|i| format!("route-{i:05}")).collect();
    assert_eq!(names, want, "every resource once, in order");
}

/// Just enough HTTP/2 (RFC 9113) to misbehave on purpose: frames are written raw and HPACK
/// uses only literal, non-indexed, non-Huffman fields, which every decoder must accept.
mod h2 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const GET_TRUST_BUNDLE: &str = "/mesh.v1.Registry/GetTrustBundle";

    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// Appends one frame to `out`.
    pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap();
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }

    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        // "Literal Header Field without Indexing — New Name", lengths < 127, no Huffman.
        out.push(0);
        out.push(u8::try_from(name.len()).unwrap());
        out.extend_from_slice(name.as_bytes());
        out.push(u8::try_from(value.len()).unwrap());
        out.extend_from_slice(value.as_bytes());
    }

    /// Appends the HEADERS frame of a gRPC call to `path` on `stream`.
    pub fn headers_frame(out: &mut Vec<u8>, stream: u32, path: &str, end_stream: bool) {
        let mut block = Vec::new();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "registry.mesh.invalid"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            literal(&mut block, n, v);
        }
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        frame(out, HEADERS, flags, stream, &block);
    }

    /// What the server sent, as far as these tests care.
    #[derive(Debug)]
    pub enum Event {
        Headers { stream: u32, end_stream: bool },
        Reset { stream: u32, code: u32 },
        GoAway { code: u32 },
        Ping,
        Closed,
        Other,
    }

    type Io = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    /// A client connection that acknowledges SETTINGS and nothing else by itself.
    pub struct Conn {
        io: Io,
        last_ping: [u8; 8],
    }

    impl Conn {
        /// Sends the preface and empty SETTINGS.
        pub async fn open(io: Io) -> Self {
            let mut c = Self {
                io,
                last_ping: [0; 8],
            };
            let mut out = PREFACE.to_vec();
            frame(&mut out, SETTINGS, 0, 0, &[]);
            c.write(&out).await;
            c
        }

        pub async fn write(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
            self.io.flush().await.unwrap();
        }

        pub async fn headers(&mut self, stream: u32, path: &str, end_stream: bool) {
            let mut out = Vec::new();
            headers_frame(&mut out, stream, path, end_stream);
            self.write(&out).await;
        }

        pub async fn data(&mut self, stream: u32, payload: &[u8], end_stream: bool) {
            let mut out = Vec::new();
            frame(
                &mut out,
                DATA,
                if end_stream { END_STREAM } else { 0 },
                stream,
                payload,
            );
            self.write(&out).await;
        }

        /// Answers the last PING the server sent.
        pub async fn pong(&mut self) {
            let mut out = Vec::new();
            let ping = self.last_ping;
            frame(&mut out, PING, ACK, 0, &ping);
            self.write(&out).await;
        }

        /// The next frame the server sends (SETTINGS acknowledged on the way), within the
        /// tests' timeout.
        pub async fn next(&mut self) -> Event {
            tokio::time::timeout(super::TIMEOUT, self.read_event())
                .await
                .expect("a frame from the registry within the timeout")
        }

        async fn read_event(&mut self) -> Event {
            let mut head = [0u8; 9];
            if self.io.read_exact(&mut head).await.is_err() {
                return Event::Closed;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if self.io.read_exact(&mut payload).await.is_err() {
                return Event::Closed;
            }
            let word = |at: usize| {
                u32::from_be_bytes([
                    payload[at],
                    payload[at + 1],
                    payload[at + 2],
                    payload[at + 3],
                ])
            };
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let mut out = Vec::new();
                    frame(&mut out, SETTINGS, ACK, 0, &[]);
                    self.write(&out).await;
                    Event::Other
                }
                HEADERS => Event::Headers {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                },
                RST_STREAM => Event::Reset {
                    stream,
                    code: word(0),
                },
                GOAWAY => Event::GoAway { code: word(4) },
                PING if flags & ACK == 0 => {
                    self.last_ping.copy_from_slice(&payload);
                    Event::Ping
                }
                _ => Event::Other,
            }
        }
    }
}
