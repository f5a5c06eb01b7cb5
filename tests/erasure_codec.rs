//! Erasure codec: any `k` of `k + m` restore the stripe, position locality, the error contract,
//! and a golden vector that pins the encoding matrix (parity is part of the on-disk format).

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use shardvol::erasure::{Codec, ErasureError};

/// Deterministic filler (xorshift32), so failures reproduce without a seed file.
fn fill(buf: &mut [u8], mut x: u32) {
    x |= 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
}

/// A stripe of `k` random data shards and `m` parity shards computed from them.
fn stripe(codec: &Codec, len: usize, seed: u32) -> Vec<Vec<u8>> {
    let (k, m) = (codec.data_shards(), codec.parity_shards());
    let mut s: Vec<Vec<u8>> = (0..k + m).map(|_| vec![0u8; len]).collect();
    for (i, d) in s[..k].iter_mut().enumerate() {
        fill(d, seed.wrapping_mul(31).wrapping_add(i as u32));
    }
    encode(codec, &mut s);
    s
}

fn encode(codec: &Codec, s: &mut [Vec<u8>]) {
    let k = codec.data_shards();
    let (data, parity) = s.split_at_mut(k);
    let data: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut parity: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
    codec.encode(&data, &mut parity).unwrap();
}

fn reconstruct(codec: &Codec, s: &mut [Vec<u8>], present: &[bool]) -> Result<(), ErasureError> {
    let mut shards: Vec<&mut [u8]> = s.iter_mut().map(Vec::as_mut_slice).collect();
    codec.reconstruct(&mut shards, present)
}

/// The bytes `[a, b)` of every shard.
fn sub(s: &[Vec<u8>], a: usize, b: usize) -> Vec<Vec<u8>> {
    s.iter().map(|v| v[a..b].to_vec()).collect()
}

#[test]
fn encoding_a_sub_range_gives_the_same_parity_bytes_as_the_whole_chunk() {
    let codec = Codec::new(4, 2).unwrap();
    let full = stripe(&codec, 256 * 1024, 7);
    // 4 KiB block ranges at the start, middle and end, and 64-byte ranges at odd places.
    for (a, b) in [
        (0, 4096),
        (4096 * 17, 4096 * 18),
        (252 * 1024, 256 * 1024),
        (64, 128),
        (4032, 4160),
    ] {
        let mut part = sub(&full, a, b);
        for p in &mut part[4..] {
            p.fill(0xee);
        }
        encode(&codec, &mut part);
        assert_eq!(part, sub(&full, a, b), "parity of range {a}..{b}");
    }
}

#[test]
fn reconstructing_a_sub_range_gives_the_same_bytes_as_the_whole_chunk() {
    let codec = Codec::new(4, 2).unwrap();
    let full = stripe(&codec, 64 * 1024, 8);
    let (a, b) = (4096 * 5, 4096 * 6);
    for missing in [&[1][..], &[0, 2], &[3, 5], &[4, 5]] {
        let mut part = sub(&full, a, b);
        let mut present = [true; 6];
        for &i in missing {
            present[i] = false;
            part[i].fill(0x5a);
        }
        reconstruct(&codec, &mut part, &present).unwrap();
        assert_eq!(part, sub(&full, a, b), "missing {missing:?}");
    }
}

#[test]
fn flipping_one_data_byte_changes_parity_at_that_offset_only() {
    let codec = Codec::new(4, 2).unwrap();
    let before = stripe(&codec, 16 * 1024, 9);
    for (shard, offset) in [(0, 0), (1, 4095), (2, 4096), (3, 16 * 1024 - 1), (2, 777)] {
        let mut after = before.clone();
        after[shard][offset] ^= 0x01;
        encode(&codec, &mut after);
        for p in 4..6 {
            let changed: Vec<usize> = (0..before[p].len())
                .filter(|&o| before[p][o] != after[p][o])
                .collect();
            // An MDS code has no zero coefficient: every parity shard changes, exactly there.
            assert_eq!(
                changed,
                vec![offset],
                "parity {p} after flipping shard {shard} at {offset}"
            );
        }
    }
}

/// Multiplication in GF(2^8) with the polynomial 0x11d, bit by bit.
fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1d;
        }
        b >>= 1;
    }
    p
}

