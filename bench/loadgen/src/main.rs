//! `mesh-bench`: an open-loop HTTP/1.1 keep-alive load generator for `bench/run.sh`. Each
//! connection sends on a fixed schedule and latency is measured from the *intended* send time,
//! so a slow response also charges the requests queued behind it (no coordinated omission).
//! Prints one JSON object on stdout.

use std::net::SocketAddr;
// Real wall-clock scheduling: nothing here runs under tokio's paused test clock.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;

mod conn;

/// Open-loop HTTP/1.1 load: RATE requests/s spread evenly over CONNECTIONS keep-alive
/// connections; latency percentiles are corrected for coordinated omission.
#[derive(Parser, Debug)]
#[command(name = "mesh-bench", version)]
struct Args {
    /// Target, e.g. 127.0.0.1:18004.
    #[arg(long)]
    addr: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/1k")]
    path: String,
    /// Total requests per second over all connections.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Keep-alive connections (one OS thread each, one request in flight each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured duration, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load sent on the same schedule before measuring starts.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Required body length of every response (any length when absent).
    #[arg(long)]
    expect_len: Option<usize>,
    /// Connect/read/write timeout; a timed-out request counts as an error.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Unmeasured requests each connection sends before the schedule starts, so connection
    /// setup behind the target (e.g. a proxy's upstream TLS handshake) is not measured.
    #[arg(long, default_value_t = 1)]
    prime: u32,
    /// HTTPS: the CA (PEM) that issued the target's certificate; TLS is used when given.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// HTTPS: the name sent as SNI and checked against the certificate (also the Host).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// Busy-wait this long before each send instead of sleeping, to hit the send time precisely.
    #[arg(long, default_value = "50us", value_parser = humantime::parse_duration)]
    spin: Duration,
}

/// What one connection measured.
struct Tally {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    scheduled: u64,
    ok: u64,
    errors: u64,
    unsent: u64,
    reconnects: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        // Nanoseconds, 1 ns .. 100 s, 3 significant digits.
        let h = || Histogram::new_with_bounds(1, 100_000_000_000, 3);
        Ok(Self {
            latency: h()?,
            send_lag: h()?,
            scheduled: 0,
            ok: 0,
            errors: 0,
            unsent: 0,
            reconnects: 0,
            first_error: None,
        })
    }

    fn error(&mut self, e: &dyn std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, o: Self) -> anyhow::Result<()> {
        self.latency.add(&o.latency)?;
        self.send_lag.add(&o.send_lag)?;
        self.scheduled += o.scheduled;
        self.ok += o.ok;
        self.errors += o.errors;
        self.unsent += o.unsent;
        self.reconnects += o.reconnects;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        Ok(())
    }
}

/// The fixed schedule of one connection.
struct Plan<'a> {
    args: &'a Args,
    /// Time of request 0 of connection 0.
    start: Instant,
    /// Time between two requests on one connection.
    interval: Duration,
    /// Requests intended before this are warm-up and not recorded.
    record_from: Instant,
    /// No request is intended at or after this.
    end: Instant,
    /// Requests still unsent at this point are abandoned and counted as `unsent`.
    give_up: Instant,
    /// TLS towards an HTTPS target.
    tls: Option<conn::Tls>,
}

