//! Wire (de)serialization for [`ChitchatMessage`], via [`ChitchatEnvelope`].
//!
//! This module is deliberately kept separate from the message model
//! (`message.rs`) so that the on-wire format can grow across protocol
//! versions without cluttering the data types.
//!
//! The protocol version is not carried by [`ChitchatMessage`]: it is stamped
//! in [`ChitchatEnvelope`], which owns the wire format below, and it
//! drives the digest encoding (mirroring [`Digest`], whose encoding it
//! selects).

use std::io::BufRead;

use anyhow::{Context, bail};

use crate::ChitchatId;
use crate::delta::Delta;
use crate::digest::Digest;
use crate::message::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion, Sweep};
use crate::serialize::{Deserializable, Serializable};
use crate::swim::{deserialize_updates, serialize_updates, serialized_updates_len};

const MAGIC_NUMBER: u16 = 45_139;

#[derive(Clone, Copy)]
#[repr(u8)]
enum MessageType {
    Syn = 0,
    SynAck = 1u8,
    Ack = 2u8,
    BadCluster = 3u8,
    Syn2 = 4u8,
    SynAck2 = 5u8,
    Ack2 = 6u8,
    Ping = 7u8,
    PingReq = 8u8,
    PingAck = 9u8,
    #[cfg(test)]
    PanicForTest = 255u8,
}

impl MessageType {
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Syn),
            1 => Some(Self::SynAck),
            2 => Some(Self::Ack),
            3 => Some(Self::BadCluster),
            4 => Some(Self::Syn2),
            5 => Some(Self::SynAck2),
            6 => Some(Self::Ack2),
            7 => Some(Self::Ping),
            8 => Some(Self::PingReq),
            9 => Some(Self::PingAck),
            #[cfg(test)]
            255 => Some(Self::PanicForTest),
            _ => None,
        }
    }

    pub fn to_code(self) -> u8 {
        self as u8
    }

    /// Types only a V2 envelope may carry (their digest and updates assume V2 semantics).
    fn needs_v2(self) -> bool {
        matches!(
            self,
            Self::Syn2 | Self::SynAck2 | Self::Ack2 | Self::Ping | Self::PingReq | Self::PingAck
        )
    }
}

impl ChitchatEnvelope {
    /// Bytes written before the message body: magic number (2) + protocol
    /// version (1) + message type (1).
    pub(crate) const HEADER_LEN: usize = 2 + 1 + 1;

    /// Serializes the message. The protocol version is stamped in the header
    /// and drives the digest encoding.
    pub(crate) fn serialize(&self, buf: &mut Vec<u8>) {
        buf.extend(MAGIC_NUMBER.to_le_bytes());
        self.version.to_code().serialize(buf);

        match &self.message {
            ChitchatMessage::Syn { cluster_id, digest } => {
                buf.push(MessageType::Syn.to_code());
                digest.serialize(self.version, buf);
                cluster_id.serialize(buf);
            }
            ChitchatMessage::SynAck { digest, delta } => {
                buf.push(MessageType::SynAck.to_code());
                digest.serialize(self.version, buf);
                delta.serialize(buf);
            }
            ChitchatMessage::Ack { delta } => {
                buf.push(MessageType::Ack.to_code());
                delta.serialize(buf);
            }
            ChitchatMessage::BadCluster => {
                buf.push(MessageType::BadCluster.to_code());
            }
            #[cfg(test)]
            ChitchatMessage::PanicForTest => {
                buf.push(MessageType::PanicForTest.to_code());
            }
            v2 => serialize_v2(v2, self.version, buf),
        }
    }

