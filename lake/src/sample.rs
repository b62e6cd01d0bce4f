//! Deterministic file contents for generated sample lakes: the demo's (`lakecache demo`) and the
//! benchmark's datasets are written and checked with the same byte streams.

/// Fills `buf` with the bytes of stream `seed` (xorshift64*).
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn streams_are_deterministic_and_differ_by_seed() {
        let (mut a, mut b, mut c) = ([0u8; 37], [0u8; 37], [0u8; 37]);
        super::fill(7, &mut a);
        super::fill(7, &mut b);
        super::fill(8, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // A prefix of a longer fill is the shorter fill.
        let mut short = [0u8; 5];
        super::fill(7, &mut short);
        assert_eq!(short, a[..5]);
    }
}
