use crate::ChitchatId;
use crate::delta::Delta;
use crate::digest::Digest;
use crate::swim::MemberUpdate;

/// Chitchat message.
///
/// Each variant represents a step of the gossip "handshake"
/// between node A and node B.
/// The names {SYN, SYN-ACK, ACK} of the different steps are borrowed from
/// TCP handshake.
///
/// The message is a pure data model. The protocol version used to encode it on
/// the wire is not part of the model: it is a (de)serialization parameter (see
/// `message_serialize`), stamped in the message header so peers can decode the
/// digest regardless of the sender's wire format.
#[derive(Debug, Eq, PartialEq)]
pub enum ChitchatMessage {
    /// Scuttlebutt SYN: node A initiates a handshake and sends its digest.
    Syn { cluster_id: String, digest: Digest },
    /// Scuttlebutt SYN-ACK: node B returns a partial update as described in the Scuttlebutt
    /// reconciliation algorithm and its own digest.
    SynAck { digest: Digest, delta: Delta },
    /// Scuttlebutt ACK: node A returns a partial update for B.
    Ack { delta: Delta },
    /// Node B rejects the SYN message because node A and B belong to different clusters.
    BadCluster,
    /// V2 SYN (meshd): a digest of only some entries (recent changes, a rotating window and the
    /// sender's own entry; with a `sweep`, every entry in the sweep's range instead), so its
    /// size does not grow with the cluster, plus SWIM membership updates. Liveness is not in
    /// the digest: SWIM probes carry it.
    Syn2 {
        cluster_id: String,
        from: ChitchatId,
        sweep: Option<Sweep>,
        digest: Digest,
        updates: Vec<MemberUpdate>,
    },
    /// V2 SYN-ACK: B's entries for the ids of A's digest and for B's own recent changes (for a
    /// sweep: every entry of B in the range, as far as one message holds, and the range it
    /// covered), what A lacks among them, and updates.
    SynAck2 {
        digest: Digest,
        delta: Delta,
        swept: Option<Sweep>,
        updates: Vec<MemberUpdate>,
    },
    /// V2 ACK: what B lacks among the ids of B's SYN-ACK digest; A's versions of the ids B
    /// has newer (B's recent changes A lacks: B answers with one more `Ack2` carrying them and
    /// an empty request, so a change is pulled as well as pushed); and updates.
    Ack2 {
        delta: Delta,
        request: Digest,
        updates: Vec<MemberUpdate>,
    },
    /// SWIM probe: `target` answers with a [`ChitchatMessage::PingAck`] of the same `seq`.
    Ping {
        seq: u64,
        from: ChitchatId,
        target: ChitchatId,
        updates: Vec<MemberUpdate>,
    },
    /// SWIM indirect probe: ping `target` for `from`, relay its ack as `seq`.
    PingReq {
        seq: u64,
        from: ChitchatId,
        target: ChitchatId,
        updates: Vec<MemberUpdate>,
    },
    /// Answer to a [`ChitchatMessage::Ping`] (or relayed for a [`ChitchatMessage::PingReq`]).
    PingAck {
        seq: u64,
        from: ChitchatId,
        updates: Vec<MemberUpdate>,
    },
    /// A message used by tests to trigger a panic
    #[cfg(test)]
    PanicForTest,
}

/// A range of node ids, `(after, until]` in the table's order (`None`: from the start, to the
/// end). A sweep SYN lists every entry of the sender in its range, so an id missing from it is
/// one the sender lacks; sweeping range after range covers a table of any size without a
/// digest larger than a datagram.
#[derive(Debug, Clone, Default, Eq, PartialEq)]
pub struct Sweep {
    pub after: Option<ChitchatId>,
    pub until: Option<ChitchatId>,
}

impl Sweep {
    /// Whether `id` is in the range.
    pub fn contains(&self, id: &ChitchatId) -> bool {
        self.after.as_ref().is_none_or(|after| id > after)
            && self.until.as_ref().is_none_or(|until| id <= until)
    }
}

/// A [`ChitchatMessage`] paired with the protocol version it is encoded
/// with. The version is not part of the message model (see
/// [`ChitchatMessage`]'s doc); this struct is the unit that actually travels
/// on the wire, see `message_serialize`.
#[derive(Debug, Eq, PartialEq)]
pub struct ChitchatEnvelope {
    pub version: ProtocolVersion,
    pub message: ChitchatMessage,
}

impl ChitchatEnvelope {
    #[cfg(test)]
    pub(crate) fn new_syn_v0(cluster_id: String, digest: Digest) -> Self {
        Self {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn { cluster_id, digest },
        }
    }

    #[cfg(test)]
    pub(crate) fn new_syn_v1(cluster_id: String, digest: Digest) -> Self {
        Self {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::Syn { cluster_id, digest },
        }
    }

    #[cfg(test)]
    pub(crate) fn new_syn_ack_v0(digest: Digest, delta: Delta) -> Self {
        Self {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::SynAck { digest, delta },
        }
    }

    #[cfg(test)]
    pub(crate) fn new_ack_v0(delta: Delta) -> Self {
        Self {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Ack { delta },
        }
    }

    #[cfg(test)]
    pub(crate) fn new_bad_cluster_v0() -> Self {
        Self {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        }
    }

    #[cfg(test)]
    pub(crate) fn new_panic_for_test_v0() -> Self {
        Self {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::PanicForTest,
        }
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ProtocolVersion {
    /// The digest is serialized using the V0 (uncompressed) wire format.
    V0 = 0,
    /// The digest is serialized using the V1 (compressed) wire format.
    V1 = 1,
    /// meshd: V1's digest format, digests of a bounded number of entries (`Syn2`, `SynAck2`,
    /// `Ack2`) and SWIM failure detection (`Ping`, `PingReq`, `PingAck`) instead of
    /// heartbeats in every digest. Every node of a cluster must run it.
    V2 = 2,
}

impl ProtocolVersion {
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::V0),
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }

    pub fn to_code(self) -> u8 {
        self as u8
    }
}
