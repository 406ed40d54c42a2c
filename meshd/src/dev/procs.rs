//! The child processes of `meshd dev`: spawned with their output in a log file, in their own
//! process group (so a terminal's Ctrl-C reaches only `meshd dev`), killed if dropped.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Lines of a log quoted in an error.
const TAIL_LINES: usize = 15;

/// The running children, in start order.
#[derive(Default)]
pub struct Procs {
    list: Vec<Proc>,
}

/// One child process.
pub struct Proc {
    /// What it is, e.g. `n2 meshd`.
    pub name: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Process id.
    pub pid: u32,
    /// Killed (SIGKILL) if dropped while running.
    child: Child,
    exited: Option<ExitStatus>,
}

// === impl Procs ===

impl Procs {
    /// Starts `program args...` with stdout and stderr appended to `log`; returns its pid.
    pub fn spawn<I, S>(
        &mut self,
        name: &str,
        program: &Path,
        args: I,
        log: &Path,
    ) -> anyhow::Result<u32>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = command(program, args, log)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child
            .id()
            .context("a child that was just spawned has a pid")?;
        self.list.push(Proc {
            name: name.to_owned(),
            log: log.to_owned(),
            pid,
            child,
            exited: None,
        });
        Ok(pid)
    }

    /// The child named `name`.
    pub fn get(&self, name: &str) -> Option<&Proc> {
        self.list.iter().find(|p| p.name == name)
    }

    /// Fails, quoting its log, if any child has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for p in &mut self.list {
            if let Some(status) = p.poll_exit() {
                bail!(
                    "{} exited unexpectedly ({status}); its log is {}{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log)
                );
            }
        }
        Ok(())
    }

    /// Children that exited since the last call, with their status.
    pub fn newly_exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut out = Vec::new();
        for p in &mut self.list {
            if p.exited.is_none()
                && let Some(status) = p.poll_exit()
            {
                out.push((p.name.clone(), status));
            }
        }
        out
    }

    /// Sends SIGTERM to every running child (latest first), waits until `grace` for them to
    /// exit, then kills the rest. Returns the names of the children that had to be killed.
    pub async fn stop(&mut self, grace: Duration) -> Vec<String> {
        for p in self.list.iter_mut().rev() {
            if p.poll_exit().is_none() {
                terminate(p).await;
            }
        }
        let deadline = Instant::now() + grace;
        let mut killed = Vec::new();
        for p in self.list.iter_mut().rev() {
            if p.exited.is_some() {
                continue;
            }
            match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(Ok(status)) => p.exited = Some(status),
                Ok(Err(_)) | Err(_) => {
                    let _ = p.child.kill().await;
                    killed.push(p.name.clone());
                }
            }
        }
        killed
    }

    /// Kills every child at once (SIGKILL) and reaps it.
    pub async fn kill_all(&mut self) {
        for p in &mut self.list {
            if p.poll_exit().is_none() {
                let _ = p.child.kill().await;
            }
        }
    }
}

// === impl Proc ===

impl Proc {
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }
}

/// Runs `program args...` to completion (output appended to `log`) within `timeout`.
pub async fn run_to_end<I, S>(
    name: &str,
    program: &Path,
    args: I,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = command(program, args, log)?;
    let status = tokio::time::timeout(timeout, cmd.status())
        .await
        .with_context(|| {
            format!(
                "{name} did not finish within {timeout:?}; its log is {}",
                log.display()
            )
        })?
        .with_context(|| format!("running {name} ({})", program.display()))?;
    if !status.success() {
        bail!(
            "{name} failed ({status}); its log is {}{}",
            log.display(),
            tail(log)
        );
    }
    Ok(())
}

fn command<I, S>(program: &Path, args: I, log: &Path) -> anyhow::Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening log {}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd)
}

/// SIGTERM through kill(1): the workspace denies `unsafe`, which `libc::kill` needs. Falls back
/// to SIGKILL if kill(1) cannot run.
async fn terminate(p: &mut Proc) {
    let sent = Command::new("kill")
        .args(["-TERM", &p.pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !sent {
        let _ = p.child.start_kill();
    }
}

/// The end of a log, as text to append to an error message (empty if unreadable).
pub fn tail(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n  last lines of the log:");
    for l in &lines[start..] {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}
