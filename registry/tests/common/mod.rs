//! Helpers shared by the in-process API tests: mTLS registry clients like meshd's and
//! meshctl's, and a scrape of the admin metrics.

use std::path::{Path, PathBuf};
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
    /// The trust domain.
    pub td: TrustDomain,
    /// The registry's data dir (CA, store).
    pub data: PathBuf,
    /// gRPC address.
    pub addr: std::net::SocketAddr,
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
#[allow(dead_code)]
pub async fn start() -> Running {
    start_with(|_| {}).await
}

/// [`start`], with `tweak` applied to the config `init` wrote.
pub async fn start_with(tweak: impl Fn(&mut mesh_registry::config::Config)) -> Running {
    use mesh_registry::init;
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
            join: None,
        },
        SystemTime::now(),
    )
    .expect("init");
    serve(dir, report, td, data, tweak).await
}

/// Drains `running` until it has stopped, then serves its data dir again (new ports, same
/// store and CA), with `tweak` applied to the config.
#[allow(dead_code)]
pub async fn restart(
    running: Running,
    tweak: impl Fn(&mut mesh_registry::config::Config),
) -> Running {
    let Running {
        _dir,
        report,
        td,
        data,
        stop_tx,
        running,
        ..
    } = running;
    stop_tx.send(()).expect("registry running");
    tokio::time::timeout(TIMEOUT, running)
        .await
        .expect("registry stops within the timeout")
        .expect("serving task");
    serve(_dir, report, td, data, tweak).await
}

async fn serve(
    dir: tempfile::TempDir,
    report: mesh_registry::init::Report,
    td: TrustDomain,
    data: PathBuf,
    tweak: impl Fn(&mut mesh_registry::config::Config),
) -> Running {
    use mesh_api::NodeName;
    use mesh_registry::{app, config::Config};

    let mut config = Config::load(&report.config_file).expect("config");
    config.drain_grace_period = Duration::from_secs(120);
    tweak(&mut config);
    // The store of a registry that just stopped may still be closing (sled releases its lock
    // when the last handle drops); retry briefly.
    let bound = {
        let mut tries = 0;
        loop {
            match app::build(config.clone()).await {
                Ok(bound) => break bound,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("registry starts: {e:?}"),
            }
        }
    };
    let (addr, admin_addr) = (bound.listen_addr, bound.admin_addr);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(bound.wait_termination(async {
        let _ = stop_rx.await;
    }));
    let admin = credentials_client(addr, &td, &report.admin_dir);
    let viewer = credentials_client(addr, &td, &report.viewer_dir);
    let node = identity_client(
        addr,
        &td,
        &data,
        Identity::node(&td, &NodeName::new("node-1").expect("name")),
    );
    Running {
        _dir: dir,
        report,
        td,
        data,
        addr,
        admin_addr,
        stop_tx,
        running,
        admin,
        viewer,
        node,
    }
}

/// Registers node `name` the way a host does (a token for `services`, then Join with a CSR),
/// so the registry knows which services it may host and report on.
#[allow(dead_code)]
pub async fn join(
    admin: &mut RegistryClient<Channel>,
    td: &TrustDomain,
    name: &str,
    services: &[&str],
) {
    use mesh_api::proto::v1 as pb;
    let token = admin
        .create_token(pb::CreateTokenRequest {
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            ttl_seconds: 3600,
            uses: 1,
            ..Default::default()
        })
        .await
        .expect("create token")
        .into_inner()
        .token;
    let node = mesh_api::name::NodeName::new(name).expect("node name");
    let (_key, csr_pem) = tls::new_key_and_csr(&Identity::node(td, &node)).expect("csr");
    admin
        .join(pb::JoinRequest {
            token,
            node_name: name.to_owned(),
            csr_pem,
            datacenter: "dc1".to_owned(),
            zone: "a".to_owned(),
        })
        .await
        .expect("join");
}

/// A client presenting a certificate for `identity`, issued by the registry's CA in `data`.
pub fn identity_client(
    addr: std::net::SocketAddr,
    td: &TrustDomain,
    data: &Path,
    identity: Identity,
) -> RegistryClient<Channel> {
    use mesh_ca::{Authority, SignRequest};
    use mesh_registry::init;
    use std::time::SystemTime;

    let ca = Authority::load(
        td,
        &init::CaPaths::new(data).read().expect("ca paths"),
        SystemTime::now(),
    )
    .expect("ca");
    let (cert, key) = ca
        .issue(&SignRequest {
            identity,
            dns_names: Vec::new(),
            ttl: Duration::from_secs(3600),
            now: SystemTime::now(),
        })
        .expect("cert");
    client(addr, td, &ca.trust_bundle_pem(), &cert.chain_pem, &key)
}

/// Polls `check` until it returns `Some` (every few ms, up to [`TIMEOUT`]); panics naming
/// `what` otherwise. For conditions a background task makes true.
#[allow(dead_code)]
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
