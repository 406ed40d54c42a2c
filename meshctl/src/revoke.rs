//! `meshctl node remove`, `meshctl cert revoke` and `meshctl credentials`: cutting a host or a
//! person off (the registry writes the deny-list every meshd enforces), and issuing, listing
//! and revoking operator credentials.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use mesh_api::Identity;
use mesh_api::proto::v1 as pb;

use crate as ctl;
use mesh_client::registry as control;

/// What `meshctl cert revoke` names: exactly one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoke {
    /// One certificate serial.
    pub serial: Option<String>,
    /// Every certificate of a node.
    pub node: Option<String>,
    /// Every certificate of a service, `namespace/name`.
    pub service: Option<String>,
    /// Every certificate of an operator identity (`admin/NAME`, `viewer/NAME`).
    pub identity: Option<String>,
}

/// The registry request for `revoke`, or why the arguments do not name one thing. Pure.
pub fn request(r: &Revoke) -> anyhow::Result<pb::RevokeCertificatesRequest> {
    let given = [&r.serial, &r.node, &r.service, &r.identity]
        .iter()
        .filter(|o| o.is_some())
        .count();
    anyhow::ensure!(
        given == 1,
        "name exactly one of SERIAL, --node NAME, --service NS/NAME, --identity admin/NAME"
    );
    Ok(pb::RevokeCertificatesRequest {
        serial: r.serial.clone().unwrap_or_default(),
        node: r.node.clone().unwrap_or_default(),
        service: r.service.clone().unwrap_or_default(),
        identity: r.identity.clone().unwrap_or_default(),
    })
}

/// What to tell the operator after a revocation. Pure.
pub fn summary(what: &str, resp: &pb::RevocationResponse) -> String {
    let mut out = String::new();
    if resp.revoked.is_empty() {
        out.push_str(&format!(
            "{what}: no unexpired certificate left to revoke (deny-list at revision {})\n",
            resp.revision
        ));
    } else {
        out.push_str(&format!(
            "{what}: {} certificate(s) revoked at revision {}; every meshd refuses them within \
             seconds, and open connections carried by them are closed\n",
            resp.revoked.len(),
            resp.revision
        ));
        let rows: Vec<Vec<String>> = resp
            .revoked
            .iter()
            .map(|c| {
                vec![
                    c.serial.clone(),
                    c.identity.clone(),
                    c.node.clone(),
                    ctl::when(c.not_after_unix, ctl::now_unix()),
                ]
            })
            .collect();
        out.push_str(&ctl::columns(
            &["SERIAL", "IDENTITY", "NODE", "EXPIRES"],
            &rows,
        ));
    }
    out
}

/// Removes node `name`; returns what to tell the operator.
pub async fn remove_node(client: &control::Client, name: &str) -> anyhow::Result<String> {
    let resp = client.remove_node(name).await?;
    let mut out = if resp.node_removed {
        format!("node {name} removed: its record is deleted, gossip drops it and refuses it back\n")
    } else {
        format!(
            "node {name} was not registered; its name is on the deny-list (gossip refuses it)\n"
        )
    };
    out.push_str(&summary(&format!("node {name}"), &resp));
    out.push_str(&format!(
        "to let a reinstalled host join as {name} again: meshctl token create --replace {name}\n"
    ));
    Ok(out)
}

/// Revokes what `r` names; returns what to tell the operator.
pub async fn revoke(client: &control::Client, r: &Revoke) -> anyhow::Result<String> {
    let req = request(r)?;
    let what = [
        ("serial", &req.serial),
        ("node", &req.node),
        ("service", &req.service),
        ("identity", &req.identity),
    ]
    .into_iter()
    .find(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k} {v}"))
    .unwrap_or_default();
    Ok(summary(&what, &client.revoke_certificates(req).await?))
}

/// The `meshctl credentials list` table. Pure.
pub fn credentials_table(creds: &[pb::Credential], now_unix: i64) -> String {
    let rows: Vec<Vec<String>> = creds
        .iter()
        .map(|c| {
            let state = if c.revoked {
                "revoked"
            } else if c.not_after_unix <= now_unix {
                "expired"
            } else {
                "valid"
            };
            vec![
                c.identity.clone(),
                c.serial.clone(),
                state.to_owned(),
                ctl::when(c.not_after_unix, now_unix),
            ]
        })
        .collect();
    ctl::columns(&["IDENTITY", "SERIAL", "STATE", "EXPIRES"], &rows)
}

/// `meshctl credentials create`: a key made here (it never leaves this host), its certificate
/// from the registry, written to `out` as meshctl reads credentials (`ca.pem`, `admin.pem`,
/// `admin-key.pem` 0600, `meshctl.toml`). `out` must not exist yet.
pub async fn create_credentials(
    client: &control::Client,
    td: &mesh_api::TrustDomain,
    registry: &str,
    role: &str,
    name: &str,
    ttl: Option<Duration>,
    out: &Path,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        !out.exists(),
        "{} already exists; pick a new directory for the credentials",
        out.display()
    );
    let identity = Identity::parse(&format!("spiffe://{td}/{role}/{name}")).with_context(|| {
        format!("{role}/{name} is not an operator identity (admin/NAME or viewer/NAME)")
    })?;
    let (key_pem, csr_pem) = mesh_runtime::tls::new_key_and_csr(&identity)?;
    let resp = client
        .issue_credentials(pb::IssueCredentialsRequest {
            role: role.to_owned(),
            name: name.to_owned(),
            csr_pem,
            ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
        })
        .await?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write(&out.join("ca.pem"), &resp.trust_bundle_pem, 0o644)?;
    write(&out.join("admin.pem"), &resp.cert_chain_pem, 0o644)?;
    write(&out.join("admin-key.pem"), &key_pem, 0o600)?;
    write(
        &out.join("meshctl.toml"),
        &format!("# meshctl credentials ({identity})\nregistry = \"{registry}\"\n"),
        0o644,
    )?;
    Ok(format!(
        "credentials for {identity} (serial {}, expires {}) written to {}\n",
        resp.serial,
        ctl::when(resp.not_after_unix, ctl::now_unix()),
        out.display()
    ))
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_names_exactly_one_thing() {
        assert!(request(&Revoke::default()).is_err());
        let two = Revoke {
            serial: Some("ab".into()),
            node: Some("n".into()),
            ..Revoke::default()
        };
        assert!(request(&two).is_err());
        let one = request(&Revoke {
            service: Some("shop/api".into()),
            ..Revoke::default()
        })
        .unwrap();
        assert_eq!(one.service, "shop/api");
        assert!(one.serial.is_empty() && one.node.is_empty() && one.identity.is_empty());
    }

    #[test]
    fn credentials_show_their_state() {
        let c = |revoked, not_after| pb::Credential {
            serial: "01".into(),
            identity: "spiffe://t/admin/ops".into(),
            not_before_unix: 0,
            not_after_unix: not_after,
            revoked,
        };
        let t = credentials_table(&[c(true, 100), c(false, 10), c(false, 100)], 50);
        let states: Vec<&str> = t
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(2).unwrap())
            .collect();
        assert_eq!(states, ["revoked", "expired", "valid"]);
    }
}
