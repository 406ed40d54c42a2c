//! An HTTP test app: answers every request (HTTP/1.1 or HTTP/2 without TLS) with a plain-text
//! report of what it received — its own name, protocol version, method, path, the identity
//! header meshd sets, and the body's length and digest — and counts connections and requests
//! so tests can see pooling and that denied requests never arrive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// How an [`HttpApp`] misbehaves; every field can be changed while it runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Answer 503 to every `n`th request (0 = never), counting from the first.
    pub fail_every: AtomicU64,
    /// Answer every request with this status (0 = normal).
    pub status: std::sync::atomic::AtomicU16,
    /// Wait this many milliseconds before answering.
    pub delay_ms: AtomicU64,
}

/// A running HTTP app; stops when dropped.
pub struct HttpApp {
    /// Bound address.
    pub addr: SocketAddr,
    /// Its behaviour, adjustable at run time.
    pub behavior: Arc<Behavior>,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpApp {
    /// Serves on `addr` (port 0 allowed) as `name`.
    pub async fn start(addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let l = TcpListener::bind(addr).await?;
        let addr = l.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let behavior = Arc::new(Behavior::default());
        let (c, r, name) = (connections.clone(), requests.clone(), name.to_owned());
        let b = behavior.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, name, b) = (r.clone(), name.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                        report(name.clone(), b.clone(), n, req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            behavior,
            connections,
            requests,
            task,
        })
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn report(
    name: String,
    behavior: Arc<Behavior>,
    n: u64,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let delay = behavior.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let header = |n: &str| {
        (parts.headers.get(n))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    // The mesh's own headers that reached the app (none should).
    let mesh_headers: Vec<&str> = (parts.headers.keys())
        .map(http::HeaderName::as_str)
        .filter(|n| n.starts_with("x-mesh-"))
        .collect();
    let text = format!(
        "app={name}\nversion={:?}\nmethod={}\npath={}\nquery={}\nmesh_headers={}\nauthority={}\nhost={}\nxfcc={}\nxff={}\nforwarded={}\nxfp={}\nrequest_id={}\nbody_len={}\nbody_sha={}\n",
        parts.version,
        parts.method,
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        mesh_headers.join(","),
        parts
            .uri
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default(),
        header("host"),
        header("x-forwarded-client-cert"),
        header("x-forwarded-for"),
        header("forwarded"),
        header("x-forwarded-proto"),
        header("x-request-id"),
        body.len(),
        crate::apps::sha256(&body),
    );
    let fail_every = behavior.fail_every.load(Ordering::SeqCst);
    let forced = behavior.status.load(Ordering::SeqCst);
    let status = if forced != 0 {
        forced
    } else if fail_every != 0 && n.is_multiple_of(fail_every) {
        503
    } else {
        (parts.uri.path().strip_prefix("/status/"))
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(200)
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp.headers_mut().insert(
        "x-app",
        http::HeaderValue::from_str(&name).unwrap_or(http::HeaderValue::from_static("?")),
    );
    // A hostile app tries to speak for the mesh: `/forge` answers with the mesh's headers.
    if parts.uri.path().starts_with("/forge") {
        let h = resp.headers_mut();
        h.insert(
            "x-mesh-error",
            http::HeaderValue::from_static("inbound/forged_by_app"),
        );
        h.insert("x-mesh-anything", http::HeaderValue::from_static("forged"));
        h.insert(
            "x-forwarded-client-cert",
            http::HeaderValue::from_static("By=forged;URI=spiffe://mesh.test/ns/default/svc/admin"),
        );
    }
    Ok(resp)
}

/// What one request through the mesh got.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `x-app` of the answering instance, empty when the mesh answered.
    pub app: String,
    /// `x-mesh-error`, empty when the mesh did not produce the response.
    pub mesh_error: String,
    /// `retry-after`, if any.
    pub retry_after: Option<String>,
    /// How long the request took.
    pub elapsed: std::time::Duration,
}

/// A keep-alive HTTP/1.1 client for driving many requests.
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A new client with its own connection pool.
    pub fn new() -> Self {
        Self {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `GET http://{addr}{path}` with `headers`.
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut req = Request::get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let started = std::time::Instant::now();
        let request = self.inner.request(req.body(Full::new(Bytes::new()))?);
        let resp = tokio::time::timeout(crate::scaled(crate::CLIENT_TIMEOUT), request)
            .await
            .with_context(|| format!("GET {path} from {addr}: no answer"))??;
        let h = |n: &str| {
            (resp.headers().get(n))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let reply = Reply {
            status: resp.status().as_u16(),
            app: h("x-app").unwrap_or_default(),
            mesh_error: h("x-mesh-error").unwrap_or_default(),
            retry_after: h("retry-after"),
            elapsed: std::time::Duration::ZERO,
        };
        tokio::time::timeout(
            crate::scaled(crate::CLIENT_TIMEOUT),
            resp.into_body().collect(),
        )
        .await
        .with_context(|| format!("GET {path} from {addr}: body did not end"))??;
        Ok(Reply {
            elapsed: started.elapsed(),
            ..reply
        })
    }

    /// `n` GETs with at most `concurrency` in flight; every reply, in completion order.
    pub async fn get_many(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        n: usize,
        concurrency: usize,
    ) -> anyhow::Result<Vec<Reply>> {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        let headers: Vec<(String, String)> = (headers.iter())
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for _ in 0..concurrency.max(1) {
            let (c, next, path, headers) =
                (self.clone(), next.clone(), path.to_owned(), headers.clone());
            tasks.spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < n as u64 {
                    let hs: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    out.push(c.get(addr, &path, &hs).await?);
                }
                Ok::<_, anyhow::Error>(out)
            });
        }
        let mut all = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        Ok(all)
    }
}

/// How many of `replies` each answering app (or mesh error) got.
pub fn tally(replies: &[Reply]) -> std::collections::BTreeMap<String, usize> {
    let mut t = std::collections::BTreeMap::new();
    for r in replies {
        let who = if r.app.is_empty() {
            format!("{} {}", r.status, r.mesh_error)
        } else {
            format!("{} {}", r.status, r.app)
        };
        *t.entry(who).or_insert(0) += 1;
    }
    t
}
