//! Regenerates the committed protobuf code from `proto/mesh.proto` (with protox, so no system
//! `protoc` is needed) and fails if the committed copy is stale. Run it once to update.

#[test]
fn generated_code_is_fresh() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/mesh.proto")], [root.join("proto")])
        .expect("proto/mesh.proto must compile");
    let out = tempfile_dir();
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)
        .expect("code generation must succeed");
    let fresh = std::fs::read_to_string(out.join("mesh.v1.rs")).expect("generated file");
    let committed_path = root.join("src/gen/mesh.v1.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if fresh != committed {
        std::fs::write(&committed_path, &fresh).expect("write generated code");
        panic!("src/gen/mesh.v1.rs was stale and has been regenerated; commit it");
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-api-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
