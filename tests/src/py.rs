//! The Python test peers (grpcio and websockets servers and clients in `tests/grpc/` and
//! `tests/ws/`), run from the venv scripts/setup makes under target/test-venv.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::Within as _;
use std::process::{Child, Command, Output, Stdio};

/// The venv's interpreter.
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python3");
    assert!(p.exists(), "{} missing: run scripts/setup", p.display());
    p
}

/// A script under tests/, e.g. `grpc/echo.py`.
pub fn script(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A script's server (`<script> serve ADDR NAME`, which prints `ready`); killed when dropped.
pub struct Server(Child);

impl Server {
    /// Starts it and waits for its `ready` line.
    pub fn start(rel: &str, addr: SocketAddr, name: &str) -> Self {
        let mut cmd = Command::new(python());
        cmd.arg(script(rel))
            .args(["serve", &addr.to_string(), name])
            .stdout(Stdio::piped());
        crate::proc::contain(&mut cmd);
        let mut child = cmd.spawn().expect("python test server spawns");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout is piped"))
            .read_line(&mut line)
            .expect("python test server prints a line");
        assert_eq!(line.trim(), "ready", "{rel} server did not start");
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `<script> ARGS...` to completion off the async runtime's workers.
pub async fn run(rel: &'static str, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script(rel))
            .args(&args)
            .within(crate::CLI_TIMEOUT)
            .expect("python test client runs")
    })
    .await
    .expect("python test client task")
}
