//! Table tests of signed gossip state: what a key holder can and cannot make others believe.

use std::time::{Duration, SystemTime};

use mesh_ca::{Authority, SignRequest};

use super::*;

struct Mesh {
    td: TrustDomain,
    ca: Authority,
    roots: Arc<RootCertStore>,
}

fn mesh(td: &str) -> Mesh {
    let td = TrustDomain::new(td).unwrap();
    let (ca, _) = Authority::generate(&td, SystemTime::now()).unwrap();
    let roots = tls::root_store(&ca.trust_bundle_pem()).unwrap();
    Mesh { td, ca, roots }
}

fn signer_for(m: &Mesh, identity: Identity) -> Signer {
    let (issued, key) =
        m.ca.issue(&SignRequest {
            identity,
            dns_names: Vec::new(),
            ttl: Duration::from_secs(3600),
            now: SystemTime::now(),
        })
        .unwrap();
    Signer::new(CertSlot::new(Some(
        tls::certified_key(&issued.chain_pem, &key).unwrap(),
    )))
}

fn node_signer(m: &Mesh, name: &str) -> Signer {
    signer_for(m, Identity::node(&m.td, &NodeName::new(name).unwrap()))
}

fn id(name: &str, generation: u64) -> ChitchatId {
    ChitchatId::new(
        name.to_owned(),
        generation,
        "127.0.0.1:7946".parse().unwrap(),
    )
}

fn state(kvs: &[(&str, &str)]) -> NodeState {
    let mut st = NodeState::for_test();
    for (k, v) in kvs {
        st.set(*k, *v);
    }
    st
}

fn signed(signer: &Signer, id: &ChitchatId, kvs: &[(&str, &str)]) -> NodeState {
    let mut st = state(kvs);
    signer.sign(id, &mut st);
    st
}

const KVS: &[(&str, &str)] = &[
    ("node", "{\"state\":\"serving\"}"),
    ("svc/default/api", "{}"),
];

#[test]
fn a_node_speaks_for_itself_only() {
    let m = mesh("mesh.test");
    let a = id("a", 1);
    let ok = signed(&node_signer(&m, "a"), &a, KVS);
    assert_eq!(verify(&m.td, &m.roots, &a, &ok), Verdict::Verified);

    // Each way a key holder could try to speak for another node, or to slip in a change.
    let b_as_a = signed(&node_signer(&m, "b"), &a, KVS);
    let mut tampered = ok.clone();
    tampered.set("node", "{\"state\":\"draining\"}");
    let mut added = ok.clone();
    added.set("svc/default/evil", "{}");
    let other = mesh("mesh.test");
    let foreign_ca = signed(&node_signer(&other, "a"), &a, KVS);
    let other_td = mesh("other.test");
    let foreign_td = signed(&node_signer(&other_td, "a"), &a, KVS);
    let workload = signed(
        &signer_for(
            &m,
            Identity::parse("spiffe://mesh.test/ns/default/svc/api").unwrap(),
        ),
        &a,
        KVS,
    );
    let mut stolen_sig = state(KVS);
    stolen_sig.set(KEY_CERT, ok.get(KEY_CERT).unwrap());
    stolen_sig.set(KEY_SIG, ok.get(KEY_SIG).unwrap());
    stolen_sig.set("svc/default/db", "{}");
    let cases: Vec<(&str, ChitchatId, NodeState)> = vec![
        ("signed by b, claims a", a.clone(), b_as_a),
        ("a value changed after signing", a.clone(), tampered),
        ("a key added after signing", a.clone(), added),
        ("another mesh's CA", a.clone(), foreign_ca),
        ("another trust domain", a.clone(), foreign_td),
        ("a workload certificate", a.clone(), workload),
        (
            "a's signature replayed over other state",
            a.clone(),
            stolen_sig,
        ),
        (
            "a's state replayed under another generation",
            id("a", 2),
            ok.clone(),
        ),
        (
            "a's state replayed under another id",
            id("b", 1),
            ok.clone(),
        ),
        ("unsigned", a, state(KVS)),
    ];
    for (what, who, st) in cases {
        assert!(
            matches!(verify(&m.td, &m.roots, &who, &st), Verdict::Refused(_)),
            "{what}: accepted"
        );
    }
}

#[test]
fn signing_again_without_a_change_writes_nothing() {
    let m = mesh("mesh.test");
    let s = node_signer(&m, "a");
    let a = id("a", 1);
    let mut st = state(KVS);
    s.sign(&a, &mut st);
    let v = st.max_version();
    s.sign(&a, &mut st);
    assert_eq!(
        st.max_version(),
        v,
        "no new versions for an unchanged state"
    );
    st.set("svc/default/db", "{}");
    s.sign(&a, &mut st);
    assert!(st.max_version() > v + 1);
    assert_eq!(verify(&m.td, &m.roots, &a, &st), Verdict::Verified);
}

#[test]
fn the_last_verified_state_stays_in_force() {
    let m = mesh("mesh.test");
    let a = id("a", 1);
    let mut v = StateVerifier::new(m.td.clone(), m.roots.clone());
    let good = signed(&node_signer(&m, "a"), &a, KVS);
    let kvs = v.usable(&a, &good).unwrap();
    assert!(kvs.iter().any(|(k, _)| k == "svc/default/api"));
    // A forger rewrites a's state (new versions): what was verified stays.
    let mut forged = good.clone();
    forged.set("node", "{\"state\":\"draining\"}");
    assert_eq!(v.usable(&a, &forged), Some(kvs));
    // A never-verified node is not used at all; a new generation needs its own proof.
    assert_eq!(v.usable(&id("ghost", 1), &state(KVS)), None);
    assert_eq!(v.usable(&id("a", 2), &forged), None);
    v.retain(|n| n != "a");
    assert_eq!(v.usable(&a, &forged), None, "forgotten once gone");
}

#[test]
fn oversized_state_is_refused_before_any_crypto() {
    let m = mesh("mesh.test");
    let a = id("a", 1);
    let big = "x".repeat(MAX_VALUE_LEN + 1);
    let st = signed(&node_signer(&m, "a"), &a, &[("node", big.as_str())]);
    assert_eq!(
        verify(&m.td, &m.roots, &a, &st),
        Verdict::Refused("key or value too long")
    );
    let many: Vec<(String, String)> = (0..=MAX_KEYS)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let st = signed(&node_signer(&m, "a"), &a, &refs);
    assert_eq!(
        verify(&m.td, &m.roots, &a, &st),
        Verdict::Refused("too many keys")
    );
}

#[test]
fn unsigned_states_pass_only_for_legacy_peers_never_seen_signed() {
    let m = mesh("mesh.test");
    let a = id("a", 1);
    let mut strict = StateVerifier::new(m.td.clone(), m.roots.clone());
    assert_eq!(strict.usable(&a, &state(KVS)), None);
    let mut upgrading = StateVerifier::new(m.td.clone(), m.roots.clone()).accepting_unsigned(true);
    assert!(
        upgrading.usable(&a, &state(KVS)).is_some(),
        "an older meshd is heard"
    );
    // Once a signed, an unsigned state for it is a forgery: the signed one stays.
    let good = signed(&node_signer(&m, "a"), &a, KVS);
    let kvs = upgrading.usable(&a, &good).unwrap();
    let mut stripped = state(KVS);
    stripped.set("node", "{\"state\":\"draining\"}");
    assert_eq!(upgrading.usable(&a, &stripped), Some(kvs));
}
