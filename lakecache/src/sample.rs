//! A generated sample lake, shaped like the two classic training layouts: an ImageNet-like tree
//! of ~110 KiB files in class folders, and TFRecord-like shards of ~128 MiB. Content is
//! deterministic pseudo-random bytes (incompressible, like JPEGs), so runs are repeatable.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use lakecache_lake::sample::fill;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleSpec {
    pub images: u64,
    pub classes: u64,
    pub image_size: u64,
    pub shards: u64,
    pub shard_size: u64,
}

/// The files of the sample lake: (relative path, size, seed).
pub fn files(spec: &SampleSpec) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for i in 0..spec.images {
        let class = i % spec.classes.max(1);
        // Sizes vary ±25% around the mean, as real JPEGs do.
        let jitter = (i.wrapping_mul(2_654_435_761) % 51) as i64 - 25;
        let size = (spec.image_size as i64 * (100 + jitter) / 100).max(1) as u64;
        out.push((
            format!("images/train/n{class:08}/img_{i:07}.jpg"),
            size,
            1000 + i,
        ));
    }
    for s in 0..spec.shards {
        out.push((
            format!("shards/train-{s:05}-of-{:05}.tfrecord", spec.shards),
            spec.shard_size,
            1_000_000 + s,
        ));
    }
    out
}

/// Writes the sample lake under `root` unless the same one is there already.
pub fn generate(root: &Path, spec: &SampleSpec) -> anyhow::Result<PathBuf> {
    let marker = root.with_extension("generated");
    let want = format!("{spec:?}");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(root.to_path_buf());
    }
    let _ = std::fs::remove_dir_all(root);
    let mut buf = Vec::new();
    for (path, size, seed) in files(spec) {
        let p = root.join(&path);
        std::fs::create_dir_all(p.parent().unwrap_or(root))?;
        let mut f =
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        let mut left = size;
        let mut stream = seed;
        while left > 0 {
            let n = left.min(8 << 20) as usize;
            buf.resize(n, 0);
            fill(stream, &mut buf);
            stream = stream.wrapping_add(0x1_0000_0000);
            f.write_all(&buf)?;
            left -= n as u64;
        }
    }
    std::fs::write(&marker, want)?;
    Ok(root.to_path_buf())
}
