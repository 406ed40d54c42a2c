//! Child processes of a test: each in its own process group and killed with the test thread
//! that started it (so an interrupted run leaves nothing behind), with exit status readable
//! without reaping, and commands run to completion under a deadline.
#![allow(unsafe_code)] // fork/exec hooks and waitid: the std API has no safe equivalent.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Makes the command's process lead its own process group (so [`Proc::kill9`] reaches
/// everything it forks: `ip netns exec`, `unshare … sh`, python's helpers) and die with the
/// thread that spawned it (`PR_SET_PDEATHSIG`): a test binary killed by ^C or a CI timeout
/// does not leave daemons holding its addresses.
pub fn contain(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the hook runs in the child between fork and exec and only makes
    // async-signal-safe system calls (setpgid, prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the test process exited"));
            }
            Ok(())
        });
    }
}

/// How a child ended, if it has, without reaping it (so `Child::wait` still works).
pub fn exit_status(pid: u32) -> Option<String> {
    // SAFETY: waitid writes into the zeroed siginfo we own; WNOWAIT leaves the child waitable.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 {
            // ECHILD: already reaped (by a kill9/terminate) — it is not running.
            return Some("reaped".to_owned());
        }
        if info.si_pid() == 0 {
            return None;
        }
        let status = info.si_status();
        Some(match info.si_code {
            libc::CLD_EXITED => format!("exit code {status}"),
            _ => format!("killed by signal {status}"),
        })
    }
}

/// A child process killed (SIGKILL, with its process group) when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Its combined stdout/stderr log.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `program args…` (inside `netns` when given), appending its output to `log`.
    pub fn start(
        netns: Option<&str>,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = wrap(&netns.map(str::to_owned), program);
        cmd.args(args);
        Self::spawn(cmd, log)
    }

    /// Spawns `cmd` contained (see [`contain`]), appending its output to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null());
        contain(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How it ended, or `None` while it runs (a stopped `Proc` reads as "stopped").
    pub fn exited(&self) -> Option<String> {
        match &self.child {
            Some(c) => exit_status(c.id()),
            None => Some("stopped by the test".to_owned()),
        }
    }

    /// SIGKILL its process group and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The group shares the leader's pid, which is not reused before it is reaped.
            signal_group(c.id(), libc::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        // Never signal a pid that may already have been reaped and reused.
        if let Some(status) = c.try_wait()? {
            return Ok(status.code());
        }
        signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                signal_group(c.id(), libc::SIGKILL);
                let _ = c.wait();
                bail!(
                    "process {} did not exit within {timeout:?} of SIGTERM",
                    c.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; callers pass the pid of a child not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Sends `sig` to the process group led by `pid`.
fn signal_group(pid: u32, sig: i32) {
    // SAFETY: as in `signal`; a negative pid names the process group.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
    }
}

/// `bin`, run inside network namespace `netns` when given.
pub fn wrap(netns: &Option<String>, bin: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// Runs `cmd` to completion with its output captured, killing it (and its process group) if it
/// takes longer than `timeout` (scaled by `MESH_E2E_TIMEOUT_SCALE`): one hung client must not
/// stall the suite.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let timeout = crate::scaled(timeout);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    contain(cmd);
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout is piped")?;
    let mut err = child.stderr.take().context("stderr is piped")?;
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Grandchildren may hold the pipes open: the group goes with the leader.
    signal_group(child.id(), libc::SIGKILL);
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// [`output_within`] as a method, for `Command` chains.
pub trait Within {
    /// Runs to completion with output captured, killed after `timeout` (scaled).
    fn within(&mut self, timeout: Duration) -> anyhow::Result<Output>;
}

impl Within for Command {
    fn within(&mut self, timeout: Duration) -> anyhow::Result<Output> {
        output_within(self, timeout)
    }
}

/// A child spawned by the test itself (piped output, say), contained (see [`contain`]) and
/// killed with its whole process group when dropped — a failing assertion leaks nothing.
pub struct Guard(pub Child);

impl Guard {
    /// Spawns `cmd` contained.
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        contain(cmd);
        Ok(Self(
            cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?,
        ))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Whatever the leader left behind in its group goes too.
        signal_group(self.0.id(), libc::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
