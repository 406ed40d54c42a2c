//! A test's scratch directory: removed when the test passes, kept when it fails (with its path
//! and the last lines of every log printed into the failure), and a watchdog that ends a test
//! hung past its deadline instead of stalling the whole suite.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long one e2e test may run before the watchdog aborts the test binary (scaled by
/// `MESH_E2E_TIMEOUT_SCALE`). The longest test takes about a minute on an idle 2-core machine.
pub const WATCHDOG: Duration = Duration::from_secs(300);

/// Lines of each log printed when a test fails.
pub const LOG_TAIL_LINES: usize = 50;

/// A scratch directory with a watchdog; see the module docs.
pub struct Scratch {
    tmp: Option<tempfile::TempDir>,
    path: PathBuf,
    _watchdog: mpsc::Sender<()>,
}

impl Scratch {
    /// A new directory `mesh-e2e-*` under the temp dir, watched from now.
    pub fn new() -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("mesh-e2e-").tempdir()?;
        let path = tmp.path().to_owned();
        Ok(Self {
            _watchdog: watchdog(path.clone(), crate::scaled(WATCHDOG)),
            tmp: Some(tmp),
            path,
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after the test.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(t) = self.tmp.take() {
            let _ = t.keep();
        }
        self.path.clone()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep();
            // Printed through libtest's capture: shown with the failure, silent on a pass.
            eprintln!("{}", report(&self.path));
        }
    }
}

/// The directory's path and the last [`LOG_TAIL_LINES`] lines of every `*.log` in it.
pub fn report(dir: &Path) -> String {
    let mut logs = Vec::new();
    collect_logs(dir, &mut logs);
    logs.sort();
    let mut out = format!("scratch directory kept: {}\n", dir.display());
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        out.push_str(&format!(
            "--- {} (last {} of {} lines) ---\n",
            log.display(),
            lines.len() - from,
            lines.len()
        ));
        for l in &lines[from..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_logs(&p, out);
        } else if p.extension().is_some_and(|x| x == "log") {
            out.push(p);
        }
    }
}

/// A thread that aborts the test binary, after printing `dir`'s report to the real stderr
/// (libtest's capture would lose it), unless the returned sender is dropped within `limit`.
fn watchdog(dir: PathBuf, limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "mesh-e2e watchdog: {test} still running after {limit:?}; aborting the test binary\n{}",
                report(&dir)
            );
            std::process::abort();
        }
    });
    tx
}
