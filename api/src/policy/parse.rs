//! Reading resources from a policy file (TOML) or from the wire (kind, namespace, name and spec
//! JSON): the key fields, the rules on names that depend on the kind, then the kind's spec.

use serde_json::{Map, Value};

use super::decode;
use super::{
    Kind, MESH_CONFIG_NAME, Problem, REVOCATION_NAME, ROOT_NAMESPACE, Resource, ResourceKey, Spec,
    root_namespace,
};
use crate::name::{DEFAULT_NAMESPACE, Label};

/// See [`Resource::from_json`].
pub(super) fn from_json(
    kind: &str,
    namespace: &str,
    name: &str,
    spec_json: &str,
) -> Result<Resource, Vec<Problem>> {
    let mut cx = decode::Cx::default();
    let parsed_kind = kind
        .parse::<Kind>()
        .map_err(|e| cx.error("kind", e.to_string()))
        .ok();
    let parsed_ns = match namespace {
        "" => Some(default_namespace(parsed_kind)),
        ns => decode::label(&Value::from(ns), "namespace", &mut cx),
    };
    let parsed_name = decode::label(&Value::from(name), "name", &mut cx);
    let fields = match serde_json::from_str::<Value>(spec_json) {
        Ok(Value::Object(map)) => Some(map),
        Ok(other) => {
            let found = decode::describe(&other);
            cx.error("", format!("spec must be a JSON object, found {found}"));
            None
        }
        Err(e) => {
            cx.error("", format!("spec is not valid JSON: {e}"));
            None
        }
    };
    let key = match (parsed_kind, parsed_ns, parsed_name) {
        (Some(k), Some(ns), Some(n)) => Some(ResourceKey::new(k, ns, n)),
        _ => None,
    };
    let resource = key
        .as_ref()
        .map_or_else(|| format!("{kind}/{namespace}/{name}"), ToString::to_string);
    let built = match (key, fields) {
        (Some(key), Some(fields)) => build(key, &fields, &mut cx),
        _ => None,
    };
    if let Some(r) = built.filter(|_| cx.is_clean()) {
        return Ok(r);
    }
    Err(cx
        .into_problems()
        .into_iter()
        .map(|(key, message)| Problem {
            file: String::new(),
            resource: resource.clone(),
            key,
            message,
        })
        .collect())
}

/// Validates `fields` as a `key.kind` spec, plus the rules on names that depend on the kind.
fn build(key: ResourceKey, fields: &Map<String, Value>, cx: &mut decode::Cx) -> Option<Resource> {
    if key.kind == Kind::MeshConfig {
        if key.name.as_str() != MESH_CONFIG_NAME {
            cx.error(
                "name",
                format!("a MeshConfig must be named {MESH_CONFIG_NAME:?} (there is one per mesh)"),
            );
        }
        if key.namespace.as_str() != ROOT_NAMESPACE {
            cx.error(
                "namespace",
                format!("a MeshConfig lives in namespace {ROOT_NAMESPACE:?}; omit `namespace`"),
            );
        }
    }
    if let Some(only) = singleton_name(key.kind) {
        let named = match key.kind {
            Kind::Revocation => super::Revocation::is_valid_name(key.name.as_str()),
            _ => key.name.as_str() == only,
        };
        if !named {
            let message = match key.kind {
                Kind::Revocation => format!(
                    "a Revocation is named {only:?} (the registry's own) or \"site-<site>\" \
                     (another site's, imported by the registry)"
                ),
                _ => format!(
                    "a {} must be named {only:?} (there is one per mesh)",
                    key.kind
                ),
            };
            cx.error("name", message);
        }
        if key.namespace.as_str() != ROOT_NAMESPACE {
            cx.error(
                "namespace",
                format!(
                    "a {} lives in namespace {ROOT_NAMESPACE:?}; omit `namespace`",
                    key.kind
                ),
            );
        }
    }
    let spec = Spec::read(key.kind, fields, cx)?;
    Some(Resource { key, spec })
}

