//! The CA on disk and while running: its files (with the trust bundle), the operator's
//! rotations (`mesh-registry ca rotate-intermediate`, `ca rotate-root prepare|activate|finish`)
//! and the running registry's pickup of changed files, without a restart.
//!
//! # Layout (`<data_dir>/ca`)
//!
//! `root.pem`, `root-key.pem` (absent when kept offline), `intermediate.pem`,
//! `intermediate-key.pem`: what signs now. `trust-bundle.pem`: the roots peers trust (absent:
//! the root alone). `next/`: the root and intermediate a root rotation will switch to.
//! `retired/`: certificates that no longer sign, kept for the record (their keys are deleted:
//! a stolen disk later signs nothing with them). `root-activated-at`: when the last root switch
//! happened (Unix seconds), so `finish` can wait until no leaf of the old root is left.
//!
//! # Rotations
//!
//! Intermediate: one step. The new intermediate is signed by the same root, so leaves of the
//! old one (which carry it in their chain) keep verifying until they expire; new leaves come
//! from the new one as soon as the running registry notices the files (within
//! [`RELOAD_INTERVAL`]).
//!
//! Root: three steps, each safe on its own. `prepare` makes the next root and intermediate and
//! puts both roots in the bundle, which every node receives on the policy watch (the
//! TrustBundle resource) and trusts at once. `activate` (once `meshctl check` shows every node
//! at that revision) signs with the new intermediate: new leaves chain to the new root, old
//! ones to the old root, and every node trusts both. `finish` (once every old leaf has
//! expired: the node certificate lifetime after `activate`) drops the old root.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::TrustDomain;
use mesh_ca::{Authority, CaFiles};

use crate::init::CaPaths;

/// How often the running registry looks for changed CA files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA material is invalid.
    #[error(transparent)]
    Ca(#[from] mesh_ca::Error),
    /// `prepare` while a root rotation is already prepared.
    #[error(
        "a root rotation is already prepared ({0} exists): run `ca rotate-root activate`, or remove that directory to start over"
    )]
    RotationPending(PathBuf),
    /// `activate` without `prepare`.
    #[error("no root rotation is prepared ({0} is missing): run `ca rotate-root prepare` first")]
    NothingPrepared(PathBuf),
    /// `finish` while leaves of the old root may still be valid.
    #[error(
        "the old root may still anchor unexpired certificates for {remaining_secs} more seconds \
         (the node certificate lifetime after the switch); wait, or pass --force"
    )]
    TooEarly {
        /// Seconds until the last old-root leaf has expired.
        remaining_secs: u64,
    },
    /// `finish` with nothing to finish.
    #[error("the trust bundle already holds only the current root")]
    NothingToFinish,
}

/// A step of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RootStep {
    /// Make the next root and intermediate; trust both roots.
    Prepare,
    /// Sign with the next intermediate (under the new root).
    Activate,
    /// Trust only the new root.
    Finish,
}

/// The CA directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

/// The authority the running registry signs with; replaced when the files change.
#[derive(Debug)]
pub struct CaHandle {
    current: RwLock<Arc<Authority>>,
}

// === impl Layout ===

