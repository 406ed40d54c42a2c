//! Join tokens over the registry API: operators create them (uses default to 1, unlimited only
//! when asked; optionally pinned to the node they replace) and revoke them; operators and
//! viewers list them, never seeing a secret or its hash.

use std::time::{Duration, SystemTime};

use mesh_api::NodeName;
use mesh_api::proto::v1 as pb;
use mesh_api::token::JoinToken;
use tonic::Status;
use tracing::info;

use super::{
    RegistryApi, Rejected, normalize_services, quoted, random_hex, reject, sha256_hex, store_error,
    unix,
};
use crate::server::PeerInfo;
use crate::store::{self, TokenRecord};

/// How many joins a token allows when the request leaves `uses` unset (0) and does not ask for
/// `unlimited_uses`.
pub const DEFAULT_TOKEN_USES: u32 = 1;

/// The `max_uses` a create request means (0: unlimited), or why it is contradictory. Pure.
pub fn max_uses(uses: u32, unlimited_uses: bool) -> Result<u32, String> {
    match (uses, unlimited_uses) {
        (0, true) => Ok(0),
        (n, true) => Err(format!(
            "uses = {n} and unlimited_uses contradict each other; set one of them"
        )),
        (0, false) => Ok(DEFAULT_TOKEN_USES),
        (n, false) => Ok(n),
    }
}

/// A stored token as the API shows it: everything but the secret's hash.
pub fn token_info(t: TokenRecord) -> pb::TokenRecord {
    pb::TokenRecord {
        id: t.id,
        services: t.services,
        created_unix: t.created_unix,
        expires_unix: t.expires_unix,
        uses: t.uses,
        max_uses: t.max_uses,
        created_by: t.created_by,
        replace_node: t.replace_node.unwrap_or_default(),
        revoked_unix: t.revoked_unix.unwrap_or_default(),
        revoked_by: t.revoked_by,
    }
}

// === impl RegistryApi ===

impl RegistryApi {
    pub(super) async fn do_create_token(
        &self,
        peer: &PeerInfo,
        req: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, Rejected> {
        let now = SystemTime::now();
        let admin = self.require_admin(peer)?;
        let services = normalize_services(&req.services)
            .map_err(|e| reject("bad_request", Status::invalid_argument(e)))?;
        let max_uses = max_uses(req.uses, req.unlimited_uses)
            .map_err(|e| reject("bad_request", Status::invalid_argument(e)))?;
        let replace_node = match req.replace_node.as_str() {
            "" => None,
            name => Some(
                NodeName::new(name)
                    .map_err(|e| {
                        reject(
                            "bad_request",
                            Status::invalid_argument(format!("replace_node {}: {e}", quoted(name))),
                        )
                    })?
                    .to_string(),
            ),
        };
        let ttl = if req.ttl_seconds == 0 {
            self.inner.config.default_token_ttl
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        if ttl > self.inner.config.max_token_ttl {
            return Err(reject(
                "bad_request",
                Status::invalid_argument(format!(
                    "ttl {} is longer than the registry's max_token_ttl {}",
                    humantime::format_duration(ttl),
                    humantime::format_duration(self.inner.config.max_token_ttl)
                )),
            ));
        }
        let secret = random_hex(32);
        let record = TokenRecord {
            id: random_hex(8),
            secret_sha256: sha256_hex(secret.as_bytes()),
            services: services.clone(),
            created_unix: unix(now),
            expires_unix: unix(now + ttl),
            max_uses,
            uses: 0,
            created_by: admin.to_string(),
            replace_node,
            revoked_unix: None,
            revoked_by: String::new(),
        };
        let token = JoinToken {
            id: record.id.clone(),
            secret,
            ca: self.inner.ca.current().root_fingerprint(),
            td: self.inner.config.trust_domain.to_string(),
            registry: self.inner.config.advertise.clone(),
            services,
            exp: record.expires_unix,
        };
        let r = record.clone();
        self.blocking(move |s| s.put_token(&r)).await?;
        info!(
            token = %record.id,
            services = ?record.services,
            max_uses = record.max_uses,
            replace_node = record.replace_node.as_deref().unwrap_or_default(),
            by = %admin,
            "join token created"
        );
        Ok(pb::CreateTokenResponse {
            token: token.encode(),
            id: record.id,
            expires_unix: record.expires_unix,
        })
    }

    pub(super) async fn do_list_tokens(
        &self,
        peer: &PeerInfo,
    ) -> Result<pb::ListTokensResponse, Rejected> {
        self.require_reader(peer)?;
        let tokens = self.blocking(|s| s.list_tokens()).await?;
        Ok(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(token_info).collect(),
        })
    }

    pub(super) async fn do_revoke_token(
        &self,
        peer: &PeerInfo,
        req: pb::RevokeTokenRequest,
    ) -> Result<pb::RevokeTokenResponse, Rejected> {
        let now = SystemTime::now();
        let admin = self.require_admin(peer)?;
        if req.id.is_empty() {
            return Err(reject(
                "bad_request",
                Status::invalid_argument(
                    "a token id is required (`meshctl token list` shows them)",
                ),
            ));
        }
        let (id, by) = (req.id.clone(), admin.to_string());
        let (token, already_revoked) = self
            .blocking(move |s| Ok(s.revoke_token(&id, unix(now), &by)))
            .await?
            .map_err(|e| match e {
                store::Error::TokenNotFound => reject(
                    "unknown_token",
                    Status::not_found(format!(
                        "join token {} not found (`meshctl token list` shows the ids)",
                        quoted(&req.id)
                    )),
                ),
                other => store_error(other),
            })?;
        if !already_revoked {
            info!(token = %token.id, uses = token.uses, by = %admin, "join token revoked");
        }
        Ok(pb::RevokeTokenResponse {
            token: Some(token_info(token)),
            already_revoked,
        })
    }
}

#[cfg(test)]
mod tests;
