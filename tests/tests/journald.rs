//! meshd under systemd's journal writes native journal entries with its structured fields, so
//! `journalctl -u meshd MESHD_SRC_IDENTITY=... MESHD_DECISION=deny` finds requests by caller and
//! decision. No journald runs here: the test binds its own socket where journald's would be
//! (`/run/systemd/journal/socket`, in a private mount namespace of meshd's) and decodes the
//! native protocol that journald itself would receive.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, next_ip};

/// Decodes one datagram of the journal's native protocol: `KEY=value\n`, or for values with
/// newlines `KEY\n<u64 LE length><value>\n`.
fn decode(mut buf: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !buf.is_empty() {
        let nl = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
        let line = &buf[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            buf = &buf[(nl + 1).min(buf.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &buf[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            buf = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    fields
}

/// Every entry received so far, read continuously by a thread: journald drains its socket at
/// once, and a socket left full would make meshd drop (access) or wait (log) on its writes.
#[derive(Clone, Default)]
struct Journal(std::sync::Arc<std::sync::Mutex<Vec<BTreeMap<String, String>>>>);

impl Journal {
    fn listen(sock: UnixDatagram) -> Journal {
        let j = Journal::default();
        let entries = j.0.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => entries.lock().unwrap().push(decode(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
        j
    }

    /// The first entry matching `want`, waiting up to 20 s for it.
    async fn until(
        &self,
        what: &str,
        want: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(e) = self.0.lock().unwrap().iter().find(|e| want(e)) {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let messages: Vec<String> = (self.0.lock().unwrap().iter())
            .filter_map(|e| e.get("MESSAGE").cloned())
            .collect();
        panic!("no journal entry {what}; got: {messages:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_carry_structured_fields() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let dir = cluster.registry.dir.join("journal");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = UnixDatagram::bind(dir.join("socket")).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let journal = Journal::listen(sock);

    // api's node logs to the "journal"; web's node calls it.
    let ip = next_ip();
    let app = HttpApp::start(SocketAddr::new(ip.into(), 0), "api")
        .await
        .unwrap();
    let mut api = NodeSpec::new("api-node", cluster.registry.token(&["api"], 1).unwrap());
    api.ip = ip.into();
    api.services = vec![ServiceSpec::new("api", app.addr).protocol("http")];
    api.journal = Some(dir.clone());
    cluster.add_spec(api).await.unwrap();
    let ip = next_ip();
    let upstream = SocketAddr::new(ip.into(), 19201);
    cluster
        .add(
            "web-node",
            vec![
                ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080))
                    .protocol("http")
                    .upstream("api", upstream),
            ],
        )
        .await
        .unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("web-node")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    let reply = Client::new().get(upstream, "/hello", &[]).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");

    let ready = journal
        .until("saying meshd is ready", |e| {
            e.get("MESSAGE").is_some_and(|m| m == "meshd ready")
        })
        .await;
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "meshd");
    assert_eq!(ready["PRIORITY"], "6", "info");
    assert_eq!(ready["MESHD_NODE"], "api-node");
    assert!(ready.contains_key("CODE_FILE"), "{ready:?}");

    // The access log of the request, found by caller identity and decision.
    let access = journal
        .until("for the request", |e| {
            e.get("MESHD_HTTP_PATH").is_some_and(|p| p == "/hello")
        })
        .await;
    assert_eq!(
        access["MESHD_SRC_IDENTITY"],
        "spiffe://mesh.test/ns/default/svc/web"
    );
    assert_eq!(access["MESHD_DST_SERVICE"], "default/api");
    assert_eq!(access["MESHD_DECISION"], "allow");
    assert_eq!(access["MESHD_HTTP_STATUS"], "200");
    assert_eq!(access["MESHD_DIRECTION"], "inbound");

    // A rejected connection: plaintext on the mTLS port, with the reason as a field.
    let inbound = cluster.nodes[0].inbound;
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let rejected = journal
        .until("for the plaintext connection", |e| {
            e.get("MESSAGE")
                .is_some_and(|m| m == "inbound connection rejected")
        })
        .await;
    assert_eq!(rejected["PRIORITY"], "4", "warning");
    assert!(rejected.contains_key("MESHD_REASON"), "{rejected:?}");
    assert!(
        rejected["MESHD_SRC_ADDR"].starts_with("127."),
        "{rejected:?}"
    );
}
