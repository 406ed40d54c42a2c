//! Pending edges and intervals, the members digest, and warnings: the merge of sources, their
//! bounds on the wire, and the listener warnings logged once per appearance.

use super::*;

fn edge(src: &str, requests: u64) -> pb::EdgeStats {
    pb::EdgeStats {
        source: src.into(),
        destination: "default/api".into(),
        mtls: true,
        protocol: "http".into(),
        requests,
        errors: 1,
        latency_buckets: vec![requests],
        bytes: 0,
        destination_site: String::new(),
    }
}

#[test]
fn pending_merges_and_is_bounded() {
    let mut newer = vec![edge("default/web", 5)];
    merge_pending(
        &mut newer,
        vec![edge("default/web", 3), edge("default/batch", 2)],
        10,
    );
    assert_eq!(newer.len(), 2);
    assert_eq!((newer[0].requests, newer[0].errors), (8, 2));
    assert_eq!(newer[0].latency_buckets, [8]);
    let mut full = vec![edge("a/a", 1)];
    merge_pending(&mut full, vec![edge("b/b", 1)], 1);
    assert_eq!(full.len(), 1, "bounded");
}

#[test]
fn intervals() {
    let ten = Duration::from_secs(10);
    assert_eq!(next_interval(ten, 0), ten);
    assert_eq!(next_interval(ten, 500), Duration::from_millis(500));
    assert_eq!(next_interval(ten, 1), MIN_INTERVAL);
    assert_eq!(next_interval(ten, 3_600_000), MAX_INTERVAL);
}

#[test]
fn digest_ignores_order() {
    use crate::membership::Member;
    let m = |n: &str| Member {
        node: n.into(),
        gossip_addr: "127.0.0.1:1".parse().unwrap(),
        generation: 1,
        info: None,
        services: Vec::new(),
    };
    let a = MeshView {
        members: vec![m("a"), m("b")],
        ..MeshView::default()
    };
    let b = MeshView {
        members: vec![m("b"), m("a")],
        ..MeshView::default()
    };
    let c = MeshView {
        members: vec![m("a")],
        ..MeshView::default()
    };
    assert_eq!(members_digest(&a), members_digest(&b));
    assert_ne!(members_digest(&a), members_digest(&c));
    assert_eq!(members_digest(&a).len(), 16);
}

// === warnings ===

fn w(code: &'static str, message: &str) -> Warning {
    Warning::new(code, message)
}

/// Two components publish through the seam: the report carries the union, sorted and each
/// once, and follows each source's latest list.
#[test]
fn warnings_merge_every_source() {
    let mut warnings = Warnings::default();
    assert_eq!(warnings.current(), []);
    let listeners_tx = warnings.source();
    let (policy_tx, policy_rx) = watch::channel(Arc::new(vec![w("policy_kind_skipped", "b")]));
    warnings.add(policy_rx);
    // The reporter holds a clone taken before the sources publish: it still sees them.
    let reporter = warnings.clone();
    assert_eq!(reporter.current(), [w("policy_kind_skipped", "b")]);
    listeners_tx.send_replace(Arc::new(vec![
        w("listener_off_loopback", "z"),
        w("listener_off_loopback", "a"),
        w("policy_kind_skipped", "b"),
    ]));
    assert_eq!(
        reporter.current(),
        [
            w("listener_off_loopback", "a"),
            w("listener_off_loopback", "z"),
            w("policy_kind_skipped", "b"),
        ]
    );
    // A source that empties its list: its warnings are gone.
    listeners_tx.send_replace(Arc::new(vec![w("listener_off_loopback", "a")]));
    policy_tx.send_replace(Arc::new(Vec::new()));
    assert_eq!(reporter.current(), [w("listener_off_loopback", "a")]);
    // A source that goes away: its last list stays in force.
    drop(listeners_tx);
    assert_eq!(reporter.current(), [w("listener_off_loopback", "a")]);
}

#[test]
fn warnings_are_bounded_in_number() {
    let mut warnings = Warnings::default();
    let tx = warnings.source();
    let many: Vec<Warning> = (0..MAX_WARNINGS + 10)
        .map(|i| w("listener_off_loopback", &format!("{i:03}")))
        .collect();
    tx.send_replace(Arc::new(many[..MAX_WARNINGS].to_vec()));
    assert_eq!(warnings.current(), many[..MAX_WARNINGS]);
    tx.send_replace(Arc::new(many.clone()));
    let got = warnings.current();
    assert_eq!(got.len(), MAX_WARNINGS);
    assert_eq!(got[..MAX_WARNINGS - 1], many[..MAX_WARNINGS - 1]);
    assert_eq!(
        got[MAX_WARNINGS - 1],
        w(
            WARNINGS_TRUNCATED,
            "11 more warnings are not reported; see the node's log"
        )
    );
}

