//! ExternalServices on real processes: an app reaches HTTPS servers outside the mesh (their own
//! CA, one requiring a client certificate) through its upstream ports and its `http_proxy`
//! listener with TLS originated by its meshd — a server whose certificate does not name the
//! expected host is refused — and a TLS-originated TCP service; `registry_only` refuses a host
//! the mesh does not know while `allow_any` passes it through; and an ExternalService behind an
//! egress gateway is reached only through the gateway's host, which authorizes each caller by
//! identity.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use mesh_e2e::curl::{curl, curl_any, field, mesh_error, status};
use mesh_e2e::http_app::HttpApp;
use mesh_e2e::tls::{HttpsServer, TestCa, tls_echo};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, next_ip};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Sends `data` over TCP to `addr` and reads as many bytes back.
async fn echo_round_trip(addr: SocketAddr, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut back)).await??;
    Ok(back)
}

/// An ExternalService resource; `tls` is the body of its `[resource.tls]` (none when empty).
fn external(name: &str, host: &str, protocol: &str, addr: SocketAddr, tls: &str) -> String {
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!("[resource.tls]\n{tls}\n")
    };
    format!(
        r#"
[[resource]]
kind = "ExternalService"
name = "{name}"
hosts = ["{host}"]
port = {port}
protocol = "{protocol}"
endpoints = [{{ address = "{addr}" }}]
{tls}"#,
        port = addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_reach_external_services_over_tls_the_mesh_originates() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = write(files.path(), "ca.pem", &ca.pem());
    // "The internet": three servers of one provider, under its own CA.
    let out_ip = next_ip();
    let (cert, key) = ca.leaf(&["api.pay.example"], "api");
    let api = HttpsServer::start(SocketAddr::new(out_ip.into(), 0), &cert, &key, None)
        .await
        .unwrap();
    let (vcert, vkey) = ca.leaf(&["vault.pay.example"], "vault");
    let vault = HttpsServer::start(
        SocketAddr::new(out_ip.into(), 0),
        &vcert,
        &vkey,
        Some(&ca.pem()),
    )
    .await
    .unwrap();
    let (lcert, lkey) = ca.leaf(&["ledger.pay.example"], "ledger");
    let ledger = tls_echo(SocketAddr::new(out_ip.into(), 0), &lcert, &lkey).await;
    // A server the app talks TLS to itself, through CONNECT.
    let (rcert, rkey) = ca.leaf(&["raw.pay.example"], "raw");
    let raw = HttpsServer::start(SocketAddr::new(out_ip.into(), 0), &rcert, &rkey, None)
        .await
        .unwrap();
    let (ccert, ckey) = ca.leaf(&["web.client.example"], "web client");
    let client_cert = write(files.path(), "client.pem", &ccert);
    let client_key = write(files.path(), "client.key", &ckey);
    // A plain HTTP server the mesh knows nothing about.
    let plain = HttpApp::start(SocketAddr::new(out_ip.into(), 0), "plain")
        .await
        .unwrap();

    let a_ip = next_ip();
    let web = HttpApp::start(SocketAddr::new(a_ip.into(), 0), "web")
        .await
        .unwrap();
    let up = |port: u16| SocketAddr::new(a_ip.into(), port);
    let proxy = up(19100);
    let mut svc = ServiceSpec::new("web", web.addr)
        .protocol("http")
        .upstream("pay", up(19101))
        .upstream("pay-wrong-name", up(19102))
        .upstream("vault", up(19103))
        .upstream("ledger", up(19104));
    svc.http_proxy = Some(proxy);
    let mut a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    a.ip = a_ip.into();
    a.services = vec![svc];
    cluster.add_spec(a).await.unwrap();
    let a = cluster.nodes.last().unwrap();

    let ca_only = format!("ca_file = \"{ca_file}\"");
    // Not written yet: the operator puts it in place later.
    let late_ca = files.path().join("late-ca.pem").display().to_string();
    let policy = [
        external("pay", "api.pay.example", "http", api.addr, &ca_only),
        // The same server under a name its certificate does not carry.
        external(
            "pay-wrong-name",
            "wrong.pay.example",
            "http",
            api.addr,
            &ca_only,
        ),
        external(
            "vault",
            "vault.pay.example",
            "http",
            vault.addr,
            &format!("{ca_only}\ncert_file = \"{client_cert}\"\nkey_file = \"{client_key}\""),
        ),
        external("ledger", "ledger.pay.example", "tcp", ledger, &ca_only),
        external("raw", "raw.pay.example", "tcp", raw.addr, ""),
        // Its CA file is missing on this host: refused with the reason, and reported.
        external(
            "broken",
            "broken.pay.example",
            "http",
            api.addr,
            &format!("ca_file = \"{late_ca}\"\nserver_name = \"api.pay.example\""),
        ),
    ]
    .concat();
    let rev = cluster.registry.apply("external.toml", &policy).unwrap();
    a.wait_policy_revision(rev).await.unwrap();

    // Upstream port: TLS originated, the service's host name sent.
    let resp = curl(&[&format!("http://{}/orders?id=7", up(19101))]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "host"), "api.pay.example");
    assert_eq!(field(&resp, "path"), "/orders?id=7");
    assert_eq!(
        mesh_error(&resp),
        "",
        "the server cannot speak for the mesh: {resp}"
    );
    assert_eq!(field(&resp, "client_certs"), "0");
    // http_proxy: the app names the external host.
    let resp = curl(&[
        "-x",
        &format!("http://{proxy}"),
        "http://api.pay.example/by-host",
    ]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "path"), "/by-host");
    let served = api.requests();
    assert_eq!(served, 2);

    // A certificate that does not name the expected server is refused, nothing is sent.
    let resp = curl(&[&format!("http://{}/x", up(19102))]);
    assert_eq!(status(&resp), 502, "{resp}");
    assert_eq!(mesh_error(&resp), "outbound/external_handshake", "{resp}");
    assert!(resp.contains("wrong.pay.example"), "{resp}");
    assert_eq!(api.requests(), served);

    // A server that requires a client certificate gets the one from the files.
    let resp = curl(&[&format!("http://{}/secret", up(19103))]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "client_certs"), "1");

    // TCP with TLS originated: the app speaks plaintext, the server TLS.
    let back = echo_round_trip(up(19104), b"ledger entry 42")
        .await
        .unwrap();
    assert_eq!(back, b"ledger entry 42");

    // CONNECT, as an app behind HTTPS_PROXY sends it: a tcp ExternalService without TLS
    // origination is tunnelled (the app's TLS end to end, verified by the app).
    let proxy_url = format!("http://{proxy}");
    let raw_url = format!("https://raw.pay.example:{}/tunnel", raw.addr.port());
    let (ok, out) = curl_any(&["-x", &proxy_url, "--cacert", &ca_file, &raw_url]);
    assert!(ok, "{out}");
    assert_eq!(
        field(&out, "host"),
        format!("raw.pay.example:{}", raw.addr.port())
    );
    assert_eq!(field(&out, "path"), "/tunnel");
    // A service the mesh speaks HTTP (and TLS) to is not tunnelled: the app is told to send
    // plain HTTP.
    let api_url = format!("https://api.pay.example:{}/", api.addr.port());
    let (ok, out) = curl_any(&["-x", &proxy_url, "--cacert", &ca_file, &api_url]);
    assert!(
        !ok && out.contains("CONNECT tunnel failed, response 400"),
        "{out}"
    );
    // A host outside the registry under allow_any: tunnelled as it is.
    let (ok, out) = curl_any(&["-k", "-x", &proxy_url, &format!("https://{}/any", raw.addr)]);
    assert!(ok, "{out}");
    assert_eq!(field(&out, "path"), "/any");

    // A service whose TLS files this host cannot read: 503 naming the file, and a warning in
    // `meshctl check`.
    let resp = curl(&[
        "-x",
        &format!("http://{proxy}"),
        "http://broken.pay.example/",
    ]);
    assert_eq!(status(&resp), 503, "{resp}");
    assert_eq!(mesh_error(&resp), "outbound/external_tls_config", "{resp}");
    assert!(resp.contains(&late_ca), "{resp}");
    let registry = &cluster.registry;
    mesh_e2e::eventually(
        mesh_e2e::WAIT,
        "meshctl check reports the TLS files",
        || async {
            let out = registry.meshctl(&["check"]).ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(&format!(
                "a: external_tls: ExternalService default/broken: {late_ca}: cannot read"
            ))
            .then_some(())
        },
    )
    .await
    .unwrap();
    // The file appears: used by the next connection, within a second, with no policy change.
    std::fs::write(&late_ca, ca.pem()).unwrap();
    let broken = || {
        curl(&[
            "-x",
            &format!("http://{proxy}"),
            "http://broken.pay.example/now",
        ])
    };
    mesh_e2e::eventually(mesh_e2e::WAIT, "the CA file is picked up", || async {
        (status(&broken()) == 200).then_some(())
    })
    .await
    .unwrap();

    // allow_any (the default): a host the mesh does not know is passed through as it is.
    let plain_url = format!("http://{}/anything", plain.addr);
    let via_proxy = [
        "-x".to_owned(),
        format!("http://{proxy}"),
        plain_url.clone(),
    ];
    let via_proxy: Vec<&str> = via_proxy.iter().map(String::as_str).collect();
    let resp = curl(&via_proxy);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "app"), "plain");

    // registry_only: the same request is refused and says why; ExternalServices still work.
    let mesh_config = "[[resource]]\nkind = \"MeshConfig\"\nname = \"default\"\noutbound_traffic = \"registry_only\"\n";
    let rev = cluster.registry.apply("mesh.toml", mesh_config).unwrap();
    a.wait_policy_revision(rev).await.unwrap();
    let resp = curl(&via_proxy);
    assert_eq!(status(&resp), 403, "{resp}");
    assert_eq!(mesh_error(&resp), "outbound/registry_only", "{resp}");
    assert!(
        resp.contains("neither a mesh service nor an ExternalService"),
        "{resp}"
    );
    let (ok, out) = curl_any(&["-k", "-x", &proxy_url, &format!("https://{}/any", raw.addr)]);
    assert!(
        !ok && out.contains("CONNECT tunnel failed, response 403"),
        "{out}"
    );
    let (ok, out) = curl_any(&["-x", &proxy_url, "--cacert", &ca_file, &raw_url]);
    assert!(ok, "an ExternalService is still tunnelled: {out}");
    let resp = curl(&[
        "-x",
        &format!("http://{proxy}"),
        "http://api.pay.example/still",
    ]);
    assert_eq!(status(&resp), 200, "{resp}");

    // The requests are the mesh's to see: counted by destination.
    let counted = a
        .metric(
            "meshd_requests_total",
            &[
                ("direction", "outbound"),
                ("destination", "default/pay"),
                ("code", "200"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(counted, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_leaves_only_through_the_egress_gateway() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = write(files.path(), "ca.pem", &ca.pem());
    let (cert, key) = ca.leaf(&["api.pay.example"], "api");
    let api = HttpsServer::start(SocketAddr::new(next_ip().into(), 0), &cert, &key, None)
        .await
        .unwrap();
    let (lcert, lkey) = ca.leaf(&["ledger.pay.example"], "ledger");
    let ledger = tls_echo(SocketAddr::new(next_ip().into(), 0), &lcert, &lkey).await;
    let (rcert, rkey) = ca.leaf(&["raw.pay.example"], "raw");
    let raw = HttpsServer::start(SocketAddr::new(next_ip().into(), 0), &rcert, &rkey, None)
        .await
        .unwrap();

    // The egress gateway's host.
    let mut gw = NodeSpec::new("gw", cluster.registry.token(&["egress"], 1).unwrap());
    gw.extra = "[gateway]\nnames = [\"default/egress\"]\n".to_owned();
    cluster.add_spec(gw).await.unwrap();
    // Two callers: web (allowed) and batch (not).
    let mut up = Vec::new();
    for name in ["web", "batch"] {
        let ip = next_ip();
        let app = HttpApp::start(SocketAddr::new(ip.into(), 0), name)
            .await
            .unwrap();
        let (http_up, tcp_up) = (
            SocketAddr::new(ip.into(), 19201),
            SocketAddr::new(ip.into(), 19202),
        );
        let mut n = NodeSpec::new(name, cluster.registry.token(&[name], 1).unwrap());
        n.ip = ip.into();
        let mut svc = ServiceSpec::new(name, app.addr)
            .protocol("http")
            .upstream("pay", http_up)
            .upstream("ledger", tcp_up);
        svc.http_proxy = Some(SocketAddr::new(ip.into(), 19203));
        n.services = vec![svc];
        n.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        cluster.add_spec(n).await.unwrap();
        cluster
            .nodes
            .last()
            .unwrap()
            .wait_endpoints("default/egress", 1)
            .await
            .unwrap();
        up.push((http_up, tcp_up, app));
    }
    let ca_only = format!("ca_file = \"{ca_file}\"");
    let via = "egress_gateway = \"egress\"\n";
    let policy = format!(
        "{}{}{}{via}{}",
        external("pay", "api.pay.example", "http", api.addr, &ca_only)
            .replace("[resource.tls]", &format!("{via}[resource.tls]")),
        external("ledger", "ledger.pay.example", "tcp", ledger, &ca_only)
            .replace("[resource.tls]", &format!("{via}[resource.tls]")),
        external("raw", "raw.pay.example", "tcp", raw.addr, ""),
        r#"
[[resource]]
kind = "AuthorizationPolicy"
name = "pay-from-web"
selector = { service = "pay" }
rules = [{ from = [{ principals = ["spiffe://mesh.test/ns/default/svc/web"] }] }]

[[resource]]
kind = "AuthorizationPolicy"
name = "raw-from-web"
selector = { service = "raw" }
rules = [{ from = [{ principals = ["spiffe://mesh.test/ns/default/svc/web"] }] }]

[[resource]]
kind = "AuthorizationPolicy"
name = "ledger-from-web"
selector = { service = "ledger" }
rules = [{ from = [{ principals = ["spiffe://mesh.test/ns/default/svc/web"] }] }]
"#
    );
    let rev = cluster.registry.apply("egress.toml", &policy).unwrap();
    for n in &cluster.nodes {
        n.wait_policy_revision(rev).await.unwrap();
    }
    let (web_http, web_tcp, _) = &up[0];
    let (batch_http, batch_tcp, _) = &up[1];

    // web's request leaves through the gateway, which originates TLS.
    let resp = curl(&[&format!("http://{web_http}/charge")]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "host"), "api.pay.example");
    assert_eq!(field(&resp, "path"), "/charge");
    assert_eq!(mesh_error(&resp), "", "{resp}");
    let gw_node = &cluster.nodes[0];
    let at_gateway = gw_node
        .metric(
            "meshd_requests_total",
            &[
                ("direction", "inbound"),
                ("source", "default/web"),
                ("destination", "default/pay"),
                ("code", "200"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(at_gateway, 1.0, "the gateway carried it");
    let back = echo_round_trip(*web_tcp, b"debit 7").await.unwrap();
    assert_eq!(back, b"debit 7");

    // CONNECT from web's http_proxy: tunnelled through the gateway, the app's TLS end to end.
    let raw_url = format!("https://raw.pay.example:{}/via-gateway", raw.addr.port());
    let proxy_of = |ip: std::net::IpAddr| format!("http://{}", SocketAddr::new(ip, 19203));
    let web_proxy = proxy_of(web_http.ip());
    let (ok, out) = curl_any(&["-x", &web_proxy, "--cacert", &ca_file, &raw_url]);
    assert!(ok, "{out}");
    assert_eq!(field(&out, "path"), "/via-gateway");
    let raw_served = raw.requests();
    let batch_proxy = proxy_of(batch_http.ip());
    let (ok, out) = curl_any(&["-x", &batch_proxy, "--cacert", &ca_file, &raw_url]);
    assert!(!ok, "batch's tunnel is reset at the gateway: {out}");
    assert_eq!(raw.requests(), raw_served);

    // batch is refused at the gateway, by identity; nothing reaches the server.
    let served = api.requests();
    let resp = curl(&[&format!("http://{batch_http}/charge")]);
    assert_eq!(status(&resp), 403, "{resp}");
    assert!(
        resp.contains(
            "spiffe://mesh.test/ns/default/svc/batch may not call GET /charge on default/pay"
        ),
        "{resp}"
    );
    assert_eq!(api.requests(), served);
    assert!(
        echo_round_trip(*batch_tcp, b"debit 8").await.is_err(),
        "the gateway resets a caller the policy does not allow"
    );

    // Without the gateway there is no way out: the callers' hosts never dial the service.
    cluster.nodes[0].kill9();
    mesh_e2e::eventually(
        mesh_e2e::WAIT,
        "requests fail without the gateway",
        || async {
            let resp = curl(&[&format!("http://{web_http}/charge")]);
            (status(&resp) >= 500).then_some(())
        },
    )
    .await
    .unwrap();
    let resp = curl(&[&format!("http://{web_http}/charge")]);
    assert!(status(&resp) >= 500, "{resp}");
    assert_eq!(api.requests(), served, "no request left any other way");
}
