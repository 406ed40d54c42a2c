//! HTTP/1.1 upgrades (WebSocket and other `Upgrade:` protocols) across the mesh. Between hosts
//! an upgrade travels as an extended CONNECT (RFC 8441, `:protocol = websocket`) on the pooled
//! HTTP/2 connection, so it shares the mTLS connection with ordinary requests; each end turns
//! it back into the app's `GET` + `101 Switching Protocols` and then copies bytes both ways.

use http::HeaderMap;
use http::header::{self, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::super::copy::BUF_SIZE;
use super::super::shared::Shared;

/// The protocol an HTTP/1.1 request asks to switch to: `Connection` lists `upgrade` and
/// `Upgrade` names a protocol. `h2c` is not proxied (meshd already speaks HTTP/2 with apps that
/// want it), so it is `None` and the request goes on as plain HTTP/1.1.
pub fn requested(headers: &HeaderMap) -> Option<String> {
    let asks = (headers.get_all(header::CONNECTION).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    // The first protocol offered; later ones are fallbacks a proxy cannot negotiate for the app.
    let first = headers
        .get(header::UPGRADE)?
        .to_str()
        .ok()?
        .split(',')
        .next()?
        .trim();
    if first.is_empty() || first.eq_ignore_ascii_case("h2c") {
        return None;
    }
    Some(first.to_ascii_lowercase())
}

/// Adds the headers of an HTTP/1.1 upgrade for `protocol` (after hop-by-hop headers have been
/// stripped, which removed the caller's).
pub fn mark(headers: &mut HeaderMap, protocol: &str) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(protocol) {
        headers.insert(header::UPGRADE, v);
    }
}

/// Copies bytes between the two upgraded halves until both directions end, or until the
/// drain's grace period is over. Runs in its own task holding a drain guard.
pub fn tunnel(shared: &Shared, a: OnUpgrade, b: OnUpgrade, what: &'static str) {
    let guard = shared.drain.guard();
    let mut force = shared.force_rx.clone();
    tokio::spawn(async move {
        let _guard = guard;
        // Both halves resolve when their connections hand over (or fail); the drain deadline
        // bounds the wait too.
        let pair = tokio::select! {
            r = async { tokio::try_join!(a, b) } => r,
            _ = mesh_runtime::drain::until_true(&mut force) => return,
        };
        let (a, b) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, what, "upgrade did not complete");
                return;
            }
        };
        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
        tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUF_SIZE, BUF_SIZE) => match r {
                Ok((up, down)) => debug!(what, bytes.up = up, bytes.down = down, "upgraded connection closed"),
                Err(e) => debug!(what, error = %e, "upgraded connection ended with an error"),
            },
            _ = mesh_runtime::drain::until_true(&mut force) => {
                debug!(what, "upgraded connection closed at the end of the drain grace period");
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    type Case = (
        &'static [(&'static str, &'static str)],
        Option<&'static str>,
    );

    #[test]
    fn upgrade_requests_are_recognized() {
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (&[("connection", "Upgrade"), ("upgrade", "websocket")], Some("websocket")),
            (&[("connection", "keep-alive, upgrade"), ("upgrade", "WebSocket")], Some("websocket")),
            (&[("connection", "upgrade"), ("upgrade", "foo/2, bar")], Some("foo/2")),
            // Upgrade without Connection: upgrade is not a request to switch (RFC 9110 §7.8).
            (&[("upgrade", "websocket")], None),
            (&[("connection", "upgrade")], None),
            (&[("connection", "upgrade"), ("upgrade", "")], None),
            (&[("connection", "upgrade"), ("upgrade", "h2c")], None),
            (&[("connection", "close"), ("upgrade", "websocket")], None),
            (&[], None),
        ];
        for (headers, want) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in *headers {
                h.append(
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                );
            }
            assert_eq!(requested(&h).as_deref(), *want, "{headers:?}");
        }
    }

    #[test]
    fn marks_replace_whatever_was_there() {
        let mut h = HeaderMap::new();
        mark(&mut h, "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }
}
