//! Shared shapes of mesh telemetry: the request-duration buckets meshd counts in and the
//! registry aggregates (topology percentiles, latency SLOs), and the arithmetic on them.

/// Upper bounds (ms, inclusive) of the duration buckets of an edge; one more bucket holds the
/// slower requests. Dense where latency SLO thresholds usually sit (50 ms – 1 s).
pub const LATENCY_BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 2_500, 10_000,
];

/// Number of buckets: one per bound plus the overflow.
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Caller name for plaintext traffic from outside the mesh.
pub const EXTERNAL: &str = "external";

/// Most warnings one node report carries (`NodeReport.warnings`): a node sends at most this
/// many, the registry refuses a report with more.
pub const MAX_WARNINGS: usize = 64;
/// Longest warning code, bytes (`[a-z0-9_]`).
pub const MAX_WARNING_CODE_LEN: usize = 64;
/// Longest warning message, bytes.
pub const MAX_WARNING_LEN: usize = 512;

/// Whether `code` is a valid warning code: 1 to [`MAX_WARNING_CODE_LEN`] of `[a-z0-9_]`.
pub fn is_warning_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= MAX_WARNING_CODE_LEN
        && (code.bytes()).all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The bucket a request of `ms` milliseconds counts in.
pub fn bucket_of(ms: f64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&b| ms <= b as f64)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// Adds `from` into `into` bucket by bucket (a shorter vector counts as zeros).
pub fn add_buckets(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// The `q` quantile (0..=1) in ms, interpolated linearly inside its bucket (as Prometheus'
/// `histogram_quantile`); the overflow bucket answers its lower bound. `None` without data.
pub fn quantile_ms(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lower = if i == 0 {
                0.0
            } else {
                LATENCY_BOUNDS_MS[i - 1] as f64
            };
            let Some(&upper) = LATENCY_BOUNDS_MS.get(i) else {
                return Some(lower);
            };
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper as f64 - lower) * within);
        }
        seen += n;
    }
    LATENCY_BOUNDS_MS.last().map(|&b| b as f64)
}

/// How many of the requests in `buckets` took at most `threshold_ms`, interpolating linearly
/// inside the bucket the threshold falls in (exact when it is a bound).
pub fn count_within(buckets: &[u64], threshold_ms: f64) -> f64 {
    let mut good = 0.0;
    for (i, &n) in buckets.iter().enumerate() {
        let lower = if i == 0 {
            0.0
        } else {
            LATENCY_BOUNDS_MS[i - 1] as f64
        };
        let Some(&upper) = LATENCY_BOUNDS_MS.get(i) else {
            break;
        };
        let upper = upper as f64;
        if threshold_ms >= upper {
            good += n as f64;
        } else {
            if threshold_ms > lower {
                good += n as f64 * (threshold_ms - lower) / (upper - lower);
            }
            break;
        }
    }
    good
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_codes() {
        for ok in [
            "listener_off_loopback",
            "a",
            "x1",
            &"a".repeat(MAX_WARNING_CODE_LEN),
        ] {
            assert!(is_warning_code(ok), "{ok}");
        }
        for bad in [
            "",
            "Listener",
            "a-b",
            "a b",
            "é",
            &"a".repeat(MAX_WARNING_CODE_LEN + 1),
        ] {
            assert!(!is_warning_code(bad), "{bad}");
        }
    }

    #[test]
    fn buckets() {
        for (ms, want) in [
            (0.0, 0),
            (1.0, 0),
            (1.5, 1),
            (50.0, 5),
            (50.1, 6),
            (10_000.0, 15),
            (10_000.1, 16),
            (1e9, 16),
        ] {
            assert_eq!(bucket_of(ms), want, "{ms} ms");
        }
        assert_eq!(BUCKETS, 17);
    }

    #[test]
    fn quantiles() {
        let mut b = vec![0; BUCKETS];
        assert_eq!(quantile_ms(&b, 0.5), None);
        // 100 requests in (25, 50]: the median is halfway, p99 near the top.
        b[bucket_of(40.0)] = 100;
        assert_eq!(quantile_ms(&b, 0.5), Some(37.5));
        assert_eq!(quantile_ms(&b, 0.99), Some(49.75));
        // One very slow request among 100: p99 stays in the fast bucket, p100 is the overflow.
        b[bucket_of(40.0)] = 99;
        b[BUCKETS - 1] = 1;
        assert_eq!(quantile_ms(&b, 0.99), Some(50.0));
        assert_eq!(quantile_ms(&b, 1.0), Some(10_000.0));
        // In the first bucket the lower bound is 0.
        let mut first = vec![0; BUCKETS];
        first[0] = 10;
        assert_eq!(quantile_ms(&first, 0.5), Some(0.5));
    }

    #[test]
    fn within_threshold() {
        let mut b = vec![0; BUCKETS];
        b[bucket_of(20.0)] = 10; // (10, 25]
        b[bucket_of(400.0)] = 10; // (300, 500]
        b[BUCKETS - 1] = 5;
        assert_eq!(count_within(&b, 300.0), 10.0, "a bound: exact");
        assert_eq!(count_within(&b, 400.0), 15.0, "halfway into (300, 500]");
        assert_eq!(
            count_within(&b, 10_000.0),
            20.0,
            "the overflow never counts"
        );
        assert_eq!(count_within(&b, 5.0), 0.0);
    }

    #[test]
    fn adding() {
        let mut a = vec![1, 2];
        add_buckets(&mut a, &[1, 1, 1]);
        assert_eq!(a, [2, 3, 1]);
        let mut empty = Vec::new();
        add_buckets(&mut empty, &[]);
        assert!(empty.is_empty());
    }
}
