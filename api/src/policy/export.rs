//! ServiceExport: which services of a namespace this site offers to the other sites, through
//! its east-west gateways. Nothing is exported unless a ServiceExport says so.

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table};
use super::{Kind, Snapshot, Spec};
use crate::name::{Label, ServiceKey};

/// `kind = "ServiceExport"`: the services of its namespace other sites may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceExport {
    /// What is exported.
    pub services: ExportedServices,
}

/// The services a [`ServiceExport`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportedServices {
    /// `["*"]`: every service of the namespace, present and future.
    All,
    /// These names, in the resource's namespace.
    Names(Vec<Label>),
}

/// Every ServiceExport of a policy snapshot, compiled once per change: what this site's
/// east-west gateways pass on and announce to the other sites.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exports {
    /// By namespace.
    by_namespace: std::collections::BTreeMap<Label, Vec<ServiceExport>>,
}

impl Exports {
    /// The exports of `policy`.
    pub fn new(policy: &Snapshot) -> Self {
        let mut by_namespace: std::collections::BTreeMap<Label, Vec<ServiceExport>> =
            Default::default();
        for r in policy.of_kind(Kind::ServiceExport) {
            if let Spec::ServiceExport(e) = &r.spec {
                by_namespace
                    .entry(r.key.namespace.clone())
                    .or_default()
                    .push(e.clone());
            }
        }
        Self { by_namespace }
    }

    /// Whether some ServiceExport exports `service`.
    pub fn exports(&self, service: &ServiceKey) -> bool {
        (self.by_namespace.get(&service.namespace))
            .is_some_and(|es| es.iter().any(|e| e.exports(&service.namespace, service)))
    }

    /// Whether nothing is exported.
    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }
}

// === impl ServiceExport ===

impl ServiceExport {
    /// Whether `service` is exported by this resource, which lives in `namespace`.
    pub fn exports(&self, namespace: &Label, service: &ServiceKey) -> bool {
        service.namespace == *namespace
            && match &self.services {
                ExportedServices::All => true,
                ExportedServices::Names(names) => names.contains(&service.name),
            }
    }
}

impl Serialize for ExportedServices {
    /// As written: `["*"]` or the names.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => ["*"].serialize(s),
            Self::Names(names) => names.serialize(s),
        }
    }
}

// === decoding ===

const KEYS: &[&str] = &["services"];

pub(crate) fn service_export(map: &Map<String, Value>, cx: &mut Cx) -> Option<ServiceExport> {
    let t = Table::from_map(map, "", KEYS, cx);
    let services = t.req(
        "services",
        "a list of service names of this namespace such as [\"users\"], or [\"*\"] for all",
        cx,
        services,
    );
    Some(ServiceExport {
        services: services?,
    })
}

fn services(v: &Value, at: &str, cx: &mut Cx) -> Option<ExportedServices> {
    let names = decode::nonempty_list(
        v,
        at,
        cx,
        "name the services other sites may call, or [\"*\"] for all",
        |v, at, cx| {
            let s = decode::string(v, at, cx)?;
            if s == "*" {
                return Some(None);
            }
            decode::label(v, at, cx).map(Some)
        },
    )?;
    if names.iter().any(Option::is_none) {
        if names.len() > 1 {
            cx.error(
                at,
                "\"*\" exports every service of the namespace; list names or \"*\" alone",
            );
            return None;
        }
        return Some(ExportedServices::All);
    }
    let names: Vec<Label> = names.into_iter().flatten().collect();
    decode::no_duplicates(&names, at, cx, "service", |n| format!("{:?}", n.as_str()))
        .then_some(ExportedServices::Names(names))
}

#[cfg(test)]
mod tests {
    use super::super::{Resource, Spec, parse_file};
    use super::*;

    fn one(body: &str) -> Result<Resource, Vec<String>> {
        let text = format!(
            "[[resource]]\nkind = \"ServiceExport\"\nname = \"out\"\nnamespace = \"bank\"\n{body}\n"
        );
        parse_file("export.toml", &text)
            .map(|mut v| v.remove(0))
            .map_err(|ps| ps.iter().map(ToString::to_string).collect())
    }

    fn export(body: &str) -> ServiceExport {
        match one(body).unwrap().spec {
            Spec::ServiceExport(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_and_all() {
        let bank = Label::new("bank").unwrap();
        let users = ServiceKey::parse("bank/users").unwrap();
        let ledger = ServiceKey::parse("bank/ledger").unwrap();
        let other = ServiceKey::parse("shop/users").unwrap();
        let e = export(r#"services = ["users"]"#);
        assert!(e.exports(&bank, &users));
        assert!(!e.exports(&bank, &ledger));
        assert!(
            !e.exports(&bank, &other),
            "another namespace is never exported"
        );
        let all = export(r#"services = ["*"]"#);
        assert!(all.exports(&bank, &users) && all.exports(&bank, &ledger));
        assert!(!all.exports(&bank, &other));
        assert_eq!(
            serde_json::to_string(&all).unwrap(),
            r#"{"services":["*"]}"#
        );
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"services":["users"]}"#
        );
    }

    #[test]
    fn exports_of_a_snapshot() {
        let text = r#"
[[resource]]
kind = "ServiceExport"
name = "a"
namespace = "bank"
services = ["users"]
[[resource]]
kind = "ServiceExport"
name = "b"
namespace = "bank"
services = ["ledger"]
[[resource]]
kind = "ServiceExport"
name = "all"
namespace = "shop"
services = ["*"]
"#;
        let policy = Snapshot::new(1, parse_file("e.toml", text).unwrap());
        let e = Exports::new(&policy);
        let yes = ["bank/users", "bank/ledger", "shop/cart", "shop/users"];
        let no = ["bank/audit", "default/users", "mesh-system/users"];
        for s in yes {
            assert!(e.exports(&ServiceKey::parse(s).unwrap()), "{s}");
        }
        for s in no {
            assert!(!e.exports(&ServiceKey::parse(s).unwrap()), "{s}");
        }
        assert!(Exports::new(&Snapshot::default()).is_empty());
    }

    #[test]
    fn bad_input_names_the_key() {
        let cases = [
            ("", "services", "missing"),
            ("services = []", "services", "name the services"),
            (r#"services = ["*", "users"]"#, "services", "\"*\" alone"),
            (r#"services = ["Users"]"#, "services[0]", "Users"),
            (
                r#"services = ["users", "users"]"#,
                "services[1]",
                "already used",
            ),
            ("services = \"users\"", "services", "list"),
            (
                r#"services = ["users"]
sites = ["b"]"#,
                "sites",
                "unknown",
            ),
        ];
        for (body, key, want) in cases {
            let errs = one(body).expect_err(body).join("\n");
            assert!(
                errs.contains(&format!("ServiceExport/bank/out: {key}")) && errs.contains(want),
                "{body}: {errs}"
            );
        }
    }
}
