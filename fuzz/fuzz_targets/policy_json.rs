//! Policy JSON decode (`mesh_api::policy::Resource::from_json`): what the registry accepts over
//! gRPC and what meshd reads from the registry and from its persisted snapshot.
//!
//! Input: the kind (one byte: one of the kinds, or the text of the first line when it names
//! none), then namespace and name on their own lines, then the spec JSON. Never panics; what
//! decodes has the kind asked for and reads back from its canonical JSON unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::policy::{Kind, Resource};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut lines = text.splitn(4, '\n');
    let (kind, namespace, name, spec) = match usize::from(selector) % (Kind::ALL.len() + 1) {
        i if i < Kind::ALL.len() => {
            let mut lines = text.splitn(3, '\n');
            let (namespace, name) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
            (
                Kind::ALL[i].as_str(),
                namespace,
                name,
                lines.next().unwrap_or(""),
            )
        }
        _ => (
            lines.next().unwrap_or(""),
            lines.next().unwrap_or(""),
            lines.next().unwrap_or(""),
            lines.next().unwrap_or(""),
        ),
    };
    let Ok(resource) = Resource::from_json(kind, namespace, name, spec) else {
        return;
    };
    assert_eq!(Ok(resource.key.kind), kind.parse::<Kind>());
    assert_eq!(resource.spec.kind(), resource.key.kind);
    assert_eq!(resource.key.name.as_str(), name);
    if !namespace.is_empty() {
        assert_eq!(resource.key.namespace.as_str(), namespace);
    }
    let json = resource.spec_json();
    let back = Resource::from_json(
        resource.key.kind.as_str(),
        resource.key.namespace.as_str(),
        resource.key.name.as_str(),
        &json,
    )
    .unwrap_or_else(|problems| panic!("{} does not read back: {problems:?}\n{json}", resource.key));
    assert_eq!(back, resource, "{json}");
    assert_eq!(back.spec_json(), json);
});