/// Whatever a message holds, the wire form is one line the registry accepts: control
/// characters become spaces, a long message is cut between characters.
#[test]
fn warnings_on_the_wire_fit_the_registry() {
    #[rustfmt::skip]
    let cases: Vec<(String, String)> = vec![
        ("fine".into(), "fine".into()),
        ("a\nb\tc\u{1b}[2J".into(), "a b c [2J".into()),
        ("é".repeat(MAX_WARNING_LEN), format!("{}…", "é".repeat(MAX_WARNING_LEN / 2 - 2))),
        (format!("a{}", "€".repeat(400)), format!("a{}…", "€".repeat(169))),
        ("x".repeat(MAX_WARNING_LEN), "x".repeat(MAX_WARNING_LEN)),
        ("x".repeat(MAX_WARNING_LEN + 1), format!("{}…", "x".repeat(MAX_WARNING_LEN - 3))),
        (String::new(), "listener_off_loopback".into()),
    ];
    for (message, want) in cases {
        let wire = w("listener_off_loopback", &message).to_proto();
        assert_eq!(wire.message, want, "{message:?}");
        assert!(wire.message.len() <= MAX_WARNING_LEN);
        assert!(!wire.message.chars().any(char::is_control));
        assert!(mesh_api::observe::is_warning_code(&wire.code));
    }
}

fn off_loopback_config(upstream: &str, http_proxy: Option<&str>) -> Config {
    let dir = std::path::Path::new("/srv/n1");
    let mut config = Config::for_test(dir);
    let proxy = http_proxy
        .map(|p| format!("http_proxy = \"{p}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "name = \"web\"\naddress = \"127.0.0.1:8080\"\nprotocol = \"http\"\n{proxy}\
         [[upstreams]]\nservice = \"api\"\nbind = \"{upstream}\"\n"
    );
    let file = dir.join("services.d/web.toml");
    config.services = vec![config::Service::from_toml_str(&file, &text).unwrap()];
    config
}

/// At start every listener off loopback is logged; on reload only those the reload added.
#[test]
fn listener_warnings_are_logged_when_they_appear() {
    let keys = |l: &[config::OffLoopback]| l.iter().map(|l| l.key.clone()).collect::<Vec<_>>();
    let start = off_loopback_config("0.0.0.0:9001", None);
    let (now, new) = listener_warnings(&start, &[]);
    assert_eq!(keys(&new), ["upstreams[0].bind"]);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].code, config::LISTENER_OFF_LOOPBACK);
    assert!(
        now[0].message.starts_with(
            "/srv/n1/services.d/web.toml: upstreams[0].bind: 0.0.0.0:9001 is not on loopback"
        ),
        "{now:?}"
    );
    // A reload that keeps it and adds an http_proxy off loopback: only the new one is logged.
    let reload = off_loopback_config("0.0.0.0:9001", Some("10.0.0.5:15001"));
    let (now, new) = listener_warnings(&reload, &now);
    assert_eq!(keys(&new), ["http_proxy"]);
    assert_eq!(now.len(), 2);
    // Back on loopback: nothing to log, and no warnings left.
    let fixed = off_loopback_config("127.0.0.1:9001", None);
    assert_eq!(listener_warnings(&fixed, &now), (vec![], vec![]));
}

/// The task publishes each configuration's warnings as the reloader sends it.
#[tokio::test(flavor = "current_thread")]
async fn listener_warnings_follow_the_config() {
    let (config_tx, config_rx) =
        watch::channel(Arc::new(off_loopback_config("0.0.0.0:9001", None)));
    let mut warnings = Warnings::default();
    let tx = warnings.source();
    let mut rx = tx.subscribe();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(watch_listeners(config_rx, tx, shutdown_rx));
    let count = |rx: &mut watch::Receiver<Arc<Vec<Warning>>>| rx.borrow_and_update().len();
    rx.changed().await.unwrap();
    assert_eq!(count(&mut rx), 1);
    config_tx.send_replace(Arc::new(off_loopback_config(
        "10.0.0.5:9001",
        Some("[::]:15001"),
    )));
    rx.changed().await.unwrap();
    assert_eq!(count(&mut rx), 2);
    assert_eq!(warnings.current().len(), 2);
    config_tx.send_replace(Arc::new(off_loopback_config("127.0.0.1:9001", None)));
    rx.changed().await.unwrap();
    assert_eq!(count(&mut rx), 0);
    shutdown_tx.send_replace(true);
    task.await.unwrap();
}
