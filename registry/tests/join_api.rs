//! In-process test of Join with hostile tokens: a registry from `init::run` + `app::build` on
//! loopback port 0, dialled without a client certificate as a new host does. Tokens holding
//! multi-byte UTF-8 where a fingerprint should be, huge tokens and huge node names each get a
//! clear `InvalidArgument` (never a dropped connection), and the registry keeps serving: the
//! same connection then joins with a real token.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mesh_api::proto::v1 as pb;
use mesh_api::proto::v1::registry_client::RegistryClient;
use mesh_api::token::JoinToken;
use mesh_api::{Identity, NodeName, TrustDomain};
use mesh_runtime::tls::{self, SpiffeVerifier};
use rustls_pki_types::ServerName;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use common::{TIMEOUT, metrics};

/// A client with no certificate that checks the registry's, as a host joining for the first
/// time (meshd pins the CA fingerprint; the bundle does the same job here).
fn anonymous_client(
    addr: std::net::SocketAddr,
    td: &TrustDomain,
    bundle_pem: &str,
) -> RegistryClient<Channel> {
    let verifier =
        SpiffeVerifier::exact(tls::root_store(bundle_pem).unwrap(), Identity::registry(td));
    let cfg = tls::client_config(Arc::new(verifier), None, &[b"h2"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let channel = Endpoint::from_static("http://registry.mesh.invalid")
        .connect_timeout(TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("registry.mesh.invalid").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
    RegistryClient::new(channel)
}

fn join_request(td: &TrustDomain, token: String, node_name: &str) -> pb::JoinRequest {
    let node = NodeName::new("node-9").unwrap();
    let (_key, csr_pem) = tls::new_key_and_csr(&Identity::node(td, &node)).unwrap();
    pb::JoinRequest {
        token,
        node_name: node_name.to_owned(),
        csr_pem,
        datacenter: "dc1".to_owned(),
        zone: "a".to_owned(),
    }
}

/// `token` re-encoded with its JSON body changed by `edit`, bypassing `JoinToken::encode`'s
/// types (so fields can hold anything).
fn tampered(token: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let body = token.strip_prefix(mesh_api::token::PREFIX).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
    edit(&mut json);
    format!(
        "{}{}",
        mesh_api::token::PREFIX,
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json).unwrap())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_join_tokens_get_invalid_argument_and_the_registry_keeps_serving() {
    let common::Running {
        _dir,
        report,
        td,
        addr,
        admin_addr,
        stop_tx,
        running,
        mut admin,
        ..
    } = common::start().await;
    let bundle = std::fs::read_to_string(report.admin_dir.join("ca.pem")).unwrap();
    let mut host = anonymous_client(addr, &td, &bundle);
    let real = admin
        .create_token(pb::CreateTokenRequest {
            services: vec!["shop/web".to_owned()],
            ttl_seconds: 3600,
            uses: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    // (what, token, node name, text the status must hold)
    let with_ca = |ca: String| tampered(&real, |j| j["ca"] = ca.into());
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "2-byte characters across the hex digits' byte offsets",
            with_ca(format!("sha256:a{}a", "é".repeat(31))),
            "node-9".to_owned(),
            "CA fingerprint",
        ),
        (
            "a 3-byte character at the end",
            with_ca(format!("sha256:{}€", "0".repeat(61))),
            "node-9".to_owned(),
            "CA fingerprint",
        ),
        (
            "4-byte characters",
            with_ca(format!("sha256:{}", "😀".repeat(16))),
            "node-9".to_owned(),
            "CA fingerprint",
        ),
        (
            "a signed hex digit",
            with_ca(format!("sha256:{}", "+f".repeat(32))),
            "node-9".to_owned(),
            "CA fingerprint",
        ),
        (
            "a long multi-byte fingerprint",
            with_ca(format!("sha256:{}", "ж".repeat(4_000))),
            "node-9".to_owned(),
            "CA fingerprint",
        ),
        (
            "multi-byte text in a field of the wrong type",
            tampered(&real, |j| j["exp"] = "ж".repeat(4_000).into()),
            "node-9".to_owned(),
            "malformed",
        ),
        (
            "a token past the length limit",
            format!("{}{}", real, "A".repeat(mesh_api::token::MAX_LEN)),
            "node-9".to_owned(),
            "longer than",
        ),
        (
            "multi-byte text instead of a token",
            "ж".repeat(1_000),
            "node-9".to_owned(),
            "not a meshd join token",
        ),
        (
            "a long multi-byte node name",
            real.clone(),
            "ж".repeat(20_000),
            "node_name",
        ),
    ];
    let mut failures = Vec::new();
    for (what, token, node_name, want) in &cases {
        let got = host.join(join_request(&td, token.clone(), node_name)).await;
        match got {
            Err(s) if s.code() == Code::InvalidArgument && s.message().contains(want) => {
                if s.message().len() > 1_024 {
                    failures.push(format!(
                        "{what}: status message of {} bytes",
                        s.message().len()
                    ));
                }
            }
            other => failures.push(format!(
                "{what}: want InvalidArgument naming {want:?}, got {other:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Nothing above used the token up: the same connection joins with it.
    let joined = host
        .join(join_request(&td, real.clone(), "node-9"))
        .await
        .expect("the registry still serves joins on the same connection")
        .into_inner();
    assert_eq!(joined.allowed_services, ["shop/web"]);
    // The token decodes as meshd would read it, so the case above was the real thing.
    assert!(JoinToken::decode(&real).is_ok());
    let scraped = metrics(admin_addr).await;
    let bad_token = (scraped.lines())
        .find(|l| l.contains(r#"rpc="join""#) && l.contains(r#"outcome="bad_token""#))
        .unwrap_or_default();
    assert!(
        bad_token.ends_with(&format!(" {}", cases.len() - 1)),
        "every hostile token counted as bad_token:\n{scraped}"
    );

    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .expect("registry stops")
        .unwrap();
}
