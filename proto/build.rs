//! Compiles the checked-in `.proto` files with `protox` (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a cached build script built from another checkout
    // (a shared CARGO_TARGET_DIR) must still look in this one.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files = [
        "lakecache/v1/cache.proto",
        "lakecache/v1/mounter.proto",
        "csi/v1/csi.proto",
        "pluginregistration/v1/api.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".lakecache.v1.Chunk.data")
        .compile_fds(fds)?;
    Ok(())
}
