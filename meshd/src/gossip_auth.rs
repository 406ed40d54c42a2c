//! Signed gossip state: each node signs its own key-values with its node key and publishes its
//! certificate chain beside them; a receiver uses a node's state only when the chain verifies
//! against the mesh's roots, names that very node (node certificate of this trust domain, name =
//! gossip node id) and the signature covers every key-value. So a holder of the gossip key can
//! speak only for itself: state forged for another node id is never used, and the last state
//! that verified stays in force (a forger can freeze a victim's state until it restarts, not
//! change it).
//!
//! The signed message is the node id, its generation and every key-value but the signature,
//! sorted, each length-prefixed, behind a domain label ([`signed_message`]). Signing happens
//! after every change of this node's state ([`Signer::sign`], a no-op when nothing signed
//! changed: ECDSA signatures are randomised, and re-signing would bump versions for nothing).
//! Verification is cached per node by the state's `max_version`, so a view rebuild costs a
//! signature check only for nodes whose state changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chitchat::{ChitchatId, NodeState};
use mesh_api::{Identity, NodeName, TrustDomain};
use mesh_runtime::tls::{self, CertSlot, SpiffeVerifier};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::{RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Key of the signer's certificate chain (base64 DER, `.`-separated, leaf first).
pub const KEY_CERT: &str = "auth/cert";
/// Key of the signature (base64 of an ECDSA P-256 SHA-256 signature, ASN.1).
pub const KEY_SIG: &str = "auth/sig";
/// Most key-values a node's state may hold to be used (a node has a few per service).
pub const MAX_KEYS: usize = 512;
/// Longest value used, bytes (a certificate chain is the largest, about 2 KiB).
pub const MAX_VALUE_LEN: usize = 8 * 1024;
/// Longest key used, bytes.
pub const MAX_KEY_LEN: usize = 256;

const DOMAIN: &[u8] = b"meshd gossip state v1\0";
/// Why a state without signature or chain is refused.
const UNSIGNED: &str = "unsigned";

/// A node's key-values, as used in the view.
pub type KeyValues = Vec<(String, String)>;

/// What a node's state proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by the node it is about.
    Verified,
    /// Not usable, and why (bounded text for logs).
    Refused(&'static str),
}

/// Signs this node's state.
#[derive(Clone)]
pub struct Signer {
    node: Arc<CertSlot>,
    /// Digest of the last message signed and of the chain it was signed with.
    last: Arc<Mutex<Option<[u8; 32]>>>,
}

/// Verifies other nodes' states, with a cache and the last state that verified per node.
pub struct StateVerifier {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    /// node id → (generation, max_version) → verdict.
    cache: HashMap<Arc<str>, ((u64, u64), Verdict)>,
    /// node id → the key-values of its last state that verified, with its generation.
    last_good: HashMap<Arc<str>, (u64, KeyValues)>,
    /// States refused (each version once): `meshd_gossip_states_refused_total`.
    refused: prometheus_client::metrics::counter::Counter,
    /// `gossip.legacy_peers`: unsigned states of nodes never seen signed are used as they are
    /// (older meshd during a rolling upgrade).
    accept_unsigned: bool,
}

/// The message a node signs for its state; `kvs` may hold the signature key (skipped).
pub fn signed_message<'a>(
    node_id: &str,
    generation: u64,
    kvs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Vec<u8> {
    let mut kvs: Vec<(&str, &str)> = kvs.filter(|(k, _)| *k != KEY_SIG).collect();
    kvs.sort_unstable();
    let mut msg = Vec::with_capacity(256);
    msg.extend_from_slice(DOMAIN);
    put(&mut msg, node_id.as_bytes());
    msg.extend_from_slice(&generation.to_be_bytes());
    for (k, v) in kvs {
        put(&mut msg, k.as_bytes());
        put(&mut msg, v.as_bytes());
    }
    msg
}

fn put(msg: &mut Vec<u8>, bytes: &[u8]) {
    msg.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    msg.extend_from_slice(bytes);
}

/// A chain as the value of [`KEY_CERT`].
pub fn encode_chain(chain: &[CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|c| BASE64.encode(c.as_ref()))
        .collect::<Vec<_>>()
        .join(".")
}

fn decode_chain(value: &str) -> Option<Vec<CertificateDer<'static>>> {
    value
        .split('.')
        .map(|part| BASE64.decode(part).ok().map(CertificateDer::from))
        .collect()
}

// === impl Signer ===