    /// The message as chitchat puts it in a datagram: for transports that carry datagrams their
    /// own way (sealed, say) and so cannot use [`crate::transport::UdpSocket`]. (meshd: was
    /// crate-private.)
    pub fn serialize_to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.serialize(&mut buf);
        buf
    }

    #[cfg(test)]
    pub(crate) fn serialized_len(&self) -> usize {
        Self::HEADER_LEN
            + match &self.message {
                ChitchatMessage::Syn { cluster_id, digest } => {
                    cluster_id.serialized_len() + digest.serialized_len(self.version)
                }
                ChitchatMessage::SynAck { digest, delta } => {
                    digest.serialized_len(self.version) + delta.serialized_len()
                }
                ChitchatMessage::Ack { delta } => delta.serialized_len(),
                ChitchatMessage::BadCluster => 0,
                #[cfg(test)]
                ChitchatMessage::PanicForTest => 0,
                v2 => {
                    let mut buf = Vec::new();
                    serialize_v2(v2, self.version, &mut buf);
                    buf.len()
                }
            }
    }

    /// Deserializes a message, reading the protocol version from the header.
    /// The version is needed both to decode the digest and by the caller: a
    /// responder echoes it so its reply is encoded with a format the
    /// initiator is guaranteed to understand. (meshd: was crate-private, see
    /// [`Self::serialize_to_vec`].)
    pub fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        if buf.len() < 3 {
            bail!("buffer too small to store the magic number and the protocol version");
        }
        let magic_number = u16::from_le_bytes(buf[0..2].try_into().unwrap());
        if magic_number != MAGIC_NUMBER {
            bail!("invalid chitchat magic number");
        }
        let version = ProtocolVersion::from_code(buf[2]).context("invalid protocol version")?;
        buf.consume(3);

        let message_type = buf
            .first()
            .copied()
            .and_then(MessageType::from_code)
            .context("invalid message type")?;
        buf.consume(1);
        if message_type.needs_v2() && version < ProtocolVersion::V2 {
            bail!("message type needs protocol version 2");
        }

        let message = match message_type {
            MessageType::Syn => {
                let digest = Digest::deserialize(version, buf)?;
                let cluster_id = String::deserialize(buf)?;
                ChitchatMessage::Syn { cluster_id, digest }
            }
            MessageType::SynAck => {
                let digest = Digest::deserialize(version, buf)?;
                let delta = Delta::deserialize(buf)?;
                ChitchatMessage::SynAck { digest, delta }
            }
            MessageType::Ack => {
                let delta = Delta::deserialize(buf)?;
                ChitchatMessage::Ack { delta }
            }
            MessageType::BadCluster => ChitchatMessage::BadCluster,
            #[cfg(test)]
            MessageType::PanicForTest => ChitchatMessage::PanicForTest,
            v2 => deserialize_v2(v2, version, buf)?,
        };
        Ok(ChitchatEnvelope { version, message })
    }
}

/// Writes a V2-only message: type, body, then the SWIM updates last (so a reader can tell a
/// truncated datagram from a complete one).
fn serialize_v2(message: &ChitchatMessage, version: ProtocolVersion, buf: &mut Vec<u8>) {
    let updates = match message {
        ChitchatMessage::Syn2 {
            cluster_id,
            from,
            sweep,
            digest,
            updates,
        } => {
            buf.push(MessageType::Syn2.to_code());
            cluster_id.serialize(buf);
            from.serialize(buf);
            serialize_sweep(sweep.as_ref(), buf);
            digest.serialize(version, buf);
            updates
        }
        ChitchatMessage::SynAck2 {
            digest,
            delta,
            swept,
            updates,
        } => {
            buf.push(MessageType::SynAck2.to_code());
            digest.serialize(version, buf);
            delta.serialize(buf);
            serialize_sweep(swept.as_ref(), buf);
            updates
        }
        ChitchatMessage::Ack2 {
            delta,
            request,
            updates,
        } => {
            buf.push(MessageType::Ack2.to_code());
            delta.serialize(buf);
            request.serialize(version, buf);
            updates
        }
        ChitchatMessage::Ping {
            seq,
            from,
            target,
            updates,
        }
        | ChitchatMessage::PingReq {
            seq,
            from,
            target,
            updates,
        } => {
            let kind = if matches!(message, ChitchatMessage::Ping { .. }) {
                MessageType::Ping
            } else {
                MessageType::PingReq
            };
            buf.push(kind.to_code());
            seq.serialize(buf);
            from.serialize(buf);
            target.serialize(buf);
            updates
        }
        ChitchatMessage::PingAck { seq, from, updates } => {
            buf.push(MessageType::PingAck.to_code());
            seq.serialize(buf);
            from.serialize(buf);
            updates
        }
        _ => unreachable!("serialize_v2 is only called with V2 message types"),
    };
    serialize_updates(updates, buf);
}

