//! `meshctl gossip-key`: the gossip keyring held by the registry — list it, install, use or
//! remove one key, or rotate (install a new key, wait for every connected node to hold it,
//! make it the primary, wait, remove the old one, wait), so there is no moment where two
//! nodes cannot open each other's datagrams.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use anyhow::{Context as _, bail};
use mesh_api::proto::v1 as pb;
use pb::change_gossip_keys_request::Action;

use mesh_client::registry as control;

/// How often `rotate` asks the registry whether the nodes caught up.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Connected nodes that do not hold `revision` yet. Nodes not connected now are not waited
/// for: they receive the current keyring first thing when they reconnect. Pure.
pub fn lagging(status: &pb::GossipKeyStatus, revision: u64) -> Vec<String> {
    (status.nodes.iter())
        .filter(|n| n.connected && n.revision < revision)
        .map(|n| format!("{} (at revision {})", n.node, n.revision))
        .collect()
}

/// The status as a table.
pub fn render(status: &pb::GossipKeyStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "keyring revision {}", status.revision);
    for (i, id) in status.key_ids.iter().enumerate() {
        let role = if i == 0 { "primary (seals)" } else { "opens" };
        let _ = writeln!(out, "  {id}  {role}");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let _ = writeln!(
        out,
        "\n{:<24} {:<10} {:<10} REPORTED",
        "NODE", "REVISION", "CONNECTED"
    );
    for n in &status.nodes {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<10} {}s ago{}",
            n.node,
            n.revision,
            if n.connected { "yes" } else { "no" },
            (now - n.reported_unix).max(0),
            if n.revision < status.revision && n.connected {
                "  (behind)"
            } else {
                ""
            }
        );
    }
    out
}

/// One change.
pub async fn change(
    client: &control::Client,
    action: Action,
    key: &str,
) -> anyhow::Result<pb::GossipKeyStatus> {
    Ok(client
        .change_gossip_keys(pb::ChangeGossipKeysRequest {
            action: action as i32,
            key: key.to_owned(),
        })
        .await?)
}

/// Waits until every connected node holds `revision`.
async fn wait_for(
    client: &control::Client,
    revision: u64,
    timeout: Duration,
    step: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let status = client.get_gossip_keys().await?;
        let behind = lagging(&status, revision);
        if behind.is_empty() {
            eprintln!(
                "{step}: every connected node holds revision {revision} ({:.1}s)",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "{step}: after {timeout:?} these nodes still do not hold revision {revision}: {}. \
                 The keyring is safe as it is (every node still opens what the others seal); \
                 fix them and run the next step by hand (`meshctl gossip-key list` shows where it stands)",
                behind.join(", ")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The whole rotation; returns the final status.
pub async fn rotate(
    client: &control::Client,
    timeout: Duration,
) -> anyhow::Result<pb::GossipKeyStatus> {
    let before = client.get_gossip_keys().await?;
    let old = before
        .key_ids
        .first()
        .cloned()
        .context("the registry holds no gossip key")?;
    if before.key_ids.len() > 1 {
        bail!(
            "the keyring already holds {} keys ({}): a rotation is under way; finish it with \
             `meshctl gossip-key use|remove` first",
            before.key_ids.len(),
            before.key_ids.join(", ")
        );
    }
    let installed = change(client, Action::Install, "").await?;
    let new = (installed.key_ids.iter())
        .find(|id| !before.key_ids.contains(id))
        .cloned()
        .context("the registry did not add a key")?;
    eprintln!("installed key {new} (opens only)");
    wait_for(client, installed.revision, timeout, "install").await?;
    let used = change(client, Action::Use, &new).await?;
    eprintln!("key {new} is now the primary");
    wait_for(client, used.revision, timeout, "use").await?;
    let removed = change(client, Action::Remove, &old).await?;
    eprintln!("removed key {old}");
    wait_for(client, removed.revision, timeout, "remove").await?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connected_nodes_behind_are_waited_for() {
        let node = |name: &str, revision, connected| pb::NodeGossipKeys {
            node: name.into(),
            revision,
            reported_unix: 0,
            connected,
        };
        let status = pb::GossipKeyStatus {
            revision: 5,
            key_ids: vec![],
            nodes: vec![
                node("a", 5, true),
                node("b", 4, true),
                node("c", 3, false),
                node("d", 6, true),
            ],
        };
        assert_eq!(lagging(&status, 5), ["b (at revision 4)"]);
        assert!(lagging(&status, 4).is_empty());
        assert_eq!(lagging(&status, 6).len(), 2);
    }
}
