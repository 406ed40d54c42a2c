//! The systemd notification protocol (`Type=notify` units): `READY=1` once the daemon serves,
//! `STOPPING=1` when it starts draining, `STATUS=` lines for `systemctl status`. A datagram to the
//! socket named by `NOTIFY_SOCKET`; without it (not under systemd) every call does nothing.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Environment variable systemd sets for `Type=notify` services.
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("notifying systemd at {path:?}: {source}")]
    Send {
        /// `NOTIFY_SOCKET`.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Sends `state` (e.g. `"READY=1"`) to the socket named by `NOTIFY_SOCKET`, if set.
pub fn notify(state: &str) -> Result<(), Error> {
    match std::env::var(ENV_NOTIFY_SOCKET) {
        Ok(path) if !path.is_empty() => notify_to(&path, state),
        _ => Ok(()),
    }
}

/// Sends `state` to the notification socket `path` (a filesystem path, or `@name` for the
/// abstract namespace, as systemd passes it).
pub fn notify_to(path: &str, state: &str) -> Result<(), Error> {
    let err = |source| Error::Send {
        path: path.to_owned(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?,
        None => SocketAddr::from_pathname(path).map_err(err)?,
    };
    sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("sd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        let name = format!("sd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let e = notify_to("/nonexistent/notify", "READY=1").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/notify"), "{e}");
    }
}