impl Signer {
    /// Signs with whatever node certificate `node` holds at the time (renewals included).
    pub fn new(node: Arc<CertSlot>) -> Self {
        Self {
            node,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// Publishes this node's chain and a signature over its current state into `state`
    /// (this node's own), unless nothing signed changed since the last call.
    pub fn sign(&self, id: &ChitchatId, state: &mut NodeState) {
        let Some(key) = self.node.get() else {
            return;
        };
        let chain = encode_chain(&key.cert);
        let mut kvs: Vec<(String, String)> = state
            .key_values()
            .filter(|(k, _)| *k != KEY_CERT)
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        kvs.push((KEY_CERT.to_owned(), chain.clone()));
        let msg = signed_message(
            &id.node_id,
            id.generation_id,
            kvs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let digest = tls::sha256(&msg);
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == Some(digest) {
            return;
        }
        let Some(signer) = key
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        else {
            tracing::warn!("the node key cannot sign gossip state (not ECDSA P-256)");
            return;
        };
        match signer.sign(&msg) {
            Ok(sig) => {
                state.set(KEY_CERT, chain);
                state.set(KEY_SIG, BASE64.encode(sig));
                *last = Some(digest);
            }
            Err(e) => tracing::warn!(error = %e, "signing gossip state failed"),
        }
    }
}

// === impl StateVerifier ===

impl StateVerifier {
    /// Verifies against `roots` for nodes of `trust_domain`.
    pub fn new(trust_domain: TrustDomain, roots: Arc<RootCertStore>) -> Self {
        Self {
            trust_domain,
            roots,
            cache: HashMap::new(),
            last_good: HashMap::new(),
            refused: Default::default(),
            accept_unsigned: false,
        }
    }

    /// Uses unsigned states of nodes never seen signed (a rolling upgrade from meshd that did
    /// not sign); a node that signed once is held to it.
    pub fn accepting_unsigned(mut self, accept: bool) -> Self {
        self.accept_unsigned = accept;
        self
    }

    /// Counts refused states in `counter`.
    pub fn counting(mut self, counter: prometheus_client::metrics::counter::Counter) -> Self {
        self.refused = counter;
        self
    }

    /// New roots (a root rotation): every state is verified again.
    pub fn set_roots(&mut self, roots: Arc<RootCertStore>) {
        if !Arc::ptr_eq(&self.roots, &roots) {
            self.roots = roots;
            self.cache.clear();
        }
    }

    /// The key-values of `id` to use: its state when it verifies, else the last state of the
    /// same generation that did (`None`: nothing usable, the node stays out of the view).
    pub fn usable(&mut self, id: &ChitchatId, state: &NodeState) -> Option<Vec<(String, String)>> {
        let verdict = self.verdict(id, state);
        if verdict == Verdict::Verified {
            let kvs: Vec<(String, String)> = state
                .key_values()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            self.last_good
                .insert(id.node_id.clone(), (id.generation_id, kvs.clone()));
            return Some(kvs);
        }
        match self.last_good.get(&*id.node_id) {
            Some((generation, kvs)) if *generation == id.generation_id => Some(kvs.clone()),
            None if self.accept_unsigned && verdict == Verdict::Refused(UNSIGNED) => Some(
                state
                    .key_values()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Forgets nodes not in `live` (bounded memory).
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.cache.retain(|k, _| live(k));
        self.last_good.retain(|k, _| live(k));
    }

    fn verdict(&mut self, id: &ChitchatId, state: &NodeState) -> Verdict {
        let version = (id.generation_id, state.max_version());
        if let Some((v, verdict)) = self.cache.get(&*id.node_id)
            && *v == version
        {
            return verdict.clone();
        }
        let verdict = verify(&self.trust_domain, &self.roots, id, state);
        if let Verdict::Refused(why) = &verdict {
            self.refused.inc();
            tracing::debug!(node = %id.node_id, why, "gossip state refused");
        }
        self.cache
            .insert(id.node_id.clone(), (version, verdict.clone()));
        verdict
    }
}

/// Checks one node's state: caps, chain, identity, signature. Pure but for the clock.
pub fn verify(
    td: &TrustDomain,
    roots: &Arc<RootCertStore>,
    id: &ChitchatId,
    state: &NodeState,
) -> Verdict {
    if state.num_key_values() > MAX_KEYS {
        return Verdict::Refused("too many keys");
    }
    if state
        .key_values()
        .any(|(k, v)| k.len() > MAX_KEY_LEN || v.len() > MAX_VALUE_LEN)
    {
        return Verdict::Refused("key or value too long");
    }
    let (Some(chain), Some(sig)) = (state.get(KEY_CERT), state.get(KEY_SIG)) else {
        return Verdict::Refused(UNSIGNED);
    };
    let Some(chain) = decode_chain(chain) else {
        return Verdict::Refused("certificate chain is not base64 DER");
    };
    let Ok(sig) = BASE64.decode(sig) else {
        return Verdict::Refused("signature is not base64");
    };
    let Ok(name) = NodeName::new(&id.node_id) else {
        return Verdict::Refused("node id is not a node name");
    };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Verdict::Refused("empty certificate chain");
    };
    let verifier = SpiffeVerifier::exact(roots.clone(), Identity::node(td, &name));
    let server = ServerName::try_from("gossip.mesh.invalid").expect("a valid DNS name");
    if verifier
        .verify_server_cert(leaf, intermediates, &server, &[], UnixTime::now())
        .is_err()
    {
        return Verdict::Refused("certificate does not prove this node of this mesh");
    }
    let Some(spki) = tls::public_key(leaf) else {
        return Verdict::Refused("certificate key unreadable");
    };
    let msg = signed_message(&id.node_id, id.generation_id, state.key_values());
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki);
    if key.verify(&msg, &sig).is_err() {
        return Verdict::Refused("signature does not match the state");
    }
    Verdict::Verified
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
