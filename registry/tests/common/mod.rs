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

/// A registry made by `init::run` and served by `app::build` on loopback port 0, with clients
/// for its operator, its viewer and one node (`node-1`).
// Each test binary compiles this module and uses a different subset of the fields.
#[allow(dead_code)]
pub struct Running {
    /// Keeps the data dir alive for the test.
    pub _dir: tempfile::TempDir,
    /// What `init` printed.
    pub report: mesh_registry::init::Report,
    /// Admin (metrics) address.
    pub admin_addr: std::net::SocketAddr,
    /// Starts the drain.
    pub stop_tx: tokio::sync::oneshot::Sender<()>,
    /// The serving task; ends when the drain is over.
    pub running: tokio::task::JoinHandle<()>,
    /// Operator client.
    pub admin: RegistryClient<Channel>,
    /// Read-only client.
    pub viewer: RegistryClient<Channel>,
    /// Node client.
    pub node: RegistryClient<Channel>,
}

/// Starts a registry whose drain grace period is far longer than [`TIMEOUT`]: a test that sees
/// it stop within TIMEOUT proves no stream held the drain open.
pub async fn start() -> Running {
    use mesh_api::NodeName;
    use mesh_ca::{Authority, SignRequest};
    use mesh_registry::{app, config::Config, init};
    use std::time::SystemTime;

    tls::install_default_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let td = TrustDomain::new("mesh.test").expect("trust domain");
    let data = dir.path().join("reg");
    let report = init::run(
        &init::Args {
            trust_domain: td.clone(),
            data_dir: data.clone(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            import: None,
        },
        SystemTime::now(),
    )
    .expect("init");
    let mut config = Config::load(&report.config_file).expect("config");
    config.drain_grace_period = Duration::from_secs(120);
    let bound = app::build(config).await.expect("registry starts");
    let (addr, admin_addr) = (bound.listen_addr, bound.admin_addr);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(bound.wait_termination(async {
        let _ = stop_rx.await;
    }));
    let admin = credentials_client(addr, &td, &report.admin_dir);
    let viewer = credentials_client(addr, &td, &report.viewer_dir);
    let ca = Authority::load(
        &td,
        &init::CaPaths::new(&data).read().expect("ca paths"),
        SystemTime::now(),
    )
    .expect("ca");
    let (node_cert, node_key) = ca
        .issue(&SignRequest {
            identity: Identity::node(&td, &NodeName::new("node-1").expect("name")),
            dns_names: Vec::new(),
            ttl: Duration::from_secs(3600),
            now: SystemTime::now(),
        })
        .expect("node cert");
    let node = client(
        addr,
        &td,
        &ca.trust_bundle_pem(),
        &node_cert.chain_pem,
        &node_key,
    );
    Running {
        _dir: dir,
        report,
        admin_addr,
        stop_tx,
        running,
        admin,
        viewer,
        node,
    }
}
