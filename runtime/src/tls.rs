//! TLS for the mesh: PEM parsing, rustls server/client configs on the ring provider, a verifier
//! that checks the peer's SPIFFE identity instead of a DNS name, a verifier that pins the CA by
//! fingerprint for first contact, swappable certificates for rotation, and CSR creation.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use mesh_api::Identity;
use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// ALPN protocol id meshd speaks between hosts (raw TCP stream inside mTLS).
pub const ALPN_MESH_TCP: &[u8] = b"meshd/tcp/1";
/// ALPN protocol id of HTTP/2 between meshd hosts (requests of HTTP-family services,
/// multiplexed on pooled connections).
pub const ALPN_MESH_H2: &[u8] = b"meshd/h2/1";

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PEM text holds no certificate.
    #[error("no certificate found in PEM ({what})")]
    NoCertificate {
        /// What was being parsed.
        what: &'static str,
    },
    /// PEM could not be parsed.
    #[error("invalid PEM ({what}): {source}")]
    Pem {
        /// What was being parsed.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate could not be parsed as X.509.
    #[error("invalid X.509 certificate: {0}")]
    X509(String),
    /// rustls refused the material.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (e.g. empty trust bundle).
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Key or CSR generation failed.
    #[error("key or CSR generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The peer presented a certificate for another identity than the one we meant to reach.
#[derive(Debug)]
pub struct IdentityMismatch {
    /// What we expected.
    pub expected: String,
    /// URI SANs the peer presented.
    pub presented: Vec<String>,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer identity mismatch: expected {}, peer presented {:?}",
            self.expected, self.presented
        )
    }
}

impl std::error::Error for IdentityMismatch {}

/// The process-wide crypto provider (ring), preferring TLS_AES_128_GCM_SHA256: both ends are
/// meshd, and SHA-256 is hardware-accelerated on common x86 CPUs where SHA-384 is not (the
/// SHA-384 key schedule showed up in connection-setup profiles).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Installs ring as the process default so no dependency can pick another provider.
pub fn install_default_provider() {
    let _ = CryptoProvider::install_default((*provider()).clone());
}

/// All certificates in a PEM string, in order.
pub fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem { what, source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { what });
    }
    Ok(certs)
}

/// The private key in a PEM string (PKCS#8, SEC1 or PKCS#1).
pub fn parse_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| Error::Pem { what, source })
}

/// A rustls certified key from a PEM chain (leaf first) and its PEM private key.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, Error> {
    let chain = parse_certs(chain_pem, "certificate chain")?;
    let key = parse_key(key_pem, "private key")?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

