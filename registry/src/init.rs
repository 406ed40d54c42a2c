//! `mesh-registry init`: creates (or imports) the mesh CA, the operator's admin credentials,
//! read-only viewer credentials, the first gossip key and the registry config in a fresh data
//! directory.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_api::gossip_key::KeyId;
use mesh_api::name::Label;
use mesh_api::{Identity, TrustDomain};
use mesh_ca::{Authority, CaFiles, SignRequest};

use crate::config::Config;
use crate::keyring;
use crate::store::{SledStore, Store as _};

/// Lifetime of the operator credential written by init.
pub const DEFAULT_ADMIN_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Name of the first operator identity (`spiffe://<td>/admin/operator`).
pub const DEFAULT_ADMIN_NAME: &str = "operator";
/// Name of the read-only identity (`spiffe://<td>/viewer/viewer`).
pub const DEFAULT_VIEWER_NAME: &str = "viewer";
/// The sled database's directory inside the data dir.
pub const STORE_DIR: &str = "store";

/// Why init failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory already holds a mesh.
    #[error("{0} already holds a mesh CA; refusing to overwrite it (choose another --data-dir)")]
    AlreadyInitialised(PathBuf),
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// CA creation, import or signing failed.
    #[error("certificate authority: {0}")]
    Ca(#[from] mesh_ca::Error),
    /// Creating the registry store or its first gossip key failed.
    #[error("registry store at {path}: {source}")]
    Store {
        /// The store directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: keyring::Error,
    },
}

/// Operator-provided CA material to import instead of generating a new root.
#[derive(Debug, Clone)]
pub struct Import {
    /// Root certificate PEM file.
    pub root_cert: PathBuf,
    /// Intermediate certificate PEM file.
    pub intermediate_cert: PathBuf,
    /// Intermediate private key PEM file (PKCS#8).
    pub intermediate_key: PathBuf,
}

/// A new site of an existing mesh: its own signing intermediate under the mesh's root.
#[derive(Debug, Clone)]
pub struct Join {
    /// The `ca/` directory of a site that holds the root key (`root.pem`, `root-key.pem`,
    /// `intermediate.pem`, `intermediate-key.pem`).
    pub ca_dir: PathBuf,
    /// The new site's name (in its intermediate's subject).
    pub site: Label,
}

/// What init should make.
#[derive(Debug, Clone)]
pub struct Args {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory to create.
    pub data_dir: PathBuf,
    /// gRPC listen address for the config.
    pub listen: SocketAddr,
    /// Admin listen address for the config.
    pub admin_listen: SocketAddr,
    /// Import instead of generate.
    pub import: Option<Import>,
    /// Join an existing mesh's root as a new site instead of generating a root.
    pub join: Option<Join>,
}

/// What init made.
#[derive(Debug, Clone)]
pub struct Report {
    /// The registry config file.
    pub config_file: PathBuf,
    /// Directory with operator credentials for meshctl.
    pub admin_dir: PathBuf,
    /// `sha256:` fingerprint of the root.
    pub root_fingerprint: String,
    /// Whether a root key was generated and stored.
    pub root_key_stored: bool,
    /// Operator identity.
    pub admin_identity: Identity,
    /// Directory with read-only credentials for meshctl (same file names as `admin_dir`).
    pub viewer_dir: PathBuf,
    /// Read-only identity.
    pub viewer_identity: Identity,
    /// Id of the first gossip key (the key itself stays in the store).
    pub gossip_key_id: KeyId,
}

/// Paths of the CA files inside a data dir.
pub struct CaPaths {
    /// Root certificate.
    pub root_cert: PathBuf,
    /// Root key (only when generated here).
    pub root_key: PathBuf,
    /// Intermediate certificate.
    pub intermediate_cert: PathBuf,
    /// Intermediate key.
    pub intermediate_key: PathBuf,
}

impl CaPaths {
    /// The layout under `data_dir/ca`.
    pub fn new(data_dir: &Path) -> Self {
        Self::in_dir(&data_dir.join("ca"))
    }

    /// The same file names in `ca` (the next CA of a root rotation lives in `ca/next`).
    pub fn in_dir(ca: &Path) -> Self {
        Self {
            root_cert: ca.join("root.pem"),
            root_key: ca.join("root-key.pem"),
            intermediate_cert: ca.join("intermediate.pem"),
            intermediate_key: ca.join("intermediate-key.pem"),
        }
    }

    /// Reads the CA files (the root key is optional).
    pub fn read(&self) -> Result<CaFiles, Error> {
        Ok(CaFiles {
            root_cert_pem: read(&self.root_cert)?,
            root_key_pem: read(&self.root_key).ok(),
            intermediate_cert_pem: read(&self.intermediate_cert)?,
            intermediate_key_pem: read(&self.intermediate_key)?,
        })
    }
}

