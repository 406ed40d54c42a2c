//! Join token RPCs against a memory store, driven through the API methods: how many uses a
//! request means, joins under a registered name (refused unless the token replaces exactly
//! that node), listing without secrets, revocation, and who may call what.

use std::path::Path;
use std::sync::Arc;

use mesh_api::name::Label;
use mesh_api::{Identity, TrustDomain};
use mesh_ca::Authority;
use mesh_runtime::tls;
use tonic::Code;

use super::*;
use crate::api::Metrics;
use crate::config::Config;
use crate::store::{MemoryStore, Store};

struct Fixture {
    api: RegistryApi,
    store: Arc<MemoryStore>,
    td: TrustDomain,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

fn fixture() -> Fixture {
    let td = TrustDomain::new("mesh.test").unwrap();
    let text = Config::render(
        &td,
        Path::new("/nonexistent"),
        "127.0.0.1:7700".parse().unwrap(),
        "127.0.0.1:7701".parse().unwrap(),
    );
    let config = Config::from_toml_str(Path::new("registry.toml"), &text).unwrap();
    let (ca, _) = Authority::generate(&td, SystemTime::now()).unwrap();
    let store = Arc::new(MemoryStore::new());
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let api = RegistryApi::new(
        store.clone(),
        Arc::new(crate::ca::CaHandle::new(ca)),
        config,
        Metrics::default(),
        shutdown_rx,
    )
    .unwrap();
    Fixture {
        api,
        store,
        td,
        _shutdown: shutdown,
    }
}

fn peer(identity: Identity) -> PeerInfo {
    PeerInfo {
        identity: Some(identity),
        ..PeerInfo::default()
    }
}

fn request(services: &[&str], uses: u32) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        ttl_seconds: 3600,
        uses,
        ..Default::default()
    }
}

/// The answer of a call that must succeed.
fn ok<T>(r: Result<T, Rejected>) -> T {
    r.unwrap_or_else(|rej| panic!("refused ({}): {:?}", rej.reason, rej.status))
}

/// A refusal as the caller sees it, plus the metric reason.
fn refusal<T: std::fmt::Debug>(r: Result<T, Rejected>) -> (&'static str, Code, String) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(rej) => (
            rej.reason,
            rej.status.code(),
            rej.status.message().to_owned(),
        ),
    }
}

impl Fixture {
    fn admin(&self) -> PeerInfo {
        peer(Identity::Admin {
            trust_domain: self.td.clone(),
            name: Label::new("operator").unwrap(),
        })
    }

    fn viewer(&self) -> PeerInfo {
        peer(Identity::Viewer {
            trust_domain: self.td.clone(),
            name: Label::new("ro").unwrap(),
        })
    }

    fn node(&self, name: &str) -> PeerInfo {
        peer(Identity::node(&self.td, &NodeName::new(name).unwrap()))
    }

    async fn create(&self, req: pb::CreateTokenRequest) -> pb::CreateTokenResponse {
        let created = self.api.do_create_token(&self.admin(), req).await;
        created.unwrap_or_else(|r| panic!("{:?}", r.status))
    }

    fn stored(&self, id: &str) -> TokenRecord {
        self.store.get_token(id).unwrap().unwrap()
    }

    async fn join(&self, token: &str, name: &str) -> Result<pb::JoinResponse, Rejected> {
        let node = NodeName::new(name).unwrap();
        let (_key, csr_pem) = tls::new_key_and_csr(&Identity::node(&self.td, &node)).unwrap();
        self.api
            .do_join(pb::JoinRequest {
                token: token.to_owned(),
                node_name: name.to_owned(),
                csr_pem,
                datacenter: "dc1".to_owned(),
                zone: "a".to_owned(),
            })
            .await
    }
}

