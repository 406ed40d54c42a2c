//! When a starting node starts taking work: it joins gossip as `starting` (peers send it
//! nothing) and turns `serving` once it has learned the mesh — its view holds other members
//! and has stopped changing for two gossip rounds — so that its apps' first calls find their
//! upstreams' endpoints instead of failing. A node without seeds (the first of a mesh) serves at
//! once; one whose seeds never answer serves after [`MAX_WARMUP`] rather than never.

use std::sync::Arc;
use std::time::Duration;

use mesh_api::gossip::{self, NodeInfo, NodeState};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use super::{MeshView, resign};
use crate::gossip_auth::Signer;

/// Longest a node stays `starting` while its view is still changing or its seeds are silent.
pub const MAX_WARMUP: Duration = Duration::from_secs(5);

/// Gossip rounds the view must stay unchanged before the node serves.
pub const STABLE_ROUNDS: u32 = 2;

/// Whether a node may serve: no seeds to learn from, or it knows other members and its view
/// has been stable for `stable` (at least [`STABLE_ROUNDS`] × `interval`), or it has waited
/// [`MAX_WARMUP`]. Pure.
pub fn warm(
    has_seeds: bool,
    members: usize,
    stable: Duration,
    waited: Duration,
    interval: Duration,
) -> bool {
    !has_seeds || waited >= MAX_WARMUP || (members > 1 && stable >= interval * STABLE_ROUNDS)
}

/// Turns this node `serving` once [`warm`]; never undoes a later `draining`.
pub(super) async fn serve_when_warm(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    signer: Signer,
    mut view_rx: watch::Receiver<Arc<MeshView>>,
    has_seeds: bool,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut changed = Instant::now();
    let mut tick = tokio::time::interval(interval);
    loop {
        let members = view_rx.borrow_and_update().members.len();
        if warm(
            has_seeds,
            members,
            changed.elapsed(),
            started.elapsed(),
            interval,
        ) {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = view_rx.changed() => changed = Instant::now(),
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
    }
    let mut c = chitchat.lock().await;
    let current = c
        .self_node_state()
        .get(gossip::KEY_NODE)
        .map(gossip::decode::<NodeInfo>);
    let Some(Ok(mut node)) = current else { return };
    if node.state != NodeState::Starting {
        return;
    }
    node.state = NodeState::Serving;
    c.self_node_state()
        .set(gossip::KEY_NODE, gossip::encode(&node));
    resign(&mut c, &signer);
    info!(waited = ?started.elapsed(), "learned the mesh; now taking work");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_table() {
        let ms = Duration::from_millis;
        let i = ms(200);
        #[rustfmt::skip]
        let cases = [
            // (has_seeds, members, stable, waited, warm)
            (false, 1, ms(0), ms(0), true),
            (true, 1, ms(4000), ms(4000), false),
            (true, 3, ms(399), ms(1000), false),
            (true, 3, ms(400), ms(1000), true),
            (true, 1, ms(0), ms(5000), true),
            (true, 2, ms(0), ms(5000), true),
        ];
        for (seeds, members, stable, waited, want) in cases {
            assert_eq!(
                warm(seeds, members, stable, waited, i),
                want,
                "{seeds} {members} {stable:?} {waited:?}"
            );
        }
    }
}
