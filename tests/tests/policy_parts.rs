//! A policy snapshot larger than one gRPC message is streamed in parts, never refused: with the
//! registry's responses capped at 64 KiB, nodes starting after 400 policies (~200 KiB) were
//! applied still become ready at that revision and enforce the last policy of the set.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{Cluster, NodeSpec, Registry, RegistryOpts, ServiceSpec, WAIT, eventually};

const WEB: &str = "spiffe://mesh.test/ns/default/svc/web";

/// `count` AuthorizationPolicies in namespace `bulk` (none selects a running service), then
/// `last` verbatim.
fn bulk(tag: &str, count: usize, last: &str) -> String {
    let mut text = String::new();
    for i in 0..count {
        text.push_str(&format!(
            "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"{tag}-{i:04}\"\nnamespace = \"bulk\"\n\
             action = \"allow\"\nselector = {{ service = \"svc-{i:04}\", labels = {{ pad = \"{}\" }} }}\n\
             rules = [{{ from = [{{ principals = [\"{WEB}\"] }}], to = [{{ paths = [\"/v1/{tag}/{i}/*\"] }}] }}]\n\n",
            "p".repeat(200)
        ));
    }
    text.push_str(last);
    text
}

fn apply(reg: &Registry, name: &str, text: &str) -> u64 {
    let path = reg.dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = reg
        .meshctl_ok(&["apply", "-f", path.to_str().unwrap()])
        .unwrap();
    let at = out.find("(revision ").unwrap_or_else(|| panic!("{out}"));
    out[at + 10..].split(')').next().unwrap().parse().unwrap()
}

async fn works(addr: SocketAddr) -> bool {
    let data = apps::payload(256, 1);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), apps::round_trip(addr, &data)).await,
        Ok(Ok(got)) if got == data
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_larger_than_a_message_arrive_in_parts() {
    let opts = RegistryOpts {
        extra: vec!["max_response_message_size = 65536".to_owned()],
        ..RegistryOpts::default()
    };
    let mut cluster = Cluster::new(opts).await.unwrap();
    let deny = format!(
        "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"zz-deny-web\"\naction = \"deny\"\n\
         selector = {{ service = \"api\" }}\nrules = [{{ from = [{{ principals = [\"{WEB}\"] }}] }}]\n"
    );
    // Applied 50 at a time: an apply's own answer (every change, with its diff) must fit.
    let mut total = 0;
    let mut rev = 0;
    for chunk in 0..8 {
        let text = bulk(
            &format!("first{chunk}"),
            50,
            if chunk == 7 { &deny } else { "" },
        );
        total += text.len();
        rev = apply(&cluster.registry, &format!("bulk{chunk}.toml"), &text);
    }
    assert!(total > 150 * 1024, "{total} bytes");

    let b_ip = mesh_e2e::next_ip();
    let api = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let mut spec_b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    spec_b.ip = b_ip.into();
    spec_b.services = vec![ServiceSpec::new("api", api.addr)];
    // Ready only once a policy snapshot is in place: the whole one, in parts.
    cluster.add_spec(spec_b).await.unwrap();
    let a_ip = mesh_e2e::next_ip();
    let up = SocketAddr::new(a_ip.into(), 19501);
    let mut spec_a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    spec_a.ip = a_ip.into();
    spec_a.seeds = vec![cluster.node("b").spec.gossip_addr()];
    spec_a.services =
        vec![ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080)).upstream("api", up)];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    cluster.node("b").wait_policy_revision(rev).await.unwrap();
    // The last policy of the snapshot is enforced: web is denied.
    for _ in 0..3 {
        assert!(
            !works(up).await,
            "web reached api past the snapshot's last policy"
        );
    }

    // Later changes arrive as usual.
    let out = cluster
        .registry
        .meshctl_ok(&["delete", "ap", "zz-deny-web"])
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    cluster
        .node("b")
        .wait_policy_revision(rev + 1)
        .await
        .unwrap();
    eventually(WAIT, "web allowed again", || async {
        works(up).await.then_some(())
    })
    .await
    .unwrap();
    let dump = cluster.node("b").config_dump().await.unwrap();
    // 400 policies in place, and nothing unreadable: the parts added up to the whole.
    assert_eq!(dump["policy"]["resources"], 400, "{}", dump["policy"]);
    assert_eq!(dump["policy"]["unreadable"], serde_json::json!([]));
}
