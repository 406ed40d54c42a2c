use super::*;
use crate::config::Protocol;

fn ep(port: u16, dc: &str, zone: &str, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        node: format!("n{port}"),
        addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
        datacenter: dc.to_owned(),
        zone: zone.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        protocol: Protocol::Http,
        healthy: true,
        draining: false,
        site: String::new(),
        sni: None,
        site_rank: 0,
    }
}

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A deterministic xorshift64 "uniform" index source.
fn seeded(mut state: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % n as u64).unwrap()
    }
}

/// Answers `rand` calls from a fixed script.
fn script(answers: &[usize]) -> impl FnMut(usize) -> usize + '_ {
    let mut i = 0;
    move |_| {
        i += 1;
        answers[i - 1]
    }
}

fn od(c5xx: u32, gateway: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: c5xx,
        consecutive_gateway_errors: gateway,
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent: 10,
    }
}

#[test]
fn subset_membership() {
    let e = ep(1, "dc", "z", &[("version", "v2"), ("track", "canary")]);
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[], true),
        (&[("version", "v2")], true),
        (&[("version", "v2"), ("track", "canary")], true),
        (&[("version", "v1")], false),
        (&[("version", "v2"), ("region", "eu")], false),
    ];
    for (want, expected) in cases {
        assert_eq!(in_subset(&e, &labels(want)), *expected, "{want:?}");
    }
}

#[test]
fn empty_picks_none() {
    for lb in [
        LoadBalancer::RoundRobin,
        LoadBalancer::Random,
        LoadBalancer::LeastRequest,
        LoadBalancer::Ewma,
    ] {
        assert_eq!(pick(lb, &[], 3, &mut seeded(1)), None, "{lb:?}");
    }
}

#[test]
fn single_candidate_is_picked() {
    for lb in [
        LoadBalancer::RoundRobin,
        LoadBalancer::Random,
        LoadBalancer::LeastRequest,
        LoadBalancer::Ewma,
    ] {
        let got = pick(lb, &[Cand::default()], 7, &mut seeded(1));
        assert_eq!(got, Some(0), "{lb:?}");
    }
}

#[test]
fn round_robin_cycles() {
    let cands = [Cand::default(); 3];
    let got: Vec<_> = (0..7)
        .map(|c| pick(LoadBalancer::RoundRobin, &cands, c, &mut seeded(1)).unwrap())
        .collect();
    assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
}

#[test]
fn random_uses_rand_and_wraps() {
    let cands = [Cand::default(); 4];
    let cases = [(0, 0), (3, 3), (5, 1)]; // 5 is out of range: wrapped, not trusted
    for (answer, want) in cases {
        let got = pick(LoadBalancer::Random, &cands, 0, &mut script(&[answer]));
        assert_eq!(got, Some(want), "rand answered {answer}");
    }
}

#[test]
fn random_index_stays_in_range() {
    assert_eq!(random_index(0), 0);
    assert_eq!(random_index(1), 0);
    assert!((0..1000).all(|_| random_index(3) < 3));
    let picked = pick(
        LoadBalancer::Random,
        &[Cand::default(); 2],
        0,
        &mut random_index,
    );
    assert!(matches!(picked, Some(0 | 1)));
}

#[test]
fn least_request_table() {
    let load = |n: &[u64]| -> Vec<Cand> {
        n.iter()
            .map(|&in_flight| Cand {
                in_flight,
                ewma_ns: 0.0,
            })
            .collect()
    };
    // (in-flight per endpoint, scripted rand answers, expected pick)
    let cases: &[(&[u64], &[usize], usize)] = &[
        (&[5, 1], &[0, 0], 1),       // draws 0 then 1: the lighter wins
        (&[1, 5], &[1, 0], 0),       // draws 1 then 0
        (&[3, 3], &[1, 0], 1),       // tie: the first drawn
        (&[3, 3], &[0, 0], 0),       // tie: the first drawn
        (&[9, 0, 4], &[0, 1], 2),    // second draw 1 skips 0 → index 2
        (&[9, 0, 4], &[2, 1], 1),    // second draw 1 < 2 → index 1
        (&[0, 9, 9, 9], &[3, 1], 3), // the idle one is not drawn; tie → first
    ];
    for (inflight, answers, want) in cases {
        let got = pick(
            LoadBalancer::LeastRequest,
            &load(inflight),
            0,
            &mut script(answers),
        );
        assert_eq!(got, Some(*want), "{inflight:?} {answers:?}");
    }
}

