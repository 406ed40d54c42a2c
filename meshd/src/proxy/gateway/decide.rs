//! Gateway decisions, all pure: whether a Route attaches to a gateway listener (and why not,
//! for its status), and which attached Route serves a request arriving on a listener for a
//! host. Host names combine as in the Kubernetes Gateway API: a request is served when its
//! host matches the listener's names (if any) and the Route's (if any), and the Route whose
//! names match it most specifically wins (exact over wildcard, longer wildcard over shorter,
//! names over none; ties go to the first Route by name).

use std::sync::Arc;

use mesh_api::policy::{Listener, Specificity, attaches, best_match};

use super::super::route::GatewayRoute;

/// The Route that serves a request for `host` (normalized: lowercase, no port) on `listener`,
/// among those attached to its gateway (in name order); `None`: no Route serves that host
/// there (the gateway answers 404).
pub fn select<'r>(
    routes: &'r [Arc<GatewayRoute>],
    listener: &Listener,
    host: &str,
) -> Option<&'r Arc<GatewayRoute>> {
    best_match(&listener.hostnames, host)?;
    let mut best: Option<(Option<Specificity>, &Arc<GatewayRoute>)> = None;
    for r in routes {
        if attaches(&r.hostnames, listener).is_err() {
            continue;
        }
        let Some(spec) = best_match(&r.hostnames, host) else {
            continue;
        };
        // Strictly better only: on a tie the earlier Route (by name) keeps it.
        if best.as_ref().is_none_or(|(b, _)| spec > *b) {
            best = Some((spec, r));
        }
    }
    best.map(|(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::policy::{Hostname, HttpRoute, ListenerProtocol, NotAttached, ResourceKey};
    use proptest::prelude::*;

    fn h(s: &str) -> Hostname {
        Hostname::new(s).unwrap()
    }

    fn listener(protocol: ListenerProtocol, hosts: &[&str]) -> Listener {
        Listener {
            name: "web".parse().unwrap(),
            bind: "127.0.0.1:8443".parse().unwrap(),
            protocol,
            hostnames: hosts.iter().map(|s| h(s)).collect(),
            tls: None,
            service: None,
            redirect_to_https_port: None,
            proxy_protocol: false,
            send_proxy_protocol: None,
        }
    }

    fn route(name: &str, hosts: &[&str]) -> Arc<GatewayRoute> {
        let key = ResourceKey::new(
            mesh_api::policy::Kind::Route,
            "shop".parse().unwrap(),
            name.parse().unwrap(),
        );
        Arc::new(GatewayRoute {
            hostnames: hosts.iter().map(|s| h(s)).collect(),
            route: super::super::super::route::CompiledRoute::new(key, &[] as &[HttpRoute]),
        })
    }

    fn picked(routes: &[Arc<GatewayRoute>], l: &Listener, host: &str) -> Option<String> {
        select(routes, l, host).map(|r| r.route.key.name.to_string())
    }

    #[test]
    fn the_most_specific_route_serves_a_host() {
        use ListenerProtocol::Https;
        let routes = [
            route("any", &[]),
            route("exact", &["shop.example.com"]),
            route("short", &["*.com"]),
            route("wild", &["*.example.com"]),
        ];
        let open = listener(Https, &[]);
        let narrow = listener(Https, &["*.example.com"]);
        let cases: &[(&Listener, &str, Option<&str>)] = &[
            (&open, "shop.example.com", Some("exact")),
            (&open, "api.example.com", Some("wild")),
            (&open, "example.com", Some("short")),
            (&open, "example.org", Some("any")),
            (&narrow, "shop.example.com", Some("exact")),
            (&narrow, "a.b.example.com", Some("wild")),
            // The listener does not serve it, whatever the Routes say.
            (&narrow, "example.org", None),
            (&narrow, "example.com", None),
        ];
        for (l, host, want) in cases {
            assert_eq!(
                picked(&routes, l, host).as_deref(),
                *want,
                "{host} on {:?}",
                l.hostnames
            );
        }
        // Without a catch-all Route an unknown host finds nothing.
        assert_eq!(picked(&routes[1..], &open, "example.org"), None);
    }

    #[test]
    fn ties_go_to_the_first_route_by_name() {
        let l = listener(ListenerProtocol::Http, &[]);
        let routes = [
            route("a", &["*.example.com"]),
            route("b", &["*.example.com"]),
        ];
        assert_eq!(picked(&routes, &l, "x.example.com").as_deref(), Some("a"));
        let routes = [route("a", &[]), route("b", &[])];
        assert_eq!(picked(&routes, &l, "x.example.com").as_deref(), Some("a"));
    }

    #[test]
    fn attachment_and_why_not() {
        use ListenerProtocol::*;
        let cases: &[(&[&str], Listener, Result<(), &str>)] = &[
            (&[], listener(Https, &["*.example.com"]), Ok(())),
            (&["shop.example.com"], listener(Https, &[]), Ok(())),
            (
                &["shop.example.com"],
                listener(Https, &["*.example.com"]),
                Ok(()),
            ),
            // Wider than the listener: attaches, serves the overlap.
            (
                &["*.example.com"],
                listener(Https, &["shop.example.com"]),
                Ok(()),
            ),
            (
                &["shop.example.org"],
                listener(Https, &["*.example.com"]),
                Err(
                    "no host name of the route (shop.example.org) overlaps listener web's (*.example.com)",
                ),
            ),
            (
                &[],
                listener(Tcp, &[]),
                Err("listener web is tcp; Routes attach to http and https listeners only"),
            ),
            (
                &[],
                listener(Tls, &[]),
                Err("listener web is tls; Routes attach to http and https listeners only"),
            ),
        ];
        for (hosts, l, want) in cases {
            let hosts: Vec<Hostname> = hosts.iter().map(|s| h(s)).collect();
            let got = attaches(&hosts, l).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "{hosts:?} on {l:?}");
        }
        let mut redirecting = listener(Http, &[]);
        redirecting.redirect_to_https_port = Some(8443);
        assert!(matches!(
            attaches(&[], &redirecting),
            Err(NotAttached::Redirects { .. })
        ));
        // A Route that does not attach serves nothing, even for a host it names.
        let routes = [route("exact", &["shop.example.com"])];
        assert_eq!(picked(&routes, &redirecting, "shop.example.com"), None);
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "example", "com"]), 1..4)
            .prop_map(|labels| labels.join("."))
    }

    fn name_strategy() -> impl Strategy<Value = Hostname> {
        (host_strategy(), any::<bool>()).prop_map(|(host, wild)| {
            Hostname::new(&if wild { format!("*.{host}") } else { host }).unwrap()
        })
    }

    proptest! {
        /// Whatever the Routes, the chosen one names the host (or names nothing), the listener
        /// serves the host, and no other attached Route matches it more specifically.
        #[test]
        fn the_choice_is_sound(
            routes in prop::collection::vec(prop::collection::vec(name_strategy(), 0..3), 0..5),
            listener_names in prop::collection::vec(name_strategy(), 0..3),
            host in host_strategy(),
        ) {
            let mut l = listener(ListenerProtocol::Https, &[]);
            l.hostnames = listener_names;
            let routes: Vec<Arc<GatewayRoute>> = routes.into_iter().enumerate().map(|(i, hs)| {
                let r = route(&format!("r{i}"), &[]);
                Arc::new(GatewayRoute { hostnames: hs, route: super::super::super::route::CompiledRoute::new(r.route.key.clone(), &[]) })
            }).collect();
            match select(&routes, &l, &host) {
                Some(r) => {
                    prop_assert!(best_match(&l.hostnames, &host).is_some());
                    let spec = best_match(&r.hostnames, &host);
                    prop_assert!(spec.is_some());
                    for other in &routes {
                        if attaches(&other.hostnames, &l).is_ok() {
                            prop_assert!(best_match(&other.hostnames, &host) <= spec);
                        }
                    }
                }
                None => {
                    let served = best_match(&l.hostnames, &host).is_some()
                        && routes.iter().any(|r| attaches(&r.hostnames, &l).is_ok()
                            && best_match(&r.hostnames, &host).is_some());
                    prop_assert!(!served);
                }
            }
        }
    }
}
