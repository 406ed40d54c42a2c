//! Policy TOML parse (`mesh_api::policy::parse_file`): the files `meshctl apply -f` and the
//! registry read. Never panics; every problem names the file; what parses has no duplicate
//! keys and each resource survives the trip through its canonical JSON wire form
//! (`Resource::from_json(spec_json())` gives it back, and `spec_json` is a fixed point).

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use mesh_api::policy::{self, Resource};

const FILE: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let resources = match policy::parse_file(FILE, text) {
        Ok(resources) => resources,
        Err(problems) => {
            assert!(!problems.is_empty(), "an error without a problem");
            for p in &problems {
                assert_eq!(p.file, FILE, "{p:?}");
                assert!(!p.message.is_empty(), "{p:?}");
            }
            return;
        }
    };
    let mut keys = BTreeSet::new();
    for resource in &resources {
        assert_eq!(resource.spec.kind(), resource.key.kind);
        assert!(keys.insert(resource.key.clone()), "{} twice", resource.key);
        assert_wire_round_trip(resource);
    }
});

fn assert_wire_round_trip(resource: &Resource) {
    let json = resource.spec_json();
    let back = Resource::from_json(
        resource.key.kind.as_str(),
        resource.key.namespace.as_str(),
        resource.key.name.as_str(),
        &json,
    )
    .unwrap_or_else(|problems| panic!("{} does not read back: {problems:?}\n{json}", resource.key));
    assert_eq!(&back, resource, "{json}");
    assert_eq!(back.spec_json(), json);
}