#[test]
fn p2c_draws_two_distinct() {
    let cands = [Cand::default(); 5];
    let mut seen = Vec::new();
    let mut rand = seeded(7);
    let mut rec = |n: usize| {
        let v = rand(n);
        seen.push((n, v));
        v
    };
    for _ in 0..1000 {
        pick(LoadBalancer::LeastRequest, &cands, 0, &mut rec);
    }
    for pair in seen.chunks(2) {
        let (a, b) = (pair[0].1, pair[1].1);
        let b = if b >= a { b + 1 } else { b };
        assert_ne!(a, b);
        assert!(a < 5 && b < 5);
    }
}

#[test]
fn cost_table() {
    let cases = [
        (0, 1_000_000.0, 1_000_000.0),
        (3, 1_000_000.0, 4_000_000.0),
        (0, 0.0, DEFAULT_EWMA_NS),
        (1, 0.0, 2.0 * DEFAULT_EWMA_NS),
        (0, f64::NAN, DEFAULT_EWMA_NS),
        (0, -5.0, DEFAULT_EWMA_NS),
    ];
    for (in_flight, ewma_ns, want) in cases {
        let got = cost(&Cand { in_flight, ewma_ns });
        assert!((got - want).abs() < 1e-6, "{in_flight} {ewma_ns}: {got}");
    }
}

#[test]
fn ewma_prefers_cheaper_cost() {
    let c = |in_flight, ms: f64| Cand {
        in_flight,
        ewma_ns: ms * 1e6,
    };
    // (candidates, scripted draws, expected)
    let cases: &[(&[Cand], &[usize], usize)] = &[
        (&[c(0, 50.0), c(0, 5.0)], &[0, 0], 1),
        (&[c(0, 5.0), c(20, 5.0)], &[1, 0], 0), // same latency, less load
        (&[c(0, 5.0), c(0, 100.0)], &[0, 0], 0),
        (&[c(9, 5.0), c(0, 100.0)], &[0, 0], 0), // 50ms < 100ms
        (&[c(30, 5.0), c(0, 100.0)], &[0, 0], 1), // 155ms > 100ms
        (&[c(0, 1.0), c(0, 0.0)], &[0, 0], 0),   // unmeasured costs the default
        (&[c(40, 1.0), c(0, 0.0)], &[0, 0], 1),  // but wins against a loaded one
        (&[c(2, 5.0), c(2, 5.0)], &[0, 0], 0),   // tie: the first drawn
        (&[c(2, 5.0), c(2, 5.0)], &[1, 0], 1),   // tie: the first drawn
    ];
    for (cands, answers, want) in cases {
        let got = pick(LoadBalancer::Ewma, cands, 0, &mut script(answers));
        assert_eq!(got, Some(*want), "{cands:?}");
    }
}

#[test]
fn ewma_sends_most_traffic_to_the_fast_endpoint() {
    // One request per simulated millisecond; endpoint 0 answers in 10 ms, endpoint 1 in
    // 100 ms. In-flight counts come from the simulated completions, latencies from Stats.
    let latency = [Duration::from_millis(10), Duration::from_millis(100)];
    let stats = [Stats::new(), Stats::new()];
    let t0 = Instant::now();
    let mut pending: [std::collections::VecDeque<Instant>; 2] = Default::default();
    let mut in_flight = [0_u64; 2];
    let mut counts = [0_u32; 2];
    let mut rand = seeded(42);
    for i in 0..10_000 {
        let now = t0 + Duration::from_millis(i);
        for j in 0..2 {
            while pending[j].front().is_some_and(|&done| done <= now) {
                pending[j].pop_front();
                in_flight[j] -= 1;
                stats[j].observe(latency[j], now);
            }
        }
        let cands: Vec<Cand> = (0..2)
            .map(|j| Cand {
                in_flight: in_flight[j],
                ewma_ns: stats[j].cand(now).ewma_ns,
            })
            .collect();
        let p = pick(LoadBalancer::Ewma, &cands, 0, &mut rand).unwrap();
        counts[p] += 1;
        in_flight[p] += 1;
        pending[p].push_back(now + latency[p]);
    }
    assert!(
        counts[1] > 0,
        "the slow endpoint is still tried: {counts:?}"
    );
    assert!(counts[0] > 9 * counts[1], "{counts:?}");
}

