//! Webhook delivery against real loopback servers: retries until a 2xx, gives up after the
//! last attempt, stops retrying on drain, and speaks HTTPS to a server whose certificate chains
//! to the configured roots (and refuses one that does not).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_api::{Identity, TrustDomain};
use mesh_ca::{Authority, SignRequest};
use mesh_runtime::tls::{self, CertSlot};
use tokio::net::TcpListener;

use super::*;

/// Short enough that a test with retries finishes at once.
const FAST: Retry = Retry {
    timeout: Duration::from_secs(5),
    attempts: 3,
    backoff: Duration::from_millis(10),
};

/// What a test server saw: content type and body of each request.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Serves HTTP/1.1 on `listener` (optionally behind TLS), answering the i-th request with
/// `statuses[i]` (the last one repeats), recording every request.
fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    statuses: Vec<StatusCode>,
) -> Seen {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (seen, statuses, tls) = (record.clone(), statuses.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (seen, statuses) = (seen.clone(), statuses.clone());
                    async move {
                        let ct = req
                            .headers()
                            .get(CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut seen = seen.lock().unwrap();
                        seen.push((ct, String::from_utf8_lossy(&body).into_owned()));
                        let status = statuses[(seen.len() - 1).min(statuses.len() - 1)];
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = status;
                        Ok::<_, hyper::Error>(resp)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => http.serve_connection(TokioIo::new(stream), svc).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(TokioIo::new(tcp), svc).await,
                };
            });
        }
    });
    seen
}

fn delivery(
    tls: Option<rustls::ClientConfig>,
) -> (
    Delivery,
    Family<WebhookLabels, Counter>,
    watch::Sender<bool>,
) {
    let outcomes = Family::<WebhookLabels, Counter>::default();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let lock = OnceLock::new();
    if let Some(config) = tls {
        lock.set(Ok(Arc::new(config))).unwrap();
    }
    let d = Delivery::with(FAST, lock, outcomes.clone(), shutdown_rx);
    (d, outcomes, shutdown_tx)
}

fn count(outcomes: &Family<WebhookLabels, Counter>, outcome: &'static str) -> u64 {
    outcomes.get_or_create(&WebhookLabels { outcome }).get()
}

async fn local() -> (TcpListener, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test(flavor = "current_thread")]
async fn http_retries_until_accepted() {
    let (listener, addr) = local().await;
    let seen = serve(
        listener,
        None,
        vec![StatusCode::SERVICE_UNAVAILABLE, StatusCode::NO_CONTENT],
    );
    let (d, outcomes, _shutdown) = delivery(None);
    let url = format!("http://{addr}/hooks/secret-token");
    assert!(d.deliver(&url, Bytes::from_static(b"{\"a\":1}")).await);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(ct, body)| ct == "application/json" && body == "{\"a\":1}")
    );
    assert_eq!(
        (count(&outcomes, "delivered"), count(&outcomes, "failed")),
        (1, 0)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn gives_up_after_the_last_attempt() {
    let (listener, addr) = local().await;
    let seen = serve(listener, None, vec![StatusCode::INTERNAL_SERVER_ERROR]);
    let (d, outcomes, _shutdown) = delivery(None);
    assert!(!d.deliver(&format!("http://{addr}/"), Bytes::new()).await);
    assert_eq!(seen.lock().unwrap().len(), FAST.attempts as usize);
    assert_eq!(
        (count(&outcomes, "delivered"), count(&outcomes, "failed")),
        (0, 1)
    );

    // Nothing listening, and a URL that is not one: failed, no panic.
    drop(seen);
    let (listener, addr) = local().await;
    drop(listener);
    assert!(!d.deliver(&format!("http://{addr}/"), Bytes::new()).await);
    assert!(!d.deliver("ftp://example.invalid/", Bytes::new()).await);
    assert!(!d.deliver("not a url", Bytes::new()).await);
    assert_eq!(count(&outcomes, "failed"), 4);
}

#[tokio::test(flavor = "current_thread")]
async fn drain_stops_retrying() {
    let (listener, addr) = local().await;
    let seen = serve(listener, None, vec![StatusCode::INTERNAL_SERVER_ERROR]);
    let outcomes = Family::<WebhookLabels, Counter>::default();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let slow = Retry {
        backoff: Duration::from_secs(3_600),
        ..FAST
    };
    let d = Delivery::with(slow, OnceLock::new(), outcomes.clone(), shutdown_rx);
    shutdown_tx.send_replace(true);
    let delivered = tokio::time::timeout(
        Duration::from_secs(10),
        d.deliver(&format!("http://{addr}/"), Bytes::new()),
    )
    .await
    .expect("a drain cuts the hour-long backoff short");
    assert!(!delivered);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A TLS acceptor for `localhost` and the root it chains to.
fn localhost_tls() -> (tokio_rustls::TlsAcceptor, String) {
    tls::install_default_provider();
    let td = TrustDomain::new("mesh.test").unwrap();
    let (ca, _) = Authority::generate(&td, SystemTime::now()).unwrap();
    let (issued, key) = ca
        .issue(&SignRequest {
            identity: Identity::registry(&td),
            dns_names: vec!["localhost".to_owned()],
            ttl: Duration::from_secs(3_600),
            now: SystemTime::now(),
        })
        .unwrap();
    let bundle = ca.trust_bundle_pem();
    let slot = CertSlot::new(Some(tls::certified_key(&issued.chain_pem, &key).unwrap()));
    let cfg = tls::server_config(
        tls::root_store(&bundle).unwrap(),
        slot,
        true,
        &[b"http/1.1"],
    )
    .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), bundle)
}

fn trusting(bundle_pem: &str) -> rustls::ClientConfig {
    let roots = tls::root_store(bundle_pem).unwrap();
    client_config(Arc::unwrap_or_clone(roots)).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn https_with_trusted_roots() {
    let (acceptor, bundle) = localhost_tls();
    let (listener, addr) = local().await;
    let seen = serve(listener, Some(acceptor), vec![StatusCode::OK]);
    let (d, outcomes, _shutdown) = delivery(Some(trusting(&bundle)));
    let url = format!("https://localhost:{}/hook", addr.port());
    assert!(d.deliver(&url, Bytes::from_static(b"{}")).await);
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(count(&outcomes, "delivered"), 1);

    // A client that trusts another root refuses the server: nothing is delivered.
    let (_, other) = localhost_tls();
    let (d, outcomes, _shutdown) = delivery(Some(trusting(&other)));
    assert!(!d.deliver(&url, Bytes::from_static(b"{}")).await);
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(count(&outcomes, "failed"), 1);
    let err = d
        .post(&url.parse().unwrap(), Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
}

#[test]
fn system_roots_load_when_present() {
    // The host may have no CA bundle (a minimal container); then the error names the paths.
    match system_tls() {
        Ok(config) => assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]),
        Err(reason) => assert!(reason.contains(SYSTEM_ROOTS[0]), "{reason}"),
    }
}
