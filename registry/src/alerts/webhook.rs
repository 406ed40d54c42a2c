//! Delivery of SLO alert webhooks: one JSON POST per alert event, in its own task so the
//! evaluator never waits, with a timeout per attempt and a few retries with backoff. Plain
//! `http://` goes through hyper-util's client; `https://` through tokio-rustls (ring provider)
//! with the system's trust roots, read once on first use.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;
use tracing::{Instrument as _, debug, info, warn};

use super::WebhookLabels;

/// Time allowed for one attempt: connect, TLS, request and response head.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per alert event before it is given up (logged and counted as failed).
pub const WEBHOOK_ATTEMPTS: u32 = 4;
/// Wait after the first failed attempt; doubled after each further one (1 s, 2 s, 4 s).
pub const WEBHOOK_BACKOFF: Duration = Duration::from_secs(1);
/// Where the system's trust roots are looked for, in order (Debian family, RHEL family).
pub const SYSTEM_ROOTS: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not `http://` or `https://` with a host.
    #[error("the webhook URL is not an http:// or https:// URL with a host")]
    BadUrl,
    /// No trust roots could be loaded for `https://`.
    #[error("no usable trust roots for https webhooks: {reason}")]
    NoTrustRoots {
        /// What went wrong, per file.
        reason: String,
    },
    /// The TCP connection failed.
    #[error("connecting to {authority} failed")]
    Connect {
        /// `host:port`.
        authority: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (e.g. the certificate is not trusted for the host).
    #[error("TLS handshake with {host} failed")]
    Tls {
        /// The host name.
        host: String,
        /// The I/O error carrying the rustls error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange over HTTPS failed.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// The plain-HTTP client failed.
    #[error("HTTP request failed")]
    Client(#[source] hyper_util::client::legacy::Error),
    /// The webhook answered, but not with a 2xx.
    #[error("the webhook answered {0}")]
    Status(StatusCode),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Timeout, attempts and backoff of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts in all.
    pub attempts: u32,
    /// First wait between attempts, doubled after each.
    pub backoff: Duration,
}

/// Sends webhooks. Cloning is cheap and shares the clients.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<HttpConnector, Full<Bytes>>,
    /// Built on the first `https://` delivery; a failure is kept (and reported per delivery)
    /// rather than retried, since the roots on disk do not change under a running registry.
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    retry: Retry,
    outcomes: Family<WebhookLabels, Counter>,
    /// Becomes `true` when the registry drains: pending retries are dropped then.
    shutdown: watch::Receiver<bool>,
}

// === impl Retry ===

impl Default for Retry {
    fn default() -> Self {
        Self {
            timeout: WEBHOOK_TIMEOUT,
            attempts: WEBHOOK_ATTEMPTS,
            backoff: WEBHOOK_BACKOFF,
        }
    }
}

// === impl Delivery ===

impl Delivery {
    /// Counts outcomes in `outcomes`; retries stop once `shutdown` holds `true`.
    pub fn new(outcomes: Family<WebhookLabels, Counter>, shutdown: watch::Receiver<bool>) -> Self {
        Self::with(Retry::default(), OnceLock::new(), outcomes, shutdown)
    }

    fn with(
        retry: Retry,
        tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
        outcomes: Family<WebhookLabels, Counter>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let http = Client::builder(TokioExecutor::new()).build_http();
        Self {
            inner: Arc::new(Inner {
                http,
                tls,
                retry,
                outcomes,
                shutdown,
            }),
        }
    }

    /// POSTs `body` (JSON) to `url` in a new task, in the current span. Fire-and-forget: the
    /// task is bounded by attempts × (timeout + backoff) and stops retrying when the registry
    /// drains, so nothing needs to wait for it.
    pub fn spawn(&self, url: String, body: Vec<u8>) {
        let this = self.clone();
        tokio::spawn(async move { this.deliver(&url, Bytes::from(body)).await }.in_current_span());
    }

    /// Tries up to `retry.attempts` times; true once delivered.
    async fn deliver(&self, url: &str, body: Bytes) -> bool {
        let retry = self.inner.retry;
        // The URL may carry a secret (tokens in paths are common), so logs show the host only.
        let parsed = url.parse::<Uri>().ok().filter(|u| u.host().is_some());
        let host = parsed
            .as_ref()
            .and_then(|u| u.authority())
            .map_or_else(String::new, ToString::to_string);
        let mut shutdown = self.inner.shutdown.clone();
        let mut backoff = retry.backoff;
        let mut last = Error::BadUrl;
        if let Some(uri) = &parsed {
            for attempt in 1..=retry.attempts {
                let result = tokio::time::timeout(retry.timeout, self.post(uri, body.clone()))
                    .await
                    .unwrap_or(Err(Error::TimedOut(retry.timeout)));
                match result {
                    Ok(()) => {
                        self.count("delivered");
                        info!(webhook.host = %host, attempt, "slo webhook delivered");
                        return true;
                    }
                    Err(e) => {
                        debug!(webhook.host = %host, attempt, error = %error_chain(&e), "slo webhook attempt failed");
                        last = e;
                    }
                }
                if attempt == retry.attempts {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
                }
                backoff = backoff.saturating_mul(2);
            }
        }
        self.count("failed");
        warn!(
            webhook.host = %host,
            attempts = retry.attempts,
            error = %error_chain(&last),
            "slo webhook not delivered; the alert is still in the metrics and logs"
        );
        false
    }

    fn count(&self, outcome: &'static str) {
        self.inner
            .outcomes
            .get_or_create(&WebhookLabels { outcome })
            .inc();
    }

    /// One attempt.
    async fn post(&self, uri: &Uri, body: Bytes) -> Result<(), Error> {
        let authority = uri.authority().ok_or(Error::BadUrl)?.to_string();
        let status = match uri.scheme_str() {
            Some("http") => {
                let req = request(uri.clone(), &authority, body);
                let resp = self.inner.http.request(req).await.map_err(Error::Client)?;
                resp.status()
            }
            Some("https") => self.post_tls(uri, &authority, body).await?,
            _ => return Err(Error::BadUrl),
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(Error::Status(status))
        }
    }

    async fn post_tls(&self, uri: &Uri, authority: &str, body: Bytes) -> Result<StatusCode, Error> {
        let config = self
            .inner
            .tls
            .get_or_init(|| system_tls().map(Arc::new))
            .clone()
            .map_err(|reason| Error::NoTrustRoots { reason })?;
        let host = uri.host().ok_or(Error::BadUrl)?;
        // An IPv6 literal comes bracketed in a URI; names and connects want it bare.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|source| Error::Connect {
                authority: authority.to_owned(),
                source,
            })?;
        let name = ServerName::try_from(host.to_owned()).map_err(|_| Error::BadUrl)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| Error::Tls {
                host: host.to_owned(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(Error::Http)?;
        // Fire-and-forget: the connection ends when `sender` is dropped at the end of this
        // attempt (or the attempt's timeout drops it).
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "webhook connection ended with an error");
                }
            }
            .in_current_span(),
        );
        let path = uri
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);
        let resp = sender
            .send_request(request(path, authority, body))
            .await
            .map_err(Error::Http)?;
        Ok(resp.status())
    }
}

fn request(uri: Uri, authority: &str, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(USER_AGENT, http::HeaderValue::from_static("mesh-registry"));
    if let Ok(host) = http::HeaderValue::from_str(authority) {
        headers.insert(HOST, host);
    }
    req
}

/// A TLS client trusting the system's roots, on ring.
fn system_tls() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut problems = Vec::new();
    for path in SYSTEM_ROOTS {
        match CertificateDer::pem_file_iter(path) {
            Ok(certs) => {
                roots.add_parsable_certificates(certs.filter_map(Result::ok));
            }
            Err(e) => problems.push(format!("{path}: {e}")),
        }
        if !roots.is_empty() {
            break;
        }
    }
    if roots.is_empty() {
        problems.push("no certificates found".to_owned());
        return Err(problems.join("; "));
    }
    client_config(roots).map_err(|e| e.to_string())
}

fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `error: cause: cause`, for one log field.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests;