/// The sled database's directory inside `data_dir`.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(STORE_DIR)
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to a new file with `mode` (0600 for keys).
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Creates the mesh in `args.data_dir`.
pub fn run(args: &Args, now: SystemTime) -> Result<Report, Error> {
    let paths = CaPaths::new(&args.data_dir);
    if paths.intermediate_cert.exists() {
        return Err(Error::AlreadyInitialised(args.data_dir.clone()));
    }
    let (ca, files) = match (&args.import, &args.join) {
        (Some(imp), _) => Authority::import(
            &args.trust_domain,
            &read(&imp.root_cert)?,
            &read(&imp.intermediate_cert)?,
            &read(&imp.intermediate_key)?,
            now,
        )?,
        (None, Some(join)) => {
            let root = CaPaths::in_dir(&join.ca_dir).read()?;
            let site = join.site.as_str();
            let files = Authority::site_intermediate(&args.trust_domain, &root, site, now)?;
            (Authority::load(&args.trust_domain, &files, now)?, files)
        }
        (None, None) => Authority::generate(&args.trust_domain, now)?,
    };
    let (store, gossip_key_id) = create_store(&store_dir(&args.data_dir))?;
    write(&paths.root_cert, &files.root_cert_pem, 0o644)?;
    if let Some(key) = &files.root_key_pem {
        write(&paths.root_key, key, 0o600)?;
    }
    write(
        &paths.intermediate_cert,
        &files.intermediate_cert_pem,
        0o644,
    )?;
    write(&paths.intermediate_key, &files.intermediate_key_pem, 0o600)?;

    let admin_identity = Identity::Admin {
        trust_domain: args.trust_domain.clone(),
        name: Label::new(DEFAULT_ADMIN_NAME).expect("default admin name is a label"),
    };
    let admin_dir = args.data_dir.join("admin");
    let admin_cert = write_credentials(&ca, &admin_identity, &admin_dir, args.listen, now)?;
    let viewer_identity = Identity::Viewer {
        trust_domain: args.trust_domain.clone(),
        name: Label::new(DEFAULT_VIEWER_NAME).expect("default viewer name is a label"),
    };
    let viewer_dir = args.data_dir.join("viewer");
    let viewer_cert = write_credentials(&ca, &viewer_identity, &viewer_dir, args.listen, now)?;
    // Recorded so `meshctl credentials list` shows them and `revoke` can name them.
    for issued in [&admin_cert, &viewer_cert] {
        store
            .put_cert(&crate::api::credential_record(issued, now))
            .map_err(|e| Error::Store {
                path: store_dir(&args.data_dir),
                source: e.into(),
            })?;
    }
    drop(store);
    let config_file = args.data_dir.join("registry.toml");
    let data_dir = std::fs::canonicalize(&args.data_dir).unwrap_or_else(|_| args.data_dir.clone());
    write(
        &config_file,
        &Config::render(
            &args.trust_domain,
            &data_dir,
            args.listen,
            args.admin_listen,
        ),
        0o644,
    )?;
    Ok(Report {
        config_file,
        admin_dir,
        root_fingerprint: ca.root_fingerprint(),
        root_key_stored: files.root_key_pem.is_some(),
        admin_identity,
        viewer_dir,
        viewer_identity,
        gossip_key_id,
    })
}

/// Creates the store with the first gossip keyring and returns its key's id. Done before any
/// CA file is written: a failure here leaves a data dir that init may be run on again.
fn create_store(dir: &Path) -> Result<(SledStore, KeyId), Error> {
    let store_err = |source| Error::Store {
        path: dir.to_owned(),
        source,
    };
    let store = SledStore::open(dir).map_err(|e| store_err(e.into()))?;
    let ensured = keyring::ensure(&store).map_err(store_err)?;
    Ok((store, ensured.primary))
}

