//! Reassembly of policy events the registry sends in parts (an event larger than one gRPC
//! message: `more = true` on every part but the last). Nothing is applied until the last part
//! arrives, so a node never enforces half a snapshot.

use mesh_api::proto::v1 as pb;

/// Most resource bytes one reassembled event may hold (a node will not buffer more).
pub const MAX_EVENT_BYTES: usize = 256 * 1024 * 1024;

/// Why parts could not be put together (the stream is reopened, asking for a full snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    /// A part of another revision or kind arrived before the last part.
    #[error(
        "policy event parts do not belong together: revision {first} (full: {first_full}) then {next} (full: {next_full})"
    )]
    Mismatch {
        /// Revision of the parts so far.
        first: u64,
        /// Whether they are a full snapshot.
        first_full: bool,
        /// Revision of the stray part.
        next: u64,
        /// Whether it is a full snapshot.
        next_full: bool,
    },
    /// The parts add up to more than [`MAX_EVENT_BYTES`].
    #[error("policy event parts exceed {MAX_EVENT_BYTES} bytes")]
    TooLarge,
}

/// Parts received so far.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<pb::PolicyEvent>,
    bytes: usize,
}

impl Assembler {
    /// Adds a part; returns the whole event once its last part is in. Pure.
    pub fn push(&mut self, part: pb::PolicyEvent) -> Result<Option<pb::PolicyEvent>, PartError> {
        self.bytes += part
            .resources
            .iter()
            .map(|r| r.spec_json.len() + r.kind.len() + r.namespace.len() + r.name.len())
            .sum::<usize>();
        if self.bytes > MAX_EVENT_BYTES {
            self.reset();
            return Err(PartError::TooLarge);
        }
        let more = part.more;
        let whole = match self.pending.take() {
            None => part,
            Some(mut so_far) => {
                if so_far.revision != part.revision || so_far.full_snapshot != part.full_snapshot {
                    self.reset();
                    return Err(PartError::Mismatch {
                        first: so_far.revision,
                        first_full: so_far.full_snapshot,
                        next: part.revision,
                        next_full: part.full_snapshot,
                    });
                }
                so_far.resources.extend(part.resources);
                so_far
            }
        };
        if more {
            self.pending = Some(whole);
            return Ok(None);
        }
        self.bytes = 0;
        Ok(Some(pb::PolicyEvent {
            more: false,
            ..whole
        }))
    }

    /// Drops what was received (the stream ended midway).
    pub fn reset(&mut self) {
        self.pending = None;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(revision: u64, full: bool, names: &[&str], more: bool) -> pb::PolicyEvent {
        pb::PolicyEvent {
            revision,
            full_snapshot: full,
            resources: names
                .iter()
                .map(|n| pb::Resource {
                    name: (*n).to_owned(),
                    ..Default::default()
                })
                .collect(),
            more,
        }
    }

    fn names(e: &pb::PolicyEvent) -> Vec<&str> {
        e.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn parts_become_one_event_only_at_the_last() {
        let mut a = Assembler::default();
        assert_eq!(a.push(part(7, true, &["a", "b"], true)), Ok(None));
        assert_eq!(a.push(part(7, true, &["c"], true)), Ok(None));
        let whole = a.push(part(7, true, &["d"], false)).unwrap().unwrap();
        assert_eq!(
            (whole.revision, whole.full_snapshot, whole.more),
            (7, true, false)
        );
        assert_eq!(names(&whole), ["a", "b", "c", "d"]);
        // A single-part event passes straight through.
        let one = a.push(part(8, false, &["e"], false)).unwrap().unwrap();
        assert_eq!(names(&one), ["e"]);
    }

    #[test]
    fn stray_parts_are_refused_and_forgotten() {
        let mut a = Assembler::default();
        a.push(part(7, true, &["a"], true)).unwrap();
        assert!(matches!(
            a.push(part(8, true, &["b"], false)),
            Err(PartError::Mismatch {
                first: 7,
                next: 8,
                ..
            })
        ));
        // After the refusal it starts clean.
        assert_eq!(
            names(&a.push(part(9, true, &["c"], false)).unwrap().unwrap()),
            ["c"]
        );
        a.push(part(10, true, &["a"], true)).unwrap();
        assert!(matches!(
            a.push(part(10, false, &["b"], false)),
            Err(PartError::Mismatch { .. })
        ));
    }
}
