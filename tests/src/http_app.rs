//! An HTTP test app: answers every request (HTTP/1.1 or HTTP/2 without TLS) with a plain-text
//! report of what it received — its own name, protocol version, method, path, the identity
//! header meshd sets, and the body's length and digest — and counts connections and requests
//! so tests can see pooling and that denied requests never arrive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A running HTTP app; stops when dropped.
pub struct HttpApp {
    /// Bound address.
    pub addr: SocketAddr,
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
        let (c, r, name) = (connections.clone(), requests.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, name) = (r.clone(), name.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        report(name.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
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
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let header = |n: &str| {
        (parts.headers.get(n))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let text = format!(
        "app={name}\nversion={:?}\nmethod={}\npath={}\nauthority={}\nhost={}\nxfcc={}\nbody_len={}\nbody_sha={}\n",
        parts.version,
        parts.method,
        parts.uri.path(),
        parts
            .uri
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default(),
        header("host"),
        header("x-forwarded-client-cert"),
        body.len(),
        crate::apps::sha256(&body),
    );
    let status = (parts.uri.path().strip_prefix("/status/"))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp.headers_mut().insert(
        "x-app",
        http::HeaderValue::from_str(&name).unwrap_or(http::HeaderValue::from_static("?")),
    );
    Ok(resp)
}
