//! `authz-bench`: the CPU cost of one authorization decision
//! (`mesh_api::policy::authz::authorize`) with 100 AuthorizationPolicies loaded, for a few
//! representative connections, plus the cost of the policy-update steps a node runs per event.
//! Prints a markdown table. See BENCHMARKS.md ("Policy"); never run by CI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::IpAddr;
// Real wall-clock timing of CPU-bound loops.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use mesh_api::policy::authz::{self, Decision, Request, Workload};
use mesh_api::policy::{Resource, Snapshot, parse_file, path};
use mesh_api::{Identity, ServiceKey};

/// Times `authorize` over a 100-policy snapshot; `--print-policies` prints the policy file
/// instead (for `meshctl apply -f`).
#[derive(Parser, Debug)]
#[command(name = "authz-bench", version)]
struct Args {
    /// Measured batches per case (the table shows their median).
    #[arg(long, default_value_t = 15)]
    batches: usize,
    /// Target length of one batch; the iteration count is calibrated to it.
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    batch: Duration,
    /// Unmeasured run of every case before the batches.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Print the 100-policy TOML file and exit.
    #[arg(long)]
    print_policies: bool,
}

/// The workload every case calls: `default/api` with label `version=v1` on app port 8080.
const TARGET: &str = "default/api";
const PORT: u16 = 8080;
const TD: &str = "mesh.test";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = policies();
    if args.print_policies {
        print!("{text}");
        return Ok(());
    }
    let resources = parse_file("bench.toml", &text).map_err(|problems| {
        anyhow::anyhow!(
            "the generated policies do not parse:\n{}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    anyhow::ensure!(
        resources.len() == 100,
        "expected 100 policies, got {}",
        resources.len()
    );
    let snapshot = Snapshot::new(1, resources.clone());
    let empty = Snapshot::default();

    let target = ServiceKey::parse(TARGET).context("target service")?;
    let idle = ServiceKey::parse("default/idle").context("idle service")?;
    let labels = BTreeMap::from([("version".to_owned(), "v1".to_owned())]);
    let web = identity("web/frontend")?;
    let quarantined = identity("quarantine/worker")?;
    let stranger = identity("other/x")?;
    let ip = |s: &str| s.parse::<IpAddr>().context("ip");
    let req = |source, source_ip, service| Request {
        source: Some(source),
        source_ip,
        workload: Workload {
            service,
            labels: &labels,
        },
        port: PORT,
        http: None,
    };

    let selecting = authz::selecting(
        &snapshot,
        &Workload {
            service: &target,
            labels: &labels,
        },
    )
    .count();
    anyhow::ensure!(
        selecting == 10,
        "expected 10 policies selecting {TARGET}, got {selecting}"
    );

    // (name, what it exercises, snapshot, request, expected decision summary)
    let cases: Vec<Case<'_>> = vec![
        Case {
            name: "allow (5th ALLOW policy matches)",
            snapshot: &snapshot,
            request: req(&web, ip("10.1.2.3")?, &target),
            expect: "allow AuthorizationPolicy/default/api-c5-web",
        },
        Case {
            name: "deny (mesh-wide DENY matches)",
            snapshot: &snapshot,
            request: req(&quarantined, ip("10.1.2.3")?, &target),
            expect: "deny AuthorizationPolicy/mesh-system/deny-quarantine",
        },
        Case {
            name: "no match (no_allow_match)",
            snapshot: &snapshot,
            request: req(&stranger, ip("192.168.1.1")?, &target),
            expect: "deny no_allow_match",
        },
        Case {
            name: "unselected service (default allow)",
            snapshot: &snapshot,
            request: req(&web, ip("10.1.2.3")?, &idle),
            expect: "allow default",
        },
        Case {
            name: "empty snapshot (baseline)",
            snapshot: &empty,
            request: req(&web, ip("10.1.2.3")?, &target),
            expect: "allow default",
        },
    ];
    for c in &cases {
        let got = summary(&authz::authorize(c.snapshot, &c.request));
        anyhow::ensure!(
            got == c.expect,
            "case {:?}: expected {:?}, got {got:?}",
            c.name,
            c.expect
        );
    }

    // What the inbound adds per HTTP request: the snapshot's path options, path
    // normalization, and the decision with the request's method and path.
    let no_headers: Vec<(String, String)> = Vec::new();
    let http_req = |path: &'static str| Request {
        http: Some(authz::Http {
            method: "GET",
            path,
            headers: &no_headers,
        }),
        ..req(&web, "10.1.2.3".parse().expect("ip"), &target)
    };
    let opts = snapshot.mesh_config().path_options();
    let normal = "/api/v1/items/42";
    let spelled = "//api/./v1/x/../%69tems/42";
    anyhow::ensure!(
        path::normalize(spelled, opts).ok().as_deref() == Some(normal),
        "{spelled} does not normalize to {normal}"
    );
    let allow_http = http_req(normal);
    // Interleave the cases batch by batch so machine drift hits all of them alike.
    let mut runs: Vec<Runner<'_>> = cases
        .iter()
        .map(|c| {
            let c = *c;
            Runner::new(c.name, move || {
                black_box(authz::authorize(
                    black_box(c.snapshot),
                    black_box(&c.request),
                ));
            })
        })
        .collect();
    runs.push(Runner::new(
        "path options of the snapshot (mesh_config)",
        || {
            black_box(black_box(&snapshot).mesh_config().path_options());
        },
    ));
    runs.push(Runner::new(
        "normalize a normal path (borrowed)",
        move || {
            black_box(path::normalize(black_box(normal), opts).ok());
        },
    ));
    runs.push(Runner::new("normalize an obfuscated path", move || {
        black_box(path::normalize(black_box(spelled), opts).ok());
    }));
    runs.push(Runner::new(
        "per HTTP request: options + normalize + authorize (allow)",
        || {
            let s = black_box(&snapshot);
            let o = s.mesh_config().path_options();
            let p = path::normalize(black_box(normal), o).ok();
            black_box(&p);
            black_box(authz::authorize(s, black_box(&allow_http)));
        },
    ));
    // What a node does per policy event besides the fsync: decode one resource from its wire
    // JSON, and (incremental events) clone the whole snapshot to apply it to.
    let one = resources
        .iter()
        .find(|r| r.key.name.as_str() == "api-c5-web")
        .context("api-c5-web")?;
    let (kind, ns, name, spec) = wire(one);
    runs.push(Runner::new(
        "decode one resource (Resource::from_json)",
        move || {
            black_box(Resource::from_json(&kind, &ns, &name, black_box(&spec)).ok());
        },
    ));
    runs.push(Runner::new("clone the 100-policy snapshot", || {
        black_box(black_box(&snapshot).clone());
    }));
    let saved_len = save_json(&snapshot).len();
    runs.push(Runner::new("serialize the snapshot as policy.json", || {
        black_box(save_json(black_box(&snapshot)));
    }));
    runs.push(Runner::new("parse_file, 100 policies (TOML)", || {
        black_box(parse_file("bench.toml", black_box(&text)).ok());
    }));

    for r in &mut runs {
        r.calibrate(args.batch, args.warmup / (cases.len() as u32 + 3));
    }
    for _ in 0..args.batches {
        for r in &mut runs {
            r.batch();
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "authz-bench: 100 AuthorizationPolicies ({selecting} select {TARGET}), TCP connections \
         (meshd is L4: one decision per connection); median of {} batches of ~{:?}",
        args.batches, args.batch
    );
    let _ = writeln!(
        out,
        "policy.json of this snapshot as meshd writes it: {saved_len} bytes"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| case | ns per call, median | min | max | calls per batch |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    for r in &runs {
        let (med, min, max) = r.stats();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.name,
            fmt_ns(med),
            fmt_ns(min),
            fmt_ns(max),
            r.iters
        );
    }
    print!("{out}");
    Ok(())
}

