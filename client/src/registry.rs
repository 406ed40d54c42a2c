//! The only module that talks to the registry: a gRPC client over our own rustls config, either
//! pinned to the CA fingerprint of a join token (first contact) or authenticated with a mesh
//! certificate (node or operator).

use std::sync::Arc;
use std::time::Duration;

use mesh_api::proto::v1 as pb;
use mesh_api::{Identity, TrustDomain};
use mesh_runtime::tls::{self, CertSlot, PinnedRootVerifier, RootsSlot, SpiffeVerifier};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

/// Server name sent to the registry; the verifiers check its SPIFFE identity, not this name.
const REGISTRY_SERVER_NAME: &str = "registry.mesh.invalid";

/// Registry client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the TLS configuration failed.
    #[error("tls setup: {0}")]
    Tls(#[from] tls::Error),
    /// The registry address is not usable.
    #[error("registry address {0:?} is not host:port")]
    BadAddress(String),
    /// The call failed (connection refused, timed out, or refused by the registry).
    // Not a #[source]: the status message is already in the text, and tonic's own Display
    // would repeat it in every error chain.
    #[error("registry call failed ({:?}): {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

impl Error {
    /// Whether the registry refused the call (as opposed to being unreachable); retrying
    /// would be refused again. `AlreadyExists`: a join under a registered node name.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Status(s) => matches!(
                s.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument
                    | tonic::Code::AlreadyExists
            ),
            _ => false,
        }
    }
}

/// How this client proves itself and checks the registry.
pub enum Auth {
    /// First contact: no client certificate; the registry must chain to this root fingerprint.
    Pinned([u8; 32]),
    /// A mesh member: the registry must prove `spiffe://<td>/registry` under `roots`; we present
    /// whatever certificate `cert` holds at handshake time (so renewal needs no reconnect).
    Mesh {
        /// The trust bundle; read at each new connection, so a root rotation applies to the
        /// next reconnect without rebuilding the client.
        roots: Arc<RootsSlot>,
        /// The mesh's trust domain.
        trust_domain: TrustDomain,
        /// Our certificate.
        cert: Arc<CertSlot>,
    },
}

/// Builds the TLS connector of each new registry connection.
enum Connector {
    /// First contact: one fixed configuration.
    Fixed(tokio_rustls::TlsConnector),
    /// A member: rebuilt when the roots changed since the last connection.
    Mesh {
        roots: Arc<RootsSlot>,
        trust_domain: TrustDomain,
        cert: Arc<CertSlot>,
        last: std::sync::Mutex<Option<(Arc<RootCertStore>, tokio_rustls::TlsConnector)>>,
    },
}

impl Connector {
    fn new(auth: Auth) -> Result<Self, Error> {
        Ok(match auth {
            Auth::Pinned(fp) => Self::Fixed(tokio_rustls::TlsConnector::from(Arc::new(
                tls::client_config(Arc::new(PinnedRootVerifier::new(fp)), None, &[b"h2"])?,
            ))),
            Auth::Mesh {
                roots,
                trust_domain,
                cert,
            } => Self::Mesh {
                roots,
                trust_domain,
                cert,
                last: std::sync::Mutex::new(None),
            },
        })
    }

    fn current(&self) -> Result<tokio_rustls::TlsConnector, Error> {
        let (roots, trust_domain, cert, last) = match self {
            Self::Fixed(c) => return Ok(c.clone()),
            Self::Mesh {
                roots,
                trust_domain,
                cert,
                last,
            } => (roots, trust_domain, cert, last),
        };
        let roots = roots.get();
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((r, c)) = &*last
            && Arc::ptr_eq(r, &roots)
        {
            return Ok(c.clone());
        }
        let cfg = tls::client_config(
            Arc::new(SpiffeVerifier::exact(
                roots.clone(),
                Identity::registry(trust_domain),
            )),
            Some(cert.clone()),
            &[b"h2"],
        )?;
        let c = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        *last = Some((roots, c.clone()));
        Ok(c)
    }
}

/// Listings of policy that span a change are read again at most this many times.
const MAX_LISTING_ATTEMPTS: usize = 3;

/// A connected (lazily) registry client.
#[derive(Clone)]
pub struct Client {
    inner: pb::registry_client::RegistryClient<Channel>,
}

