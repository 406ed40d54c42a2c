//! `meshctl apply|get|delete|history`: policy files are parsed and validated locally first (so
//! problems name the file, resource and key before anything is sent), then sent to the
//! registry; answers are printed as tables, TOML that `apply -f` reads back, or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use mesh_api::policy::{self, Kind, Resource};
use mesh_api::proto::v1 as pb;
use serde_json::{Value, json};

use mesh_client::registry as control;

/// Policy command errors; [`Error::exit_code`] maps them to the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is invalid (files, kinds, names): one line per problem; nothing was sent.
    #[error("{} problem(s), nothing applied:\n  {}", .0.len(), .0.join("\n  "))]
    Invalid(Vec<String>),
    /// The named resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The registry refused or could not be reached.
    #[error(transparent)]
    Registry(#[from] control::Error),
}

/// How `get` and `history` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// Aligned columns with more: for Gateways, every listener and the Routes attached to it
    /// (or why each is not). Other kinds print as `table`.
    Wide,
    /// `[[resource]]` tables that `meshctl apply -f` accepts.
    Toml,
    /// JSON with full specs.
    Json,
}

/// The kind argument of `get`: a kind in any spelling [`Kind`] accepts, or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindArg {
    /// Every kind.
    All,
    /// One kind.
    One(Kind),
}

// === impl Error ===

impl Error {
    /// 64 (EX_USAGE) for invalid input, local or as judged by the registry; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Invalid(_) => 64,
            Self::Registry(control::Error::Status(s))
                if s.code() == tonic::Code::InvalidArgument =>
            {
                64
            }
            _ => 1,
        }
    }
}

// === impl KindArg ===

impl std::str::FromStr for KindArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        s.parse()
            .map(Self::One)
            .map_err(|e: policy::UnknownKind| format!("{e}, or \"all\""))
    }
}

impl KindArg {
    fn wire(self) -> String {
        match self {
            Self::All => String::new(),
            Self::One(k) => k.as_str().to_owned(),
        }
    }
}

/// Parses a kind argument for clap.
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse().map_err(|e: policy::UnknownKind| e.to_string())
}

// === reading files ===

/// The files named by `-f` arguments: a file as given, a directory's `*.toml` files sorted by
/// name (not recursive).
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for p in paths {
        if p.is_dir() {
            let entries = match std::fs::read_dir(p) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(format!("{}: {e}", p.display()));
                    continue;
                }
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml") && f.is_file())
                .collect();
            found.sort();
            if found.is_empty() {
                problems.push(format!(
                    "{}: no *.toml files in this directory",
                    p.display()
                ));
            }
            out.extend(found);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            problems.push(format!("{}: no such file or directory", p.display()));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Error::Invalid(problems))
    }
}

/// Reads and validates every file; every problem of every file is reported, and a resource
/// defined in two files is one too.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Resource>, Error> {
    let files = files(paths)?;
    let mut problems = Vec::new();
    let mut resources = Vec::new();
    let mut seen: BTreeMap<policy::ResourceKey, String> = BTreeMap::new();
    for f in &files {
        let name = f.display().to_string();
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        match policy::parse_file(&name, &text) {
            Ok(rs) => {
                for r in rs {
                    if let Some(first) = seen.get(&r.key) {
                        problems.push(format!("{name}: {}: also defined in {first}", r.key));
                    } else {
                        seen.insert(r.key.clone(), name.clone());
                        resources.push(r);
                    }
                }
            }
            Err(ps) => problems.extend(ps.iter().map(ToString::to_string)),
        }
    }
    if problems.is_empty() {
        Ok(resources)
    } else {
        Err(Error::Invalid(problems))
    }
}

/// A resource in its wire form.
pub fn wire(r: &Resource) -> pb::Resource {
    r.to_proto()
}

// === commands ===

