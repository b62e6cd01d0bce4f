//! The readers: one implementation for every system, so the client's cost is the same
//! everywhere. Plain threads, as a DataLoader's worker processes are; each takes the next file
//! from a shared queue.
//!
//! - [`sequential`]: each reader reads its file from start to end with `pread` of 1 MiB (or a
//!   1 MiB ranged GET from the store); the latency of every read is recorded.
//! - [`whole_files`]: each reader opens a file, reads it to its end in 1 MiB reads and closes it
//!   (or GETs the object); the latency of every file is recorded.
//! - [`walk`]: lists the tree and stats every entry (or lists every object from the store);
//!   the latency of every stat is recorded.
//!
//! Every reader checks each file's size and first bytes, so a fast wrong answer cannot pass.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::dataset::{self, FileSpec};
use crate::s3::Direct;

/// How a workload reaches the data.
#[derive(Clone)]
pub enum Access {
    /// Through the file system at this directory.
    Fs(PathBuf),
    /// Straight from the store.
    S3(Arc<Direct>),
}

/// What one epoch measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub seconds: f64,
    pub bytes: u64,
    pub files: u64,
    /// Milliseconds per read (or per file, or per stat).
    pub latencies: Vec<f64>,
}

impl Measured {
    /// The `q` quantile (0..=1) of the latencies, nearest rank.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.latencies, q)
    }
}

pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

/// Runs `per_file` over `files` with `readers` threads; stops at the first error.
fn parallel(
    files: &[FileSpec],
    readers: usize,
    per_file: &(dyn Fn(&FileSpec, &mut Vec<f64>) -> anyhow::Result<u64> + Sync),
) -> anyhow::Result<Measured> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let start = Instant::now();
    let results: Vec<anyhow::Result<(u64, Vec<f64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..readers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    let mut bytes = 0;
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        match per_file(f, &mut lat) {
                            Ok(n) => bytes += n,
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok((bytes, lat))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader panicked")))
            })
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut m = Measured {
        seconds,
        files: files.len() as u64,
        ..Default::default()
    };
    for r in results {
        let (b, l) = r?;
        m.bytes += b;
        m.latencies.extend(l);
    }
    Ok(m)
}

fn check_start(f: &FileSpec, got: &[u8]) -> anyhow::Result<()> {
    let want = dataset::expected_start(f);
    ensure!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "{}: wrong bytes at the start of the file",
        f.path
    );
    Ok(())
}

/// Reads each file sequentially in `read_size` pieces.
pub fn sequential(
    access: &Access,
    files: &[FileSpec],
    readers: usize,
    read_size: usize,
) -> anyhow::Result<Measured> {
    parallel(files, readers, &|f, lat| {
        let mut off = 0u64;
        match access {
            Access::Fs(root) => {
                let p = root.join(&f.path);
                let file =
                    std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                let mut buf = vec![0u8; read_size];
                loop {
                    let t = Instant::now();
                    let n = file
                        .read_at(&mut buf, off)
                        .with_context(|| format!("reading {} at {off}", p.display()))?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    if off == 0 {
                        check_start(f, &buf[..n])?;
                    }
                    if n == 0 {
                        break;
                    }
                    off += n as u64;
                }
            }
            Access::S3(d) => {
                while off < f.size {
                    let end = (off + read_size as u64).min(f.size);
                    let t = Instant::now();
                    let b = d.read_range(&f.path, off, end)?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    ensure!(b.len() as u64 == end - off, "{}: short GET", f.path);
                    if off == 0 {
                        check_start(f, &b)?;
                    }
                    off = end;
                }
            }
        }
        ensure!(
            off == f.size,
            "{}: read {off} bytes, expected {}",
            f.path,
            f.size
        );
        Ok(off)
    })
}

/// Reads each file whole, in order.
pub fn whole_files(
    access: &Access,
    files: &[FileSpec],
    readers: usize,
) -> anyhow::Result<Measured> {
    parallel(files, readers, &|f, lat| {
        let t = Instant::now();
        let got = match access {
            Access::Fs(root) => {
                use std::io::Read;
                let p = root.join(&f.path);
                let mut file =
                    std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                loop {
                    let n = file
                        .read(&mut buf)
                        .with_context(|| format!("reading {}", p.display()))?;
                    if got == 0 {
                        check_start(f, &buf[..n])?;
                    }
                    if n == 0 {
                        break;
                    }
                    got += n as u64;
                }
                got
            }
            Access::S3(d) => {
                let b = d.read_all(&f.path)?;
                check_start(f, &b)?;
                b.len() as u64
            }
        };
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            got == f.size,
            "{}: read {got} bytes, expected {}",
            f.path,
            f.size
        );
        Ok(got)
    })
}

/// Lists and stats everything under `prefix`; fails unless it finds exactly `expect` files.
pub fn walk(access: &Access, prefix: &str, expect: usize) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let mut lat = Vec::new();
    let files = match access {
        Access::Fs(root) => walk_fs(&root.join(prefix), &mut lat)?,
        Access::S3(d) => {
            let t = Instant::now();
            let n = d.list(&format!("{prefix}/"))?.len();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            n
        }
    };
    if files != expect {
        bail!("listed {files} files under {prefix}, expected {expect}");
    }
    Ok(Measured {
        seconds: start.elapsed().as_secs_f64(),
        bytes: 0,
        files: files as u64,
        latencies: lat,
    })
}

fn walk_fs(root: &Path, lat: &mut Vec<f64>) -> anyhow::Result<usize> {
    let mut files = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            let t = Instant::now();
            let m =
                std::fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            if m.is_dir() {
                dirs.push(p);
            } else {
                files += 1;
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::DatasetSpec;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn readers_read_and_check_a_local_tree() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DatasetSpec {
            shards: 3,
            shard_size: (2 << 20) + 5,
            images: 20,
            classes: 4,
            image_size: 3000,
        };
        let shards = dataset::shards(&spec);
        let images = dataset::images(&spec);
        dataset::generate(dir.path(), &shards).unwrap();
        dataset::generate(dir.path(), &images).unwrap();
        let access = Access::Fs(dir.path().to_path_buf());
        let m = sequential(&access, &shards, 2, 1 << 20).unwrap();
        assert_eq!(m.bytes, dataset::total(&shards));
        // Three full reads, one short and one at the end, per shard.
        assert_eq!(m.latencies.len(), 3 * 4);
        let m = whole_files(&access, &images, 4).unwrap();
        assert_eq!((m.files, m.bytes), (20, dataset::total(&images)));
        let m = walk(&access, "images", 20).unwrap();
        // train/, four class folders, twenty images.
        assert_eq!(m.latencies.len(), 25);
        assert!(walk(&access, "images", 21).is_err());
        // A file with other bytes is caught.
        std::fs::write(
            dir.path().join(&images[3].path),
            vec![0u8; images[3].size as usize],
        )
        .unwrap();
        assert!(whole_files(&access, &images, 4).is_err());
    }
}
