//! This node's gossip keyring: loaded from `<data_dir>/gossip-keys.json` (so gossip works while
//! the registry is down), fetched from the registry on first start, kept in step with it
//! (`WatchGossipKeys`: persisted before use, then reported back), published as a `watch`
//! snapshot the sealed transport reads on every datagram.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::gossip_key::KeyMaterial;
use mesh_api::proto::v1 as pb;
use mesh_runtime::backoff::Backoff;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::control;
use crate::gossip_seal::{GossipKey, Keyring};

/// File holding the keyring, under the data dir (mode 0600: it is secret).
pub const KEYS_FILE: &str = "gossip-keys.json";
/// File mode of [`KEYS_FILE`].
const KEYS_FILE_MODE: u32 = 0o600;
/// First reconnect delay of the keyring watch.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest reconnect delay of the keyring watch.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a first start waits for the registry's keyring (a node cannot gossip without it).
pub const FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Keyring errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The keyring file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The keyring file or the registry's keyring is unusable.
    #[error("{what}: {reason}")]
    Invalid {
        /// Where it came from.
        what: String,
        /// Why.
        reason: String,
    },
    /// The registry could not be asked.
    #[error("fetching the gossip keyring from the registry: {0}")]
    Registry(#[from] control::Error),
    /// The registry did not answer in time on first start.
    #[error(
        "the registry sent no gossip keyring within {0:?}; a node cannot gossip without one (is the registry reachable?)"
    )]
    Timeout(Duration),
}

/// The keyring as stored on disk and sent by the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    revision: u64,
    /// Base64, primary first.
    keys: Vec<String>,
}

/// Builds a keyring from base64 keys, primary first. Pure.
pub fn keyring_from(keys: &[String]) -> Result<Keyring, String> {
    let mut parsed = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let material = KeyMaterial::from_base64(k).map_err(|e| format!("keys[{i}]: {e}"))?;
        parsed.push(GossipKey::from_bytes(*material.as_bytes()));
    }
    let mut it = parsed.into_iter();
    let primary = it.next().ok_or("no keys: a keyring needs at least one")?;
    Keyring::new(primary, it.collect()).map_err(|e| e.to_string())
}