#[test]
fn peak_ewma_table() {
    let ms = 1e6;
    // (prior, sample, elapsed, expected)
    let cases = [
        (0.0, 5.0 * ms, Duration::ZERO, 5.0 * ms), // first sample
        (5.0 * ms, 50.0 * ms, Duration::from_secs(60), 50.0 * ms), // peak: jump
        (50.0 * ms, 10.0 * ms, Duration::ZERO, 50.0 * ms), // no time: no move
        (
            50.0 * ms,
            10.0 * ms,
            EWMA_DECAY,
            10.0 * ms + 40.0 * ms / std::f64::consts::E,
        ),
        (50.0 * ms, 10.0 * ms, Duration::from_secs(1000), 10.0 * ms), // long ago: sample
        (f64::NAN, 7.0 * ms, Duration::ZERO, 7.0 * ms),               // garbage prior: the sample
        (-1.0, 7.0 * ms, Duration::ZERO, 7.0 * ms),                   // negative prior: the sample
    ];
    for (prior, sample, elapsed, want) in cases {
        let got = peak_ewma(prior, sample, elapsed);
        assert!(
            (got - want).abs() < 1.0,
            "{prior} {sample} {elapsed:?}: {got}"
        );
    }
}

#[test]
fn stats_peak_then_decay() {
    let stats = Stats::new();
    let t0 = Instant::now();
    assert_eq!(stats.ewma_ns(), 0.0);
    stats.observe(Duration::from_millis(10), t0);
    assert_eq!(stats.ewma_ns(), 10e6);
    let peak = t0 + Duration::from_millis(1);
    stats.observe(Duration::from_millis(200), peak);
    assert_eq!(stats.ewma_ns(), 200e6, "jumps to the peak");
    let mut prev = stats.ewma_ns();
    for s in 1..=30 {
        stats.observe(Duration::from_millis(10), peak + Duration::from_secs(s));
        let now = stats.ewma_ns();
        assert!(now < prev && now > 10e6, "decays gradually: {prev} → {now}");
        prev = now;
    }
    // 1 s steps compose to one 30 s step: 10 ms + 190 ms × e^-3.
    let want = 10e6 + 190e6 * (-3.0_f64).exp();
    assert!((prev - want).abs() < 1.0, "{prev} vs {want}");
    stats.observe(Duration::ZERO, t0 + Duration::from_secs(1000));
    assert!(
        stats.ewma_ns() > 0.0,
        "a measured endpoint never reads as unmeasured"
    );
}

#[test]
fn stats_cand_relaxes_idle_estimate_to_default() {
    let stats = Stats::new();
    let t0 = Instant::now();
    assert_eq!(stats.cand(t0).ewma_ns, 0.0, "unmeasured stays unmeasured");
    stats.observe(Duration::from_secs(2), t0);
    let cases = [
        (Duration::ZERO, 2e9),
        (Duration::from_secs(600), DEFAULT_EWMA_NS),
    ];
    for (idle, want) in cases {
        let got = stats.cand(t0 + idle).ewma_ns;
        assert!((got - want).abs() < 1.0, "{idle:?}: {got}");
    }
    let mid = stats.cand(t0 + EWMA_DECAY).ewma_ns;
    assert!(mid < 2e9 && mid > DEFAULT_EWMA_NS);
    assert_eq!(stats.ewma_ns(), 2e9, "reading does not store");
}

#[test]
fn in_flight_guard_counts() {
    let stats = Arc::new(Stats::new());
    let a = stats.start();
    let b = Stats::start(&stats);
    assert_eq!(stats.in_flight(), 2);
    assert_eq!(stats.cand(Instant::now()).in_flight, 2);
    drop(a);
    assert_eq!(stats.in_flight(), 1);
    drop(b);
    assert_eq!(stats.in_flight(), 0);
}

/// Feeds outcomes; returns the ejection (if any) after each.
fn run(o: &mut Outlier, cfg: &OutlierDetection, outcomes: &[Outcome]) -> Vec<bool> {
    let t = Instant::now();
    outcomes
        .iter()
        .map(|&x| o.record(x, cfg, t, true).is_some())
        .collect()
}

