//! A TLS server name on the inbound port → the service whose identity the server proves
//! (`meshd::proxy::tls::callee`): a mesh service (`<name>.<ns>.svc.mesh`) or, for an
//! ExternalService reached through its egress gateway (`<svc>.<gw>.<ns>.egress.mesh`), the
//! gateway. The name is the caller's choice, read before any certificate is checked.
//!
//! Invariants: never panics; a name that resolves is exactly the canonical spelling of what it
//! resolves to (no second spelling reaches the same certificate), and the two forms never both
//! apply.

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
    let egress = parse_egress_sni(name);
    assert!(mesh.is_none() || egress.is_none(), "{name:?} is both");
    if let Some(k) = &mesh {
        assert_eq!(k.sni(), name);
    }
    if let Some((svc, gw, ns)) = &egress {
        assert_eq!(egress_sni(svc, gw, ns), name);
    }
    let got = callee(name);
    match (&mesh, &egress) {
        (Some(k), _) => assert_eq!(got.as_ref(), Some(k)),
        (None, Some((_, gw, ns))) => {
            assert_eq!(got, Some(ServiceKey::new(ns.clone(), gw.clone())));
        }
        (None, None) => assert!(got.is_none()),
    }
});
