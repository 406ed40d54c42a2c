//! meshd: the per-host daemon — local proxy for every service on the host, gossip membership
//! and discovery, workload identity, admin endpoint, and the dev mesh (`meshd dev`).

/// The registry client (from `mesh-client`), under the name the daemon's modules use.
pub use mesh_client::registry as control;

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod deny;
pub mod dev;
pub mod discovery;
pub mod fsutil;
pub mod gossip_auth;
pub mod gossip_keys;
pub mod gossip_metrics;
pub mod gossip_seal;
pub mod health;
pub mod identity;
pub mod membership;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod trace;
pub mod wan;