/// Keeps the keyring in step with the registry.
pub struct GossipKeys {
    path: PathBuf,
    revision: u64,
    tx: watch::Sender<Arc<Keyring>>,
    revision_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl GossipKeys {
    /// The persisted keyring, or on first start (none persisted) the registry's, persisted
    /// before this returns.
    pub async fn load_or_fetch(
        data_dir: &Path,
        client: &control::Client,
        revision_gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Result<(Self, watch::Receiver<Arc<Keyring>>), Error> {
        let path = data_dir.join(KEYS_FILE);
        let (persisted, keyring) = match load(&path)? {
            Some(found) => {
                info!(revision = found.0.revision, path = %path.display(), "loaded the persisted gossip keyring");
                found
            }
            None => {
                info!("no gossip keyring yet; fetching the registry's");
                let first = async {
                    let mut stream = client.watch_gossip_keys().await?;
                    match stream.message().await {
                        Ok(Some(k)) => Ok(k),
                        Ok(None) => Err(Error::Invalid {
                            what: "the registry's gossip keyring watch".into(),
                            reason: "ended before sending a keyring".into(),
                        }),
                        Err(s) => Err(Error::Registry(s.into())),
                    }
                };
                let msg = tokio::time::timeout(FIRST_FETCH_TIMEOUT, first)
                    .await
                    .map_err(|_| Error::Timeout(FIRST_FETCH_TIMEOUT))??;
                let keyring = keyring_from(&msg.keys).map_err(|reason| Error::Invalid {
                    what: "the registry's gossip keyring".into(),
                    reason,
                })?;
                let p = Persisted {
                    revision: msg.revision,
                    keys: msg.keys,
                };
                store(&path, &p)?;
                (p, keyring)
            }
        };
        revision_gauge.set(persisted.revision as i64);
        let (tx, rx) = watch::channel(Arc::new(keyring));
        Ok((
            Self {
                path,
                revision: persisted.revision,
                tx,
                revision_gauge,
            },
            rx,
        ))
    }

    /// Follows the registry until `shutdown` turns true, reconnecting with jittered backoff.
    pub async fn run(mut self, client: control::Client, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        // Tell the registry what this node holds, even if nothing changes.
        let mut report_due = true;
        loop {
            let opened = tokio::select! {
                r = client.watch_gossip_keys() => r,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
            };
            match opened {
                Ok(mut stream) => loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
                    };
                    match msg {
                        Ok(Some(k)) => {
                            backoff.reset();
                            match self.apply(k) {
                                Ok(changed) => report_due |= changed,
                                Err(e) => {
                                    error!(error = %e, "gossip keyring not applied; keeping the one in hand")
                                }
                            }
                            if report_due {
                                match client.report_gossip_keys(self.revision).await {
                                    Ok(()) => report_due = false,
                                    Err(e) => {
                                        warn!(error = %e, "could not report the gossip keyring revision")
                                    }
                                }
                            }
                        }
                        Ok(None) => {
                            info!("gossip keyring watch ended by the registry; reconnecting");
                            break;
                        }
                        Err(status) => {
                            warn!(error = %control::Error::from(status), "gossip keyring watch failed; reconnecting");
                            break;
                        }
                    }
                },
                Err(e) => {
                    warn!(error = %e, revision = self.revision, "cannot open the gossip keyring watch; gossiping with the keyring in hand");
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
            }
        }
        debug!("gossip keyring watch stopped");
    }

    /// Persists then publishes a keyring from the registry; `Ok(false)` if it is the one in
    /// hand. Nothing is published unless it is valid and durable.
    fn apply(&mut self, msg: pb::GossipKeyring) -> Result<bool, Error> {
        if msg.revision == self.revision {
            return Ok(false);
        }
        let keyring = keyring_from(&msg.keys).map_err(|reason| Error::Invalid {
            what: format!("the registry's gossip keyring revision {}", msg.revision),
            reason,
        })?;
        store(
            &self.path,
            &Persisted {
                revision: msg.revision,
                keys: msg.keys,
            },
        )?;
        let primary = keyring.primary().id();
        let keys = 1 + keyring.others().len();
        self.tx.send_replace(Arc::new(keyring));
        info!(revision = msg.revision, primary = %primary, keys, "gossip keyring updated");
        self.revision = msg.revision;
        self.revision_gauge.set(msg.revision as i64);
        Ok(true)
    }
}

/// Reads the keyring file; `None` if there is none.
fn load(path: &Path) -> Result<Option<(Persisted, Keyring)>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let invalid = |reason: String| Error::Invalid {
        what: path.display().to_string(),
        reason,
    };
    let p: Persisted = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let keyring = keyring_from(&p.keys).map_err(invalid)?;
    Ok(Some((p, keyring)))
}

fn store(path: &Path, p: &Persisted) -> Result<(), Error> {
    let json = serde_json::to_vec_pretty(p).map_err(|e| Error::Invalid {
        what: path.display().to_string(),
        reason: e.to_string(),
    })?;
    crate::fsutil::write_atomic(path, &json, KEYS_FILE_MODE)
        .map_err(|(path, source)| Error::Io { path, source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> String {
        KeyMaterial::generate().unwrap().to_base64()
    }

    #[test]
    fn keyrings_from_base64_keys() {
        let (a, b) = (key(), key());
        let ring = keyring_from(&[a.clone(), b]).unwrap();
        assert_eq!(
            ring.primary().id().to_string(),
            KeyMaterial::from_base64(&a).unwrap().id().to_string()
        );
        assert_eq!(ring.others().len(), 1);
        #[rustfmt::skip]
        let bad: &[(Vec<String>, &str)] = &[
            (vec![], "no keys"),
            (vec!["AAAA".into()], "keys[0]: gossip key is 3 bytes"),
            (vec![a.clone(), "nope!".into()], "keys[1]"),
            (vec![a.clone(), a], "more than once"),
        ];
        for (keys, want) in bad {
            let e = keyring_from(keys).map(|_| ()).unwrap_err();
            assert!(e.contains(want), "{keys:?}: {e}");
        }
    }

    #[test]
    fn persisted_keyrings_round_trip_privately() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("meshd-gk-{}", std::process::id()));
        let path = dir.join(KEYS_FILE);
        assert!(load(&path).unwrap().is_none());
        let p = Persisted {
            revision: 3,
            keys: vec![key(), key()],
        };
        store(&path, &p).unwrap();
        let (back, ring) = load(&path).unwrap().unwrap();
        assert_eq!(back, p);
        assert_eq!(ring.others().len(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "{\"revision\": 1, \"keys\": [\"AAAA\"]}").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains(KEYS_FILE) && e.contains("keys[0]"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