/// `meshctl apply -f ...`: validates locally, applies, prints one line per change.
pub async fn apply(
    client: &control::Client,
    paths: &[PathBuf],
    dry_run: bool,
) -> Result<String, Error> {
    let resources = load(paths)?;
    let resp = client
        .apply(pb::ApplyRequest {
            resources: resources.iter().map(wire).collect(),
            dry_run,
        })
        .await?;
    Ok(changes(&resp, dry_run))
}

/// `meshctl delete <kind> <name>`.
pub async fn delete(
    client: &control::Client,
    kind: Kind,
    name: &str,
    namespace: Option<&str>,
    dry_run: bool,
) -> Result<String, Error> {
    let resp = client
        .delete_resource(pb::DeleteResourceRequest {
            kind: kind.as_str().to_owned(),
            namespace: namespace.unwrap_or_default().to_owned(),
            name: name.to_owned(),
            dry_run,
        })
        .await
        .map_err(not_found)?;
    Ok(changes(&resp, dry_run))
}

/// `meshctl get <kind|all> [name]`.
pub async fn get(
    client: &control::Client,
    kind: KindArg,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> Result<String, Error> {
    let resp = client
        .get_resources(pb::GetResourcesRequest {
            kind: kind.wire(),
            namespace: namespace.unwrap_or_default().to_owned(),
            name: name.unwrap_or_default().to_owned(),
            page_token: String::new(),
        })
        .await?;
    let mut resources = resp.resources;
    if let (Some(name), true) = (name, resources.is_empty()) {
        let what = match kind {
            KindArg::All => "no resource".to_owned(),
            KindArg::One(k) => format!("no {k}"),
        };
        let ns = namespace.map_or_else(|| "any namespace".to_owned(), |n| format!("namespace {n}"));
        return Err(Error::NotFound(format!("{what} named {name:?} in {ns}")));
    }
    resources.sort_by_cached_key(|r| {
        (
            r.kind.parse::<Kind>().ok(),
            r.namespace.clone(),
            r.name.clone(),
        )
    });
    Ok(match output {
        Output::Table => table(&resources),
        Output::Wide => {
            let gateways: Vec<&pb::Resource> = (resources.iter())
                .filter(|r| r.kind.parse::<Kind>().ok() == Some(Kind::Gateway))
                .collect();
            if gateways.is_empty() {
                table(&resources)
            } else {
                let routes = client
                    .get_resources(pb::GetResourcesRequest {
                        kind: Kind::Route.to_string(),
                        namespace: namespace.unwrap_or_default().to_owned(),
                        name: String::new(),
                        page_token: String::new(),
                    })
                    .await?
                    .resources;
                gateway_wide(&gateways, &routes)
            }
        }
        Output::Toml => toml_of(&resources),
        Output::Json => {
            let list: Vec<Value> = resources.iter().map(json_of).collect();
            pretty(&json!({ "revision": resp.revision, "resources": list }))
        }
    })
}

/// `meshctl history <kind> <name>`.
pub async fn history(
    client: &control::Client,
    kind: Kind,
    name: &str,
    namespace: Option<&str>,
    output: Output,
) -> Result<String, Error> {
    let resp = client
        .history(pb::HistoryRequest {
            kind: kind.as_str().to_owned(),
            namespace: namespace.unwrap_or_default().to_owned(),
            name: name.to_owned(),
        })
        .await?;
    if resp.versions.is_empty() {
        let ns = namespace.unwrap_or(if kind == Kind::MeshConfig {
            policy::ROOT_NAMESPACE
        } else {
            mesh_api::name::DEFAULT_NAMESPACE
        });
        return Err(Error::NotFound(format!(
            "{kind}/{ns}/{name} has no history"
        )));
    }
    Ok(match output {
        Output::Json => pretty(&Value::Array(history_json(&resp.versions))),
        Output::Table | Output::Wide | Output::Toml => history_table(&resp.versions),
    })
}

fn not_found(e: control::Error) -> Error {
    match &e {
        control::Error::Status(s) if s.code() == tonic::Code::NotFound => {
            Error::NotFound(s.message().to_owned())
        }
        _ => Error::Registry(e),
    }
}

// === formatting ===

/// One line per change, `created Kind/ns/name (revision N)`; with `dry_run`, each followed by
/// the registry's diff, indented.
pub fn changes(resp: &pb::ApplyResponse, dry_run: bool) -> String {
    let mut out = String::new();
    for c in &resp.changes {
        let key = format!("{}/{}/{}", c.kind, c.namespace, c.name);
        if dry_run {
            let _ = writeln!(out, "{} {key} (dry run)", c.action);
            for line in c.diff.lines() {
                let _ = writeln!(out, "    {line}");
            }
        } else {
            let _ = writeln!(out, "{} {key} (revision {})", c.action, resp.revision);
        }
    }
    out
}

/// `KIND NAMESPACE NAME REVISION AUTHOR UPDATED`; empty when there are none.
pub fn table(resources: &[pb::Resource]) -> String {
    if resources.is_empty() {
        return String::new();
    }
    let rows: Vec<Vec<String>> = resources
        .iter()
        .map(|r| {
            vec![
                r.kind.clone(),
                r.namespace.clone(),
                r.name.clone(),
                r.revision.to_string(),
                r.author.clone(),
                time(r.updated_unix),
            ]
        })
        .collect();
    crate::columns(
        &["KIND", "NAMESPACE", "NAME", "REVISION", "AUTHOR", "UPDATED"],
        &rows,
    )
}

/// One row per gateway listener and attached Route: whether the Route attaches to the listener,
/// or why not (a Route that attaches silently, or never, is what Consul users trip on).
pub fn gateway_wide(gateways: &[&pb::Resource], routes: &[pb::Resource]) -> String {
    use mesh_api::policy::{ListenerProtocol, Resource, Spec, attaches};
    let decode =
        |r: &pb::Resource| Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json).ok();
    let routes: Vec<Resource> = routes.iter().filter_map(decode).collect();
    let mut rows = Vec::new();
    for g in gateways {
        let Some(Resource {
            key,
            spec: Spec::Gateway(gw),
            ..
        }) = decode(g)
        else {
            continue;
        };
        let attached: Vec<(&Resource, &mesh_api::policy::Route)> = (routes.iter())
            .filter_map(|r| match &r.spec {
                Spec::Route(route)
                    if r.key.namespace == key.namespace && route.gateways.contains(&key.name) =>
                {
                    Some((r, route))
                }
                _ => None,
            })
            .collect();
        for l in &gw.listeners {
            let hosts = if l.hostnames.is_empty() {
                "*".to_owned()
            } else {
                l.hostnames
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut row = |route: String, status: String| {
                rows.push(vec![
                    format!("{}/{}", key.namespace, key.name),
                    l.name.to_string(),
                    l.protocol.to_string(),
                    l.bind.to_string(),
                    hosts.clone(),
                    route,
                    status,
                ]);
            };
            match (l.protocol, &l.service) {
                (ListenerProtocol::Tls | ListenerProtocol::Tcp, Some(svc)) => {
                    row(format!("service {svc}"), "-".to_owned());
                }
                _ if attached.is_empty() => {
                    row("-".to_owned(), "no Route names this gateway".to_owned())
                }
                _ => {
                    for (r, route) in &attached {
                        let status = match attaches(&route.hostnames, l) {
                            Ok(()) => "attached".to_owned(),
                            Err(why) => format!("not attached: {why}"),
                        };
                        row(r.key.name.to_string(), status);
                    }
                }
            }
        }
    }
    crate::columns(
        &[
            "GATEWAY",
            "LISTENER",
            "PROTOCOL",
            "BIND",
            "HOSTNAMES",
            "ROUTE",
            "STATUS",
        ],
        &rows,
    )
}

/// `REVISION AUTHOR TIME ACTION`, oldest first.
pub fn history_table(versions: &[pb::Resource]) -> String {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .zip(actions(versions))
        .map(|(v, action)| {
            vec![
                v.revision.to_string(),
                v.author.clone(),
                time(v.updated_unix),
                action.to_owned(),
            ]
        })
        .collect();
    crate::columns(&["REVISION", "AUTHOR", "TIME", "ACTION"], &rows)
}

/// Every version with its action and full spec (`null` for deletions).
pub fn history_json(versions: &[pb::Resource]) -> Vec<Value> {
    versions
        .iter()
        .zip(actions(versions))
        .map(|(v, action)| {
            json!({
                "kind": v.kind,
                "namespace": v.namespace,
                "name": v.name,
                "revision": v.revision,
                "author": v.author,
                "updated_unix": v.updated_unix,
                "time": time(v.updated_unix),
                "action": action,
                "spec": if v.deleted { Value::Null } else { spec_value(&v.spec_json) },
            })
        })
        .collect()
}

/// `created` for the first version and after a deletion, `deleted`, else `updated`.
fn actions(versions: &[pb::Resource]) -> Vec<&'static str> {
    let mut prev_live = false;
    versions
        .iter()
        .map(|v| {
            let a = match (v.deleted, prev_live) {
                (true, _) => "deleted",
                (false, false) => "created",
                (false, true) => "updated",
            };
            prev_live = !v.deleted;
            a
        })
        .collect()
}

