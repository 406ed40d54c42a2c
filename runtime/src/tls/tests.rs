use std::time::{Duration, SystemTime};

use mesh_api::{Identity, ServiceKey, TrustDomain};
use mesh_ca::{Authority, SignRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("mesh.test").unwrap()
}

fn workload(name: &str) -> Identity {
    Identity::workload(&td(), &ServiceKey::parse(name).unwrap())
}

fn issue(ca: &Authority, id: Identity) -> Arc<CertifiedKey> {
    let (key_pem, csr_pem) = new_key_and_csr(&id).unwrap();
    let issued = ca
        .sign_csr(
            &csr_pem,
            &SignRequest {
                identity: id,
                dns_names: vec![],
                ttl: Duration::from_secs(3600),
                now: SystemTime::now(),
            },
        )
        .unwrap();
    certified_key(&issued.chain_pem, &key_pem).unwrap()
}

/// Runs one handshake plus a round trip; returns the identity the server saw, or the error
/// text of whichever side failed.
async fn handshake(
    server: ServerConfig,
    client: ClientConfig,
    sni: &str,
) -> Result<Option<Identity>, String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let server_task = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        let id = peer_identity(tls.get_ref().1.peer_certificates().unwrap_or_default());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    });
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let client_res = async {
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    let server_res = server_task.await.unwrap();
    match (client_res, server_res) {
        (Ok(()), Ok(id)) => Ok(id),
        (c, s) => Err(format!("client: {:?}; server: {:?}", c.err(), s.err())),
    }
}

fn mesh() -> Authority {
    Authority::generate(&td(), SystemTime::now()).unwrap().0
}

#[tokio::test]
async fn mutual_tls_with_spiffe_identities() {
    let ca = mesh();
    let roots = root_store(&ca.trust_bundle_pem()).unwrap();
    let server = server_config(
        roots.clone(),
        CertSlot::new(Some(issue(&ca, workload("api")))),
        false,
        &[],
    )
    .unwrap();
    let verifier = Arc::new(SpiffeVerifier::new(
        roots.clone(),
        Box::new(|name| match name {
            ServerName::DnsName(d) => {
                ServiceKey::from_sni(d.as_ref()).map(|k| Identity::workload(&td(), &k))
            }
            _ => None,
        }),
    ));
    let client_cert: Arc<dyn rustls::client::ResolvesClientCert> =
        CertSlot::new(Some(issue(&ca, workload("web"))));
    let client = client_config(verifier, Some(client_cert), &[]).unwrap();
    let seen = handshake(
        server.clone(),
        client.clone(),
        &ServiceKey::parse("api").unwrap().sni(),
    )
    .await
    .unwrap();
    assert_eq!(seen, Some(workload("web")));

    // Same server, but the client meant to reach "db": the server proves "api" → refused.
    let err = handshake(server, client, &ServiceKey::parse("db").unwrap().sni())
        .await
        .unwrap_err();
    assert!(err.contains("IdentityMismatch"), "{err}");
}