#[test]
fn outlier_triggers_table() {
    use Outcome::{ConnectFailure as C, Status5xx as S, Success as G};
    let (y, n) = (true, false);
    // (cfg, outcomes, ejected after each)
    let cases: &[(&str, OutlierDetection, &[Outcome], &[bool])] = &[
        ("5xx at 3", od(3, 0), &[S(500), S(503), S(500)], &[n, n, y]),
        (
            "success resets",
            od(3, 0),
            &[S(500), S(500), G, S(500)],
            &[n, n, n, n],
        ),
        (
            "4xx is success",
            od(2, 0),
            &[S(500), S(404), S(500)],
            &[n, n, n],
        ),
        ("connect counts as 5xx", od(2, 0), &[C, S(500)], &[n, y]),
        ("gateway at 2", od(0, 2), &[S(502), S(504)], &[n, y]),
        ("connect is gateway", od(0, 2), &[C, S(503)], &[n, y]),
        (
            "500 breaks gateway run",
            od(0, 2),
            &[S(502), S(500), S(502)],
            &[n, n, n],
        ),
        ("both off", od(0, 0), &[C, C, C, C], &[n, n, n, n]),
        ("first trigger wins", od(5, 2), &[S(502), S(502)], &[n, y]),
        (
            "5xx off, gateway on",
            od(0, 3),
            &[S(500), S(500), S(500)],
            &[n, n, n],
        ),
    ];
    for (name, cfg, outcomes, want) in cases {
        let mut o = Outlier::default();
        assert_eq!(run(&mut o, cfg, outcomes), *want, "{name}");
    }
}

#[test]
fn ejection_resets_counters_and_ignores_late_outcomes() {
    let cfg = od(2, 0);
    let t0 = Instant::now();
    let mut o = Outlier::default();
    assert_eq!(o.record(Outcome::Status5xx(500), &cfg, t0, true), None);
    let d = o.record(Outcome::Status5xx(500), &cfg, t0, true);
    assert_eq!(d, Some(Duration::from_secs(30)));
    assert_eq!((o.consecutive_5xx, o.consecutive_gateway), (0, 0));
    assert!(o.is_ejected(t0 + Duration::from_secs(29)));
    assert!(!o.is_ejected(t0 + Duration::from_secs(30)));
    // Late failures of requests started before the ejection do not count.
    let late = t0 + Duration::from_secs(1);
    assert_eq!(o.record(Outcome::Status5xx(500), &cfg, late, true), None);
    assert_eq!(o.consecutive_5xx, 0);
}

