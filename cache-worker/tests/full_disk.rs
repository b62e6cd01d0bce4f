//! A Disk tier on a filesystem that fills up before the tier's configured size does.
//!
//! The tier is a real tmpfs mounted for the test, smaller than the size the store is told, so
//! that demotions into it fail with ENOSPC part-way through their copy. The store must lose
//! nothing it claims to have (a get is the right bytes or a miss), leak nothing (no block file
//! left uncounted in the tier it came from, no temporary file anywhere), and count the failures.
//! Mounting needs root, which the suite has.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use lakecache_lake::BlockKey;
use lakecache_worker::metrics::{TierLabel, WorkerMetrics};
use lakecache_worker::store::{BlockStore, Lookup, TierKind, TierSpec};

/// Unmounts the tmpfs when the test ends, passed or not.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(dir: &Path, size: &str) -> Self {
        let uid = Command::new("id").arg("-u").output().expect("run id -u");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test mounts a small tmpfs to fill a real filesystem and must run as root"
        );
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

const BS: u64 = 16 << 10;

fn key(i: u64) -> BlockKey {
    BlockKey::new("data/part", "v1", i)
}

fn data(i: u64) -> Bytes {
    Bytes::from(
        (0..BS)
            .map(|b| (b as u8).wrapping_mul(31) ^ i as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Bytes of `*.blk` files, and names of `*.tmp` files, in a directory.
fn files(dir: &Path) -> (u64, Vec<String>) {
    let mut blk = 0;
    let mut tmp = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".blk") {
            blk += e.metadata().unwrap().len();
        } else if name.ends_with(".tmp") {
            tmp.push(name);
        }
    }
    (blk, tmp)
}

#[tokio::test]
async fn a_full_disk_tier_loses_nothing_and_leaks_nothing() {
    let mem = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let _mount = Mounted::tmpfs(disk.path(), "256k");
    let metrics = Arc::new(WorkerMetrics::default());
    // The Disk tier is told 40 blocks; its filesystem holds about 12 (each block also has a
    // `.meta` file that takes a page).
    let (mem_cap, disk_cap) = (4 * BS, 40 * BS);
    let store = BlockStore::open(
        vec![
            TierSpec {
                kind: TierKind::Memory,
                dir: mem.path().into(),
                capacity: mem_cap,
            },
            TierSpec {
                kind: TierKind::Disk,
                dir: disk.path().into(),
                capacity: disk_cap,
            },
        ],
        BS,
        metrics.clone(),
    )
    .unwrap();
    let (mut hits, mut misses) = (0, 0);
    for round in 0..3 {
        for i in 0..60 {
            match store.get(&key(i)).await {
                Lookup::Hit { body, tier } => {
                    let bytes = body.into_bytes().unwrap();
                    assert!(
                        bytes == data(i),
                        "round {round}: block {i} from {tier:?} has wrong bytes"
                    );
                    hits += 1;
                }
                Lookup::Miss { past } => {
                    misses += 1;
                    store.put(&key(i), past, data(i)).await;
                }
            }
        }
    }
    assert!(misses > 0 && hits > 0, "hits {hits}, misses {misses}");
    for u in store.usage() {
        let cap = if u.kind == TierKind::Memory {
            mem_cap
        } else {
            disk_cap
        };
        assert!(u.used <= cap, "{:?} counts {} > {cap}", u.kind, u.used);
    }
    for (kind, dir, cap) in [
        (TierKind::Memory, mem.path(), mem_cap),
        (TierKind::Disk, disk.path(), disk_cap),
    ] {
        let (blk, tmp) = files(dir);
        assert!(
            blk <= cap,
            "{kind:?} tier directory holds {blk} bytes of blocks, more than its {cap}"
        );
        assert!(tmp.is_empty(), "{kind:?} tier left temporary files {tmp:?}");
    }
    // Counted usage matches the files: nothing on disk that the index does not know of.
    let counted: u64 = store.usage().iter().map(|u| u.used).sum();
    let real = files(mem.path()).0 + files(disk.path()).0;
    assert_eq!(counted, real, "counted usage differs from the block files");
    let failed = metrics
        .tier_write_errors
        .get_or_create(&TierLabel {
            tier: "disk".into(),
        })
        .get();
    assert!(
        failed > 0,
        "no failed write into the full Disk tier counted"
    );
    // The store still serves: a new block goes in and comes back.
    store.put(&key(1000), 255, data(1000)).await;
    match store.get(&key(1000)).await {
        Lookup::Hit { body, .. } => assert!(body.into_bytes().unwrap() == data(1000)),
        Lookup::Miss { .. } => panic!("a new block was not stored after the disk filled"),
    }
}
