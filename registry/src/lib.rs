//! mesh-registry: the control plane — join tokens, node inventory, workload certificate
//! signing, policy, the gossip keyring and observability (node reports, topology, SLO
//! alerting) over a tonic gRPC API on mTLS, with state in sled behind the `store::Store` trait.

pub mod admin;
pub mod alerts;
pub mod api;
pub mod app;
pub mod ca;
pub mod config;
pub mod init;
pub mod keyring;
pub mod kv;
pub mod server;
pub mod slo;
pub mod store;
pub mod traffic;
pub mod upkeep;
