//! rustls configurations derived from the identity snapshot: one inbound server config that
//! picks the local service's certificate by SNI, and one client config per local service that
//! presents that service's identity and checks the upstream's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mesh_api::{Identity, ServiceKey, TrustDomain};
use mesh_runtime::tls::{self, ALPN_MESH_H2, ALPN_MESH_TCP, SpiffeVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;

use crate::identity::Certs;

/// TLS configs for the current certificates.
pub struct TlsState {
    /// Trust domain of the mesh.
    pub trust_domain: TrustDomain,
    /// Inbound server config.
    pub server: Arc<ServerConfig>,
    /// Client config per local (source) service, with its ticket store.
    pub clients: BTreeMap<ServiceKey, Client>,
}

/// The client side of one local service.
#[derive(Clone)]
pub struct Client {
    /// rustls config presenting the service's identity, for byte streams.
    pub config: Arc<ClientConfig>,
    /// The same, negotiating HTTP/2 (requests of HTTP-family upstreams).
    pub h2_config: Arc<ClientConfig>,
    /// `config` without session resumption: the retry after a stale resumption.
    pub fresh_config: Arc<ClientConfig>,
    /// `h2_config` without session resumption.
    pub fresh_h2_config: Arc<ClientConfig>,
    /// Its session tickets (see [`TicketStore::forget`]).
    pub tickets: Arc<TicketStore>,
}

/// Chooses the certificate of the local service named by the client's SNI.
#[derive(Debug)]
struct SniResolver {
    by_sni: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No certificate for an unknown name: the handshake fails, nothing is revealed. An
        // ExternalService named through its egress gateway gets the gateway's certificate
        // (whether this host may send it there is decided after the handshake).
        let sni = hello.server_name()?;
        match self.by_sni.get(sni) {
            Some(key) => Some(key.clone()),
            None => self.by_sni.get(&callee(sni)?.sni()).cloned(),
        }
    }
}

/// The service whose identity a server named `sni` must prove: the mesh service it names (in
/// this site or, through its east-west gateway, another: [`ServiceKey::site_sni`]), or the
/// egress gateway of an ExternalService name ([`mesh_api::policy::egress_sni`]).
pub fn callee(sni: &str) -> Option<ServiceKey> {
    ServiceKey::from_sni(sni)
        .or_else(|| ServiceKey::from_site_sni(sni).map(|(svc, _)| svc))
        .or_else(|| {
            let (_, gateway, namespace) = mesh_api::policy::parse_egress_sni(sni)?;
            Some(ServiceKey::new(namespace, gateway))
        })
}

/// Single-certificate client resolver (the source service's identity).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Most tickets kept per server name.
const TICKETS_PER_SERVER: usize = 8;

/// A client session store for TLS 1.3 tickets. A ticket carries the peer certificate of the
/// *first* full handshake of its chain (resumptions inherit it), so after the peer rotates, a
/// resumed session can present a certificate that has expired since. The outbound refuses such
/// a session, [`TicketStore::forget`]s that server's tickets and reconnects with a full
/// handshake, which starts a fresh chain.
#[derive(Debug)]
pub struct TicketStore {
    tickets: std::sync::Mutex<
        HashMap<
            ServerName<'static>,
            std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>,
        >,
    >,
    hints: rustls::client::ClientSessionMemoryCache,
}

impl TicketStore {
    fn new() -> Self {
        Self {
            tickets: std::sync::Mutex::new(HashMap::new()),
            hints: rustls::client::ClientSessionMemoryCache::new(64),
        }
    }

    /// Drops every ticket for `server_name`.
    pub fn forget(&self, server_name: &ServerName<'static>) {
        self.tickets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(server_name);
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.hints.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.hints.kx_hint(server_name)
    }

    // meshd speaks TLS 1.3 only.
    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut map = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let q = map.entry(server_name).or_default();
        if q.len() >= TICKETS_PER_SERVER {
            q.pop_front();
        }
        q.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let mut map = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let q = map.get_mut(server_name)?;
        q.pop_back()
    }
}

/// Tickets sent after each full handshake: each lets one later connection resume.
const TICKETS_PER_HANDSHAKE: usize = 4;

fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, tls::Error> {
    static TICKETER: std::sync::OnceLock<Arc<dyn rustls::server::ProducesTickets>> =
        std::sync::OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let t = rustls::crypto::ring::Ticketer::new()?;
    Ok(TICKETER.get_or_init(|| t).clone())
}