fn json_of(r: &pb::Resource) -> Value {
    json!({
        "kind": r.kind,
        "namespace": r.namespace,
        "name": r.name,
        "revision": r.revision,
        "author": r.author,
        "updated_unix": r.updated_unix,
        "spec": spec_value(&r.spec_json),
    })
}

fn spec_value(spec_json: &str) -> Value {
    serde_json::from_str(spec_json).unwrap_or_else(|_| Value::String(spec_json.to_owned()))
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialise");
    s.push('\n');
    s
}

/// The resources as a policy file `meshctl apply -f` reads back, each headed by a comment
/// with its revision, author and time.
pub fn toml_of(resources: &[pb::Resource]) -> String {
    let mut out = String::new();
    for r in resources {
        let mut table = toml::Table::new();
        if let Value::Object(spec) = spec_value(&r.spec_json) {
            for (k, v) in spec {
                if let Some(v) = toml_value(v) {
                    table.insert(k, v);
                }
            }
        }
        let mut doc = toml::Table::new();
        doc.insert(
            "resource".into(),
            toml::Value::Array(vec![toml::Value::Table(table)]),
        );
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "# {}/{}/{}: revision {} by {} at {}",
            r.kind,
            r.namespace,
            r.name,
            r.revision,
            r.author,
            time(r.updated_unix)
        );
        // The key fields first, where people look for them (a toml::Table sorts its keys).
        let key = |v: &str| toml::Value::String(v.to_owned()).to_string();
        let head = format!(
            "[[resource]]\nkind = {}\nname = {}\nnamespace = {}\n",
            key(&r.kind),
            key(&r.name),
            key(&r.namespace)
        );
        let body = toml::to_string(&doc).expect("TOML tables serialise");
        out.push_str(&body.replacen("[[resource]]\n", &head, 1));
    }
    out
}

/// JSON → TOML; `null` (absent) is dropped.
fn toml_value(v: Value) -> Option<toml::Value> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => toml::Value::String(s),
        Value::Array(a) => toml::Value::Array(a.into_iter().filter_map(toml_value).collect()),
        Value::Object(m) => toml::Value::Table(
            m.into_iter()
                .filter_map(|(k, v)| toml_value(v).map(|v| (k, v)))
                .collect(),
        ),
    })
}

/// A Unix time as RFC 3339 UTC (`-` when unset).
fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".to_owned();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix as u64)).to_string()
}

#[cfg(test)]
mod tests;
