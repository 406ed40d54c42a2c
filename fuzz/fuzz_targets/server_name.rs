//! A TLS server name on the inbound port → the service whose identity the server proves
//! (`meshd::proxy::tls::callee`): a mesh service (`<name>.<ns>.svc.mesh`), a mesh service in a
//! named site (`<name>.<ns>.<site>.svc.mesh`, through that site's east-west gateway) or, for an
//! ExternalService reached through its egress gateway (`<svc>.<gw>.<ns>.egress.mesh`), the
//! gateway. The name is the caller's choice, read before any certificate is checked.
//!
//! Invariants: never panics; a name that resolves is exactly the canonical spelling of what it
//! resolves to (no second spelling reaches the same certificate), and no two forms both apply.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::ServiceKey;
use mesh_api::policy::{egress_sni, parse_egress_sni};
use meshd::proxy::tls::callee;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let mesh = ServiceKey::from_sni(name);
    let site = ServiceKey::from_site_sni(name);
    let egress = parse_egress_sni(name);
    let forms = [mesh.is_some(), site.is_some(), egress.is_some()];
    assert!(
        forms.iter().filter(|f| **f).count() <= 1,
        "{name:?} has two forms"
    );
    if let Some(k) = &mesh {
        assert_eq!(k.sni(), name);
    }
    if let Some((k, s)) = &site {
        assert_eq!(k.site_sni(s), name);
    }
    if let Some((svc, gw, ns)) = &egress {
        assert_eq!(egress_sni(svc, gw, ns), name);
    }
    let got = callee(name);
    match (&mesh, &site, &egress) {
        (Some(k), _, _) | (None, Some((k, _)), _) => assert_eq!(got.as_ref(), Some(k)),
        (None, None, Some((_, gw, ns))) => {
            assert_eq!(got, Some(ServiceKey::new(ns.clone(), gw.clone())));
        }
        (None, None, None) => assert!(got.is_none()),
    }
});
