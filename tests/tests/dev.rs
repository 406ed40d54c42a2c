//! `meshd dev`, the README's "run it" command: it must bring up a working mesh, say so, carry
//! traffic, and leave nothing behind when stopped.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_e2e::bins;
use mesh_e2e::proc::Guard;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshd_dev_runs_a_working_mesh_and_stops_cleanly() {
    let b = bins();
    let dir = tempfile::tempdir().unwrap();
    // Below the ephemeral port range (32768+), so TIME-WAIT sockets of other tests cannot collide.
    let base = 20000 + (std::process::id() % 300) as u16 * 20;
    let stderr_log = dir.path().join("meshd-dev.stderr.log");
    let mut guard = Guard::spawn(
        Command::new(&b.meshd)
            .args([
                "dev",
                "--nodes",
                "2",
                "--base-port",
                &base.to_string(),
                "--dir",
            ])
            .arg(dir.path().join("mesh"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap()),
    )
    .unwrap();
    let child = &mut guard.0;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line == "meshd dev: ready";
                out.push(line);
                if done {
                    break;
                }
            }
            Err(_) => {
                panic!(
                    "meshd dev did not get ready; output:\n{}\n{}",
                    out.join("\n"),
                    mesh_e2e::scratch::report(dir.path())
                );
            }
        }
    }
    let text = out.join("\n");
    assert!(
        text.contains("hello from api on n2"),
        "self-check answered: {text}"
    );
    assert!(
        text.contains("refused"),
        "plaintext to an inbound port is refused: {text}"
    );
    // The L7 showcase: the ingress gateway routes by path, policy denies with its name.
    assert!(
        text.contains("GET / via the gateway: hello from web on n1")
            && text.contains("GET /api/orders via the gateway: hello from api on n2"),
        "gateway self-check: {text}"
    );
    assert!(
        text.contains("GET /admin on api: 403 RBAC: access denied")
            && text.contains("AuthorizationPolicy/default/api-no-admin"),
        "policy self-check: {text}"
    );
    let gateway = format!("127.0.0.1:{}", base + 15);
    let (code, body) = mesh_e2e::http_get(&gateway, "/api/x").await.unwrap();
    assert_eq!(
        (code, body.starts_with("hello from api on n2")),
        (200, true),
        "{body}"
    );

    // The upstream port printed in the walk-through carries traffic.
    let upstream = format!("127.0.0.1:{}", base + 14);
    assert!(
        text.contains(&upstream),
        "walk-through names {upstream}: {text}"
    );
    let (code, body) = mesh_e2e::http_get(&upstream, "/").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.starts_with("hello from api on n2"), "{body}");

    // SIGTERM: exits 0 and stops every child it started.
    let pids: Vec<String> = text
        .lines()
        .filter_map(|l| l.split("pid ").nth(1))
        .map(|p| p.trim().to_owned())
        .collect();
    assert!(pids.len() >= 3, "registry and node pids listed: {text}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "meshd dev did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} left running"
        );
    }
}