impl Layout {
    /// The CA directory of `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("ca"),
        }
    }

    fn current(&self) -> CaPaths {
        CaPaths::in_dir(&self.dir)
    }

    fn next(&self) -> CaPaths {
        CaPaths::in_dir(&self.dir.join("next"))
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("trust-bundle.pem")
    }

    fn retired(&self) -> PathBuf {
        self.dir.join("retired")
    }

    fn activated_at(&self) -> PathBuf {
        self.dir.join("root-activated-at")
    }

    /// Loads and checks the signing CA and its trust bundle.
    pub fn load(&self, td: &TrustDomain, now: SystemTime) -> Result<Authority, Error> {
        let files = read_files(&self.current())?;
        let authority = Authority::load(td, &files, now)?;
        match read_optional(&self.bundle())? {
            Some(bundle) => Ok(authority.with_trust_bundle(&bundle)?),
            None => Ok(authority),
        }
    }

    /// Writes `bundle` as `ca.pem` of the credentials `init` made beside the CA (admin/,
    /// viewer/), so meshctl run here keeps verifying the registry after the switch. meshctl
    /// elsewhere updates its own `ca.pem` from the registry on its next run.
    fn refresh_local_credentials(&self, bundle: &str) -> Result<(), Error> {
        let Some(data_dir) = self.dir.parent() else {
            return Ok(());
        };
        for who in ["admin", "viewer"] {
            let dir = data_dir.join(who);
            if dir.join("ca.pem").exists() {
                write_atomic(&dir.join("ca.pem"), bundle, 0o644)?;
            }
        }
        Ok(())
    }

    /// Every file the running registry reads, concatenated: a change to any is a reload.
    pub fn fingerprint(&self) -> String {
        let c = self.current();
        [
            &c.root_cert,
            &c.root_key,
            &c.intermediate_cert,
            &c.intermediate_key,
            &self.bundle(),
        ]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\u{0}")
    }
}

