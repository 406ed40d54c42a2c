//! On-disk identity state under `<data_dir>/identity/`: the node certificate, key and trust
//! bundle, and one certificate + key per local service. Each certificate and its key share one
//! file (mode 0600) written atomically (temp file, fsync, rename), so a crash can never pair a
//! new key with an old certificate.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mesh_api::{Identity, ServiceKey, TrustDomain};
use mesh_runtime::tls;

use super::Error;

/// The node's stored identity.
pub(crate) struct Node {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) bundle_pem: String,
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
    pub(crate) not_after: SystemTime,
    /// When this node obtained the certificate (the file's mtime when loaded): renewal is
    /// scheduled from here, not from `not_before`, which the CA backdates for clock skew.
    pub(crate) obtained: SystemTime,
}

/// A stored workload certificate.
pub(crate) struct Workload {
    pub(crate) identity: Identity,
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// When this node obtained the certificate (see [`Node::obtained`]).
    pub(crate) obtained: SystemTime,
}

/// The identity directory.
pub(crate) struct Dir {
    root: PathBuf,
}

impl Dir {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn err(&self, path: &Path, reason: impl ToString) -> Error {
        Error::Store {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }

    fn read_opt(&self, name: &str) -> Result<Option<String>, Error> {
        let path = self.root.join(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(&path, e)),
        }
    }

    /// When `name` was last written, clamped to `[not_before, now]`.
    fn obtained(&self, name: &str, not_before: SystemTime) -> SystemTime {
        let now = SystemTime::now();
        std::fs::metadata(self.root.join(name))
            .and_then(|m| m.modified())
            .unwrap_or(not_before)
            .clamp(not_before.min(now), now)
    }

    fn write(&self, name: &str, contents: &str, mode: u32) -> Result<(), Error> {
        crate::fsutil::write_atomic(&self.root.join(name), contents.as_bytes(), mode)
            .map_err(|(path, e)| self.err(&path, e))
    }

    /// The stored node identity, if the node has joined.
    pub(crate) fn load_node(&self) -> Result<Option<Node>, Error> {
        let (Some(td), Some(bundle_pem), Some(pair)) = (
            self.read_opt("trust-domain")?,
            self.read_opt("bundle.pem")?,
            self.read_opt("node.pem")?,
        ) else {
            return Ok(None);
        };
        let node_path = self.root.join("node.pem");
        let (chain_pem, key_pem) = split_pair(&pair).ok_or_else(|| {
            self.err(
                &node_path,
                "expected certificates followed by a private key",
            )
        })?;
        let trust_domain = TrustDomain::new(td.trim())
            .map_err(|e| self.err(&self.root.join("trust-domain"), e))?;
        let chain = tls::parse_certs(&chain_pem, "node certificate")
            .map_err(|e| self.err(&node_path, e))?;
        let (not_before, not_after) =
            tls::validity(&chain[0]).map_err(|e| self.err(&node_path, e))?;
        Ok(Some(Node {
            trust_domain,
            bundle_pem,
            chain_pem,
            key_pem,
            not_after,
            obtained: self.obtained("node.pem", not_before),
        }))
    }

    /// Stores the node identity; the certificate/key file is written last, so the trust
    /// bundle it chains to is always on disk first.
    pub(crate) fn save_node(&self, node: &Node) -> Result<(), Error> {
        self.write("bundle.pem", &node.bundle_pem, 0o644)?;
        self.write("trust-domain", node.trust_domain.as_str(), 0o644)?;
        self.write(
            "node.pem",
            &join_pair(&node.chain_pem, &node.key_pem),
            0o600,
        )
    }

    fn workload_file(svc: &ServiceKey) -> String {
        format!("workloads/{}.{}.pem", svc.namespace, svc.name)
    }

