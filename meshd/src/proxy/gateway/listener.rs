//! One listener of one gateway: what the listener set keys a gateway's accept loop by.

use mesh_api::ServiceKey;
use mesh_api::policy::Listener;

/// One listener of one gateway, as the listener set keys it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayListener {
    /// The Gateway's `namespace/name`: also its workload identity.
    pub gateway: ServiceKey,
    /// The listener as the resource declares it.
    pub listener: Listener,
}