/// An optional sweep: a flag byte (bit 0: a sweep, bit 1: `after` follows, bit 2: `until`
/// follows), then the ids.
fn serialize_sweep(sweep: Option<&Sweep>, buf: &mut Vec<u8>) {
    let Some(sweep) = sweep else {
        0u8.serialize(buf);
        return;
    };
    let flags = 1 | u8::from(sweep.after.is_some()) << 1 | u8::from(sweep.until.is_some()) << 2;
    flags.serialize(buf);
    for id in [&sweep.after, &sweep.until].into_iter().flatten() {
        id.serialize(buf);
    }
}

fn deserialize_sweep(buf: &mut &[u8]) -> anyhow::Result<Option<Sweep>> {
    let flags = u8::deserialize(buf)?;
    if flags & !0b111 != 0 || (flags & 1 == 0 && flags != 0) {
        bail!("invalid sweep flags {flags:#x}");
    }
    if flags == 0 {
        return Ok(None);
    }
    let after = (flags & 2 != 0)
        .then(|| ChitchatId::deserialize(buf))
        .transpose()?;
    let until = (flags & 4 != 0)
        .then(|| ChitchatId::deserialize(buf))
        .transpose()?;
    Ok(Some(Sweep { after, until }))
}

/// Bytes the SWIM updates of a message take (for budgeting deltas around them).
pub(crate) fn updates_len(updates: &[crate::swim::MemberUpdate]) -> usize {
    serialized_updates_len(updates)
}

fn deserialize_v2(
    message_type: MessageType,
    version: ProtocolVersion,
    buf: &mut &[u8],
) -> anyhow::Result<ChitchatMessage> {
    let message = match message_type {
        MessageType::Syn2 => {
            let cluster_id = String::deserialize(buf)?;
            let from = ChitchatId::deserialize(buf)?;
            let sweep = deserialize_sweep(buf)?;
            let digest = Digest::deserialize(version, buf)?;
            let updates = deserialize_updates(buf)?;
            ChitchatMessage::Syn2 {
                cluster_id,
                from,
                sweep,
                digest,
                updates,
            }
        }
        MessageType::SynAck2 => {
            let digest = Digest::deserialize(version, buf)?;
            let delta = Delta::deserialize(buf)?;
            let swept = deserialize_sweep(buf)?;
            let updates = deserialize_updates(buf)?;
            ChitchatMessage::SynAck2 {
                digest,
                delta,
                swept,
                updates,
            }
        }
        MessageType::Ack2 => {
            let delta = Delta::deserialize(buf)?;
            let request = Digest::deserialize(version, buf)?;
            let updates = deserialize_updates(buf)?;
            ChitchatMessage::Ack2 {
                delta,
                request,
                updates,
            }
        }
        MessageType::Ping | MessageType::PingReq => {
            let seq = u64::deserialize(buf)?;
            let from = ChitchatId::deserialize(buf)?;
            let target = ChitchatId::deserialize(buf)?;
            let updates = deserialize_updates(buf)?;
            if matches!(message_type, MessageType::Ping) {
                ChitchatMessage::Ping {
                    seq,
                    from,
                    target,
                    updates,
                }
            } else {
                ChitchatMessage::PingReq {
                    seq,
                    from,
                    target,
                    updates,
                }
            }
        }
        MessageType::PingAck => {
            let seq = u64::deserialize(buf)?;
            let from = ChitchatId::deserialize(buf)?;
            let updates = deserialize_updates(buf)?;
            ChitchatMessage::PingAck { seq, from, updates }
        }
        _ => bail!("not a V2 message type"),
    };
    Ok(message)
}

#[cfg(test)]
mod tests {
    use crate::message::ChitchatEnvelope;
    use crate::{ChitchatId, Delta, Digest, Heartbeat};