/// Builds the TLS state for `certs`.
pub fn build(certs: &Certs) -> Result<TlsState, tls::Error> {
    let by_sni = certs
        .workloads
        .iter()
        .map(|(svc, w)| (svc.sni(), w.key.clone()))
        .collect();
    let mut server = tls::server_config(
        certs.roots.clone(),
        Arc::new(SniResolver { by_sni }),
        false,
        &[ALPN_MESH_TCP, ALPN_MESH_H2],
    )?;
    // Stateless tickets (rotating keys) instead of rustls' default 256-entry session cache, which
    // a burst of new connections between two busy hosts evicts before the tickets are used. One
    // ticketer for the process, so tickets stay valid across certificate rotations.
    server.ticketer = ticketer()?;
    server.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    let td = certs.trust_domain.clone();
    let verifier = Arc::new(SpiffeVerifier::new(
        certs.roots.clone(),
        Box::new(move |name| match name {
            ServerName::DnsName(d) => callee(d.as_ref()).map(|k| Identity::workload(&td, &k)),
            _ => None,
        }),
    ));
    let mut clients = BTreeMap::new();
    for (svc, w) in &certs.workloads {
        let mut cfg = tls::client_config(
            verifier.clone(),
            Some(Arc::new(Fixed(w.key.clone()))),
            &[ALPN_MESH_TCP],
        )?;
        let tickets = Arc::new(TicketStore::new());
        cfg.resumption = rustls::client::Resumption::store(tickets.clone());
        // One ticket store for both: a ticket is bound to the server and identities, not to
        // the ALPN protocol.
        let mut h2 = cfg.clone();
        h2.alpn_protocols = vec![ALPN_MESH_H2.to_vec()];
        let fresh = |c: &ClientConfig| {
            let mut c = c.clone();
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        };
        clients.insert(
            svc.clone(),
            Client {
                fresh_config: fresh(&cfg),
                fresh_h2_config: fresh(&h2),
                config: Arc::new(cfg),
                h2_config: Arc::new(h2),
                tickets,
            },
        );
    }
    Ok(TlsState {
        trust_domain: certs.trust_domain.clone(),
        server: Arc::new(server),
        clients,
    })
}

/// Reason of a refused or closed connection whose peer certificate is on the deny-list.
pub const REASON_CERT_REVOKED: &str = "cert_revoked";

/// Every value [`failure_reason`] returns: the `reason` label values of a failed handshake,
/// whose series start at zero so a dashboard sees them before the first failure.
pub const FAILURE_REASONS: &[&str] = &[
    "peer_closed",
    "peer_reset",
    "handshake_io_error",
    "not_tls",
    "no_client_cert",
    "cert_expired",
    "cert_not_yet_valid",
    "untrusted_cert",
    "identity_mismatch",
    "bad_cert",
    "peer_alert",
    "unknown_service",
    "incompatible_peer",
    "handshake_error",
];

/// A bounded reason for a TLS failure, for metrics and logs.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    let Some(err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "peer_closed",
            std::io::ErrorKind::ConnectionReset => "peer_reset",
            _ => "handshake_io_error",
        };
    };
    match err {
        E::InvalidMessage(_) => "not_tls",
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "cert_expired",
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "cert_not_yet_valid"
        }
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "untrusted_cert",
        E::InvalidCertificate(C::Other(o))
            if o.0.downcast_ref::<tls::IdentityMismatch>().is_some() =>
        {
            "identity_mismatch"
        }
        E::InvalidCertificate(_) => "bad_cert",
        E::AlertReceived(_) => "peer_alert",
        E::General(m) if m.contains("no server certificate") => "unknown_service",
        E::General(m) if m.contains("no mesh identity") => "unknown_service",
        E::PeerIncompatible(_) => "incompatible_peer",
        _ => "handshake_error",
    }
}