/// The TLS settings of `--tls-ca`, if given.
fn tls(args: &Args) -> anyhow::Result<Option<conn::Tls>> {
    let Some(path) = &args.tls_ca else {
        return Ok(None);
    };
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let roots = mesh_runtime::tls::root_store(&pem)?;
    let config = rustls::ClientConfig::builder_with_provider(mesh_runtime::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(args.tls_name.clone())?;
    Ok(Some(conn::Tls {
        config: std::sync::Arc::new(config),
        name,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0.0 && args.connections > 0,
        "--rate and --connections must be positive"
    );
    // Threads inherit the timer slack of their creator: 1 ns instead of the default 50 µs
    // makes sleeps wake on time. Best effort (needs Linux >= 4.6).
    let _ = std::fs::write("/proc/self/timerslack_ns", "1");

    let tls = tls(&args)?;
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut c = conn::Conn::connect(args.addr, &args.path, args.timeout, tls.as_ref())
            .with_context(|| format!("connecting to {}", args.addr))?;
        for _ in 0..args.prime {
            c.exchange(args.expect_len)
                .with_context(|| format!("priming a connection to {}", args.addr))?;
        }
        conns.push(c);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let record_from = start + args.warmup;
    let end = record_from + args.duration;
    let plan = Plan {
        args: &args,
        start,
        interval: Duration::from_secs_f64(args.connections as f64 / args.rate),
        record_from,
        end,
        give_up: end + args.timeout,
        tls,
    };

    let mut total = Tally::new()?;
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let plan = &plan;
                s.spawn(move || worker(plan, i, c))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    for t in results {
        total.merge(t)?;
    }

    let us = |h: &Histogram<u64>, q: f64| round2(h.value_at_quantile(q) as f64 / 1000.0);
    let out = serde_json::json!({
        "addr": args.addr.to_string(),
        "path": args.path,
        "rate": args.rate,
        "connections": args.connections,
        "duration_s": args.duration.as_secs_f64(),
        "scheduled": total.scheduled,
        "ok": total.ok,
        "errors": total.errors,
        "unsent": total.unsent,
        "reconnects": total.reconnects,
        "achieved_rps": round2(total.ok as f64 / args.duration.as_secs_f64()),
        "p50_us": us(&total.latency, 0.50),
        "p90_us": us(&total.latency, 0.90),
        "p99_us": us(&total.latency, 0.99),
        "p999_us": us(&total.latency, 0.999),
        "max_us": round2(total.latency.max() as f64 / 1000.0),
        "mean_us": round2(total.latency.mean() / 1000.0),
        "send_lag_p50_us": us(&total.send_lag, 0.50),
        "send_lag_p99_us": us(&total.send_lag, 0.99),
        "first_error": total.first_error,
    });
    println!("{out}");
    Ok(())
}

/// Runs connection `idx`'s schedule: request k is intended at
/// `start + idx * interval / connections + k * interval`.
fn worker(plan: &Plan<'_>, idx: usize, mut conn: conn::Conn) -> anyhow::Result<Tally> {
    let args = plan.args;
    let mut t = Tally::new()?;
    let offset = plan.interval.mul_f64(idx as f64 / args.connections as f64);
    let mut healthy = true;
    for k in 0u32.. {
        let intended = plan.start + offset + plan.interval * k;
        if intended >= plan.end {
            break;
        }
        let measured = intended >= plan.record_from;
        if measured {
            t.scheduled += 1;
        }
        if Instant::now() >= plan.give_up {
            if measured {
                t.unsent += 1;
            }
            continue;
        }
        wait_until(intended, args.spin);
        if !healthy || conn.closing {
            match conn::Conn::connect(args.addr, &args.path, args.timeout, plan.tls.as_ref()) {
                Ok(c) => {
                    conn = c;
                    healthy = true;
                    t.reconnects += 1;
                }
                Err(e) => {
                    if measured {
                        t.error(&e);
                    }
                    continue;
                }
            }
        }
        let sent = Instant::now();
        let result = conn.exchange(args.expect_len);
        let done = Instant::now();
        if let Err(e) = &result {
            healthy = false;
            if measured {
                t.error(e);
            }
            continue;
        }
        if measured {
            t.ok += 1;
            t.latency.saturating_record(nanos(done - intended));
            t.send_lag.saturating_record(nanos(sent - intended));
        }
    }
    Ok(t)
}

/// Sleeps until `spin` before `at`, then busy-waits.
fn wait_until(at: Instant, spin: Duration) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > spin {
            std::thread::sleep(left - spin);
        } else {
            std::hint::spin_loop();
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
