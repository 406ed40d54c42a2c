//! Regenerates the committed etcd client code from `proto/etcd.proto` (with protox, so no
//! system `protoc` is needed) and fails if the committed copy is stale. Run it once to update.

#[test]
fn generated_etcd_client_is_fresh() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/etcd.proto")], [root.join("proto")])
        .expect("proto/etcd.proto must compile");
    let out = std::env::temp_dir().join(format!("mesh-registry-etcd-gen-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("temp dir");
    tonic_prost_build::configure()
        .build_server(false)
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)
        .expect("code generation must succeed");
    let fresh = std::fs::read_to_string(out.join("etcdserverpb.rs")).expect("generated file");
    let committed_path = root.join("src/kv/etcd/gen/etcdserverpb.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if fresh != committed {
        std::fs::create_dir_all(committed_path.parent().expect("a parent")).expect("gen dir");
        std::fs::write(&committed_path, &fresh).expect("write generated code");
        panic!("src/kv/etcd/gen/etcdserverpb.rs was stale and has been regenerated; commit it");
    }
}