#[test]
fn golden_parity_pins_the_encoding_matrix() {
    // Coefficients: parity row j, data column i = byte 0 of parity j when data i is all ones and
    // the other data shards are zero.
    let codec = Codec::new(4, 2).unwrap();
    let mut coeff = vec![vec![0u8; 4]; 2];
    for i in 0..4 {
        let mut s: Vec<Vec<u8>> = (0..6).map(|_| vec![0u8; 64]).collect();
        s[i].fill(1);
        encode(&codec, &mut s);
        for j in 0..2 {
            assert!(s[4 + j].iter().all(|&b| b == s[4 + j][0]));
            coeff[j][i] = s[4 + j][0];
        }
    }
    // The systematic Vandermonde matrix of Backblaze's and klauspost's Reed-Solomon for 4 + 2.
    assert_eq!(
        coeff,
        vec![vec![0x1b, 0x1c, 0x12, 0x14], vec![0x1c, 0x1b, 0x14, 0x12]]
    );
    // Every parity byte is that linear combination over GF(2^8) mod x^8+x^4+x^3+x^2+1.
    let s = stripe(&codec, 4096, 41);
    for o in [0, 1, 63, 64, 2047, 4095] {
        for j in 0..2 {
            let want = (0..4).fold(0u8, |acc, i| acc ^ gf_mul(coeff[j][i], s[i][o]));
            assert_eq!(s[4 + j][o], want, "parity {j} at {o}");
        }
    }

    // A whole 10 + 4 stripe, hashed: pins the matrix and the field multiplication.
    let codec = Codec::new(10, 4).unwrap();
    let s = stripe(&codec, 4096, 42);
    let mut h = blake3::Hasher::new();
    for p in &s[10..] {
        h.update(p);
    }
    assert_eq!(
        h.finalize().to_hex().as_str(),
        "892f06c4c5c6841400ca1691e9a6a52d5bfefadd23f568cc9467ae944de826b0"
    );
}

#[test]
fn reconstruct_data_fills_data_and_leaves_missing_parity_alone() {
    let codec = Codec::new(4, 2).unwrap();
    let orig = stripe(&codec, 4096, 10);
    let mut s = orig.clone();
    s[2].fill(0);
    s[5].fill(0xab);
    let present = [true, true, false, true, true, false];
    let mut shards: Vec<&mut [u8]> = s.iter_mut().map(Vec::as_mut_slice).collect();
    codec.reconstruct_data(&mut shards, &present).unwrap();
    assert_eq!(s[2], orig[2]);
    assert!(s[5].iter().all(|&b| b == 0xab));
}

#[test]
fn more_than_m_missing_is_too_few_shards_and_touches_nothing() {
    let codec = Codec::new(4, 2).unwrap();
    let orig = stripe(&codec, 128, 11);
    let mut s = orig.clone();
    let present = [false, true, false, true, false, true];
    assert_eq!(
        reconstruct(&codec, &mut s, &present),
        Err(ErasureError::TooFewShards {
            present: 3,
            needed: 4
        })
    );
    assert_eq!(s, orig);
    let mut shards: Vec<&mut [u8]> = s.iter_mut().map(Vec::as_mut_slice).collect();
    assert_eq!(
        codec.reconstruct_data(&mut shards, &present),
        Err(ErasureError::TooFewShards {
            present: 3,
            needed: 4
        })
    );
}

#[test]
fn m_zero_encodes_nothing_and_reconstructs_only_a_whole_stripe() {
    let codec = Codec::new(3, 0).unwrap();
    let data = [vec![1u8; 64], vec![2u8; 64], vec![3u8; 64]];
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    codec.encode(&refs, &mut []).unwrap();
    let mut s = data.to_vec();
    reconstruct(&codec, &mut s, &[true; 3]).unwrap();
    assert_eq!(s, data);
    assert_eq!(
        reconstruct(&codec, &mut s, &[true, false, true]),
        Err(ErasureError::TooFewShards {
            present: 2,
            needed: 3
        })
    );
    // Arguments are still checked.
    let bad: Vec<&[u8]> = vec![&data[0][..], &data[1][..32], &data[2][..]];
    assert_eq!(codec.encode(&bad, &mut []), Err(ErasureError::BadShards));
}

