//! mesh-client: what talks to the mesh's control plane from outside the daemon's data path —
//! the registry's gRPC client ([`registry`]), an operator's or a tool's credentials and the
//! trust bundle they follow ([`credentials`]), and reads of a node's admin endpoint
//! ([`admin`]). Shared by meshd, meshctl and whatever comes next (a gateway, an adapter, a
//! console) without linking the daemon.

use std::time::Duration;

pub mod admin;
pub mod credentials;
pub mod registry;

/// Time allowed for one registry or admin call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
