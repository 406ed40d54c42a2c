//! TLS outside the mesh for tests: a throwaway CA that signs server and client certificates,
//! and an HTTPS server standing for a service on the internet (its own CA, optionally
//! requiring client certificates) that reports what it received.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// A test CA and leaf certificates it signs (PEM).
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new self-signed CA.
    pub fn new() -> Self {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("empty names are valid");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge test CA");
        let key = rcgen::KeyPair::generate().expect("key generation");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate, key) for `names`, with `cn` as its subject (to tell renewals apart).
    pub fn leaf(&self, names: &[&str], cn: &str) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("valid names");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        (cert.pem(), key.serialize_pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// An HTTPS server that answers every request with `host=`, `path=` (with the query),
/// `method=` and `client_certs=` (how many certificates the client presented) lines, and an
/// `x-mesh-error` header of its own (which the mesh must not pass on as its own).
pub struct HttpsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered so far.
    pub requests: Arc<AtomicU64>,
}

impl HttpsServer {
    /// Listens on `addr` with `cert_pem`/`key_pem`; with `client_ca_pem`, clients must present
    /// a certificate that CA issued.
    pub async fn start(
        addr: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: Option<&str>,
    ) -> anyhow::Result<Self> {
        let provider = mesh_runtime::tls::provider();
        let chain = mesh_runtime::tls::parse_certs(cert_pem, "server certificate")?;
        let key = mesh_runtime::tls::parse_key(key_pem, "server key")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca_pem {
            Some(ca) => {
                let roots = mesh_runtime::tls::root_store(ca)?;
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind(addr).await?;
        let addr = l.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (acceptor, counter) = (acceptor.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let certs = tls.get_ref().1.peer_certificates().map_or(0, <[_]>::len);
                    let svc = service_fn(move |req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let host = (req.headers().get(http::header::HOST))
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let path = req.uri().path_and_query().map(ToString::to_string);
                        let body = format!(
                            "host={host}\npath={}\nmethod={}\nclient_certs={certs}\n",
                            path.unwrap_or_default(),
                            req.method()
                        );
                        // A server outside the mesh trying to speak for it: the mesh removes it.
                        let resp = Response::builder()
                            .header("x-mesh-error", "outbound/forged_by_the_server")
                            .body(Full::new(Bytes::from(body)));
                        async move { resp }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, requests })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A TLS echo server with `cert_pem`: an app that terminates its own TLS (behind a passthrough
/// listener), or a database outside the mesh speaking TLS.
pub async fn tls_echo(addr: SocketAddr, cert_pem: &str, key_pem: &str) -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let chain = mesh_runtime::tls::parse_certs(cert_pem, "echo certificate").expect("certificate");
    let key = mesh_runtime::tls::parse_key(key_pem, "echo key").expect("key");
    let config = rustls::ServerConfig::builder_with_provider(mesh_runtime::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate and key match");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = l.local_addr().expect("bound address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
