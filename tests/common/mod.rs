//! Helpers shared by several integration-test binaries (each includes this with `mod common;`).

/// `len` deterministic pseudo-random bytes from `seed` (xorshift): test payloads that differ per
/// seed and never look like zeros.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