/// The one name a registry-owned, once-per-mesh kind may have.
fn singleton_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Revocation => Some(REVOCATION_NAME),
        Kind::TrustBundle => Some(super::TRUST_BUNDLE_NAME),
        _ => None,
    }
}

fn default_namespace(kind: Option<Kind>) -> Label {
    if matches!(
        kind,
        Some(Kind::MeshConfig | Kind::Revocation | Kind::TrustBundle)
    ) {
        root_namespace()
    } else {
        Label::new(DEFAULT_NAMESPACE).expect("the default namespace is a label")
    }
}

/// See [`super::parse_file`].
pub(super) fn parse_file(file: &str, text: &str) -> Result<Vec<Resource>, Vec<Problem>> {
    let problem = |resource: &str, key: &str, message: String| Problem {
        file: file.to_owned(),
        resource: resource.to_owned(),
        key: key.to_owned(),
        message,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| vec![problem("", "", e.to_string().trim_end().to_owned())])?;
    let root = decode::from_toml(toml::Value::Table(table));
    let Value::Object(root) = root else {
        unreachable!("a TOML document is a table");
    };
    let mut problems = Vec::new();
    let mut cx = decode::Cx::default();
    let top = decode::Table::from_map(&root, "", &["resource"], &mut cx);
    let items = top.req(
        "resource",
        "one or more [[resource]] tables",
        &mut cx,
        |v, at, cx| {
            decode::list(v, at, cx, |v, at, cx| match v {
                Value::Object(m) => Some(m),
                other => {
                    cx.error(
                        at,
                        format!(
                            "expected a [[resource]] table, found {}",
                            decode::describe(other)
                        ),
                    );
                    None
                }
            })
        },
    );
    for (key, message) in cx.into_problems() {
        problems.push(problem("", &key, message));
    }
    let mut resources: Vec<(usize, Resource)> = Vec::new();
    for (i, fields) in items.into_iter().flatten().enumerate() {
        let at = format!("resource[{i}]");
        let mut cx = decode::Cx::default();
        let key = read_key(fields, &mut cx);
        let label = key.as_ref().map_or(at, ToString::to_string);
        let spec: Map<String, Value> = fields
            .iter()
            .filter(|(k, _)| !KEY_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let built = key.and_then(|key| build(key, &spec, &mut cx));
        let clean = cx.is_clean();
        for (key, message) in cx.into_problems() {
            problems.push(problem(&label, &key, message));
        }
        if let Some(r) = built.filter(|_| clean) {
            if let Some((first, _)) = resources.iter().find(|(_, x)| x.key == r.key) {
                problems.push(problem(
                    &label,
                    "name",
                    format!("defined twice in this file (also resource[{first}]); names must be unique per kind and namespace"),
                ));
            }
            resources.push((i, r));
        }
    }
    if problems.is_empty() {
        Ok(resources.into_iter().map(|(_, r)| r).collect())
    } else {
        Err(problems)
    }
}

/// The fields of a `[[resource]]` table that form its key; the rest is the spec.
const KEY_FIELDS: &[&str] = &["kind", "name", "namespace"];

/// Reads the key fields of one `[[resource]]` table.
fn read_key(fields: &Map<String, Value>, cx: &mut decode::Cx) -> Option<ResourceKey> {
    let kind = match fields.get("kind") {
        None => {
            cx.error(
                "kind",
                format!("missing; expected one of: {}", Kind::names().join(", ")),
            );
            None
        }
        Some(v) => decode::string(v, "kind", cx).and_then(|s| {
            s.parse::<Kind>()
                .map_err(|e| cx.error("kind", e.to_string()))
                .ok()
        }),
    };
    let name = match fields.get("name") {
        None => {
            cx.error(
                "name",
                "missing; expected the resource's name, e.g. \"api-allow-web\"",
            );
            None
        }
        Some(v) => decode::label(v, "name", cx),
    };
    let namespace = match fields.get("namespace") {
        None => Some(default_namespace(kind)),
        Some(v) => decode::label(v, "namespace", cx),
    };
    Some(ResourceKey::new(kind?, namespace?, name?))
}
