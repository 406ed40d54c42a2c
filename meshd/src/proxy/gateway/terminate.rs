//! TLS termination of a gateway's `https` listeners: certificate chains and keys read from files
//! on the host, the one served picked by the client's SNI among the certificates' own DNS names,
//! reloaded when the files change (new handshakes get the new certificate, open connections
//! keep theirs), TLS 1.2 and 1.3 or 1.3 only, and client certificates when a CA file is set.
//! One [`Terminator`] per distinct setting is shared by everything that holds it, with one file
//! watcher, so checking a listener before opening it and serving it load the files once.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use mesh_api::policy::{Hostname, Specificity, TlsTermination, TlsVersion};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How often the certificate and key files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why a listener's certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key, or they do not belong together.
    #[error("{path}: {source}")]
    Unusable {
        /// The certificate (or CA) file.
        path: String,
        /// Why.
        #[source]
        source: mesh_runtime::tls::Error,
    },
    /// rustls refused the settings (e.g. a client CA it cannot use).
    #[error("TLS settings refused: {0}")]
    Settings(#[from] rustls::Error),
    /// The client CA file's certificates cannot verify clients.
    #[error("client CA file {path}: {reason}")]
    ClientCa {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The TLS side of one https listener setting.
pub struct Terminator {
    /// Accepts client handshakes.
    pub acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    spec: TlsTermination,
}

/// The certificates in force and the file states they were read from.
#[derive(Debug)]
struct Loaded {
    /// Each certificate's DNS names (as host-name patterns) and key, in configured order.
    certs: Vec<(Vec<Hostname>, Arc<CertifiedKey>)>,
    stamps: Vec<Stamp>,
}

/// What tells a file changed: modification time and length (a renewed certificate differs in
/// both in practice; a file replaced by rename changes both too).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Picks the certificate for each handshake from the current [`Loaded`].
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<Loaded>>,
}

/// The index of the certificate to serve for `sni` among certificates with `names`: the one
/// whose names match it most specifically (exact over wildcard, longer wildcard over shorter;
/// ties to the first), else the first (also without SNI).
pub fn pick<'n>(names: impl IntoIterator<Item = &'n [Hostname]>, sni: Option<&str>) -> usize {
    let Some(sni) = sni.map(str::to_ascii_lowercase) else {
        return 0;
    };
    let mut best: Option<(Specificity, usize)> = None;
    for (i, ns) in names.into_iter().enumerate() {
        let Some(spec) = ns.iter().filter_map(|n| n.matches(&sni)).max() else {
            continue;
        };
        if best.is_none_or(|(b, _)| spec > b) {
            best = Some((spec, i));
        }
    }
    best.map_or(0, |(_, i)| i)
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let names = loaded.certs.iter().map(|(n, _)| n.as_slice());
        let i = pick(names, hello.server_name());
        loaded.certs.get(i).map(|(_, k)| k.clone())
    }
}

/// Reads every certificate and key of `spec`.
fn load(spec: &TlsTermination) -> Result<Loaded, Error> {
    let mut certs = Vec::with_capacity(spec.certificates.len());
    let mut stamps = Vec::new();
    for files in &spec.certificates {
        let chain = read(&files.cert_file, &mut stamps)?;
        let key = read(&files.key_file, &mut stamps)?;
        let unusable = |source| Error::Unusable {
            path: files.cert_file.clone(),
            source,
        };
        let certified = mesh_runtime::tls::certified_key(&chain, &key).map_err(unusable)?;
        // rustls checks the key only when asked: a chain and key that do not belong together
        // must be refused here, not fail every handshake later.
        certified.keys_match().map_err(|e| unusable(e.into()))?;
        let names = (certified.cert.first())
            .map(|leaf| mesh_runtime::tls::dns_sans(leaf))
            .unwrap_or_default()
            .iter()
            .filter_map(|n| Hostname::new(n).ok())
            .collect();
        certs.push((names, certified));
    }
    Ok(Loaded { certs, stamps })
}

fn read(path: &str, stamps: &mut Vec<Stamp>) -> Result<String, Error> {
    let err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    stamps.push(stamp(path).map_err(err)?);
    std::fs::read_to_string(path).map_err(err)
}