    /// The stored certificate of a local service.
    pub(crate) fn load_workload(&self, svc: &ServiceKey) -> Result<Option<Workload>, Error> {
        let file = Self::workload_file(svc);
        let Some(pair) = self.read_opt(&file)? else {
            return Ok(None);
        };
        let path = self.root.join(&file);
        let (chain_pem, key_pem) = split_pair(&pair)
            .ok_or_else(|| self.err(&path, "expected certificates followed by a private key"))?;
        let chain =
            tls::parse_certs(&chain_pem, "workload certificate").map_err(|e| self.err(&path, e))?;
        let Some(identity) = tls::peer_identity(&chain) else {
            return Err(self.err(&path, "certificate carries no mesh identity"));
        };
        tls::certified_key(&chain_pem, &key_pem).map_err(|e| self.err(&path, e))?;
        let (not_before, not_after) = tls::validity(&chain[0]).map_err(|e| self.err(&path, e))?;
        Ok(Some(Workload {
            identity,
            chain_pem,
            key_pem,
            not_before,
            not_after,
            obtained: self.obtained(&file, not_before),
        }))
    }

    /// Stores a workload certificate and key.
    pub(crate) fn save_workload(&self, svc: &ServiceKey, w: &Workload) -> Result<(), Error> {
        self.write(
            &Self::workload_file(svc),
            &join_pair(&w.chain_pem, &w.key_pem),
            0o600,
        )
    }
}

const KEY_MARKER: &str = "-----BEGIN PRIVATE KEY-----";

fn join_pair(chain_pem: &str, key_pem: &str) -> String {
    format!("{}\n{}", chain_pem.trim_end(), key_pem)
}

/// Splits a stored file into (certificate chain PEM, PKCS#8 key PEM).
fn split_pair(pair: &str) -> Option<(String, String)> {
    let at = pair.find(KEY_MARKER)?;
    Some((pair[..at].to_owned(), pair[at..].to_owned()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::{Duration, SystemTime};

    use mesh_api::{Identity, ServiceKey, TrustDomain};
    use mesh_runtime::tls;

    use super::*;

    /// A self-signed certificate and its key: enough to exercise storage (no chain checks).
    fn pair(id: &Identity) -> (String, String) {
        let (key_pem, _csr) = tls::new_key_and_csr(id).unwrap();
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_string()).unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key_pem)
    }

    #[test]
    fn node_and_workload_round_trip_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Dir::new(dir.path().join("identity"));
        assert!(store.load_node().unwrap().is_none());
        let td = TrustDomain::new("mesh.test").unwrap();
        let node_id = Identity::node(&td, &mesh_api::NodeName::new("n1").unwrap());
        let (chain, key) = pair(&node_id);
        let now = SystemTime::now();
        store
            .save_node(&Node {
                trust_domain: td.clone(),
                bundle_pem: chain.clone(),
                chain_pem: chain,
                key_pem: key.clone(),
                not_after: now + Duration::from_secs(60),
                obtained: now,
            })
            .unwrap();
        let loaded = store.load_node().unwrap().unwrap();
        assert_eq!(loaded.trust_domain, td);
        assert_eq!(loaded.key_pem, key);
        let mode = std::fs::metadata(dir.path().join("identity/node.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "certificate+key file is private");

        let svc = ServiceKey::parse("shop/api").unwrap();
        assert!(store.load_workload(&svc).unwrap().is_none());
        let wid = Identity::workload(&td, &svc);
        let (wchain, wkey) = pair(&wid);
        store
            .save_workload(
                &svc,
                &Workload {
                    identity: wid.clone(),
                    chain_pem: wchain,
                    key_pem: wkey,
                    not_before: now,
                    not_after: now,
                    obtained: now,
                },
            )
            .unwrap();
        assert_eq!(store.load_workload(&svc).unwrap().unwrap().identity, wid);

        // A file whose key does not match its certificate is reported, not used.
        let (other_chain, _) = pair(&wid);
        let (_, other_key) = pair(&wid);
        std::fs::write(
            dir.path().join("identity/workloads/shop.api.pem"),
            join_pair(&other_chain, &other_key),
        )
        .unwrap();
        assert!(store.load_workload(&svc).is_err());
        std::fs::write(
            dir.path().join("identity/workloads/shop.api.pem"),
            "garbage",
        )
        .unwrap();
        assert!(store.load_workload(&svc).is_err());
    }
}
