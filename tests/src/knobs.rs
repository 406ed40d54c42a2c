//! The environment knobs of the e2e suite: `MESH_E2E_TIMEOUT_SCALE` (slow machines wait
//! longer) and `MESH_E2E_REQUIRE` (capabilities whose absence fails a test instead of skipping
//! it), and the one way a test records that it skipped.

use std::io::Write as _;
use std::time::Duration;

/// Multiplier for every wait of the harness, from `MESH_E2E_TIMEOUT_SCALE` (default 1, at
/// least 1). Scales how long a test waits for something to happen, never a bound a test
/// asserts as the product's behaviour.
pub fn scale() -> f64 {
    match std::env::var("MESH_E2E_TIMEOUT_SCALE") {
        Err(_) => 1.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 1.0 => s,
            _ => panic!("MESH_E2E_TIMEOUT_SCALE={v:?}: expected a number ≥ 1, like 2 or 1.5"),
        },
    }
}

/// `d` scaled by [`scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(scale())
}

/// Whether `MESH_E2E_REQUIRE` (a comma-separated list, or `all`) names `capability`.
pub fn required(capability: &str) -> bool {
    names(
        &std::env::var("MESH_E2E_REQUIRE").unwrap_or_default(),
        capability,
    )
}

/// Whether the comma-separated `list` names `capability` (or says `all`).
fn names(list: &str, capability: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|c| c == capability || c == "all")
}

/// Whether a test that needs `capability` can run. When it cannot (`available` is false) the
/// test fails if `MESH_E2E_REQUIRE` names the capability, and otherwise records a skip that the
/// test command counts (a line `mesh-e2e: SKIPPED <test>: …` on the real stderr, past libtest's
/// capture) and should `return`.
pub fn can_run(capability: &str, available: bool, why: &str) -> bool {
    if available {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    assert!(
        !required(capability),
        "{test} needs {capability} ({why}), and MESH_E2E_REQUIRE says it must run"
    );
    let _ = writeln!(
        std::io::stderr().lock(),
        "mesh-e2e: SKIPPED {test}: needs {capability}: {why}"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_list() {
        for (list, want) in [
            ("", false),
            ("netns", true),
            ("journald, netns", true),
            ("all", true),
            ("netnsx", false),
            ("net", false),
        ] {
            assert_eq!(names(list, "netns"), want, "{list:?}");
        }
    }

    #[test]
    fn an_available_capability_always_runs() {
        assert!(can_run("anything", true, "never consulted"));
    }
}