fn stamp(path: &str) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

/// The current state of every file `spec` reads, or `None` if one cannot be read.
fn stamps(spec: &TlsTermination) -> Option<Vec<Stamp>> {
    (spec.certificates.iter())
        .flat_map(|f| [&f.cert_file, &f.key_file])
        .map(|p| stamp(p).ok())
        .collect()
}

/// The rustls server settings of `spec`, serving what `resolver` picks.
fn server_config(spec: &TlsTermination, resolver: Arc<Resolver>) -> Result<ServerConfig, Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match spec.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = mesh_runtime::tls::provider();
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match &spec.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_err = |reason: String| Error::ClientCa {
                path: path.clone(),
                reason,
            };
            let pem = read(path, &mut Vec::new())?;
            let roots = mesh_runtime::tls::root_store(&pem).map_err(|e| ca_err(e.to_string()))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| ca_err(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

// === the shared terminators ===

/// Live terminators by setting (a handful per host: a linear scan is enough).
static LIVE: Mutex<Vec<(TlsTermination, Weak<Terminator>)>> = Mutex::new(Vec::new());

/// The terminator of `spec`: the live one if anything holds it, else loaded now (with a file
/// watcher that runs while it lives). Must be called within the tokio runtime.
pub fn terminator(spec: &TlsTermination) -> Result<Arc<Terminator>, Error> {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|(_, w)| w.strong_count() > 0);
    if let Some(t) = live
        .iter()
        .find(|(s, _)| s == spec)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(t);
    }
    let resolver = Arc::new(Resolver {
        current: RwLock::new(Arc::new(load(spec)?)),
    });
    let config = server_config(spec, resolver.clone())?;
    let t = Arc::new(Terminator {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        resolver,
        spec: spec.clone(),
    });
    live.push((spec.clone(), Arc::downgrade(&t)));
    tokio::spawn(watch(Arc::downgrade(&t)));
    Ok(t)
}

/// Reloads the certificates of `t` whenever their files change, until nothing holds it. A
/// change that cannot be loaded (a key written before its certificate, say) keeps the old
/// certificates and is tried again at the next change.
async fn watch(t: Weak<Terminator>) {
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let Some(t) = t.upgrade() else {
            return;
        };
        let old = t
            .resolver
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .stamps
            .clone();
        let Some(now) = stamps(&t.spec) else {
            continue;
        };
        if now == old {
            continue;
        }
        match load(&t.spec) {
            Ok(loaded) => {
                *t.resolver
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
                let files: Vec<&str> = t
                    .spec
                    .certificates
                    .iter()
                    .map(|c| c.cert_file.as_str())
                    .collect();
                info!(certificates = ?files, "gateway certificates reloaded");
            }
            Err(e) => {
                warn!(error = %e, "gateway certificates changed on disk but cannot be loaded; serving the previous ones");
                // Remember the new state, so a half-written pair is retried only when the
                // files change again (the next write completes it).
                let mut cur = t
                    .resolver
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                let certs = cur.certs.clone();
                *cur = Arc::new(Loaded { certs, stamps: now });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&[&str]]) -> Vec<Vec<Hostname>> {
        (list.iter())
            .map(|ns| ns.iter().map(|n| Hostname::new(n).unwrap()).collect())
            .collect()
    }

    #[test]
    fn sni_picks_the_most_specific_certificate() {
        let certs = names(&[
            &["default.example.net"],
            &["*.example.com"],
            &["shop.example.com", "www.example.com"],
            &["*.eu.example.com"],
        ]);
        let cases = [
            (None, 0),
            (Some("shop.example.com"), 2),
            (Some("SHOP.example.com"), 2),
            (Some("api.example.com"), 1),
            (Some("a.eu.example.com"), 3),
            (Some("example.com"), 0),
            (Some("other.org"), 0),
        ];
        for (sni, want) in cases {
            assert_eq!(pick(certs.iter().map(Vec::as_slice), sni), want, "{sni:?}");
        }
        assert_eq!(pick([], Some("x.org")), 0);
    }
}
