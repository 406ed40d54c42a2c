//! The TrustBundle resource: the CA's trust bundle, published on the policy watch whenever it
//! changes, so every node trusts a new root before anything is signed under it.

use std::time::SystemTime;

use mesh_api::policy::{Kind, ROOT_NAMESPACE, Resource, Spec, TRUST_BUNDLE_NAME, TrustBundle};
use tracing::info;

use super::{RegistryApi, Rejected, unix};
use crate::store::PolicyChange;

impl RegistryApi {
    /// Writes the CA's current trust bundle as the TrustBundle resource if the stored one
    /// differs. A mesh that never rotated its root has none (nodes trust the root they joined
    /// with): the resource appears with the first bundle of two roots. Returns the new
    /// revision, or `None` when nothing changed.
    pub async fn publish_trust_bundle(&self) -> Result<Option<u64>, String> {
        let bundle = TrustBundle::from_pem(&self.inner.ca.current().trust_bundle_pem());
        if bundle.roots.len() == 1 {
            let (_, records) = self
                .blocking(|s| s.list_policies())
                .await
                .map_err(|r: Rejected| r.status.message().to_owned())?;
            if !records.iter().any(|r| r.kind == Kind::TrustBundle.as_str()) {
                return Ok(None);
            }
        }
        let spec_json = Resource {
            key: TrustBundle::key(),
            spec: Spec::TrustBundle(bundle.clone()),
        }
        .spec_json();
        let change = PolicyChange {
            kind: Kind::TrustBundle.as_str().to_owned(),
            namespace: ROOT_NAMESPACE.to_owned(),
            name: TRUST_BUNDLE_NAME.to_owned(),
            spec_json: Some(spec_json),
        };
        let api = self.clone();
        let now = unix(SystemTime::now());
        let (revision, outcomes) = self
            .blocking(move |store| {
                api.inner.policy.commit(
                    store,
                    &[change],
                    "registry",
                    now,
                    false,
                    &api.inner.metrics,
                )
            })
            .await
            .map_err(|r: Rejected| r.status.message().to_owned())?;
        let changed = outcomes
            .first()
            .is_some_and(|(a, _)| *a != crate::store::ChangeAction::Unchanged);
        if changed {
            info!(
                revision,
                roots = bundle.roots.len(),
                "trust bundle published"
            );
        }
        Ok(changed.then_some(revision))
    }
}
