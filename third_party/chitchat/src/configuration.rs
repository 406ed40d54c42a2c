#![allow(clippy::derive_partial_eq_without_eq)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::{
    ChitchatId, FailureDetectorConfig, NodeState, ProtocolVersion, SwimConfig, SyncConfig,
};

/// An optional user-defined callback executed when the self node is lagging behind.
pub type CatchupCallback = Box<dyn Fn() + Send>;

/// An optional user-defined predicate liveness predication applied on top of the output of the
/// failure detector.
pub type ExtraLivenessPredicate = Box<dyn Fn(&NodeState) -> bool + Send>;

/// Which node ids a node takes into its table when it first hears of them (in a peer's
/// digest), and how large that table may grow. Added in meshd's copy of chitchat: without it,
/// one SYN listing invented ids grows every node's table (and so its digest) until no node can
/// send a digest in one datagram.
#[derive(Clone)]
pub struct Admission {
    /// Whether a new id may enter at all.
    pub accept: std::sync::Arc<dyn Fn(&ChitchatId) -> bool + Send + Sync>,
    /// Most bytes the digest of the whole table may take (an upper bound per entry is counted),
    /// so the SYN stays within one datagram.
    pub max_digest_len: usize,
}

/// A struct for configuring a Chitchat instance.
pub struct ChitchatConfig {
    pub chitchat_id: ChitchatId,
    pub cluster_id: String,
    pub gossip_interval: Duration,
    pub listen_addr: SocketAddr,
    pub seed_nodes: Vec<String>,
    pub failure_detector_config: FailureDetectorConfig,
    /// How long tombstoned key-value pairs are retained before garbage collection.
    ///
    /// Garbage collection runs during gossip rounds. Chitchat records the version of the latest
    /// garbage-collected tombstone so that peers which may have missed a deletion are reset and
    /// repopulated from the remaining state.
    pub marked_for_deletion_grace_period: Duration,
    /// An optional callback executed when the self node is lagging behind. It
    /// is meant to wire up an external mechanism capable of catching up the
    /// Chitchat state faster than the Chitchat protocol. That external
    /// mechanism will call [`crate::Chitchat::reset_node_state`] to communicate
    /// the results back to Chitchat. For instance, in Quickwit, we use a GRPC
    /// API to fetch the states from other nodes in the cluster.
    pub catchup_callback: Option<CatchupCallback>,
    // Extra lifeness predicate that can be used to define what a node being "live" means.
    // It can be used for instance, to only surface the nodes that are both alive according
    // to the failure detector, but also have a given set of required keys.
    pub extra_liveness_predicate: Option<ExtraLivenessPredicate>,
    /// Protocol version used to exchange messages between peers. The latest version is V1, which
    /// compresses the digest. This MUST stay `V0` until every node in the cluster runs a version
    /// able to decode the newer format.
    pub protocol_version: ProtocolVersion,
    /// New node ids: which are taken in, and how large the table may grow (meshd's addition;
    /// `None`: every id, without bound, as upstream).
    pub admission: Option<Admission>,
    /// SWIM failure detection (protocol V2 only; meshd's addition).
    pub swim: SwimConfig,
    /// Which entries V2 digests carry (meshd's addition).
    pub sync: SyncConfig,
}

impl Default for SwimConfig {
    /// Tuned for a 200 ms gossip interval: a suspicion lasts 200 ms per decade of members
    /// (600 ms at 1,000) once three other members confirm it, ten times that alone (time for
    /// a falsely suspected member to hear of it and refute, however slow its links).
    fn default() -> Self {
        Self {
            suspicion_min: Duration::from_millis(200),
            suspicion_max_mult: 10,
            expected_confirmations: 3,
            retransmit_mult: 4,
        }
    }
}

impl ChitchatConfig {
    #[cfg(test)]
    pub fn for_test(port: u16) -> Self {
        let chitchat_id = ChitchatId::for_local_test(port);
        let listen_addr = chitchat_id.gossip_advertise_addr;
        Self {
            chitchat_id,
            cluster_id: "default-cluster".to_string(),
            gossip_interval: Duration::from_millis(50),
            listen_addr,
            seed_nodes: Vec::new(),
            failure_detector_config: Default::default(),
            marked_for_deletion_grace_period: Duration::from_secs(10_000),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
            admission: None,
            swim: SwimConfig::default(),
            sync: SyncConfig::default(),
        }
    }
}

#[cfg(test)]
impl Default for ChitchatConfig {
    fn default() -> Self {
        let chitchat_id = ChitchatId::for_local_test(10_000);
        let listen_addr = chitchat_id.gossip_advertise_addr;
        Self {
            chitchat_id,
            cluster_id: "default-cluster".to_string(),
            gossip_interval: Duration::from_millis(1_000),
            listen_addr,
            seed_nodes: Vec::new(),
            failure_detector_config: Default::default(),
            marked_for_deletion_grace_period: Duration::from_secs(60 * 15), // 15mn
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
            admission: None,
            swim: SwimConfig::default(),
            sync: SyncConfig::default(),
        }
    }
}