#[test]
fn what_a_request_means_for_uses() {
    // (uses, unlimited_uses, max_uses stored or an error)
    let cases = [
        (0, false, Some(DEFAULT_TOKEN_USES)),
        (1, false, Some(1)),
        (5, false, Some(5)),
        (0, true, Some(0)),
        (3, true, None),
    ];
    for (uses, unlimited, want) in cases {
        assert_eq!(
            max_uses(uses, unlimited).ok(),
            want,
            "uses {uses}, unlimited {unlimited}"
        );
    }
    assert_eq!(DEFAULT_TOKEN_USES, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn uses_default_to_one_and_unlimited_only_when_asked() {
    let f = fixture();
    let unset = f.create(request(&["web"], 0)).await;
    assert_eq!(f.stored(&unset.id).max_uses, 1);
    let three = f.create(request(&["web"], 3)).await;
    assert_eq!(f.stored(&three.id).max_uses, 3);
    let unlimited = f
        .create(pb::CreateTokenRequest {
            unlimited_uses: true,
            ..request(&["web"], 0)
        })
        .await;
    assert_eq!(f.stored(&unlimited.id).max_uses, 0);

    let contradictory = f
        .api
        .do_create_token(
            &f.admin(),
            pb::CreateTokenRequest {
                unlimited_uses: true,
                ..request(&["web"], 2)
            },
        )
        .await;
    let (reason, code, msg) = refusal(contradictory);
    assert_eq!((reason, code), ("bad_request", Code::InvalidArgument));
    assert!(msg.contains("unlimited_uses"), "{msg}");

    // The default really is one join.
    ok(f.join(&unset.token, "node-1").await);
    let (reason, code, _) = refusal(f.join(&unset.token, "node-2").await);
    assert_eq!((reason, code), ("token_used_up", Code::PermissionDenied));
}

#[tokio::test(flavor = "current_thread")]
async fn a_registered_name_is_joined_only_with_a_token_that_replaces_it() {
    let f = fixture();
    let first = f.create(request(&["web"], 1)).await;
    ok(f.join(&first.token, "node-1").await);
    let original = f.store.get_node("node-1").unwrap().unwrap();

    // An ordinary token with uses left: refused, nothing used, the record unchanged.
    let ordinary = f.create(request(&["web", "api"], 5)).await;
    let (reason, code, msg) = refusal(f.join(&ordinary.token, "node-1").await);
    assert_eq!((reason, code), ("node_exists", Code::AlreadyExists));
    assert!(
        msg.contains("node node-1 is already registered")
            && msg.contains("meshctl token create --replace node-1"),
        "{msg}"
    );
    assert_eq!(f.stored(&ordinary.id).uses, 0);
    assert_eq!(f.store.get_node("node-1").unwrap(), Some(original.clone()));
    assert_eq!(f.store.list_certs(0).unwrap().len(), 1);
    // It still joins a new name.
    ok(f.join(&ordinary.token, "node-2").await);

    // A replace token joins exactly its name: not another one, registered or not.
    let replace = f
        .create(pb::CreateTokenRequest {
            replace_node: "node-1".to_owned(),
            ..request(&["web"], 0)
        })
        .await;
    assert_eq!(
        f.stored(&replace.id).replace_node.as_deref(),
        Some("node-1")
    );
    for other in ["node-2", "node-3"] {
        let (reason, code, msg) = refusal(f.join(&replace.token, other).await);
        assert_eq!(
            (reason, code),
            ("token_for_other_node", Code::PermissionDenied),
            "{other}"
        );
        assert!(
            msg.contains("replace node node-1") && msg.contains(other),
            "{msg}"
        );
    }
    assert_eq!(f.stored(&replace.id).uses, 0);
    ok(f.join(&replace.token, "node-1").await);
    let replaced = f.store.get_node("node-1").unwrap().unwrap();
    assert_eq!(replaced.token_id, replace.id);
    assert_ne!(replaced.cert_serial, original.cert_serial);
    assert_eq!(f.stored(&replace.id).uses, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn replace_node_must_be_a_node_name() {
    let f = fixture();
    let bad = f
        .api
        .do_create_token(
            &f.admin(),
            pb::CreateTokenRequest {
                replace_node: "Not A Name".to_owned(),
                ..request(&["web"], 1)
            },
        )
        .await;
    let (reason, code, msg) = refusal(bad);
    assert_eq!((reason, code), ("bad_request", Code::InvalidArgument));
    assert!(msg.contains("replace_node \"Not A Name\""), "{msg}");
    assert!(f.store.list_tokens().unwrap().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn tokens_are_listed_to_operators_and_viewers_without_secrets() {
    let f = fixture();
    let a = f.create(request(&["web"], 2)).await;
    let b = f
        .create(pb::CreateTokenRequest {
            replace_node: "node-7".to_owned(),
            ..request(&["shop/*"], 1)
        })
        .await;
    ok(f.join(&a.token, "node-1").await);

    for who in [f.admin(), f.viewer()] {
        let listed = ok(f.api.do_list_tokens(&who).await).tokens;
        let mut want = vec![
            pb::TokenRecord {
                id: a.id.clone(),
                services: vec!["default/web".to_owned()],
                uses: 1,
                max_uses: 2,
                ..token_info(f.stored(&a.id))
            },
            pb::TokenRecord {
                id: b.id.clone(),
                services: vec!["shop/*".to_owned()],
                max_uses: 1,
                replace_node: "node-7".to_owned(),
                ..token_info(f.stored(&b.id))
            },
        ];
        want.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(listed, want);
        assert!(
            listed
                .iter()
                .all(|t| t.created_by.contains("/admin/operator"))
        );
        let text = format!("{listed:?}");
        for id in [&a.id, &b.id] {
            let stored = f.stored(id);
            assert!(!text.contains(&stored.secret_sha256), "hash listed: {text}");
            let secret = JoinToken::decode(if *id == a.id { &a.token } else { &b.token })
                .unwrap()
                .secret;
            assert!(!text.contains(&secret), "secret listed: {text}");
        }
    }
    let (reason, code, _) = refusal(f.api.do_list_tokens(&f.node("node-1")).await);
    assert_eq!((reason, code), ("not_admin", Code::PermissionDenied));
}

#[tokio::test(flavor = "current_thread")]
async fn operators_revoke_and_a_revoked_token_never_joins() {
    let f = fixture();
    let t = f.create(request(&["web"], 3)).await;
    ok(f.join(&t.token, "node-1").await);
    let revoke = |who: PeerInfo, id: &str| {
        let req = pb::RevokeTokenRequest { id: id.to_owned() };
        let api = f.api.clone();
        async move { api.do_revoke_token(&who, req).await }
    };

    let (reason, code, msg) = refusal(revoke(f.viewer(), &t.id).await);
    assert_eq!((reason, code), ("read_only", Code::PermissionDenied));
    assert!(msg.contains("viewer"), "{msg}");
    assert_eq!(f.stored(&t.id).revoked_unix, None);
    let (reason, code, _) = refusal(revoke(f.node("node-1"), &t.id).await);
    assert_eq!((reason, code), ("not_admin", Code::PermissionDenied));
    let (reason, code, msg) = refusal(revoke(f.admin(), "00000000deadbeef").await);
    assert_eq!((reason, code), ("unknown_token", Code::NotFound));
    assert!(msg.contains("\"00000000deadbeef\""), "{msg}");
    let (_, code, _) = refusal(revoke(f.admin(), "").await);
    assert_eq!(code, Code::InvalidArgument);

    let done = ok(revoke(f.admin(), &t.id).await);
    assert!(!done.already_revoked);
    let shown = done.token.unwrap();
    assert!(shown.revoked_unix > 0);
    assert!(shown.revoked_by.contains("/admin/operator"), "{shown:?}");
    assert_eq!(shown.uses, 1);
    let again = ok(revoke(f.admin(), &t.id).await);
    assert!(again.already_revoked);
    assert_eq!(again.token, Some(shown.clone()));

    let (reason, code, msg) = refusal(f.join(&t.token, "node-2").await);
    assert_eq!((reason, code), ("token_revoked", Code::PermissionDenied));
    assert!(msg.contains("revoked"), "{msg}");
    assert_eq!(f.store.get_node("node-2").unwrap(), None);
    assert_eq!(f.stored(&t.id).uses, 1);
    // Listed as revoked; the node that joined before keeps its record.
    let listed = ok(f.api.do_list_tokens(&f.viewer()).await).tokens;
    assert_eq!(listed, vec![shown]);
    assert!(f.store.get_node("node-1").unwrap().is_some());
}
