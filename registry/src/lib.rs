//! mesh-registry: the control plane — join tokens, node inventory, workload certificate
//! signing, policy and the gossip keyring over a tonic gRPC API on mTLS, with state in sled
//! behind the `store::Store` trait.

pub mod admin;
pub mod api;
pub mod app;
pub mod config;
pub mod init;
pub mod keyring;
pub mod server;
pub mod store;
