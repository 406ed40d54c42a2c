//! mesh-runtime: process plumbing shared by meshd and the registry — TLS configuration with
//! SPIFFE identities, telemetry setup, the lifecycle (phases, readiness, drain), signals and
//! retry backoff.

pub mod backoff;
pub mod drain;
pub mod lifecycle;
pub mod sd_notify;
pub mod signal;
pub mod telemetry;
pub mod tls;
