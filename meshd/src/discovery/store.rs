//! The persisted policy snapshot, `<data_dir>/policy.json`: the revision and every resource
//! in its wire form (kind, namespace, name, spec), written atomically with fsync so a crash
//! leaves the previous snapshot or the new one. Reading validates every resource again;
//! one unreadable resource rejects the whole file (never half a policy).

use std::path::Path;

use mesh_api::policy::{Problem, Resource, Snapshot};
use serde::{Deserialize, Serialize};

use super::Error;

/// Bumped when the file's layout changes; other values are refused, not guessed at.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: u32,
    revision: u64,
    resources: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    kind: String,
    namespace: String,
    name: String,
    /// The canonical spec JSON, stored as an object so the file stays readable.
    spec: serde_json::Value,
}

fn err(path: &Path, reason: impl ToString) -> Error {
    Error::Store {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads the snapshot at `path`; `None` when there is no file.
pub fn load(path: &Path) -> Result<Option<Snapshot>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(path, e)),
    };
    let file: File = serde_json::from_str(&text).map_err(|e| err(path, e))?;
    if file.format != FORMAT {
        return Err(err(
            path,
            format!("format {} is not the supported {FORMAT}", file.format),
        ));
    }
    let mut resources = Vec::with_capacity(file.resources.len());
    let mut problems = Vec::new();
    for e in &file.resources {
        match Resource::from_json(&e.kind, &e.namespace, &e.name, &e.spec.to_string()) {
            Ok(r) => resources.push(r),
            Err(p) => problems.extend(p.iter().map(Problem::to_string)),
        }
    }
    if !problems.is_empty() {
        return Err(err(path, problems.join("; ")));
    }
    Ok(Some(Snapshot::new(file.revision, resources)))
}

/// Writes `snapshot` to `path` durably (mode 0644: policy is not secret).
pub fn save(path: &Path, snapshot: &Snapshot) -> Result<(), Error> {
    let file = File {
        format: FORMAT,
        revision: snapshot.revision,
        resources: snapshot
            .resources
            .values()
            .map(|r| Entry {
                kind: r.key.kind.as_str().to_owned(),
                namespace: r.key.namespace.to_string(),
                name: r.key.name.to_string(),
                spec: serde_json::to_value(&r.spec).expect("policy specs serialise to JSON"),
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&file).expect("the snapshot file serialises");
    text.push(b'\n');
    crate::fsutil::write_atomic(path, &text, 0o644).map_err(|(p, e)| err(&p, e))
}
