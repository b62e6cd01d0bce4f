//! The benchmark's dataset, generated straight into the store's directory: TFRecord-like shards
//! under `shards/` and an ImageNet-like tree of ~110 KiB files in class folders under
//! `images/train/`. The bytes are deterministic pseudo-random (incompressible, like JPEGs and
//! TFRecords), the same generator `lakecache demo` uses, so every reader can check the first
//! bytes of every file it reads.
//!
//! Files put into a versitygw posix directory behind its back have no ETag; each gets one as
//! the `user.etag` extended attribute the gateway reads, made from the file's seed and size in
//! the multipart form (`<hex>-1`), which no client mistakes for an MD5 of the content.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use lakecache_lake::sample::fill;

/// The generated dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DatasetSpec {
    pub shards: u64,
    pub shard_size: u64,
    pub images: u64,
    pub classes: u64,
    /// Mean image size; each image is within ±25% of it.
    pub image_size: u64,
}

/// One file of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Path inside the bucket.
    pub path: String,
    pub size: u64,
    pub seed: u64,
}

/// Bytes of each file checked by readers (its start).
pub const CHECKED: usize = 64;

/// The bytes a file starts with (at most [`CHECKED`]).
pub fn expected_start(f: &FileSpec) -> Vec<u8> {
    let mut b = vec![0u8; (f.size as usize).min(CHECKED)];
    fill(f.seed, &mut b);
    b
}

pub fn shards(spec: &DatasetSpec) -> Vec<FileSpec> {
    (0..spec.shards)
        .map(|s| FileSpec {
            path: format!("shards/train-{s:05}-of-{:05}.tfrecord", spec.shards),
            size: spec.shard_size,
            seed: 1_000_000 + s,
        })
        .collect()
}

pub fn images(spec: &DatasetSpec) -> Vec<FileSpec> {
    (0..spec.images)
        .map(|i| {
            let class = i % spec.classes.max(1);
            // Sizes vary ±25% around the mean, as real JPEGs do.
            let jitter = (i.wrapping_mul(2_654_435_761) % 51) as i64 - 25;
            let size = (spec.image_size as i64 * (100 + jitter) / 100).max(1) as u64;
            FileSpec {
                path: format!("images/train/n{class:08}/img_{i:07}.jpg"),
                size,
                seed: 1000 + i,
            }
        })
        .collect()
}

pub fn total(files: &[FileSpec]) -> u64 {
    files.iter().map(|f| f.size).sum()
}

/// A stable ETag for a file: 128 bits from its seed and size, in multipart form.
pub fn etag(f: &FileSpec) -> String {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(f.seed ^ f.size.rotate_left(32));
    format!("{a:016x}{:016x}-1", mix(a))
}

/// Writes `files` under `root` (two threads), each with its ETag attribute.
pub fn generate(root: &Path, files: &[FileSpec]) -> anyhow::Result<()> {
    let half = files.len().div_ceil(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(half.max(1))
            .map(|part| s.spawn(move || write_files(root, part)))
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok(())
    })
}

fn write_files(root: &Path, files: &[FileSpec]) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for f in files {
        let p = root.join(&f.path);
        std::fs::create_dir_all(p.parent().unwrap_or(root))?;
        let mut out =
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        let mut left = f.size;
        let mut stream = f.seed;
        while left > 0 {
            let n = left.min(8 << 20) as usize;
            buf.resize(n, 0);
            fill(stream, &mut buf);
            stream = stream.wrapping_add(0x1_0000_0000);
            out.write_all(&buf)?;
            left -= n as u64;
        }
        xattr::set(&p, "user.etag", etag(f).as_bytes())
            .with_context(|| format!("setting the ETag attribute of {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DatasetSpec {
        DatasetSpec {
            shards: 2,
            shard_size: 9 << 20,
            images: 10,
            classes: 3,
            image_size: 1000,
        }
    }

    #[test]
    fn layout_and_sizes() {
        let s = spec();
        let im = images(&s);
        assert_eq!(im.len(), 10);
        assert!(im.iter().all(|f| (750..=1250).contains(&f.size)));
        assert_eq!(im[4].path, "images/train/n00000001/img_0000004.jpg");
        assert_eq!(shards(&s)[1].path, "shards/train-00001-of-00002.tfrecord");
        let tags: std::collections::HashSet<_> = im.iter().map(etag).collect();
        assert_eq!(tags.len(), im.len());
        assert!(etag(&im[0]).ends_with("-1") && etag(&im[0]).len() == 34);
    }

    #[test]
    fn generated_files_start_as_expected() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec();
        let mut files = shards(&s);
        files.extend(images(&s));
        generate(dir.path(), &files).unwrap();
        for f in &files {
            let bytes = std::fs::read(dir.path().join(&f.path)).unwrap();
            assert_eq!(bytes.len() as u64, f.size);
            assert_eq!(&bytes[..CHECKED.min(bytes.len())], &expected_start(f)[..]);
        }
        // The second 8 MiB of a shard is another stream, not a repeat.
        let shard = std::fs::read(dir.path().join(&files[0].path)).unwrap();
        assert_ne!(&shard[..64], &shard[8 << 20..(8 << 20) + 64]);
    }
}
