//! The etcd backend's wire layer: the part of etcd's v3 gRPC API the registry speaks
//! (`proto/etcd.proto`, client code generated with protox and committed;
//! `tests/etcd_proto.rs` keeps it fresh, `tests/etcd_wire.rs` proves it against a real etcd).

#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod pb {
    include!("etcd/gen/etcdserverpb.rs");
}