    /// Checks the reported length, then round-trips and asserts both the
    /// message and the version survive.
    fn test_envelope_serdeser_aux(envelope: ChitchatEnvelope, expected_len: usize) {
        let buf = envelope.serialize_to_vec();
        assert_eq!(buf.len(), expected_len);
        assert_eq!(buf.len(), envelope.serialized_len());
        let deserialized = ChitchatEnvelope::deserialize(&mut &buf[..]).unwrap();
        assert_eq!(envelope, deserialized);
    }

    #[test]
    fn test_syn() {
        {
            let envelope = ChitchatEnvelope::new_syn_v0("cluster-a".to_string(), Digest::default());
            test_envelope_serdeser_aux(envelope, 17);
        }
        {
            let mut digest = Digest::default();
            let node = ChitchatId::for_local_test(10_001);
            digest.add_node(node, Heartbeat(0), 0, 0);

            let envelope = ChitchatEnvelope::new_syn_v0("cluster-a".to_string(), digest);
            test_envelope_serdeser_aux(envelope, 68);
        }
    }

    #[test]
    fn test_syn_compressed_digest_roundtrips() {
        let mut digest = Digest::default();
        for i in 0..100 {
            let node = ChitchatId::for_local_test(10_000 + i);
            digest.add_node(node, Heartbeat(i as u64), 0, i as u64);
        }
        // Emit the compressed wire format.
        let envelope = ChitchatEnvelope::new_syn_v1("cluster-a".to_string(), digest);
        let buf = envelope.serialize_to_vec();
        // A peer decodes it transparently, regardless of the encoding used.
        let deserialized = ChitchatEnvelope::deserialize(&mut &buf[..]).unwrap();
        assert_eq!(envelope, deserialized);
    }

    #[test]
    fn test_syn_ack() {
        {
            let envelope = ChitchatEnvelope::new_syn_ack_v0(Digest::default(), Delta::default());
            // 2 (magic number) + 1 (protocol version) + 1 (message tag) + 2 (digest len) + 1 (delta
            // end op)
            test_envelope_serdeser_aux(envelope, 7);
        }
        {
            // 2 bytes.
            let mut digest = Digest::default();
            let node = ChitchatId::for_local_test(10_001);
            // +43 bytes = 27 bytes (ChitchatId) + 8 (hearbeat) + 8 (max_version).
            digest.add_node(node, Heartbeat(0), 0, 0);

            // 4 bytes
            let mut delta = Delta::default();
            let node = ChitchatId::for_local_test(10_001);
            // +27 bytes (ChitchatId)
            // + 2 bytes (node delta len)
            // + 8 bytes (last_gc_version)
            // + 8 bytes (from_version).
            delta.add_node(node.clone(), 0u64, 0u64);
            // +22 bytes.
            delta.add_kv(&node, "key", "value", 1, true);
            // That's compression kicking in.
            delta.set_serialized_len(70);

            let envelope = ChitchatEnvelope::new_syn_ack_v0(digest, delta);
            // 1 byte (protocol version) + 1 byte (message tag) + 53 bytes (digest) + 60 bytes
            // (delta).
            test_envelope_serdeser_aux(envelope, 2 + 1 + 1 + 53 + 70);
        }
    }

    #[test]
    fn test_ack() {
        {
            let envelope = ChitchatEnvelope::new_ack_v0(Delta::default());
            test_envelope_serdeser_aux(envelope, 5);
        }
        {
            // 4 bytes.
            let mut delta = Delta::default();
            let node = ChitchatId::for_local_test(10_001);
            // +37 bytes = 27 bytes (ChitchatId) + 2 bytes (node delta len) + 8 bytes (heartbeat).
            delta.add_node(node.clone(), 0u64, 0u64);
            // +29 bytes.
            delta.add_kv(&node, "key", "value", 1, true);
            delta.set_serialized_len(70);
            let envelope = ChitchatEnvelope::new_ack_v0(delta);
            test_envelope_serdeser_aux(envelope, 2 + 1 + 1 + 70);
        }
    }

    #[test]
    fn test_bad_cluster() {
        test_envelope_serdeser_aux(ChitchatEnvelope::new_bad_cluster_v0(), 4);
    }
}
