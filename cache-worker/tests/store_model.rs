//! A reference-model property test of the tiered block store.
//!
//! Random sequences of reads (with the caller's put on a miss), restarts, and damage to block
//! files run against a store with a small Memory tier and a small Disk tier. The model knows every
//! block's true bytes (derived from its key) and which blocks were damaged; after every step the
//! invariants that must always hold are checked:
//!
//! - a hit returns exactly the bytes of that key;
//! - each tier's used bytes never exceed its capacity, and `usage()` agrees with the blocks that
//!   `block_file` places in that tier (count and summed length), so no block is in two tiers;
//! - a restart keeps every block that was cached before it and not damaged since.

use std::collections::{BTreeSet, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lakecache_lake::BlockKey;
use lakecache_worker::metrics::WorkerMetrics;
use lakecache_worker::store::{BlockStore, Lookup, TierKind, TierSpec};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};

const KEYS: u64 = 12;
const BLOCK_SIZE: u64 = 64;
const MEMORY_CAPACITY: u64 = 3 * BLOCK_SIZE;
const DISK_CAPACITY: u64 = 4 * BLOCK_SIZE;

#[derive(Debug, Clone)]
enum Op {
    /// Read a block; on a miss, put its bytes with the returned `past`, as the real caller does.
    Get(u64),
    /// Drop the store and open it again on the same directories.
    Restart,
    /// Flip a byte of the block's file if it is on the Disk tier.
    Corrupt(u64, usize),
    /// Cut the block's file short, whichever tier it is on.
    Truncate(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..KEYS).prop_map(Op::Get),
        1 => Just(Op::Restart),
        2 => (0..KEYS, any::<usize>()).prop_map(|(k, at)| Op::Corrupt(k, at)),
        1 => (0..KEYS).prop_map(Op::Truncate),
    ]
}

fn key(k: u64) -> BlockKey {
    BlockKey::new("data/part-0.parquet", "v1", k)
}

/// The true bytes of block `k`: some blocks are shorter than the block size, and no two blocks
/// share their contents.
fn data(k: u64) -> Bytes {
    let len = BLOCK_SIZE - (k % 3) * 17;
    (0..len)
        .map(|i| (k * 37 + i * 7 + 1) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn open(mem: &Path, disk: &Path) -> BlockStore {
    BlockStore::open(
        vec![
            TierSpec {
                kind: TierKind::Memory,
                dir: mem.into(),
                capacity: MEMORY_CAPACITY,
            },
            TierSpec {
                kind: TierKind::Disk,
                dir: disk.into(),
                capacity: DISK_CAPACITY,
            },
        ],
        BLOCK_SIZE,
        Arc::new(WorkerMetrics::default()),
    )
    .expect("open store")
}

/// Where `block_file` places every key.
fn placement(store: &BlockStore) -> HashMap<u64, TierKind> {
    (0..KEYS)
        .filter_map(|k| store.block_file(&key(k)).map(|(tier, _)| (k, tier)))
        .collect()
}

fn check_usage(store: &BlockStore, step: usize) -> Result<(), TestCaseError> {
    let placed = placement(store);
    let usage = store.usage();
    prop_assert_eq!(usage.len(), 2);
    for u in &usage {
        prop_assert!(
            u.used <= u.capacity,
            "step {}: {:?} tier over capacity: {:?}",
            step,
            u.kind,
            u
        );
        let mine: Vec<u64> = placed
            .iter()
            .filter(|(_, t)| **t == u.kind)
            .map(|(k, _)| *k)
            .collect();
        let len: u64 = mine.iter().map(|k| data(*k).len() as u64).sum();
        prop_assert_eq!(
            u.blocks,
            mine.len() as u64,
            "step {}: {:?} tier counts {} blocks but block_file places {:?} there ({:?})",
            step,
            u.kind,
            u.blocks,
            mine,
            usage
        );
        prop_assert_eq!(
            u.used,
            len,
            "step {}: {:?} tier uses {} bytes but its blocks {:?} hold {} ({:?})",
            step,
            u.kind,
            u.used,
            mine,
            len,
            usage
        );
    }
    Ok(())
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mem = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let mut store = open(mem.path(), disk.path());
    // Blocks whose file was damaged since they were last stored: they may be lost, but a hit on
    // them must still return the true bytes.
    let mut damaged: BTreeSet<u64> = BTreeSet::new();

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            // Every other read asks for a Memory tier block's file, as the block transport
            // does: it must hold the same bytes.
            Op::Get(k) => match if step % 2 == 0 {
                store.get(&key(k)).await
            } else {
                store.get_file(&key(k)).await
            } {
                Lookup::Hit { body, tier } => {
                    let bytes = body.into_bytes().unwrap();
                    prop_assert!(
                        bytes == data(k),
                        "step {}: hit on block {} in the {:?} tier returned wrong bytes \
                         ({} bytes, expected {})",
                        step,
                        k,
                        tier,
                        bytes.len(),
                        data(k).len()
                    );
                }
                Lookup::Miss { past } => {
                    damaged.remove(&k);
                    store.put(&key(k), past, data(k)).await;
                }
            },
            Op::Restart => {
                let before: Vec<u64> = placement(&store)
                    .into_keys()
                    .filter(|k| !damaged.contains(k))
                    .collect();
                drop(store);
                store = open(mem.path(), disk.path());
                let after = placement(&store);
                let lost: Vec<u64> = before
                    .iter()
                    .copied()
                    .filter(|k| !after.contains_key(k))
                    .collect();
                prop_assert!(
                    lost.is_empty(),
                    "step {}: restart lost blocks {:?} (cached before: {:?}, after: {:?})",
                    step,
                    lost,
                    before,
                    after
                );
            }
            Op::Corrupt(k, at) => {
                if let Some((TierKind::Disk, path)) = store.block_file(&key(k))
                    && let Ok(mut f) = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                {
                    let len = f.metadata().unwrap().len();
                    if len > 0 {
                        let at = (at as u64) % len;
                        let mut byte = std::fs::read(&path).unwrap()[at as usize];
                        byte ^= 0x5a;
                        f.seek(SeekFrom::Start(at)).unwrap();
                        f.write_all(&[byte]).unwrap();
                        damaged.insert(k);
                    }
                }
            }
            Op::Truncate(k) => {
                if let Some((_, path)) = store.block_file(&key(k))
                    && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path)
                {
                    let len = f.metadata().unwrap().len();
                    f.set_len(len / 2).unwrap();
                    damaged.insert(k);
                }
            }
        }
        check_usage(&store, step)?;
    }
    drop(store);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // Integration tests have no lib.rs beside them, so name the file outright (the path is
        // relative to the package directory, where cargo runs tests).
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/store_model.txt"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops))?;
    }
}