#[test]
fn bad_shapes_are_bad_shards_or_unsupported() {
    assert_eq!(
        Codec::new(0, 2).unwrap_err(),
        ErasureError::Unsupported { k: 0, m: 2 }
    );
    assert_eq!(
        Codec::new(200, 57).unwrap_err(),
        ErasureError::Unsupported { k: 200, m: 57 }
    );
    assert_eq!(
        Codec::new(usize::MAX, 2).unwrap_err(),
        ErasureError::Unsupported {
            k: usize::MAX,
            m: 2
        }
    );
    assert!(Codec::new(200, 56).is_ok());

    let codec = Codec::new(2, 1).unwrap();
    let a = vec![0u8; 128];
    let b = vec![0u8; 64];
    let c = vec![0u8; 100];
    let z: Vec<u8> = Vec::new();
    let mut p = vec![0u8; 128];
    let mut p64 = vec![0u8; 64];
    // Lengths differ between data shards, between data and parity, not a multiple of 64, zero.
    assert_eq!(
        codec.encode(&[&a, &b], &mut [&mut p]),
        Err(ErasureError::BadShards)
    );
    assert_eq!(
        codec.encode(&[&a, &a], &mut [&mut p64]),
        Err(ErasureError::BadShards)
    );
    assert_eq!(
        codec.encode(&[&c, &c], &mut [&mut p[..100]]),
        Err(ErasureError::BadShards)
    );
    assert_eq!(
        codec.encode(&[&z, &z], &mut [&mut p[..0]]),
        Err(ErasureError::BadShards)
    );
    // Wrong shard counts.
    assert_eq!(
        codec.encode(&[&a], &mut [&mut p]),
        Err(ErasureError::BadShards)
    );
    assert_eq!(
        codec.encode(&[&a, &a], &mut []),
        Err(ErasureError::BadShards)
    );

    let mut s = vec![vec![0u8; 128], vec![0u8; 64], vec![0u8; 128]];
    assert_eq!(
        reconstruct(&codec, &mut s, &[true, false, true]),
        Err(ErasureError::BadShards)
    );
    let mut s = vec![vec![0u8; 128]; 3];
    assert_eq!(
        reconstruct(&codec, &mut s, &[true, false]),
        Err(ErasureError::BadShards)
    );
    let mut s = vec![vec![0u8; 128]; 2];
    assert_eq!(
        reconstruct(&codec, &mut s, &[true, false]),
        Err(ErasureError::BadShards)
    );
}

#[test]
fn one_codec_shared_by_threads_reconstructs_every_pattern() {
    let codec = Codec::new(6, 3).unwrap();
    let orig = stripe(&codec, 4096, 12);
    std::thread::scope(|scope| {
        for t in 0..4usize {
            let (codec, orig) = (&codec, &orig);
            scope.spawn(move || {
                for round in 0..200usize {
                    let mut s = orig.clone();
                    let mut present = [true; 9];
                    for j in 0..3 {
                        let i = (t * 7 + round * 5 + j * 2) % 9;
                        present[i] = false;
                        s[i].fill(0);
                    }
                    reconstruct(codec, &mut s, &present).unwrap();
                    assert_eq!(s, *orig);
                }
            });
        }
    });
}

/// (k, m, shard length, erasure pattern of at most m shards, data seed).
fn code_and_erasures() -> impl Strategy<Value = (usize, usize, usize, Vec<usize>, u32)> {
    (1usize..=10, 0usize..=4, 1usize..=16, any::<u32>()).prop_flat_map(|(k, m, len64, seed)| {
        let missing = proptest::sample::subsequence((0..k + m).collect::<Vec<_>>(), 0..=m);
        (Just(k), Just(m), Just(len64 * 64), missing, Just(seed))
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/erasure_codec.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_k_of_k_plus_m_restore_data_and_parity((k, m, len, missing, seed) in code_and_erasures()) {
        let codec = Codec::new(k, m).unwrap();
        let orig = stripe(&codec, len, seed);
        let mut s = orig.clone();
        let mut present = vec![true; k + m];
        for &i in &missing {
            present[i] = false;
            fill(&mut s[i], seed ^ 0xdead_beef);
        }
        prop_assert_eq!(reconstruct(&codec, &mut s, &present), Ok(()));
        prop_assert_eq!(s, orig);
    }

    #[test]
    fn more_than_m_missing_is_an_error_not_a_panic(
        (k, m) in (1usize..=10, 0usize..=4),
        extra in 1usize..=4,
        seed in any::<u32>(),
    ) {
        let n = k + m;
        let lost = (m + extra).min(n);
        let codec = Codec::new(k, m).unwrap();
        let orig = stripe(&codec, 64, seed);
        let mut s = orig.clone();
        let mut present = vec![true; n];
        // A pseudorandom choice of `lost` shards.
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = seed | 1;
        for i in (1..n).rev() {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            order.swap(i, x as usize % (i + 1));
        }
        for &i in &order[..lost] {
            present[i] = false;
        }
        prop_assert_eq!(
            reconstruct(&codec, &mut s, &present),
            Err(ErasureError::TooFewShards { present: n - lost, needed: k })
        );
        prop_assert_eq!(s, orig);
    }
}