/// A resumed TLS 1.3 session skips certificate verification, and its ticket can outlive the
/// peer's certificate. Returns true when the session was resumed and the peer's leaf has expired
/// since (or is not yet valid): such a connection must be refused like a full handshake would.
pub fn resumed_with_stale_cert(conn: &rustls::CommonState) -> bool {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return false;
    }
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return true;
    };
    match tls::validity(leaf) {
        Ok((not_before, not_after)) => {
            let now = std::time::SystemTime::now();
            now < not_before || now >= not_after
        }
        Err(_) => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use mesh_ca::{Authority, SignRequest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::identity::Workload;

    #[test]
    fn every_failure_reason_is_listed() {
        use rustls::{CertificateError as C, Error as E};
        let io = |k| std::io::Error::from(k);
        let tls = |e: E| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let errors = [
            io(std::io::ErrorKind::UnexpectedEof),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::TimedOut),
            tls(E::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            )),
            tls(E::NoCertificatesPresented),
            tls(E::InvalidCertificate(C::Expired)),
            tls(E::InvalidCertificate(C::NotValidYet)),
            tls(E::InvalidCertificate(C::UnknownIssuer)),
            tls(E::InvalidCertificate(C::BadEncoding)),
            tls(E::AlertReceived(rustls::AlertDescription::BadCertificate)),
            tls(E::General("no server certificate for x".into())),
            tls(E::PeerIncompatible(
                rustls::PeerIncompatible::Tls13RequiredForQuic,
            )),
            tls(E::HandshakeNotComplete),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for e in &errors {
            let r = failure_reason(e);
            assert!(FAILURE_REASONS.contains(&r), "{e:?} → {r} is not listed");
            seen.insert(r);
        }
        assert!(
            seen.len() >= 12,
            "the table exercises most reasons: {seen:?}"
        );
    }

    fn workload(ca: &Authority, svc: &ServiceKey, ttl: Duration) -> (Workload, SystemTime) {
        let now = SystemTime::now();
        let (issued, key_pem) = ca
            .issue(&SignRequest {
                identity: Identity::workload(ca.trust_domain(), svc),
                dns_names: vec![],
                ttl,
                now,
            })
            .unwrap();
        let w = Workload {
            key: tls::certified_key(&issued.chain_pem, &key_pem).unwrap(),
            not_before: issued.not_before,
            obtained: now,
            not_after: issued.not_after,
        };
        (w, issued.not_after)
    }

    fn certs(ca: &Authority, svc: &ServiceKey, w: Workload) -> Certs {
        Certs {
            trust_domain: ca.trust_domain().clone(),
            bundle_pem: ca.trust_bundle_pem(),
            roots: tls::root_store(&ca.trust_bundle_pem()).unwrap(),
            node_not_after: w.not_after,
            workloads: BTreeMap::from([(svc.clone(), w)]),
        }
    }

    /// Connects, reads the server's one byte (which delivers the tickets) and reports whether
    /// the session was resumed and whether its server certificate is stale.
    async fn connect(client: &Client, addr: std::net::SocketAddr, sni: &str) -> (bool, bool) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let mut s = tokio_rustls::TlsConnector::from(client.config.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        let conn = s.get_ref().1;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let stale = resumed_with_stale_cert(conn);
        let _ = s.shutdown().await;
        (resumed, stale)
    }

    /// The server rotates while the client holds tickets of its old certificate: once that
    /// certificate has expired, a resumption is recognised as stale, and after `forget` the
    /// next connection runs a full handshake against the new certificate.
    #[tokio::test]
    async fn resumption_of_an_expired_server_certificate_is_stale_until_forgotten() {
        let td = TrustDomain::new("mesh.test").unwrap();
        let (ca, _) = Authority::generate(&td, SystemTime::now()).unwrap();
        let web = ServiceKey::parse("default/web").unwrap();
        let api = ServiceKey::parse("default/api").unwrap();
        let long = Duration::from_secs(3600);
        let (client_w, _) = workload(&ca, &web, long);
        let client = build(&certs(&ca, &web, client_w)).unwrap().clients[&web].clone();
        let (short_w, short_end) = workload(&ca, &api, Duration::from_secs(2));
        let server = Arc::new(Mutex::new(
            build(&certs(&ca, &api, short_w)).unwrap().server,
        ));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let current = server.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let cfg = current.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                        return;
                    };
                    let _ = s.write_all(b"x").await;
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        });

        let sni = api.sni();
        assert_eq!(connect(&client, addr, &sni).await, (false, false), "full");
        assert_eq!(
            connect(&client, addr, &sni).await,
            (true, false),
            "resumed, certificate still valid"
        );

        // Rotate the server; the process-wide ticketer keeps old tickets decryptable.
        let (long_w, _) = workload(&ca, &api, long);
        *server.lock().unwrap() = build(&certs(&ca, &api, long_w)).unwrap().server;
        let wait = short_end
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(200)).await;

        assert_eq!(
            connect(&client, addr, &sni).await,
            (true, true),
            "resumed with the expired certificate: stale"
        );
        // The no-resumption config never offers the stale ticket, whatever the store holds.
        let fresh = Client {
            config: client.fresh_config.clone(),
            ..client.clone()
        };
        assert_eq!(
            connect(&fresh, addr, &sni).await,
            (false, false),
            "the fresh config runs a full handshake with stale tickets in the store"
        );
        client
            .tickets
            .forget(&ServerName::try_from(sni.clone()).unwrap());
        assert_eq!(
            connect(&client, addr, &sni).await,
            (false, false),
            "after forget: a full handshake with the new certificate"
        );
        assert_eq!(
            connect(&client, addr, &sni).await,
            (true, false),
            "and its tickets resume the fresh chain"
        );
    }
}
