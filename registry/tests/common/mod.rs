//! Helpers shared by the in-process API tests: mTLS registry clients like meshd's and
//! meshctl's, and a scrape of the admin metrics.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::proto::v1::registry_client::RegistryClient;
use mesh_api::{Identity, TrustDomain};
use mesh_runtime::tls::{self, CertSlot, SpiffeVerifier};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::{Channel, Endpoint};

/// Bound on every wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A registry client presenting `chain_pem`/`key_pem` and expecting the registry identity of
/// `td` under `bundle_pem` (the connector is meshd's `control::Client`, trimmed).
pub fn client(
    addr: std::net::SocketAddr,
    td: &TrustDomain,
    bundle_pem: &str,
    chain_pem: &str,
    key_pem: &str,
) -> RegistryClient<Channel> {
    let verifier =
        SpiffeVerifier::exact(tls::root_store(bundle_pem).unwrap(), Identity::registry(td));
    let cert = CertSlot::new(Some(tls::certified_key(chain_pem, key_pem).unwrap()));
    let cfg = tls::client_config(Arc::new(verifier), Some(cert), &[b"h2"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let channel = Endpoint::from_static("http://registry.mesh.invalid")
        .connect_timeout(TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("registry.mesh.invalid").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
    RegistryClient::new(channel)
}

/// A client with the meshctl credentials `init` wrote into `dir`.
pub fn credentials_client(
    addr: std::net::SocketAddr,
    td: &TrustDomain,
    dir: &Path,
) -> RegistryClient<Channel> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    client(
        addr,
        td,
        &read("ca.pem"),
        &read("admin.pem"),
        &read("admin-key.pem"),
    )
}

/// `GET /metrics` on the admin listener, over plain HTTP/1.0.
pub async fn metrics(addr: std::net::SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}
