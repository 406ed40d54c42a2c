//! `meshctl token`: join tokens held by the registry — create one (for new hosts, or to
//! replace the record of a reinstalled host with `--replace NAME`), list them (never their
//! secrets) and revoke one so no host can join with it again.

use std::time::Duration;

use mesh_api::proto::v1 as pb;
use mesh_api::token::{self, JoinToken};

use mesh_client::registry as control;

/// What `meshctl token create` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Create {
    /// `name`, `namespace/name` or `namespace/*`.
    pub services: Vec<String>,
    /// Lifetime; the registry's default when `None`.
    pub ttl: Option<Duration>,
    /// How many hosts may join with it; 0 = unlimited until it expires.
    pub uses: u32,
    /// The node whose record the token may replace (and the only name it joins as).
    pub replace: Option<String>,
}

/// The registry request for `create`: `uses` 0 asks for `unlimited_uses` (the API reads an
/// unset `uses` as 1). Pure.
pub fn request(create: &Create) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        services: create.services.clone(),
        ttl_seconds: create.ttl.map_or(0, |d| d.as_secs()),
        uses: create.uses,
        unlimited_uses: create.uses == 0,
        replace_node: create.replace.clone().unwrap_or_default(),
    }
}

/// Creates a join token.
pub async fn create(
    client: &control::Client,
    create: &Create,
) -> anyhow::Result<pb::CreateTokenResponse> {
    Ok(client.create_token(request(create)).await?)
}

/// The id `revoke` sends for what the operator typed: an id as `list` shows it, or a whole
/// token string (only its id leaves this host). Pure.
pub fn id_of(arg: &str) -> anyhow::Result<String> {
    let arg = arg.trim();
    if arg.starts_with(token::PREFIX) {
        return Ok(JoinToken::decode(arg)?.id);
    }
    Ok(arg.to_owned())
}

/// Revokes the token `arg` names (see [`id_of`]); returns what to tell the operator.
pub async fn revoke(client: &control::Client, arg: &str) -> anyhow::Result<String> {
    let resp = client.revoke_token(&id_of(arg)?).await?;
    let t = resp.token.unwrap_or_default();
    Ok(if resp.already_revoked {
        format!(
            "token {} was already revoked ({} by {})\n",
            t.id,
            when(t.revoked_unix, ctl::now_unix()),
            t.revoked_by
        )
    } else {
        format!(
            "token {} revoked: no host can join with it; nodes that joined with it ({} so far) \
             are not affected\n",
            t.id, t.uses
        )
    })
}

/// Whether a token can still be used at `now_unix`: `revoked`, `expired`, `used up` or
/// `usable`. Pure.
pub fn state(t: &pb::TokenRecord, now_unix: i64) -> &'static str {
    if t.revoked_unix != 0 {
        "revoked"
    } else if now_unix >= t.expires_unix {
        "expired"
    } else if t.max_uses != 0 && t.uses >= t.max_uses {
        "used up"
    } else {
        "usable"
    }
}

/// `ID SERVICES CREATED EXPIRES USES REPLACES CREATED BY STATE`, times relative to `now_unix`.
/// Pure.
pub fn table(tokens: &[pb::TokenRecord], now_unix: i64) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let max = match t.max_uses {
                0 => "unlimited".to_owned(),
                n => n.to_string(),
            };
            vec![
                t.id.clone(),
                t.services.join(","),
                when(t.created_unix, now_unix),
                when(t.expires_unix, now_unix),
                format!("{}/{max}", t.uses),
                dash(&t.replace_node),
                t.created_by.clone(),
                state(t, now_unix).to_owned(),
            ]
        })
        .collect();
    ctl::columns(
        &[
            "ID",
            "SERVICES",
            "CREATED",
            "EXPIRES",
            "USES",
            "REPLACES",
            "CREATED BY",
            "STATE",
        ],
        &rows,
    )
}

use crate as ctl;
use crate::when;

fn dash(s: &str) -> String {
    if s.is_empty() { "-" } else { s }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn token(id: &str, uses: u32, max_uses: u32) -> pb::TokenRecord {
        pb::TokenRecord {
            id: id.to_owned(),
            services: vec!["default/web".to_owned(), "shop/*".to_owned()],
            created_unix: NOW - 3 * 3600,
            expires_unix: NOW + 21 * 3600,
            uses,
            max_uses,
            created_by: "spiffe://mesh.test/admin/operator".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn uses_zero_asks_for_unlimited() {
        let create = Create {
            services: vec!["web".to_owned()],
            ttl: Some(Duration::from_secs(90)),
            uses: 0,
            replace: Some("node-1".to_owned()),
        };
        let req = request(&create);
        assert_eq!(
            (req.uses, req.unlimited_uses, req.ttl_seconds),
            (0, true, 90)
        );
        assert_eq!(req.replace_node, "node-1");
        let req = request(&Create {
            uses: 2,
            replace: None,
            ttl: None,
            ..create
        });
        assert_eq!(
            (req.uses, req.unlimited_uses, req.ttl_seconds),
            (2, false, 0)
        );
        assert_eq!(req.replace_node, "");
    }

    #[test]
    fn token_states() {
        let cases = [
            (token("a", 0, 1), "usable"),
            (token("a", 1, 1), "used up"),
            (token("a", 40, 0), "usable"),
            (
                pb::TokenRecord {
                    expires_unix: NOW,
                    ..token("a", 0, 1)
                },
                "expired",
            ),
            (
                pb::TokenRecord {
                    revoked_unix: NOW - 1,
                    expires_unix: NOW - 1,
                    ..token("a", 1, 1)
                },
                "revoked",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(state(&t, NOW), want, "{t:?}");
        }
    }

    #[test]
    fn the_table_shows_uses_replacement_and_state() {
        let tokens = [
            token("00000000000000aa", 1, 0),
            pb::TokenRecord {
                replace_node: "node-1".to_owned(),
                revoked_unix: NOW - 60,
                revoked_by: "spiffe://mesh.test/admin/operator".to_owned(),
                ..token("00000000000000bb", 0, 1)
            },
        ];
        let out = table(&tokens, NOW);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let cells = |l: &str| -> Vec<String> {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            cells(lines[0]),
            [
                "ID",
                "SERVICES",
                "CREATED",
                "EXPIRES",
                "USES",
                "REPLACES",
                "CREATED BY",
                "STATE"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "00000000000000aa",
                "default/web,shop/*",
                "3h ago",
                "in 21h",
                "1/unlimited",
                "-",
                "spiffe://mesh.test/admin/operator",
                "usable"
            ]
        );
        assert_eq!(cells(lines[2])[4..6], ["0/1", "node-1"]);
        assert_eq!(cells(lines[2])[7], "revoked");
        assert!(!out.contains("secret"));
    }

    #[test]
    fn revoke_takes_an_id_or_a_whole_token() {
        assert_eq!(id_of(" 00000000000000aa\n").unwrap(), "00000000000000aa");
        let t = JoinToken {
            id: "00000000000000bb".to_owned(),
            secret: "s3cret".to_owned(),
            ca: format!("sha256:{}", "0".repeat(64)),
            td: "mesh.test".to_owned(),
            registry: Vec::new(),
            services: vec!["default/web".to_owned()],
            exp: NOW,
        };
        assert_eq!(id_of(&t.encode()).unwrap(), "00000000000000bb");
        assert!(id_of(&format!("{}garbage", token::PREFIX)).is_err());
    }
}