#[test]
fn ejection_time_grows_and_is_capped() {
    let cfg = od(1, 0);
    let mut o = Outlier::default();
    let mut now = Instant::now();
    let mut got = Vec::new();
    for _ in 0..12 {
        let d = o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
        got.push(d.as_secs());
        now += d; // fail again the moment it is back: no good behaviour in between
    }
    assert_eq!(
        got,
        [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
    );
}

#[test]
fn ejection_multiplier_decays_per_good_interval() {
    let cfg = od(1, 0); // interval 10s, base 30s
    // (seconds back in service before the next ejection, expected ejection secs)
    let cases = [(0, 90), (9, 90), (10, 60), (25, 30), (1000, 30)];
    for (good, want) in cases {
        let mut o = Outlier::default();
        let mut now = Instant::now();
        for _ in 0..2 {
            now += o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
        }
        now += Duration::from_secs(good);
        let d = o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
        assert_eq!(d.as_secs(), want, "after {good}s good");
    }
    // A zero interval never decays.
    let cfg = OutlierDetection {
        interval: Duration::ZERO,
        ..od(1, 0)
    };
    let mut o = Outlier::default();
    let mut now = Instant::now();
    now += o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
    now += Duration::from_secs(3600);
    let d = o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
    assert_eq!(d.as_secs(), 60);
}

#[test]
fn capped_ejection_keeps_counting() {
    let cfg = od(2, 0);
    let t = Instant::now();
    let mut o = Outlier::default();
    let fail = Outcome::Status5xx(500);
    assert_eq!(o.record(fail, &cfg, t, false), None);
    assert_eq!(
        o.record(fail, &cfg, t, false),
        None,
        "at threshold but capped"
    );
    assert!(!o.is_ejected(t));
    assert_eq!(o.consecutive_5xx, 2);
    assert!(
        o.record(fail, &cfg, t, true).is_some(),
        "ejected once there is room"
    );
}

#[test]
fn may_eject_table() {
    // (ejected now, total, max %, expected)
    let cases = [
        (0, 0, 100, false),
        (0, 1, 100, false), // never the last endpoint
        (0, 2, 10, true),   // at least one, even above the percentage
        (1, 2, 100, false), // the other one is the last
        (0, 10, 10, true),
        (1, 10, 10, false), // 2 of 10 > 10%
        (1, 10, 20, true),
        (2, 10, 20, false),
        (0, 3, 1, true),
        (1, 3, 100, true),
        (2, 3, 100, false),
        (4, 100, 5, true),
        (5, 100, 5, false),
    ];
    for (ejected, total, pct, want) in cases {
        assert_eq!(
            may_eject(ejected, total, pct),
            want,
            "{ejected}/{total} @{pct}%"
        );
    }
}

#[test]
fn recording_counts_ejections_and_applies_the_cap() {
    let targets: Vec<Target> = (1..=10)
        .map(|p| Target {
            endpoint: ep(p, "dc", "z", &[]),
            state: Arc::default(),
        })
        .collect();
    let ejected = |t| targets.iter().filter(|x| x.state.is_ejected(t)).count();
    let cfg = od(1, 0); // max 10%: one of ten
    let t = Instant::now();
    let fail = Outcome::ConnectFailure;
    assert!(record(&targets, 0, fail, &cfg, t).is_some());
    assert_eq!(ejected(t), 1);
    assert_eq!(record(&targets, 1, fail, &cfg, t), None, "capped");
    assert_eq!(ejected(t), 1);
    assert_eq!(record(&targets, 2, Outcome::Success, &cfg, t), None);
    let later = t + Duration::from_secs(30);
    assert_eq!(ejected(later), 0, "ejection over");
    assert!(record(&targets, 1, fail, &cfg, later).is_some());
}

#[test]
fn unreachable_skips_double_up_to_the_cap() {
    let s = Duration::from_secs;
    #[rustfmt::skip]
    let cases: &[(u32, Duration)] = &[
        (0, s(1)), (1, s(1)), (2, s(2)), (3, s(4)), (4, s(8)), (5, s(16)), (6, s(30)),
        (7, s(30)), (1000, s(30)), (u32::MAX, s(30)),
    ];
    for (failures, want) in cases {
        assert_eq!(unreachable_for(*failures), *want, "{failures} failures");
    }
}

#[test]
fn reachability_marks_once_per_skip_and_clears_on_connect() {
    let r = Reachability::default();
    let now = Instant::now();
    assert!(!r.is_unreachable(now));
    assert_eq!(r.failed(now), Some(Duration::from_secs(1)));
    assert!(r.is_unreachable(now + Duration::from_millis(999)));
    // A burst of failures during the skip does not lengthen it.
    assert_eq!(r.failed(now + Duration::from_millis(10)), None);
    let later = now + Duration::from_secs(1);
    assert!(!r.is_unreachable(later));
    assert_eq!(r.failed(later), Some(Duration::from_secs(2)));
    assert!(r.is_unreachable(later + Duration::from_millis(1999)));
    r.connected();
    assert!(!r.is_unreachable(later));
    assert_eq!(r.failed(later), Some(Duration::from_secs(1)));
}

/// The skip runs on tokio's clock: a test pauses time and walks through it.
#[tokio::test(start_paused = true)]
async fn an_unreachable_endpoint_returns_on_tokios_clock() {
    let r = Reachability::default();
    assert_eq!(r.failed(Instant::now()), Some(UNREACHABLE_BASE));
    tokio::time::advance(UNREACHABLE_BASE - Duration::from_millis(1)).await;
    assert!(r.is_unreachable(Instant::now()));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!r.is_unreachable(Instant::now()));
    // Failing again doubles the skip, up to the cap: never skipped for longer than that.
    assert_eq!(r.failed(Instant::now()), Some(2 * UNREACHABLE_BASE));
    for _ in 0..10 {
        tokio::time::advance(UNREACHABLE_MAX).await;
        r.failed(Instant::now());
    }
    assert!(r.is_unreachable(Instant::now()));
    tokio::time::advance(UNREACHABLE_MAX).await;
    assert!(
        !r.is_unreachable(Instant::now()),
        "never skipped longer than the cap"
    );
}

/// The thread RNG's index is uniform enough to reach every endpoint, and in range.
#[test]
fn random_indexes_cover_the_range() {
    let mut seen = [0u32; 7];
    for _ in 0..7000 {
        seen[random_index(7)] += 1;
    }
    assert!(seen.iter().all(|n| *n > 700), "{seen:?}");
    assert_eq!(random_index(0), 0);
    assert_eq!(random_index(1), 0);
}
