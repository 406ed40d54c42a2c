//! Process signals: SIGTERM/SIGINT start a graceful drain, SIGHUP asks for a reload.

use tokio::signal::unix::{SignalKind, signal};

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGTERM (systemd stop).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown() -> std::io::Result<Shutdown> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok(Shutdown::Terminate),
        _ = int.recv() => Ok(Shutdown::Interrupt),
    }
}

/// SIGHUP as a stream: each `recv()` resolves on the next one. Registering it replaces the
/// default action (exit), so a process that reloads on SIGHUP registers it before anything
/// can send one.
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    signal(SignalKind::hangup())
}