#[tokio::test]
async fn server_refuses_missing_and_foreign_client_certs() {
    let ca = mesh();
    let foreign = mesh();
    let roots = root_store(&ca.trust_bundle_pem()).unwrap();
    let server = server_config(
        roots.clone(),
        CertSlot::new(Some(issue(&ca, workload("api")))),
        false,
        &[],
    )
    .unwrap();
    let verifier = Arc::new(SpiffeVerifier::exact(roots.clone(), workload("api")));
    let none = client_config(verifier.clone(), None, &[]).unwrap();
    let err = handshake(server.clone(), none, "api.default.svc.mesh")
        .await
        .unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate"),
        "no client cert must be refused: {err}"
    );

    let foreign_cert: Arc<dyn rustls::client::ResolvesClientCert> =
        CertSlot::new(Some(issue(&foreign, workload("web"))));
    let client = client_config(verifier, Some(foreign_cert), &[]).unwrap();
    let err = handshake(server, client, "api.default.svc.mesh")
        .await
        .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn pinned_root_accepts_only_the_pinned_mesh_registry() {
    let ca = mesh();
    let roots = root_store(&ca.trust_bundle_pem()).unwrap();
    let (issued, key) = ca
        .issue(&SignRequest {
            identity: Identity::registry(&td()),
            dns_names: vec![],
            ttl: Duration::from_secs(3600),
            now: SystemTime::now(),
        })
        .unwrap();
    let chain = format!("{}{}", issued.chain_pem, ca.trust_bundle_pem());
    let server = server_config(
        roots.clone(),
        CertSlot::new(Some(certified_key(&chain, &key).unwrap())),
        true,
        &[],
    )
    .unwrap();
    let good = client_config(
        Arc::new(PinnedRootVerifier::new(sha256(ca.root_der()))),
        None,
        &[],
    )
    .unwrap();
    let seen = handshake(server.clone(), good, "registry.mesh.invalid")
        .await
        .unwrap();
    assert_eq!(seen, None, "join clients present no certificate");

    let other = mesh();
    let bad = client_config(
        Arc::new(PinnedRootVerifier::new(sha256(other.root_der()))),
        None,
        &[],
    )
    .unwrap();
    let err = handshake(server, bad, "registry.mesh.invalid")
        .await
        .unwrap_err();
    assert!(err.contains("pinned"), "{err}");

    // A workload certificate of the right mesh is not a registry.
    let imposter = server_config(
        roots,
        CertSlot::new(Some(issue(&ca, workload("api")))),
        true,
        &[],
    )
    .unwrap();
    let mut imposter_chain = imposter;
    let (i2, k2) = ca
        .issue(&SignRequest {
            identity: workload("api"),
            dns_names: vec![],
            ttl: Duration::from_secs(3600),
            now: SystemTime::now(),
        })
        .unwrap();
    let chain2 = format!("{}{}", i2.chain_pem, ca.trust_bundle_pem());
    imposter_chain.cert_resolver = CertSlot::new(Some(certified_key(&chain2, &k2).unwrap()));
    let pinned = client_config(
        Arc::new(PinnedRootVerifier::new(sha256(ca.root_der()))),
        None,
        &[],
    )
    .unwrap();
    let err = handshake(imposter_chain, pinned, "registry.mesh.invalid")
        .await
        .unwrap_err();
    assert!(err.contains("not a registry"), "{err}");
}

#[tokio::test]
async fn cert_slot_swaps_for_new_handshakes() {
    let ca = mesh();
    let roots = root_store(&ca.trust_bundle_pem()).unwrap();
    let slot = CertSlot::new(Some(issue(&ca, workload("api"))));
    let first = slot.get().unwrap().cert[0].clone();
    slot.set(issue(&ca, workload("api")));
    let second = slot.get().unwrap().cert[0].clone();
    assert_ne!(first, second);
    let server = server_config(roots.clone(), slot.clone(), false, &[]).unwrap();
    let client_cert: Arc<dyn rustls::client::ResolvesClientCert> =
        CertSlot::new(Some(issue(&ca, workload("web"))));
    let client = client_config(
        Arc::new(SpiffeVerifier::exact(roots, workload("api"))),
        Some(client_cert),
        &[],
    )
    .unwrap();
    handshake(server, client, "api.default.svc.mesh")
        .await
        .unwrap();
}

#[test]
fn csr_carries_the_identity() {
    let id = workload("web");
    let (_key, csr) = new_key_and_csr(&id).unwrap();
    assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
    let checked = mesh_ca::csr::check(&csr, &id, &[]);
    assert!(checked.is_ok(), "{:?}", checked.err());
}

#[tokio::test]
async fn second_connection_resumes_the_session() {
    let ca = mesh();
    let roots = root_store(&ca.trust_bundle_pem()).unwrap();
    let server = Arc::new(
        server_config(
            roots.clone(),
            CertSlot::new(Some(issue(&ca, workload("api")))),
            false,
            &[],
        )
        .unwrap(),
    );
    let client_cert: Arc<dyn rustls::client::ResolvesClientCert> =
        CertSlot::new(Some(issue(&ca, workload("web"))));
    let client = Arc::new(
        client_config(
            Arc::new(SpiffeVerifier::exact(roots, workload("api"))),
            Some(client_cert),
            &[],
        )
        .unwrap(),
    );
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        let srv = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(&buf).await.unwrap();
            tls.shutdown().await.unwrap();
            let conn = tls.get_ref().1;
            (
                conn.handshake_kind(),
                conn.negotiated_cipher_suite().map(|s| s.suite()),
            )
        });
        let name = ServerName::try_from("api.default.svc.mesh").unwrap();
        let mut tls = connector.connect(name, c).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        kinds.push(srv.await.unwrap());
    }
    assert_eq!(kinds[0].0, Some(rustls::HandshakeKind::Full));
    assert_eq!(
        kinds[0].1,
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        "meshd prefers AES-128-GCM-SHA256"
    );
    assert_eq!(
        kinds[1].0,
        Some(rustls::HandshakeKind::Resumed),
        "{kinds:?}"
    );
}