/// Writes meshctl credentials for `identity` into `dir`: `ca.pem`, `admin.pem` (chain),
/// `admin-key.pem` and `meshctl.toml`. The file names are meshctl's, whatever the identity.
fn write_credentials(
    ca: &Authority,
    identity: &Identity,
    dir: &Path,
    registry: SocketAddr,
    now: SystemTime,
) -> Result<mesh_ca::Issued, Error> {
    let (issued, key) = ca.issue(&SignRequest {
        identity: identity.clone(),
        dns_names: Vec::new(),
        ttl: DEFAULT_ADMIN_CERT_TTL,
        now,
    })?;
    write(&dir.join("ca.pem"), &ca.trust_bundle_pem(), 0o644)?;
    write(&dir.join("admin.pem"), &issued.chain_pem, 0o644)?;
    write(&dir.join("admin-key.pem"), &key, 0o600)?;
    write(
        &dir.join("meshctl.toml"),
        &format!(
            "# meshctl credentials ({identity}) written by mesh-registry init\nregistry = \"{registry}\"\n"
        ),
        0o644,
    )?;
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use mesh_api::gossip_key::KeyMaterial;

    use super::*;

    fn args(data_dir: PathBuf) -> Args {
        Args {
            trust_domain: TrustDomain::new("mesh.test").unwrap(),
            data_dir,
            listen: "127.0.0.1:7700".parse().unwrap(),
            admin_listen: "127.0.0.1:7701".parse().unwrap(),
            import: None,
            join: None,
        }
    }

    #[test]
    fn a_second_site_joins_the_root_with_its_own_intermediate() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path().join("a"));
        let ra = run(&a, SystemTime::now()).unwrap();
        let b = Args {
            data_dir: dir.path().join("b"),
            join: Some(Join {
                ca_dir: a.data_dir.join("ca"),
                site: Label::new("b").unwrap(),
            }),
            ..args(dir.path().join("unused"))
        };
        let rb = run(&b, SystemTime::now()).unwrap();
        assert_eq!(rb.root_fingerprint, ra.root_fingerprint, "one root");
        assert!(!rb.root_key_stored, "the new site holds no root key");
        let (fa, fb) = (
            CaPaths::new(&a.data_dir).read().unwrap(),
            CaPaths::new(&b.data_dir).read().unwrap(),
        );
        assert_ne!(fa.intermediate_cert_pem, fb.intermediate_cert_pem);
        let cfg = Config::load(&rb.config_file).unwrap();
        Authority::load(&cfg.trust_domain, &fb, SystemTime::now()).unwrap();
        // Site b's operator credentials chain to the root site a trusts.
        let chain = std::fs::read_to_string(rb.admin_dir.join("admin.pem")).unwrap();
        let bundle = std::fs::read_to_string(ra.admin_dir.join("ca.pem")).unwrap();
        let roots = mesh_runtime::tls::root_store(&bundle).unwrap();
        let certs = mesh_runtime::tls::parse_certs(&chain, "b's operator").unwrap();
        let verifier = mesh_runtime::tls::SpiffeVerifier::exact(roots, rb.admin_identity);
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(
                &certs[0],
                &certs[1..],
                &rustls_pki_types::ServerName::try_from("registry.mesh").unwrap(),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        // A site without the root key cannot start another.
        let c = Args {
            data_dir: dir.path().join("c"),
            join: Some(Join {
                ca_dir: b.data_dir.join("ca"),
                site: Label::new("c").unwrap(),
            }),
            ..args(dir.path().join("unused"))
        };
        let e = run(&c, SystemTime::now()).unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
    }

    #[test]
    fn creates_the_first_gossip_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path().join("reg"));
        let report = run(&args, SystemTime::now()).unwrap();
        let store = crate::store::tests::reopen(&store_dir(&args.data_dir)).unwrap();
        let keyring = store.get_gossip_keyring().unwrap().unwrap();
        assert_eq!(keyring.revision, keyring::FIRST_REVISION);
        assert_eq!(keyring.keys.len(), 1);
        let key = KeyMaterial::from_base64(&keyring.keys[0]).unwrap();
        assert_eq!(key.id(), report.gossip_key_id);
    }

    #[test]
    fn creates_then_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path().join("reg"));
        let report = run(&args, SystemTime::now()).unwrap();
        assert!(report.root_key_stored);
        let cfg = Config::load(&report.config_file).unwrap();
        assert_eq!(cfg.trust_domain.as_str(), "mesh.test");
        let files = CaPaths::new(&args.data_dir).read().unwrap();
        Authority::load(&cfg.trust_domain, &files, SystemTime::now()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(report.admin_dir.join("admin-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(report.viewer_dir, args.data_dir.join("viewer"));
        assert_eq!(
            report.viewer_identity.to_string(),
            "spiffe://mesh.test/viewer/viewer"
        );
        for (dir, identity) in [
            (&report.admin_dir, &report.admin_identity),
            (&report.viewer_dir, &report.viewer_identity),
        ] {
            let chain = std::fs::read_to_string(dir.join("admin.pem")).unwrap();
            let certs = mesh_runtime::tls::parse_certs(&chain, "test").unwrap();
            assert_eq!(
                mesh_runtime::tls::peer_identity(&certs).as_ref(),
                Some(identity)
            );
            let toml = std::fs::read_to_string(dir.join("meshctl.toml")).unwrap();
            assert!(toml.contains("registry = \"127.0.0.1:7700\""), "{toml}");
            let mode = std::fs::metadata(dir.join("admin-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", dir.display());
            assert!(dir.join("ca.pem").exists());
        }
        assert!(matches!(
            run(&args, SystemTime::now()),
            Err(Error::AlreadyInitialised(_))
        ));

        // Import the same material into a second data dir: same fingerprint, no root key.
        let p = CaPaths::new(&args.data_dir);
        let args2 = Args {
            data_dir: dir.path().join("reg2"),
            import: Some(Import {
                root_cert: p.root_cert.clone(),
                intermediate_cert: p.intermediate_cert.clone(),
                intermediate_key: p.intermediate_key,
            }),
            join: None,
            ..args
        };
        let r2 = run(&args2, SystemTime::now()).unwrap();
        assert_eq!(r2.root_fingerprint, report.root_fingerprint);
        assert!(!r2.root_key_stored);
    }
}
