//! The deny-list as the data plane reads it: compiled once per policy snapshot, checked after
//! every TLS handshake (resumed ones too: rustls keeps the peer's chain in the ticket) and
//! watched by every open mTLS connection, so a revocation closes what a revoked certificate
//! carries instead of waiting for it to expire.

use std::sync::Arc;

use mesh_api::policy::{DenyList, Revocation, Snapshot};
use tokio::sync::watch;

/// Follows `policy_rx` and publishes the deny-list of each snapshot, only when it changed.
/// The task ends with discovery (sender dropped) or on `shutdown`.
pub fn compile(
    mut policy_rx: watch::Receiver<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<DenyList>> {
    let first = DenyList::from_snapshot(&policy_rx.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut last = Revocation::merged(&policy_rx.borrow());
        loop {
            tokio::select! {
                r = policy_rx.changed() => if r.is_err() { return },
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            }
            let next = Revocation::merged(&policy_rx.borrow_and_update());
            if next != last {
                let deny = next.deny_list();
                let (certs, nodes) = deny.len();
                tracing::info!(certificates = certs, nodes, "deny-list updated");
                tx.send_replace(Arc::new(deny));
                last = next;
            }
        }
    });
    rx
}

/// The serial of the peer's leaf certificate on a TLS connection, if it sent one.
pub fn peer_serial(conn: &rustls::CommonState) -> Option<String> {
    conn.peer_certificates()
        .and_then(mesh_runtime::tls::peer_serial)
}

/// The peer's serial when the deny-list refuses it.
pub fn denied_peer(deny: &DenyList, conn: &rustls::CommonState) -> Option<String> {
    peer_serial(conn).filter(|s| deny.denies_serial(s))
}

/// Resolves once `serial` is on the deny-list; never for `None` (no certificate), nor after
/// discovery is gone (the last list stays in force for connections already checked).
pub async fn until_denied(serial: Option<&str>, rx: &mut watch::Receiver<Arc<DenyList>>) {
    let Some(serial) = serial else {
        return std::future::pending().await;
    };
    loop {
        if rx.borrow_and_update().denies_serial(serial) {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_api::policy::{Resource, RevokedCert, Spec};

    fn snapshot(serials: &[&str]) -> Arc<Snapshot> {
        let mut r = Revocation::default();
        r.add_certs(serials.iter().map(|s| RevokedCert {
            serial: (*s).to_owned(),
            not_after: i64::MAX,
            identity: String::new(),
            node: String::new(),
            revoked_unix: 0,
        }));
        Arc::new(Snapshot::new(
            1,
            [Resource {
                key: Revocation::key(),
                spec: Spec::Revocation(r),
            }],
        ))
    }

    #[tokio::test]
    async fn a_connection_learns_of_its_revocation() {
        let (policy_tx, policy_rx) = watch::channel(snapshot(&[]));
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut deny_rx = compile(policy_rx, stop_rx);
        let mut mine = deny_rx.clone();
        let waiter = tokio::spawn(async move { until_denied(Some("0a"), &mut mine).await });
        policy_tx.send_replace(snapshot(&["0b"]));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "another serial does not close it");
        policy_tx.send_replace(snapshot(&["0a", "0b"]));
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("revoked within a second")
            .unwrap();
        assert!(deny_rx.borrow_and_update().denies_serial("0a"));
        let none = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            until_denied(None, &mut deny_rx),
        );
        assert!(none.await.is_err(), "no certificate: never denied");
    }
}
