//! `Host` header → mesh service (`meshd::proxy::outbound::http::service_from_host`): how the
//! `http_proxy` listener picks the service a request goes to (`api.mesh`, `api.ns.mesh`,
//! `api.ns.svc.mesh`, with or without a port).
//!
//! Invariants: never panics; a host that names a service names the same one in every spelling
//! (`<name>.<ns>.mesh`, `<name>.<ns>.svc.mesh`, a trailing dot, a port, upper case), and the
//! caller's namespace is used only for the one-label form.

#![no_main]

use std::sync::LazyLock;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use mesh_api::name::Label;
use meshd::proxy::outbound::http::service_from_host;

static SHOP: LazyLock<Label> = LazyLock::new(|| Label::new("shop").expect("label"));
static OTHER: LazyLock<Label> = LazyLock::new(|| Label::new("other").expect("label"));

fuzz_target!(|data: &[u8]| {
    // As the listener gets it: a header value that is visible ASCII.
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let Ok(host) = value.to_str() else {
        return;
    };
    let got = service_from_host(host, &SHOP);
    assert_eq!(
        service_from_host(&host.to_ascii_uppercase(), &SHOP),
        got,
        "case changed the service"
    );
    let Some(key) = got else {
        return;
    };
    let from_other = service_from_host(host, &OTHER)
        .expect("the caller's namespace matters only for the namespace");
    assert_eq!(from_other.name, key.name);
    if from_other.namespace != key.namespace {
        assert_eq!(key.namespace, *SHOP);
        assert_eq!(from_other.namespace, *OTHER);
    }
    let (name, ns) = (key.name.as_str(), key.namespace.as_str());
    let mut spellings = vec![
        format!("{name}.{ns}.svc.mesh"),
        format!("{name}.{ns}.svc.mesh."),
        format!("{name}.{ns}.svc.mesh:8080"),
        format!(
            "{}.{}.SVC.MESH",
            name.to_ascii_uppercase(),
            ns.to_ascii_uppercase()
        ),
    ];
    // `<name>.svc.mesh` is `<name>` in the caller's namespace (documented), so a namespace
    // called `svc` has only the long spelling.
    if ns != "svc" {
        spellings.extend([format!("{name}.{ns}.mesh"), format!("{name}.{ns}.mesh:80")]);
    }
    for spelling in spellings {
        assert_eq!(
            service_from_host(&spelling, &OTHER).as_ref(),
            Some(&key),
            "{spelling}"
        );
    }
});