#[derive(Clone, Copy)]
struct Case<'a> {
    name: &'static str,
    snapshot: &'a Snapshot,
    request: Request<'a>,
    expect: &'static str,
}

/// One timed closure: its calibrated batch size and the ns per call of every batch.
struct Runner<'a> {
    name: &'static str,
    f: Box<dyn FnMut() + 'a>,
    iters: u64,
    samples: Vec<f64>,
}

impl<'a> Runner<'a> {
    fn new(name: &'static str, f: impl FnMut() + 'a) -> Self {
        Self {
            name,
            f: Box::new(f),
            iters: 1,
            samples: Vec::new(),
        }
    }

    /// Runs unmeasured for `warmup`, then picks the iteration count of a `batch`-long batch.
    fn calibrate(&mut self, batch: Duration, warmup: Duration) {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < warmup || n < 10 {
            (self.f)();
            n += 1;
        }
        let per_call = start.elapsed().as_secs_f64() / n as f64;
        self.iters = ((batch.as_secs_f64() / per_call) as u64).max(1);
    }

    fn batch(&mut self) {
        let start = Instant::now();
        for _ in 0..self.iters {
            (self.f)();
        }
        self.samples
            .push(start.elapsed().as_nanos() as f64 / self.iters as f64);
    }

    /// Median, min and max ns per call.
    fn stats(&self) -> (f64, f64, f64) {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        let med = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        (
            med,
            s.first().copied().unwrap_or(f64::NAN),
            s.last().copied().unwrap_or(f64::NAN),
        )
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

fn identity(ns_svc: &str) -> anyhow::Result<Identity> {
    let (ns, svc) = ns_svc.split_once('/').context("ns/svc")?;
    Identity::parse(&format!("spiffe://{TD}/ns/{ns}/svc/{svc}")).context("identity")
}

/// `allow <policy>`, `allow default`, `deny <policy>` or `deny <reason>`.
fn summary(d: &Decision) -> String {
    match d {
        Decision::Allow {
            policy: Some(p), ..
        } => format!("allow {p}"),
        Decision::Allow { policy: None, .. } => "allow default".to_owned(),
        Decision::Deny {
            policy: Some(p), ..
        } => format!("deny {p}"),
        Decision::Deny { reason, .. } => format!("deny {reason}"),
    }
}

/// What meshd's `store::save` writes (the fsync'd write itself is not timed): every spec to a
/// JSON value, the whole file pretty-printed.
fn save_json(s: &Snapshot) -> Vec<u8> {
    let resources: Vec<serde_json::Value> = s
        .resources
        .values()
        .map(|r| {
            serde_json::json!({
                "kind": r.key.kind.as_str(),
                "namespace": r.key.namespace.to_string(),
                "name": r.key.name.to_string(),
                "spec": serde_json::to_value(&r.spec).unwrap_or_default(),
            })
        })
        .collect();
    let file = serde_json::json!({ "format": 1, "revision": s.revision, "resources": resources });
    serde_json::to_vec_pretty(&file).unwrap_or_default()
}

/// A resource's wire form: kind, namespace, name, canonical spec JSON.
fn wire(r: &Resource) -> (String, String, String, String) {
    (
        r.key.kind.as_str().to_owned(),
        r.key.namespace.to_string(),
        r.key.name.to_string(),
        r.spec_json(),
    )
}

// === the 100 policies ===

/// 100 AuthorizationPolicies. Ten select `default/api` (label version=v1), evaluated in key
/// order: its namespace first (`default` sorts before `mesh-system`), then the root namespace.
///
/// * `default/api-a-deny-blocklist` DENY from 203.0.113.0/24
/// * `default/api-b-audit-ops` AUDIT from namespace ops to port 9090
/// * `default/api-c1..c6` ALLOW with principal prefixes, `*suffix` principals, namespace
///   wildcards, ip_blocks and ports; c5 is the one `web/frontend` from 10.1.2.3 matches
///   (c6 selects by label)
/// * `mesh-system/deny-quarantine` DENY mesh-wide from namespace quarantine
/// * `mesh-system/audit-scanners` AUDIT mesh-wide from `*/svc/scanner`
///
/// The other 90 select other services: 40 in `default` (walked past by selector), 45 in
/// `shop`, `ops` and `team-a` (skipped by namespace), 5 in `mesh-system` with a service
/// selector. Every seventh of those is DENY, every eleventh AUDIT.
fn policies() -> String {
    let mut t = String::new();
    let res = |t: &mut String,
               ns: &str,
               name: &str,
               action: &str,
               selector: &str,
               rules: &[&str]| {
        let _ = writeln!(
            t,
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nnamespace = \"{ns}\"\nname = \"{name}\"\naction = \"{action}\""
        );
        if !selector.is_empty() {
            let _ = writeln!(t, "selector = {selector}");
        }
        for r in rules {
            let _ = writeln!(t, "[[resource.rules]]\n{r}");
        }
        t.push('\n');
    };
    let api = "{ service = \"api\" }";
    res(
        &mut t,
        "default",
        "api-a-deny-blocklist",
        "deny",
        api,
        &[r#"from = [{ ip_blocks = ["203.0.113.0/24", "198.51.100.7"] }]"#],
    );
    res(
        &mut t,
        "default",
        "api-b-audit-ops",
        "audit",
        api,
        &[r#"from = [{ namespaces = ["ops"] }]
to = [{ ports = [9090] }]"#],
    );
    res(
        &mut t,
        "default",
        "api-c1-billing",
        "allow",
        api,
        &[
            r#"from = [{ principals = ["spiffe://mesh.test/ns/billing/*"] }]
to = [{ ports = [8080] }]"#,
        ],
    );
    res(
        &mut t,
        "default",
        "api-c2-teams",
        "allow",
        api,
        &[
            r#"from = [{ namespaces = ["team-*"], ip_blocks = ["10.20.0.0/16"] }]"#,
            r#"from = [{ namespaces = ["partners"], not_ip_blocks = ["10.0.0.0/8"] }]"#,
        ],
    );
    res(
        &mut t,
        "default",
        "api-c3-admin",
        "allow",
        api,
        &[
            r#"from = [{ principals = ["spiffe://mesh.test/ns/default/svc/admin", "spiffe://mesh.test/ns/ops/svc/console"] }]"#,
        ],
    );
    res(
        &mut t,
        "default",
        "api-c4-batch",
        "allow",
        api,
        &[r#"from = [{ principals = ["*/svc/batch", "*/svc/cron"] }]
to = [{ ports = [8081, 8082] }]"#],
    );
    res(
        &mut t,
        "default",
        "api-c5-web",
        "allow",
        api,
        &[
            r#"from = [{ principals = ["spiffe://mesh.test/ns/mobile/*"] }]"#,
            r#"from = [{ principals = ["spiffe://mesh.test/ns/web/*"], ip_blocks = ["10.0.0.0/8", "fd00::/8"] }]
to = [{ ports = [8080, 8443] }]"#,
        ],
    );
    res(
        &mut t,
        "default",
        "api-c6-v1-mobile",
        "allow",
        "{ service = \"api\", labels = { version = \"v1\" } }",
        &[
            r#"from = [{ principals = ["spiffe://mesh.test/ns/mobile/*"], not_namespaces = ["dev-*"] }]
to = [{ ports = [8443] }]"#,
        ],
    );
    res(
        &mut t,
        "mesh-system",
        "audit-scanners",
        "audit",
        "",
        &[r#"from = [{ principals = ["*/svc/scanner"] }]"#],
    );
    res(
        &mut t,
        "mesh-system",
        "deny-quarantine",
        "deny",
        "",
        &[r#"from = [{ namespaces = ["quarantine"] }]"#],
    );

    let action = |i: usize| match i {
        i if i % 7 == 3 => "deny",
        i if i % 11 == 5 => "audit",
        _ => "allow",
    };
    let other = |t: &mut String, i: usize, ns: &str, name: String, svc: String| {
        let rules = [
            format!(
                "from = [{{ principals = [\"spiffe://mesh.test/ns/{ns}/svc/caller-{i}\", \"spiffe://mesh.test/ns/shared/*\"] }}]\nto = [{{ ports = [{}] }}]",
                8000 + i
            ),
            format!(
                "from = [{{ namespaces = [\"team-{i}\", \"ops\"], ip_blocks = [\"10.{}.0.0/16\"] }}]",
                i % 250
            ),
        ];
        let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
        res(
            t,
            ns,
            &name,
            action(i),
            &format!("{{ service = \"{svc}\" }}"),
            &rules,
        );
    };
    let mut i = 0;
    for k in 0..40 {
        other(
            &mut t,
            i,
            "default",
            format!("svc-{k:02}-policy"),
            format!("svc-{k:02}"),
        );
        i += 1;
    }
    for (ns, n) in [("shop", 20), ("ops", 15), ("team-a", 10)] {
        for k in 0..n {
            // One of them selects a service called api, in another namespace.
            let svc = if k == 0 {
                "api".to_owned()
            } else {
                format!("{ns}-svc-{k}")
            };
            other(&mut t, i, ns, format!("{ns}-policy-{k:02}"), svc);
            i += 1;
        }
    }
    for k in 0..5 {
        other(
            &mut t,
            i,
            "mesh-system",
            format!("root-db-{k}"),
            format!("db-{k}"),
        );
        i += 1;
    }
    t
}
