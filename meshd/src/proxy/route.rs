//! Endpoint selection: round robin over the usable (healthy, not draining) endpoints.

use crate::membership::Endpoint;

/// Picks up to `max` distinct usable endpoints starting at round-robin position `cursor`:
/// the first is the choice, the rest are fallbacks for connect failures.
pub fn pick(endpoints: &[Endpoint], cursor: usize, max: usize) -> Vec<&Endpoint> {
    let usable: Vec<&Endpoint> = endpoints.iter().filter(|e| e.is_usable()).collect();
    if usable.is_empty() {
        return Vec::new();
    }
    let start = cursor % usable.len();
    (0..usable.len().min(max))
        .map(|i| usable[(start + i) % usable.len()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ep(node: &str, healthy: bool, draining: bool) -> Endpoint {
        Endpoint {
            node: node.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            datacenter: "dc1".into(),
            zone: "a".into(),
            labels: BTreeMap::new(),
            protocol: crate::config::Protocol::Tcp,
            healthy,
            draining,
        }
    }

    #[test]
    fn round_robin_over_usable() {
        let eps = vec![
            ep("a", true, false),
            ep("b", false, false),
            ep("c", true, true),
            ep("d", true, false),
        ];
        let names = |v: Vec<&Endpoint>| v.iter().map(|e| e.node.clone()).collect::<Vec<_>>();
        assert_eq!(names(pick(&eps, 0, 3)), ["a", "d"]);
        assert_eq!(names(pick(&eps, 1, 3)), ["d", "a"]);
        assert_eq!(names(pick(&eps, 2, 1)), ["a"]);
        assert!(pick(&[ep("x", false, false)], 0, 3).is_empty());
        assert!(pick(&[], 5, 3).is_empty());
    }
}
