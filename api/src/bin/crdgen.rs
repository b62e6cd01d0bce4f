//! Writes the CRDs of `lakecache-api` to `crds/` and to the Helm chart's `crds/`:
//! `cargo run -p lakecache-api --bin crdgen`. With a directory argument, writes only there.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..");
    let dirs = match std::env::args().nth(1) {
        Some(d) => vec![PathBuf::from(d)],
        None => vec![root.join("crds"), root.join("charts/lakecache/crds")],
    };
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for (file, crd) in lakecache_api::crds() {
            let path = dir.join(file);
            std::fs::write(&path, lakecache_api::crd_yaml(&crd))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