impl Client {
    /// A client for `address` (`host:port`). Connects on first use and reconnects after
    /// failures; every call is bounded by `request_timeout`.
    pub fn new(
        address: &str,
        auth: Auth,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, Error> {
        if address.rsplit_once(':').is_none() {
            return Err(Error::BadAddress(address.to_owned()));
        }
        let connector = Arc::new(Connector::new(auth)?);
        let addr = address.to_owned();
        let endpoint = Endpoint::from_static("http://registry.mesh.invalid")
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel =
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let connector = connector.clone();
                let addr = addr.clone();
                async move {
                    let tcp = tokio::time::timeout(
                        connect_timeout,
                        tokio::net::TcpStream::connect(&addr),
                    )
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to the registry at {addr} timed out"),
                        )
                    })??;
                    let _ = tcp.set_nodelay(true);
                    let name = ServerName::try_from(REGISTRY_SERVER_NAME)
                        .expect("constant registry server name is a valid DNS name");
                    let tls = connector
                        .current()
                        .map_err(std::io::Error::other)?
                        .connect(name, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }));
        Ok(Self {
            inner: pb::registry_client::RegistryClient::new(channel),
        })
    }

    /// First contact: token + node CSR → node certificate.
    pub async fn join(&self, req: pb::JoinRequest) -> Result<pb::JoinResponse, Error> {
        Ok(self.inner.clone().join(req).await?.into_inner())
    }

    /// Renews the node certificate with the current one.
    pub async fn renew_node(&self, csr_pem: String) -> Result<pb::CertificateResponse, Error> {
        Ok(self
            .inner
            .clone()
            .renew_node(pb::RenewNodeRequest { csr_pem })
            .await?
            .into_inner())
    }

    /// Requests a workload certificate.
    pub async fn sign_workload(
        &self,
        req: pb::SignWorkloadRequest,
    ) -> Result<pb::CertificateResponse, Error> {
        Ok(self.inner.clone().sign_workload(req).await?.into_inner())
    }

    /// Creates a join token (operators only).
    pub async fn create_token(
        &self,
        req: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, Error> {
        Ok(self.inner.clone().create_token(req).await?.into_inner())
    }

    /// Lists join tokens without their secrets (operators and viewers).
    pub async fn list_tokens(&self) -> Result<pb::ListTokensResponse, Error> {
        Ok(self
            .inner
            .clone()
            .list_tokens(pb::ListTokensRequest {})
            .await?
            .into_inner())
    }

    /// Revokes a join token by id (operators only).
    pub async fn revoke_token(&self, id: &str) -> Result<pb::RevokeTokenResponse, Error> {
        Ok(self
            .inner
            .clone()
            .revoke_token(pb::RevokeTokenRequest { id: id.to_owned() })
            .await?
            .into_inner())
    }

    /// The roots the registry signs under (any mesh identity).
    pub async fn trust_bundle(&self) -> Result<pb::TrustBundle, Error> {
        Ok(self
            .inner
            .clone()
            .get_trust_bundle(pb::TrustBundleRequest {})
            .await?
            .into_inner())
    }

    /// Removes a node: its record, its certificates, its name from gossip (operators only).
    pub async fn remove_node(&self, name: &str) -> Result<pb::RevocationResponse, Error> {
        Ok(self
            .inner
            .clone()
            .remove_node(pb::RemoveNodeRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner())
    }

    /// Revokes the certificates `req` selects (operators only).
    pub async fn revoke_certificates(
        &self,
        req: pb::RevokeCertificatesRequest,
    ) -> Result<pb::RevocationResponse, Error> {
        Ok(self
            .inner
            .clone()
            .revoke_certificates(req)
            .await?
            .into_inner())
    }

    /// Signs operator credentials (operators only).
    pub async fn issue_credentials(
        &self,
        req: pb::IssueCredentialsRequest,
    ) -> Result<pb::CertificateResponse, Error> {
        Ok(self
            .inner
            .clone()
            .issue_credentials(req)
            .await?
            .into_inner())
    }

    /// Every operator certificate the registry issued (operators and viewers).
    pub async fn list_credentials(&self) -> Result<pb::ListCredentialsResponse, Error> {
        Ok(self
            .inner
            .clone()
            .list_credentials(pb::ListCredentialsRequest {})
            .await?
            .into_inner())
    }

    /// Lists registered nodes (operators only).
    pub async fn list_nodes(&self) -> Result<pb::ListNodesResponse, Error> {
        Ok(self
            .inner
            .clone()
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner())
    }

    /// Lists issued certificates, newest first, following pages until `limit` (0 = all;
    /// operators only).
    pub async fn list_certificates(
        &self,
        limit: u32,
    ) -> Result<pb::ListCertificatesResponse, Error> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let want = if limit == 0 {
                0
            } else {
                limit - all.len() as u32
            };
            let resp = self
                .inner
                .clone()
                .list_certificates(pb::ListCertificatesRequest {
                    limit: want,
                    page_token,
                })
                .await?
                .into_inner();
            all.extend(resp.certificates);
            let done = limit != 0 && all.len() as u32 >= limit;
            if resp.next_page_token.is_empty() || done {
                return Ok(pb::ListCertificatesResponse {
                    certificates: all,
                    next_page_token: resp.next_page_token,
                });
            }
            page_token = resp.next_page_token;
        }
    }

    /// Applies (or, with `dry_run`, validates) policy resources (operators only).
    pub async fn apply(&self, req: pb::ApplyRequest) -> Result<pb::ApplyResponse, Error> {
        Ok(self.inner.clone().apply(req).await?.into_inner())
    }

    /// Reads policy resources; empty fields match everything.
    pub async fn get_resources(
        &self,
        req: pb::GetResourcesRequest,
    ) -> Result<pb::GetResourcesResponse, Error> {
        // Every page of one revision: a listing that spans a change starts over (at most a
        // few times; then the last one is returned as it is).
        let mut whole = pb::GetResourcesResponse::default();
        for _ in 0..MAX_LISTING_ATTEMPTS {
            whole = pb::GetResourcesResponse::default();
            let mut page_token = String::new();
            let mut consistent = true;
            let mut first = true;
            loop {
                let page = self
                    .inner
                    .clone()
                    .get_resources(pb::GetResourcesRequest {
                        page_token,
                        ..req.clone()
                    })
                    .await?
                    .into_inner();
                if std::mem::take(&mut first) {
                    whole.revision = page.revision;
                }
                consistent &= page.revision == whole.revision;
                whole.resources.extend(page.resources);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if consistent {
                break;
            }
        }
        Ok(whole)
    }

    /// Deletes (or, with `dry_run`, previews deleting) one policy resource (operators only).
    pub async fn delete_resource(
        &self,
        req: pb::DeleteResourceRequest,
    ) -> Result<pb::ApplyResponse, Error> {
        Ok(self.inner.clone().delete_resource(req).await?.into_inner())
    }

    /// Every stored version of one policy resource, oldest first.
    pub async fn history(&self, req: pb::HistoryRequest) -> Result<pb::HistoryResponse, Error> {
        Ok(self.inner.clone().history(req).await?.into_inner())
    }

    /// Opens the policy watch stream: a full snapshot or the changes since `since_revision`,
    /// then one event per new revision. The request timeout bounds only the opening; the
    /// stream itself lives until either side ends it.
    pub async fn watch_policy(
        &self,
        since_revision: u64,
    ) -> Result<tonic::Streaming<pb::PolicyEvent>, Error> {
        Ok(self
            .inner
            .clone()
            .watch_policy(pb::WatchPolicyRequest { since_revision })
            .await?
            .into_inner())
    }

    /// Opens the gossip keyring watch (nodes): the current keyring, then every change.
    pub async fn watch_gossip_keys(&self) -> Result<tonic::Streaming<pb::GossipKeyring>, Error> {
        Ok(self
            .inner
            .clone()
            .watch_gossip_keys(pb::WatchGossipKeysRequest {})
            .await?
            .into_inner())
    }

    /// Tells the registry which keyring revision this node now holds (nodes).
    pub async fn report_gossip_keys(&self, revision: u64) -> Result<(), Error> {
        self.inner
            .clone()
            .report_gossip_keys(pb::ReportGossipKeysRequest { revision })
            .await?;
        Ok(())
    }

    /// Installs, uses or removes a gossip key (operators only).
    pub async fn change_gossip_keys(
        &self,
        req: pb::ChangeGossipKeysRequest,
    ) -> Result<pb::GossipKeyStatus, Error> {
        Ok(self
            .inner
            .clone()
            .change_gossip_keys(req)
            .await?
            .into_inner())
    }

    /// The gossip key ids and what every node reported (operators and viewers).
    pub async fn get_gossip_keys(&self) -> Result<pb::GossipKeyStatus, Error> {
        Ok(self
            .inner
            .clone()
            .get_gossip_keys(pb::GetGossipKeysRequest {})
            .await?
            .into_inner())
    }

    /// Node: this period's state and edge traffic; the answer may change the interval.
    pub async fn report(&self, report: pb::NodeReport) -> Result<pb::ReportResponse, Error> {
        Ok(self.inner.clone().report(report).await?.into_inner())
    }

    /// Admin or viewer: the service graph over the last `window_seconds` (0: the default).
    pub async fn get_topology(&self, window_seconds: u64) -> Result<pb::Topology, Error> {
        Ok(self
            .inner
            .clone()
            .get_topology(pb::TopologyRequest { window_seconds })
            .await?
            .into_inner())
    }

    /// Admin or viewer: every SLO's indicator, budget, burn rates and alert.
    pub async fn get_slo_status(&self) -> Result<pb::SloStatusResponse, Error> {
        Ok(self
            .inner
            .clone()
            .get_slo_status(pb::SloStatusRequest {})
            .await?
            .into_inner())
    }

    /// Admin or viewer: every node's last report.
    pub async fn get_node_reports(&self) -> Result<pb::NodeReportsResponse, Error> {
        Ok(self
            .inner
            .clone()
            .get_node_reports(pb::NodeReportsRequest {})
            .await?
            .into_inner())
    }
}
