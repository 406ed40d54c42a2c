//! curl from the test process, as a client outside the mesh would call it, and the bits of
//! its output tests read.

use std::process::Command;

use crate::Within as _;

/// curl's status line, headers and body, as one string; fails the test if curl fails.
pub fn curl(args: &[&str]) -> String {
    let (ok, out, err) = run(args);
    assert!(ok, "curl {args:?} failed: {err}");
    out
}

/// curl that may fail: whether it succeeded, and its stdout and stderr together.
pub fn curl_any(args: &[&str]) -> (bool, String) {
    let (ok, out, err) = run(args);
    (ok, format!("{out}{err}"))
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .within(crate::CLI_TIMEOUT)
        .expect("curl runs (scripts/setup installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The status of the first status line (0 when there is none).
pub fn status(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `key=value` from an app's report; fails the test when it is missing.
pub fn field<'a>(resp: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    resp.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in {resp}"))
}

/// The `x-mesh-error` header's value (empty when there is none).
pub fn mesh_error(resp: &str) -> String {
    resp.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-mesh-error")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}