/// `mesh-registry ca rotate-intermediate`: a new intermediate under the same root; the old
/// certificate goes to `retired/` and its key is deleted. Returns what to tell the operator.
pub fn rotate_intermediate(
    layout: &Layout,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<String, Error> {
    let paths = layout.current();
    let files = read_files(&paths)?;
    let old = Authority::load(td, &files, now)?;
    let next = Authority::new_intermediate(td, &files, now)?;
    retire(layout, "intermediate", old.intermediate_pem(), now)?;
    // Key first: between the two renames the pair does not match, which the reload skips.
    write_atomic(&paths.intermediate_key, &next.intermediate_key_pem, 0o600)?;
    write_atomic(&paths.intermediate_cert, &next.intermediate_cert_pem, 0o644)?;
    let new = Authority::load(td, &next, now)?;
    Ok(format!(
        "new intermediate written (expires {}); the running registry signs with it within {}s. \
         Certificates of the old one stay valid until they expire (they chain to the same root).\n",
        unix(new.intermediate_not_after()),
        RELOAD_INTERVAL.as_secs()
    ))
}

/// `mesh-registry ca rotate-root STEP`; `min_wait` is how long after `activate` the old root
/// may still anchor valid leaves. Returns what to tell the operator.
pub fn rotate_root(
    layout: &Layout,
    td: &TrustDomain,
    step: RootStep,
    now: SystemTime,
    min_wait: Duration,
    force: bool,
) -> Result<String, Error> {
    match step {
        RootStep::Prepare => prepare(layout, td, now),
        RootStep::Activate => activate(layout, td, now),
        RootStep::Finish => finish(layout, td, now, min_wait, force),
    }
}

fn prepare(layout: &Layout, td: &TrustDomain, now: SystemTime) -> Result<String, Error> {
    let next_dir = layout.dir.join("next");
    if next_dir.exists() {
        return Err(Error::RotationPending(next_dir));
    }
    let current = layout.load(td, now)?;
    let (next, files) = Authority::generate(td, now)?;
    let paths = layout.next();
    create_dir(&next_dir)?;
    write_atomic(&paths.root_cert, &files.root_cert_pem, 0o644)?;
    if let Some(key) = &files.root_key_pem {
        write_atomic(&paths.root_key, key, 0o600)?;
    }
    write_atomic(&paths.intermediate_key, &files.intermediate_key_pem, 0o600)?;
    write_atomic(
        &paths.intermediate_cert,
        &files.intermediate_cert_pem,
        0o644,
    )?;
    let bundle = format!("{}{}", current.root_pem(), next.root_pem());
    write_atomic(&layout.bundle(), &bundle, 0o644)?;
    layout.refresh_local_credentials(&bundle)?;
    Ok(format!(
        "next root {} prepared; every node now trusts both roots (pushed on the policy watch). \
         When `meshctl check` shows every node at the new policy revision, run \
         `mesh-registry ca rotate-root activate`.\n",
        next.root_fingerprint()
    ))
}

fn activate(layout: &Layout, td: &TrustDomain, now: SystemTime) -> Result<String, Error> {
    let next = layout.next();
    if !next.root_cert.exists() {
        return Err(Error::NothingPrepared(layout.dir.join("next")));
    }
    let files = read_files(&next)?;
    let new = Authority::load(td, &files, now)?;
    let old = layout.load(td, now)?;
    // Both roots stay trusted: the bundle must hold the new one before anything signs with it.
    let bundle = format!("{}{}", new.root_pem(), old.root_pem());
    let new = new.with_trust_bundle(&bundle)?;
    retire(layout, "root", old.root_pem(), now)?;
    retire(layout, "intermediate", old.intermediate_pem(), now)?;
    write_atomic(&layout.bundle(), &new.trust_bundle_pem(), 0o644)?;
    let cur = layout.current();
    write_atomic(&cur.root_cert, &files.root_cert_pem, 0o644)?;
    match &files.root_key_pem {
        Some(key) => write_atomic(&cur.root_key, key, 0o600)?,
        None => remove(&cur.root_key)?,
    }
    write_atomic(&cur.intermediate_key, &files.intermediate_key_pem, 0o600)?;
    write_atomic(&cur.intermediate_cert, &files.intermediate_cert_pem, 0o644)?;
    write_atomic(&layout.activated_at(), &unix(now).to_string(), 0o644)?;
    std::fs::remove_dir_all(layout.dir.join("next")).map_err(|source| Error::Io {
        path: layout.dir.join("next"),
        source,
    })?;
    Ok(format!(
        "the registry signs under root {} within {}s; both roots stay trusted. Once every \
         certificate of the old root has expired (the node certificate lifetime from now), run \
         `mesh-registry ca rotate-root finish`. Operator credentials issued before now chain to \
         the old root: issue new ones (`meshctl credentials create`) before finishing.\n",
        new.root_fingerprint(),
        RELOAD_INTERVAL.as_secs()
    ))
}

fn finish(
    layout: &Layout,
    td: &TrustDomain,
    now: SystemTime,
    min_wait: Duration,
    force: bool,
) -> Result<String, Error> {
    let current = layout.load(td, now)?;
    if current.trust_bundle_pem() == current.root_pem() {
        return Err(Error::NothingToFinish);
    }
    if !force {
        let activated: u64 = read_optional(&layout.activated_at())?
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let ready = activated + min_wait.as_secs();
        let now_s = unix(now);
        if now_s < ready {
            return Err(Error::TooEarly {
                remaining_secs: ready - now_s,
            });
        }
    }
    write_atomic(&layout.bundle(), current.root_pem(), 0o644)?;
    layout.refresh_local_credentials(current.root_pem())?;
    Ok(format!(
        "the trust bundle holds only root {}; nodes drop the old root within seconds.\n",
        current.root_fingerprint()
    ))
}

// === impl CaHandle ===

impl CaHandle {
    /// Starts with `ca`.
    pub fn new(ca: Authority) -> Self {
        Self {
            current: RwLock::new(Arc::new(ca)),
        }
    }

    /// The authority signing now.
    pub fn current(&self) -> Arc<Authority> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the authority.
    pub fn set(&self, ca: Authority) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ca);
    }
}

// === files ===

fn read_files(paths: &CaPaths) -> Result<CaFiles, Error> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.to_owned(),
            source,
        })
    };
    Ok(CaFiles {
        root_cert_pem: read(&paths.root_cert)?,
        root_key_pem: read_optional(&paths.root_key)?,
        intermediate_cert_pem: read(&paths.intermediate_cert)?,
        intermediate_key_pem: read(&paths.intermediate_key)?,
    })
}

fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Keeps a certificate that no longer signs under `retired/` (never its key).
fn retire(layout: &Layout, what: &str, pem: &str, now: SystemTime) -> Result<(), Error> {
    create_dir(&layout.retired())?;
    let path = layout.retired().join(format!("{what}-{}.pem", unix(now)));
    write_atomic(&path, pem, 0o644)
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })
}

fn remove(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes through a temporary file and a rename, so a reader sees the old or the new file.
fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn setup() -> (tempfile::TempDir, Layout, TrustDomain) {
        let tmp = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("mesh.test").unwrap();
        let (_, files) = Authority::generate(&td, SystemTime::now()).unwrap();
        let layout = Layout::new(tmp.path());
        let p = layout.current();
        create_dir(&layout.dir).unwrap();
        write_atomic(&p.root_cert, &files.root_cert_pem, 0o644).unwrap();
        write_atomic(&p.root_key, files.root_key_pem.as_ref().unwrap(), 0o600).unwrap();
        write_atomic(&p.intermediate_cert, &files.intermediate_cert_pem, 0o644).unwrap();
        write_atomic(&p.intermediate_key, &files.intermediate_key_pem, 0o600).unwrap();
        (tmp, layout, td)
    }

    fn roots_in_bundle(ca: &Authority) -> usize {
        ca.trust_bundle_pem().matches("BEGIN CERTIFICATE").count()
    }

    #[test]
    fn intermediate_rotation_keeps_the_root() {
        let (_tmp, layout, td) = setup();
        let now = SystemTime::now();
        let before = layout.load(&td, now).unwrap();
        let fp = layout.fingerprint();
        rotate_intermediate(&layout, &td, now).unwrap();
        let after = layout.load(&td, now).unwrap();
        assert_ne!(
            layout.fingerprint(),
            fp,
            "the running registry sees a change"
        );
        assert_eq!(after.root_pem(), before.root_pem());
        assert_ne!(after.intermediate_pem(), before.intermediate_pem());
        let retired: Vec<_> = std::fs::read_dir(layout.retired()).unwrap().collect();
        assert_eq!(retired.len(), 1, "the old certificate is kept, not its key");
    }

    #[test]
    fn root_rotation_steps_keep_both_roots_trusted_until_finish() {
        let (_tmp, layout, td) = setup();
        let now = SystemTime::now();
        let old = layout.load(&td, now).unwrap();
        assert!(matches!(
            rotate_root(&layout, &td, RootStep::Activate, now, DAY, false),
            Err(Error::NothingPrepared(_))
        ));
        rotate_root(&layout, &td, RootStep::Prepare, now, DAY, false).unwrap();
        let prepared = layout.load(&td, now).unwrap();
        assert_eq!(
            prepared.root_pem(),
            old.root_pem(),
            "still signing with the old root"
        );
        assert_eq!(roots_in_bundle(&prepared), 2);
        assert!(matches!(
            rotate_root(&layout, &td, RootStep::Prepare, now, DAY, false),
            Err(Error::RotationPending(_))
        ));
        rotate_root(&layout, &td, RootStep::Activate, now, DAY, false).unwrap();
        let active = layout.load(&td, now).unwrap();
        assert_ne!(
            active.root_pem(),
            old.root_pem(),
            "signing under the new root"
        );
        assert_eq!(roots_in_bundle(&active), 2);
        assert!(active.trust_bundle_pem().contains(old.root_pem()));
        assert!(matches!(
            rotate_root(&layout, &td, RootStep::Finish, now, DAY, false),
            Err(Error::TooEarly { .. })
        ));
        rotate_root(&layout, &td, RootStep::Finish, now + DAY, DAY, false).unwrap();
        let done = layout.load(&td, now).unwrap();
        assert_eq!(roots_in_bundle(&done), 1);
        assert_eq!(done.trust_bundle_pem(), active.root_pem());
        assert!(matches!(
            rotate_root(&layout, &td, RootStep::Finish, now + DAY, DAY, true),
            Err(Error::NothingToFinish)
        ));
    }
}
