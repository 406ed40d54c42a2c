//! Traffic between two real meshd hosts: concurrency, large checksummed transfers, half-close,
//! and proof that what crosses the wire between hosts is TLS.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use mesh_e2e::apps::{self, Echo, Relay};
use mesh_e2e::{Cluster, PairSpec, RegistryOpts, ServiceSpec, eventually, next_ip};
use std::time::Duration;

struct Pair {
    cluster: Cluster,
    upstream: SocketAddr,
    _echo: Echo,
}

/// web (node a) → api (node b, echo app). Returns the app-facing upstream port on node a.
async fn pair(relay_inbound: bool) -> (Pair, Option<Relay>) {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let mut spec = PairSpec::new(b_ip, ServiceSpec::new("api", echo.addr));
    // Optionally advertise a relay in front of b's inbound port, so the test sees the bytes.
    let relay = if relay_inbound {
        let r = Relay::start(
            SocketAddr::new(b_ip.into(), 0),
            SocketAddr::new(b_ip.into(), mesh_e2e::INBOUND_PORT),
        )
        .await
        .unwrap();
        spec.b_advertise = Some(r.addr);
        Some(r)
    } else {
        None
    };
    let upstream = cluster.pair(spec).await.unwrap();
    (
        Pair {
            cluster,
            upstream,
            _echo: echo,
        },
        relay,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_connections_and_large_transfers() {
    let (p, _) = pair(false).await;
    // 200 concurrent connections, each with its own payload.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let addr = p.upstream;
        tasks.push(tokio::spawn(async move {
            let data = apps::payload(4096 + i as usize * 13, i);
            let got = apps::round_trip(addr, &data).await.unwrap();
            assert_eq!(apps::sha256(&got), apps::sha256(&data), "connection {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Large transfers, checksummed end to end (both directions, through two proxies).
    for (i, size) in [8 << 20, 32 << 20].into_iter().enumerate() {
        let data = apps::payload(size, 1000 + i as u64);
        let got = apps::round_trip(p.upstream, &data).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert_eq!(apps::sha256(&got), apps::sha256(&data));
    }
    let a = &p.cluster.nodes[1];
    let conns = a
        .metric(
            "meshd_connections_total",
            &[("direction", "outbound"), ("service", "default/api")],
        )
        .await
        .unwrap();
    assert!(conns >= 202.0, "outbound connections counted: {conns}");
    let b = &p.cluster.nodes[0];
    let hs = b
        .metric("meshd_tls_handshakes_total", &[("direction", "inbound")])
        .await
        .unwrap();
    assert!(hs >= 202.0, "inbound handshakes counted: {hs}");
    // Once tickets have been issued, new connections between the same two hosts resume the TLS
    // session (no certificate verification on the fast path).
    let resumed = || async {
        a.metric(
            "meshd_tls_handshakes_total",
            &[("direction", "outbound"), ("kind", "resumed")],
        )
        .await
        .unwrap()
    };
    let before = resumed().await;
    for i in 0..20u64 {
        let data = apps::payload(100, i);
        assert_eq!(apps::round_trip(p.upstream, &data).await.unwrap(), data);
    }
    let after = resumed().await;
    assert!(
        after - before >= 19.0,
        "sequential connections resumed: {before} -> {after}"
    );
    // Access events are written in batches, within a fraction of a second.
    eventually(
        Duration::from_secs(5),
        "a's outbound access event",
        || async {
            a.log()
                .contains("\"dst.service\":\"default/api\"")
                .then_some(())
        },
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "b's event naming the caller",
        || async {
            b.log()
                .contains("\"src.identity\":\"spiffe://mesh.test/ns/default/svc/web\"")
                .then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_between_hosts_carries_only_tls() {
    let (p, relay) = pair(true).await;
    let relay = relay.unwrap();
    let marker = b"PLAINTEXT-MARKER-7f3a91-should-never-appear-on-the-wire";
    let mut data = Vec::new();
    for _ in 0..200 {
        data.extend_from_slice(marker);
    }
    let got = apps::round_trip(p.upstream, &data).await.unwrap();
    assert_eq!(got, data, "echo through the mesh");
    let wire = relay.bytes();
    assert!(
        wire.len() > data.len(),
        "the relay saw the inter-host traffic ({} bytes)",
        wire.len()
    );
    assert!(
        !apps::contains(&wire, marker),
        "payload visible in plaintext between hosts"
    );
    assert!(!apps::contains(&wire, b"PLAINTEXT-MARKER"));
    // TLS records: handshake (0x16) then application data (0x17), version 0x0303.
    assert_eq!(
        wire[0], 0x16,
        "first byte on the wire is a TLS handshake record"
    );
    assert!(
        apps::contains(&wire, &[0x17, 0x03, 0x03]),
        "application data records present"
    );
}

/// An app that proves half-close in both directions: on each connection it first reads a
/// one-byte mode. `r`: read until the caller's FIN, then answer with how much arrived (data
/// that can only travel after the FIN). `w`: send "bye" and FIN at once, then read until the
/// caller's FIN and report what the caller sent after receiving ours on `after_fin`.
async fn half_close_app(
    ip: std::net::Ipv4Addr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind(SocketAddr::new(ip.into(), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                s.read_exact(&mut mode).await?;
                let mut got = Vec::new();
                if mode[0] == b'r' {
                    s.read_to_end(&mut got).await?;
                    s.write_all(format!("after your FIN: {} bytes", got.len()).as_bytes())
                        .await?;
                    s.shutdown().await?;
                } else {
                    s.write_all(b"bye").await?;
                    s.shutdown().await?;
                    s.read_to_end(&mut got).await?;
                    let _ = tx.send(got);
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_carries_data_after_each_sides_fin() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let wait = mesh_e2e::scaled(Duration::from_secs(10));
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = next_ip();
    let (app, mut after_fin) = half_close_app(b_ip).await;
    let upstream = cluster
        .pair(PairSpec::new(b_ip, ServiceSpec::new("api", app)))
        .await
        .unwrap();

    // The caller's FIN first: the app's answer can only be sent after it, and must arrive.
    let mut s = tokio::net::TcpStream::connect(upstream).await.unwrap();
    s.write_all(b"r0123456789").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(wait, s.read_to_string(&mut answer))
        .await
        .expect("the answer sent after our FIN arrives, then EOF")
        .unwrap();
    assert_eq!(answer, "after your FIN: 10 bytes");

    // The app's FIN first: we see "bye" and EOF, keep sending, and the app receives it.
    let mut s = tokio::net::TcpStream::connect(upstream).await.unwrap();
    s.write_all(b"w").await.unwrap();
    let mut bye = Vec::new();
    tokio::time::timeout(wait, s.read_to_end(&mut bye))
        .await
        .expect("the app's FIN arrives")
        .unwrap();
    assert_eq!(bye, b"bye");
    s.write_all(b"still here after your FIN").await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(wait, after_fin.recv())
        .await
        .expect("the app hears what we sent after its FIN")
        .unwrap();
    assert_eq!(got, b"still here after your FIN");
}
