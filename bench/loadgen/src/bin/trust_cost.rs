//! `trust-cost`: the CPU and byte cost of issue 13's checks — signing this node's gossip state
//! after a change, verifying another node's state (chain, identity, signature), the cached
//! re-check of an unchanged state, and the deny-list check after every TLS handshake (serial
//! read from the peer certificate, set lookup against 10,000 revoked serials). Prints a
//! markdown table (median of batches). See BENCHMARKS.md ("Revocation and signed gossip");
//! never run by CI.

use std::hint::black_box;
// Real wall-clock timing of CPU-bound loops.
use std::time::{Duration, Instant, SystemTime};

use chitchat::{ChitchatId, NodeState};
use clap::Parser;
use mesh_api::policy::{Revocation, RevokedCert};
use mesh_api::{Identity, NodeName, TrustDomain};
use mesh_ca::{Authority, SignRequest};
use mesh_runtime::tls::{self, CertSlot};
use meshd::gossip_auth::{KEY_CERT, KEY_SIG, Signer, StateVerifier, verify};

#[derive(Parser, Debug)]
#[command(name = "trust-cost", version)]
struct Args {
    /// Measured batches per case (the table shows their median).
    #[arg(long, default_value_t = 15)]
    batches: usize,
    /// Target length of one batch.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    batch: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let td = TrustDomain::new("mesh.test")?;
    let (ca, _) = Authority::generate(&td, SystemTime::now())?;
    let roots = tls::root_store(&ca.trust_bundle_pem())?;
    let name = NodeName::new("node-1")?;
    let (issued, key) = ca.issue(&SignRequest {
        identity: Identity::node(&td, &name),
        dns_names: Vec::new(),
        ttl: Duration::from_secs(3600),
        now: SystemTime::now(),
    })?;
    let slot = CertSlot::new(Some(tls::certified_key(&issued.chain_pem, &key)?));
    let id = ChitchatId::new(String::from("node-1"), 1, "127.0.0.1:7946".parse()?);
    // A node with its record and three services, as meshd publishes them.
    let mut state = NodeState::for_test();
    state.set(
        "node",
        r#"{"v":1,"inbound":"10.0.0.1:15008","datacenter":"dc1","zone":"a","state":"serving"}"#,
    );
    for svc in ["web", "api", "db"] {
        state.set(
            format!("svc/default/{svc}"),
            r#"{"v":1,"protocol":"http","labels":{"version":"v1"},"healthy":true}"#,
        );
    }
    let before: usize = state.key_values().map(|(k, v)| k.len() + v.len()).sum();
    let signer = Signer::new(slot);
    signer.sign(&id, &mut state);
    let after: usize = state.key_values().map(|(k, v)| k.len() + v.len()).sum();
    let cert_bytes = state.get(KEY_CERT).map_or(0, str::len);
    let sig_bytes = state.get(KEY_SIG).map_or(0, str::len);
    anyhow::ensure!(
        verify(&td, &roots, &id, &state) == meshd::gossip_auth::Verdict::Verified,
        "the signed state does not verify"
    );

    let mut flip = false;
    let mut sign_after_change = || {
        flip = !flip;
        let mut st = state.clone();
        st.set("svc/default/web", if flip { "a" } else { "b" });
        signer.sign(&id, &mut st);
        black_box(st);
    };
    let mut full_verify = || {
        black_box(verify(&td, &roots, &id, &state));
    };
    let mut cached = StateVerifier::new(td.clone(), roots.clone());
    let mut cached_verify = || {
        black_box(cached.usable(&id, &state));
    };
    let leaf = tls::parse_certs(&issued.chain_pem, "leaf")?.remove(0);
    let mut revoked = Revocation::default();
    revoked.add_certs((0..10_000u32).map(|i| RevokedCert {
        serial: format!("{i:032x}"),
        not_after: i64::MAX,
        identity: String::new(),
        node: String::new(),
        revoked_unix: 0,
    }));
    let deny = revoked.deny_list();
    let mut handshake_check = || {
        let serial = tls::peer_serial(std::slice::from_ref(&leaf)).unwrap_or_default();
        black_box(deny.denies_serial(&serial));
    };

    let cases: Vec<(&str, &mut dyn FnMut())> = vec![
        (
            "sign this node's state after a change",
            &mut sign_after_change,
        ),
        (
            "verify another node's changed state (chain + identity + signature)",
            &mut full_verify,
        ),
        (
            "re-check an unchanged state (cached by version)",
            &mut cached_verify,
        ),
        (
            "deny-list check after a handshake (10,000 revoked serials)",
            &mut handshake_check,
        ),
    ];
    println!("| operation | median | iterations per batch |\n|---|---|---|");
    for (name, f) in cases {
        let (median, iters) = measure(f, &args);
        println!("| {name} | {} | {iters} |", fmt_ns(median));
    }
    println!(
        "\nsigned state: {before} bytes of key-values before signing, {after} after \
         (+{} bytes: chain {cert_bytes} B, signature {sig_bytes} B, keys)",
        after - before
    );
    Ok(())
}

fn measure(f: &mut dyn FnMut(), args: &Args) -> (f64, u64) {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(200) || n < 10 {
        f();
        n += 1;
    }
    let per_call = start.elapsed().as_secs_f64() / n as f64;
    let iters = ((args.batch.as_secs_f64() / per_call) as u64).max(1);
    let mut samples: Vec<f64> = (0..args.batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], iters)
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1_000.0 {
        format!("{:.1} µs", ns / 1_000.0)
    } else {
        format!("{ns:.0} ns")
    }
}