/// A root store holding every certificate of a PEM trust bundle.
pub fn root_store(bundle_pem: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(bundle_pem, "trust bundle")? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// The URI SANs of a DER certificate (empty when it cannot be parsed).
pub fn uri_sans(cert_der: &[u8]) -> Vec<String> {
    sans(cert_der, |n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// The DNS SANs of a DER certificate, lowercased (empty when it cannot be parsed).
pub fn dns_sans(cert_der: &[u8]) -> Vec<String> {
    sans(cert_der, |n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
        _ => None,
    })
}

/// The subject alternative names of a DER certificate that `pick` keeps.
fn sans(
    cert_der: &[u8],
    pick: impl Fn(&x509_parser::extensions::GeneralName<'_>) -> Option<String>,
) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value.general_names.iter().filter_map(pick).collect()
}

/// The mesh identity a peer certificate chain proves (first URI SAN of the leaf).
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<Identity> {
    let leaf = chain.first()?;
    uri_sans(leaf).iter().find_map(|u| Identity::parse(u).ok())
}

/// The serial of a DER certificate as the mesh CA writes it: lowercase hex of the serial's
/// content octets, no colons (`None` when the certificate does not parse).
pub fn serial(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// The serial of a peer chain's leaf; see [`serial`].
pub fn peer_serial(chain: &[CertificateDer<'_>]) -> Option<String> {
    serial(chain.first()?)
}

/// The subject public key of a DER certificate (for an EC key: the uncompressed point).
pub fn public_key(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// The `notAfter` of a DER certificate.
pub fn not_after(cert_der: &[u8]) -> Result<SystemTime, Error> {
    Ok(validity(cert_der)?.1)
}

/// The `(notBefore, notAfter)` of a DER certificate.
pub fn validity(cert_der: &[u8]) -> Result<(SystemTime, SystemTime), Error> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| Error::X509(e.to_string()))?;
    let t = |secs: i64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    Ok((
        t(cert.validity().not_before.timestamp()),
        t(cert.validity().not_after.timestamp()),
    ))
}

/// SHA-256 of DER bytes.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A fresh ECDSA P-256 key (PKCS#8 PEM) and a CSR (PEM) asking for `identity`. The key is
/// created here and never leaves the host.
pub fn new_key_and_csr(identity: &Identity) -> Result<(String, String), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.to_string());
    let uri = Ia5String::try_from(identity.to_string())?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Server config requiring TLS 1.3 and a client certificate from `roots` (or, with
/// `client_auth_optional`, accepting clients without one — for the registry's join call).
pub fn server_config(
    roots: Arc<RootCertStore>,
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    client_auth_optional: bool,
    alpn: &[&[u8]],
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = if client_auth_optional {
        builder.allow_unauthenticated().build()?
    } else {
        builder.build()?
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Client config with our identity-checking verifier and an optional client certificate.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client_cert {
        Some(r) => builder.with_client_cert_resolver(r),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Maps the server name a client dialled to the identity the server must prove.
pub type ExpectFn = dyn Fn(&ServerName<'_>) -> Option<Identity> + Send + Sync;

/// Verifies a server's chain against the mesh trust bundle and then checks that the leaf
/// carries the SPIFFE identity we meant to reach (not a DNS name).
pub struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expect: Box<ExpectFn>,
}

impl SpiffeVerifier {
    /// A verifier that always expects `identity`.
    pub fn exact(roots: Arc<RootCertStore>, identity: Identity) -> Self {
        Self::new(roots, Box::new(move |_| Some(identity.clone())))
    }

    /// A verifier deriving the expected identity from the server name.
    pub fn new(roots: Arc<RootCertStore>, expect: Box<ExpectFn>) -> Self {
        Self {
            roots,
            provider: provider(),
            expect,
        }
    }
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier").finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let expected = (self.expect)(server_name).ok_or_else(|| {
            rustls::Error::General(format!(
                "no mesh identity known for server name {server_name:?}"
            ))
        })?;
        check_identity(end_entity, &expected.to_string())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn check_identity(end_entity: &CertificateDer<'_>, expected: &str) -> Result<(), rustls::Error> {
    let presented = uri_sans(end_entity);
    if presented.iter().any(|u| u == expected) {
        return Ok(());
    }
    Err(rustls::Error::InvalidCertificate(CertificateError::Other(
        OtherError(Arc::new(IdentityMismatch {
            expected: expected.to_owned(),
            presented,
        })),
    )))
}

/// First contact with the registry: the host has no trust bundle yet, only the CA fingerprint
/// from its join token. The server must send the pinned root in its chain; the chain is then
/// verified to that root and the leaf must be a registry identity.
pub struct PinnedRootVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedRootVerifier {
    /// Pins the root whose DER has this SHA-256.
    pub fn new(fingerprint: [u8; 32]) -> Self {
        Self {
            fingerprint,
            provider: provider(),
        }
    }
}

impl fmt::Debug for PinnedRootVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedRootVerifier").finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedRootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = intermediates
            .iter()
            .find(|c| sha256(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "registry did not present the CA pinned by the join token (wrong registry, or token from another mesh)"
                        .to_owned(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let is_registry = uri_sans(end_entity)
            .iter()
            .any(|u| matches!(Identity::parse(u), Ok(Identity::Registry { .. })));
        if !is_registry {
            return Err(rustls::Error::General(
                "server certificate is not a registry identity".to_owned(),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One certificate that can be replaced while connections keep using it: new handshakes see
/// the new certificate, established ones are untouched. Serves as both server and client
/// resolver.
pub struct CertSlot(RwLock<Option<Arc<CertifiedKey>>>);

impl CertSlot {
    /// A slot holding `key` (or nothing yet).
    pub fn new(key: Option<Arc<CertifiedKey>>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(key)))
    }

    /// Replaces the certificate for future handshakes.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// The current certificate.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The roots to verify peers against, replaceable at runtime (a root rotation): each new
/// handshake reads the current set.
pub struct RootsSlot(RwLock<Arc<RootCertStore>>);

impl RootsSlot {
    /// A slot holding `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(roots)))
    }

    /// Replaces the roots for future handshakes.
    pub fn set(&self, roots: Arc<RootCertStore>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = roots;
    }

    /// The current roots.
    pub fn get(&self) -> Arc<RootCertStore> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for RootsSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootsSlot").finish_non_exhaustive()
    }
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

#[cfg(test)]
mod tests;
