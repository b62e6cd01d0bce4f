//! Eviction and admission: why plain LRU is not enough, and what we do instead.
//!
//! Training reads a dataset in epochs, each a fresh shuffle of every sample. When the dataset is
//! larger than the cache, LRU keeps whatever was read last; by the time a block is read again in
//! the next epoch it has long been pushed out, so LRU hits about `(cache/dataset)^2`-ish and, in
//! practice, almost never. W-TinyLFU fixes scans in general, but in this loop it fails too: the
//! newcomer's frequency includes the access being made, so a newcomer seen once last epoch
//! (count 2) always beats a victim not yet read this epoch (count 1), and the cache churns.
//!
//! lakecache keeps LRU order inside each tier but guards the door with a frequency sketch and a
//! strict comparison of *past* accesses: a block that would push another block out of the cache
//! is admitted only if it was requested more often before this request than the victim was.
//! Under shuffled epochs every block is read once per epoch, the comparison ties, nothing churns,
//! and the cache holds a stable set: it hits as often as it is large relative to the dataset.
//! A block that really is hot gains a higher count and gets in. Counts are halved every
//! `10 × capacity` accesses so that the past fades.
//!
//! The sketch is a count-min sketch of 4-bit-like saturating counters (stored in bytes, capped at
//! 15), four rows, each row at least four counters per cached block.

/// A count-min sketch of access frequencies with periodic halving.
#[derive(Debug, Clone)]
pub struct FrequencySketch {
    rows: [Vec<u8>; 4],
    mask: u64,
    additions: u64,
    sample_size: u64,
}

const SEEDS: [u64; 4] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x27D4_EB2F_1656_67C5,
];
const MAX_COUNT: u8 = 15;

impl FrequencySketch {
    /// A sketch for a cache of about `capacity` items.
    pub fn new(capacity: usize) -> Self {
        let width = (capacity.max(16) * 4).next_power_of_two();
        Self {
            rows: std::array::from_fn(|_| vec![0u8; width]),
            mask: width as u64 - 1,
            additions: 0,
            sample_size: (capacity.max(16) as u64) * 10,
        }
    }

    fn slot(&self, row: usize, item: u64) -> usize {
        let mut h = item ^ SEEDS[row];
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^= h >> 33;
        h = h.wrapping_mul(SEEDS[(row + 1) % 4] | 1);
        h ^= h >> 29;
        (h & self.mask) as usize
    }

    /// How often `item` was recorded (an over-estimate only when items collide).
    pub fn estimate(&self, item: u64) -> u8 {
        (0..4)
            .map(|r| self.rows[r][self.slot(r, item)])
            .min()
            .unwrap_or(0)
    }

    /// Records one access of `item`.
    pub fn record(&mut self, item: u64) {
        let slots: [usize; 4] = std::array::from_fn(|r| self.slot(r, item));
        let current = (0..4).map(|r| self.rows[r][slots[r]]).min().unwrap_or(0);
        if current < MAX_COUNT {
            // Conservative update: raise only the counters at the minimum.
            for (r, s) in slots.iter().enumerate() {
                if self.rows[r][*s] == current {
                    self.rows[r][*s] += 1;
                }
            }
        }
        self.additions += 1;
        if self.additions >= self.sample_size {
            self.halve();
        }
    }

    fn halve(&mut self) {
        for row in &mut self.rows {
            for c in row.iter_mut() {
                *c >>= 1;
            }
        }
        self.additions /= 2;
    }
}

/// The admission rule: a newcomer that would push `victim` out gets in only if it was requested
/// strictly more often before this request than the victim.
pub fn admit(newcomer_past: u8, victim: u8) -> bool {
    newcomer_past > victim
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashlink::LinkedHashMap;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    /// A cache of `capacity` unit-size items: LRU order, optionally the admission rule.
    struct SimCache {
        capacity: usize,
        lru: LinkedHashMap<u64, ()>,
        sketch: Option<FrequencySketch>,
    }

    impl SimCache {
        fn new(capacity: usize, admission: bool) -> Self {
            Self {
                capacity,
                lru: LinkedHashMap::new(),
                sketch: admission.then(|| FrequencySketch::new(capacity)),
            }
        }

        /// Returns whether the access hit.
        fn access(&mut self, item: u64) -> bool {
            let past = self.sketch.as_mut().map(|s| {
                let past = s.estimate(item);
                s.record(item);
                past
            });
            if self.lru.to_back(&item).is_some() {
                return true;
            }
            if self.lru.len() >= self.capacity {
                let victim = *self.lru.front().map(|(k, _)| k).unwrap();
                if let (Some(past), Some(s)) = (past, &self.sketch)
                    && !admit(past, s.estimate(victim))
                {
                    return false;
                }
                self.lru.pop_front();
            }
            self.lru.insert(item, ());
            false
        }
    }

    fn epochs(cache: &mut SimCache, items: u64, n: usize) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut order: Vec<u64> = (0..items)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        (0..n)
            .map(|_| {
                order.shuffle(&mut rng);
                let hits = order.iter().filter(|i| cache.access(**i)).count();
                hits as f64 / items as f64
            })
            .collect()
    }

    #[test]
    fn shuffled_epochs_hit_as_often_as_the_cache_is_large() {
        let (items, capacity) = (2000u64, 1000usize);
        let ours = epochs(&mut SimCache::new(capacity, true), items, 8);
        let lru = epochs(&mut SimCache::new(capacity, false), items, 8);
        let target = 0.9 * capacity as f64 / items as f64;
        println!("epoch  admission-LRU  plain-LRU   (dataset {items}, cache {capacity})");
        for (e, (a, b)) in ours.iter().zip(&lru).enumerate() {
            println!("{:>5}  {a:>13.3}  {b:>9.3}", e + 1);
        }
        for (e, h) in ours.iter().enumerate().skip(1) {
            assert!(
                *h >= target,
                "epoch {}: hit ratio {h:.3} below {target:.3}",
                e + 1
            );
        }
        assert!(
            lru[1..].iter().all(|h| *h < 0.3),
            "LRU unexpectedly good: {lru:?}"
        );
    }

    #[test]
    fn a_hot_item_gets_in_and_a_scan_does_not_flush() {
        let mut c = SimCache::new(100, true);
        for i in 0..100 {
            c.access(i);
        }
        // A scan of new items does not displace the cached set.
        for i in 1000..2000 {
            c.access(i);
        }
        let kept = (0..100).filter(|i| c.lru.contains_key(i)).count();
        assert!(kept >= 95, "scan flushed the cache: kept {kept}");
        // An item requested repeatedly gets in.
        for _ in 0..5 {
            c.access(5000);
        }
        assert!(c.lru.contains_key(&5000));
    }

    #[test]
    fn sketch_counts_and_halves() {
        let mut s = FrequencySketch::new(16);
        for _ in 0..5 {
            s.record(42);
        }
        assert_eq!(s.estimate(42), 5);
        assert_eq!(s.estimate(43), 0);
        for _ in 0..40 {
            s.record(42);
        }
        assert!(s.estimate(42) <= MAX_COUNT);
        let before = s.estimate(42);
        // Enough other traffic to trigger halving.
        for i in 0..200u64 {
            s.record(1_000_000 + i);
        }
        assert!(s.estimate(42) < before, "counts never aged");
    }
}
