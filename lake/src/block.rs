//! Blocks and where they live.
//!
//! A file is cut into fixed-size blocks. A block is named by (object path, object version,
//! block index): a changed object has another version, so its blocks get other names and a
//! cached block can never be stale. Readers and workers agree on where a block lives by
//! rendezvous (highest-random-weight) hashing: every worker gets a score for the block, and the
//! block's owners are the workers in falling score order. A large file thus spreads over every
//! worker (one big file read by many loaders does not pile onto one worker), and a worker that
//! joins or leaves moves only the blocks it wins or held.

use std::fmt;

/// The name of one block of one version of one object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub path: String,
    pub version: String,
    pub index: u64,
}

impl BlockKey {
    pub fn new(path: impl Into<String>, version: impl Into<String>, index: u64) -> Self {
        Self {
            path: path.into(),
            version: version.into(),
            index,
        }
    }

    /// A stable 128-bit id, used as the block's file name and for placement.
    pub fn id(&self) -> BlockId {
        let mut h = blake3::Hasher::new();
        h.update(self.path.as_bytes());
        h.update(&[0]);
        h.update(self.version.as_bytes());
        h.update(&[0]);
        h.update(&self.index.to_le_bytes());
        let out = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&out.as_bytes()[..16]);
        BlockId(u128::from_le_bytes(id))
    }

    /// The byte range `[start, end)` of this block in an object of `size` bytes.
    pub fn range(&self, block_size: u64, size: u64) -> (u64, u64) {
        let start = self.index.saturating_mul(block_size).min(size);
        let end = start.saturating_add(block_size).min(size);
        (start, end)
    }
}

/// A block's 128-bit id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u128);

impl BlockId {
    /// 64 bits of the id, for sketches and hash tables.
    pub fn short(&self) -> u64 {
        self.0 as u64
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(BlockId)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({self})")
    }
}

/// Number of blocks of an object of `size` bytes (an empty object has none).
pub fn block_count(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size)
}

/// The rendezvous score of `member` for an item hashed to `item`.
fn score(member: &str, item: u128) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(member.as_bytes());
    h.update(&item.to_le_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Indices into `members`, best owner first, for an item (a block id or a path hash).
pub fn rendezvous_order<S: AsRef<str>>(members: &[S], item: u128) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (score(m.as_ref(), item), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The item hash of a path, for placing its metadata.
pub fn path_item(path: &str) -> u128 {
    let out = blake3::hash(path.as_bytes());
    u128::from_le_bytes(out.as_bytes()[..16].try_into().unwrap_or([0; 16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = BlockKey::new("a/b", "v1", 0);
        assert_eq!(a.id(), BlockKey::new("a/b", "v1", 0).id());
        assert_ne!(a.id(), BlockKey::new("a/b", "v2", 0).id());
        assert_ne!(a.id(), BlockKey::new("a/b", "v1", 1).id());
        assert_eq!(BlockId::parse(&a.id().to_string()), Some(a.id()));
    }

    #[test]
    fn ranges_cover_the_object() {
        assert_eq!(BlockKey::new("x", "", 0).range(10, 25), (0, 10));
        assert_eq!(BlockKey::new("x", "", 2).range(10, 25), (20, 25));
        assert_eq!(block_count(0, 10), 0);
        assert_eq!(block_count(10, 10), 1);
        assert_eq!(block_count(11, 10), 2);
    }

    #[test]
    fn rendezvous_spreads_and_moves_little() {
        let three = ["w0", "w1", "w2"];
        let mut counts = [0usize; 3];
        let mut moved = 0;
        for i in 0..3000u64 {
            let id = BlockKey::new("big", "v", i).id().0;
            let first = rendezvous_order(&three, id)[0];
            counts[first] += 1;
            // Removing w2 moves only the blocks w2 owned.
            let two = ["w0", "w1"];
            let after = two[rendezvous_order(&two, id)[0]];
            if after != three[first] {
                moved += 1;
                assert_eq!(first, 2, "a block not owned by the leaving worker moved");
            }
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
        assert_eq!(moved, counts[2]);
    }
}
