//! When a certificate is renewed: at half its life as this node received it, plus a random
//! share of up to [`RENEW_JITTER`] so a fleet issued together does not renew in lockstep.

use std::time::SystemTime;

use rand::Rng as _;

/// Share of a certificate's lifetime added at random to its half-life.
pub const RENEW_JITTER: f64 = 0.05;

/// Share of the lifetime at which renewal starts, before jitter.
pub const RENEW_AT_LIFE: f64 = 0.5;

/// When to renew a certificate obtained at `obtained` and valid until `not_after`, for a draw
/// `u` in [0, 1): in [0.5, 0.55) of the life. Counting from `obtained`, not `not_before`: the CA
/// backdates `not_before` for clock skew, which for short lifetimes would put the half-life in
/// the past and renew in a loop.
pub fn renew_at(obtained: SystemTime, not_after: SystemTime, u: f64) -> SystemTime {
    let life = not_after.duration_since(obtained).unwrap_or_default();
    let u = if (0.0..1.0).contains(&u) { u } else { 0.0 };
    obtained + life.mul_f64(RENEW_AT_LIFE + RENEW_JITTER * u)
}

/// [`renew_at`] with a fresh random draw.
pub fn renew_at_random(obtained: SystemTime, not_after: SystemTime) -> SystemTime {
    renew_at(obtained, not_after, rand::rng().random_range(0.0..1.0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn share(life: Duration, u: f64) -> f64 {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = renew_at(t0, t0 + life, u);
        at.duration_since(t0).unwrap().as_secs_f64() / life.as_secs_f64()
    }

    #[test]
    fn table() {
        let hour = Duration::from_secs(3600);
        for (u, want) in [(0.0, 0.5), (0.5, 0.525), (0.999_999, 0.549_999_95)] {
            let got = share(hour, u);
            assert!((got - want).abs() < 1e-6, "u={u}: {got} want {want}");
        }
        // A draw outside [0, 1) (a broken source) renews at half-life, never later.
        assert!((share(hour, 1.0) - 0.5).abs() < 1e-9);
        assert!((share(hour, f64::NAN) - 0.5).abs() < 1e-9);
        // Already expired when obtained: renew at once.
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(renew_at(t0, t0 - Duration::from_secs(5), 0.3), t0);
    }

    proptest! {
        #[test]
        fn always_in_half_to_fifty_five_percent(secs in 2u64..400 * 24 * 3600, u in 0.0f64..1.0) {
            let s = share(Duration::from_secs(secs), u);
            prop_assert!((0.5..0.55).contains(&s), "{s}");
        }

        #[test]
        fn random_draws_stay_in_the_window(secs in 2u64..400 * 24 * 3600) {
            let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let life = Duration::from_secs(secs);
            let at = renew_at_random(t0, t0 + life);
            let s = at.duration_since(t0).unwrap().as_secs_f64() / life.as_secs_f64();
            prop_assert!((0.5..0.55).contains(&s), "{s}");
        }
    }
}
