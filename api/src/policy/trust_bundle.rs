//! TrustBundle: the registry-owned list of root certificates every node trusts, pushed on the
//! policy watch so a root rotation reaches every node (and applies without a restart) long
//! before the first certificate under the new root is issued.
//!
//! One resource, `TrustBundle/mesh-system/roots`, written only by the registry from its CA
//! files (`mesh-registry ca rotate-root`). Nodes verify peers and the registry against exactly
//! these roots once it is present; before that, against the bundle they got when joining.

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table};
use super::{Kind, ResourceKey, Snapshot, Spec, root_namespace};
use crate::name::Label;

/// The only name a TrustBundle may have (one per mesh, in `mesh-system`).
pub const TRUST_BUNDLE_NAME: &str = "roots";
/// Most roots a bundle may hold (a rotation needs two).
pub const MAX_ROOTS: usize = 8;
/// Longest PEM of one root, bytes.
pub const MAX_ROOT_PEM: usize = 16 * 1024;

/// `kind = "TrustBundle"`: the root certificates of the mesh, PEM, current root first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrustBundle {
    /// One PEM `CERTIFICATE` block per root.
    pub roots: Vec<String>,
}

impl TrustBundle {
    /// The resource key of the mesh's TrustBundle.
    pub fn key() -> ResourceKey {
        ResourceKey::new(
            Kind::TrustBundle,
            root_namespace(),
            Label::new(TRUST_BUNDLE_NAME).expect("\"roots\" is a label"),
        )
    }

    /// The mesh's TrustBundle in `snapshot`, if the registry published one.
    pub fn of(snapshot: &Snapshot) -> Option<TrustBundle> {
        static KEY: std::sync::LazyLock<ResourceKey> = std::sync::LazyLock::new(TrustBundle::key);
        match snapshot.resources.get(&*KEY).map(|r| &r.spec) {
            Some(Spec::TrustBundle(b)) => Some(b.clone()),
            _ => None,
        }
    }

    /// The roots as one PEM text.
    pub fn pem(&self) -> String {
        self.roots.concat()
    }

    /// Splits a PEM text into its `CERTIFICATE` blocks (normalised to end in a newline).
    pub fn from_pem(pem: &str) -> TrustBundle {
        let mut roots = Vec::new();
        let mut rest = pem;
        while let Some(start) = rest.find(BEGIN) {
            let Some(end) = rest[start..].find(END) else {
                break;
            };
            let end = start + end + END.len();
            roots.push(format!("{}\n", &rest[start..end]));
            rest = &rest[end..];
        }
        TrustBundle { roots }
    }
}

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

pub(crate) fn trust_bundle(map: &Map<String, Value>, cx: &mut Cx) -> Option<TrustBundle> {
    let t = Table::from_map(map, "", &["roots"], cx);
    let roots = t.req(
        "roots",
        "a list of PEM root certificates",
        cx,
        |v, at, cx| {
            decode::nonempty_list(v, at, cx, "a bundle holds at least the current root", root)
        },
    )?;
    if roots.len() > MAX_ROOTS {
        cx.error(
            "roots",
            format!(
                "{} roots is more than the limit of {MAX_ROOTS}",
                roots.len()
            ),
        );
        return None;
    }
    Some(TrustBundle { roots })
}

fn root(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let s = decode::string(v, at, cx)?;
    let body = s
        .trim()
        .strip_prefix(BEGIN)
        .and_then(|b| b.strip_suffix(END))
        .map(|b| b.chars().filter(|c| !c.is_whitespace()).collect::<String>());
    let ok = s.len() <= MAX_ROOT_PEM
        && body.is_some_and(|b| {
            !b.is_empty()
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        });
    if !ok {
        cx.error(
            at,
            format!("expected one PEM CERTIFICATE block of at most {MAX_ROOT_PEM} bytes"),
        );
        return None;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Resource;

    const A: &str = "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n";
    const B: &str = "-----BEGIN CERTIFICATE-----\nREVG\n-----END CERTIFICATE-----\n";

    #[test]
    fn splits_pem_and_round_trips() {
        let b = TrustBundle::from_pem(&format!("junk\n{A}{B}"));
        assert_eq!(b.roots, [A, B]);
        assert_eq!(b.pem(), format!("{A}{B}"));
        let res = Resource {
            key: TrustBundle::key(),
            spec: Spec::TrustBundle(b.clone()),
        };
        let back = Resource::from_json("TrustBundle", "mesh-system", "roots", &res.spec_json());
        assert_eq!(back.unwrap(), res);
        assert_eq!(TrustBundle::of(&Snapshot::new(1, [res])), Some(b));
        assert_eq!(TrustBundle::of(&Snapshot::default()), None);
    }

    #[test]
    fn bad_bundles_are_named() {
        for (json, key) in [
            (r#"{"roots":[]}"#, "roots"),
            (r#"{"roots":["not pem"]}"#, "roots[0]"),
            (
                r#"{"roots":["-----BEGIN CERTIFICATE-----\n$$\n-----END CERTIFICATE-----"]}"#,
                "roots[0]",
            ),
            (r#"{}"#, "roots"),
        ] {
            let p = Resource::from_json("TrustBundle", "mesh-system", "roots", json).unwrap_err();
            assert!(p.iter().any(|p| p.key == key), "{json}: {p:?}");
        }
        let many = serde_json::json!({ "roots": vec![A; MAX_ROOTS + 1] }).to_string();
        assert!(Resource::from_json("TrustBundle", "mesh-system", "roots", &many).is_err());
        let named = Resource::from_json(
            "TrustBundle",
            "mesh-system",
            "other",
            &format!(r#"{{"roots":[{A:?}]}}"#),
        );
        assert!(named.is_err());
    }
}
