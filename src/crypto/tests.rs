//! Unit tests of the crypto layer. Published vectors (IEEE 1619, RFC 5869) are in
//! `tests/crypto_vectors.rs`.

#![forbid(unsafe_code)]

use std::sync::Arc;

use proptest::prelude::*;

use super::kdf::{self, Prk};
use super::*;
use crate::layout::BLOCK_SIZE;

const BACKENDS: [XtsBackend; 3] = [
    XtsBackend::AwsLc,
    XtsBackend::AwsLcFreshContext,
    XtsBackend::RustCrypto,
];

fn test_key(seed: u8) -> XtsKey {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8).wrapping_mul(7);
    }
    XtsKey::from_bytes(k).expect("halves differ")
}

/// Deterministic filler, different for every (seed, position).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

fn id(version: u32, volume: u64, stripe: u64, chunk: u16, epoch: u32) -> ShardKeyId {
    ShardKeyId {
        version,
        volume,
        stripe: StripeId(stripe),
        chunk: ChunkIndex(chunk),
        epoch,
    }
}

fn ring_with(versions: &[u32]) -> KeyRing {
    let ring = KeyRing::new([0x42; 16]);
    for &v in versions {
        ring.insert(v, MasterKey::from_bytes([v as u8 ^ 0x5a; 32]));
    }
    ring
}

fn encrypt_copy(c: &XtsCipher, tweak: u64, data: &[u8]) -> Vec<u8> {
    let mut buf = data.to_vec();
    c.encrypt(tweak, &mut buf).expect("encrypt");
    buf
}

#[test]
fn round_trip_on_every_backend() {
    let plain = pattern(3 * BLOCK_SIZE, 1);
    for backend in BACKENDS {
        let c = XtsCipher::with_backend(test_key(1), backend).unwrap();
        let mut buf = plain.clone();
        c.encrypt(77, &mut buf).unwrap();
        assert_ne!(buf, plain, "{backend:?}: ciphertext equals plaintext");
        c.decrypt(77, &mut buf).unwrap();
        assert_eq!(buf, plain, "{backend:?}: round trip");
    }
}

#[test]
fn backends_agree() {
    let plain = pattern(4 * BLOCK_SIZE, 2);
    let reference = encrypt_copy(
        &XtsCipher::with_backend(test_key(2), XtsBackend::RustCrypto).unwrap(),
        1 << 40,
        &plain,
    );
    for backend in BACKENDS {
        let c = XtsCipher::with_backend(test_key(2), backend).unwrap();
        assert_eq!(encrypt_copy(&c, 1 << 40, &plain), reference, "{backend:?}");
        for unit in [16, 32, 48, 512, 1024] {
            let mut a = plain[..4 * unit].to_vec();
            let mut b = a.clone();
            c.encrypt_units(unit, 9, &mut a).unwrap();
            XtsCipher::with_backend(test_key(2), XtsBackend::RustCrypto)
                .unwrap()
                .encrypt_units(unit, 9, &mut b)
                .unwrap();
            assert_eq!(a, b, "{backend:?}, unit {unit}");
        }
    }
}

#[test]
fn tweak_changes_ciphertext_and_counts_per_block() {
    let block = pattern(BLOCK_SIZE, 3);
    for backend in BACKENDS {
        let c = XtsCipher::with_backend(test_key(3), backend).unwrap();
        let at5 = encrypt_copy(&c, 5, &block);
        let at6 = encrypt_copy(&c, 6, &block);
        assert_ne!(at5, at6, "{backend:?}: tweak ignored");
        // Two equal blocks in one buffer get tweaks 5 and 6.
        let twice = encrypt_copy(&c, 5, &[block.clone(), block.clone()].concat());
        assert_eq!(&twice[..BLOCK_SIZE], &at5[..], "{backend:?}");
        assert_eq!(&twice[BLOCK_SIZE..], &at6[..], "{backend:?}");
    }
}

#[test]
fn tweak_sum_does_not_wrap_at_u64_max() {
    let block = pattern(BLOCK_SIZE, 4);
    for backend in BACKENDS {
        let c = XtsCipher::with_backend(test_key(4), backend).unwrap();
        let two = encrypt_copy(&c, u64::MAX, &[block.clone(), block.clone()].concat());
        // Block 1 has tweak 2^64, not 0.
        assert_ne!(
            &two[BLOCK_SIZE..],
            &encrypt_copy(&c, 0, &block)[..],
            "{backend:?}"
        );
        assert_eq!(&two[..BLOCK_SIZE], &encrypt_copy(&c, u64::MAX, &block)[..]);
    }
}

#[test]
fn bad_lengths_are_refused_and_buffer_untouched() {
    for backend in BACKENDS {
        let c = XtsCipher::with_backend(test_key(5), backend).unwrap();
        for len in [0, 16, 4095, 4097, 8191] {
            let mut buf = vec![0xAB; len];
            assert!(matches!(c.encrypt(0, &mut buf), Err(CryptoError::BadLength(l)) if l == len));
            assert!(matches!(
                c.decrypt(0, &mut buf),
                Err(CryptoError::BadLength(_))
            ));
            assert!(buf.iter().all(|&b| b == 0xAB));
        }
        for (unit, len) in [
            (0, 0),
            (0, 16),
            (8, 16),
            (24, 48),
            (32, 48),
            (16, 0),
            (32 << 20, 32 << 20),
        ] {
            let mut buf = vec![0xCD; len];
            assert!(
                matches!(
                    c.encrypt_units(unit, 0, &mut buf),
                    Err(CryptoError::BadDataUnit { .. })
                ),
                "{backend:?} unit {unit} len {len}"
            );
            assert!(buf.iter().all(|&b| b == 0xCD));
        }
    }
}

#[test]
fn equal_key_halves_are_refused() {
    assert!(matches!(
        XtsKey::from_bytes([7; 64]),
        Err(CryptoError::WeakXtsKey)
    ));
    let mut k = [7u8; 64];
    k[63] = 8;
    assert!(XtsKey::from_bytes(k).is_ok());
}

#[test]
fn different_shard_ids_give_different_keys() {
    let ring = ring_with(&[1, 2]);
    let base = id(1, 10, 20, 3, 4);
    let variants = [
        base,
        ShardKeyId { version: 2, ..base },
        ShardKeyId { volume: 11, ..base },
        ShardKeyId {
            stripe: StripeId(21),
            ..base
        },
        ShardKeyId {
            chunk: ChunkIndex(4),
            ..base
        },
        ShardKeyId { epoch: 5, ..base },
        // Same bytes moved between fields must not collide either.
        id(1, 20, 10, 3, 4),
    ];
    let block = pattern(BLOCK_SIZE, 6);
    let outputs: Vec<Vec<u8>> = variants
        .iter()
        .map(|&v| encrypt_copy(&ring.shard_cipher(v).unwrap(), 0, &block))
        .collect();
    for i in 0..outputs.len() {
        for j in i + 1..outputs.len() {
            assert_ne!(
                outputs[i], outputs[j],
                "{:?} and {:?} share a key",
                variants[i], variants[j]
            );
        }
    }
}

#[test]
fn shard_info_layout_is_fixed_width_big_endian() {
    let info = kdf::shard_info(&id(
        9,
        0x0102_0304_0506_0708,
        0x1112_1314_1516_1718,
        0x2122,
        0x3132_3334,
    ));
    let mut expected = b"shardvol/xts-key".to_vec();
    expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    expected.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
    expected.extend_from_slice(&[0x21, 0x22]);
    expected.extend_from_slice(&[0x31, 0x32, 0x33, 0x34]);
    assert_eq!(info.to_vec(), expected);
    let tag = kdf::tag_info(0x0102_0304_0506_0708);
    assert_eq!(&tag[..16], b"shardvol/tag-key");
    assert_eq!(&tag[16..], &[1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn cached_cipher_equals_freshly_derived() {
    let ring = ring_with(&[3]);
    let sid = id(3, 7, 1000, 2, 12);
    let first = ring.shard_cipher(sid).unwrap();
    let second = ring.shard_cipher(sid).unwrap();
    assert!(Arc::ptr_eq(&first, &second), "second call missed the cache");
    let fresh = ring.derive_shard_cipher(sid).unwrap();

    // An independent derivation from the definition: HKDF(salt = pool id, IKM = master key,
    // info = label ‖ fields), 64 bytes, as AES-256-XTS data key ‖ tweak key.
    let mut okm = [0u8; 64];
    Prk::extract(&[0x42; 16], &[3 ^ 0x5a; 32])
        .expand(&kdf::shard_info(&sid), &mut okm)
        .unwrap();
    let by_hand =
        XtsCipher::with_backend(XtsKey::from_bytes(okm).unwrap(), XtsBackend::RustCrypto).unwrap();

    let block = pattern(2 * BLOCK_SIZE, 7);
    let expected = encrypt_copy(&by_hand, 5, &block);
    assert_eq!(encrypt_copy(&first, 5, &block), expected);
    assert_eq!(encrypt_copy(&fresh, 5, &block), expected);
}

#[test]
fn cache_is_bounded_and_keeps_hot_entries() {
    let ring = KeyRing::with_options([1; 16], XtsBackend::DEFAULT, 64);
    let hot = id(1, 1, 0, 0, 0);
    ring.insert(1, MasterKey::from_bytes([1; 32]));
    let hot_cipher = ring.shard_cipher(hot).unwrap();
    for stripe in 1..2000 {
        ring.shard_cipher(id(1, 1, stripe, 0, 0)).unwrap();
        // Keep using the hot shard: CLOCK must keep it.
        assert!(
            Arc::ptr_eq(&ring.shard_cipher(hot).unwrap(), &hot_cipher),
            "hot entry evicted at {stripe}"
        );
    }
    let cached = ring.cached_ciphers();
    assert!(cached <= 64, "cache grew to {cached}");
    assert!(cached >= 32, "cache holds only {cached}");
}

#[test]
fn remove_forgets_version_and_its_derivations() {
    let ring = ring_with(&[1, 2]);
    assert_eq!(ring.versions(), vec![1, 2]);
    ring.shard_cipher(id(1, 1, 1, 1, 1)).unwrap();
    ring.shard_cipher(id(2, 1, 1, 1, 1)).unwrap();
    ring.tag_key(1, 1).unwrap();
    assert_eq!(ring.cached_ciphers(), 2);

    assert!(ring.remove(1));
    assert!(!ring.remove(1));
    assert_eq!(ring.versions(), vec![2]);
    assert_eq!(ring.cached_ciphers(), 1);
    assert!(matches!(
        ring.shard_cipher(id(1, 1, 1, 1, 1)),
        Err(CryptoError::UnknownVersion(1))
    ));
    assert!(matches!(
        ring.tag_key(1, 1),
        Err(CryptoError::UnknownVersion(1))
    ));
    assert!(ring.shard_cipher(id(2, 1, 1, 1, 1)).is_ok());
}

#[test]
fn insert_over_a_version_replaces_its_keys() {
    let ring = KeyRing::new([0; 16]);
    let sid = id(1, 1, 1, 1, 1);
    let block = pattern(BLOCK_SIZE, 8);
    ring.insert(1, MasterKey::from_bytes([1; 32]));
    let old = encrypt_copy(&ring.shard_cipher(sid).unwrap(), 0, &block);
    let old_tag = ring.tag_key(1, 1).unwrap().tag(b"h", &block);
    ring.insert(1, MasterKey::from_bytes([2; 32]));
    assert_ne!(
        encrypt_copy(&ring.shard_cipher(sid).unwrap(), 0, &block),
        old
    );
    assert_ne!(ring.tag_key(1, 1).unwrap().tag(b"h", &block), old_tag);
}

#[test]
fn unknown_version_is_an_error() {
    let ring = ring_with(&[1]);
    assert!(matches!(
        ring.shard_cipher(id(7, 0, 0, 0, 0)),
        Err(CryptoError::UnknownVersion(7))
    ));
    assert!(matches!(
        ring.tag_key(7, 0),
        Err(CryptoError::UnknownVersion(7))
    ));
}

#[test]
fn tag_changes_with_every_bit_of_header_and_ciphertext() {
    let key = TagKey::from_bytes([9; 32]);
    let header = pattern(32, 10);
    let ct = pattern(BLOCK_SIZE, 11);
    let tag = key.tag(&header, &ct);
    let mut h = header.clone();
    for bit in 0..h.len() * 8 {
        h[bit / 8] ^= 1 << (bit % 8);
        assert_ne!(key.tag(&h, &ct), tag, "header bit {bit} not covered");
        h[bit / 8] ^= 1 << (bit % 8);
    }
    let mut c = ct.clone();
    for bit in 0..c.len() * 8 {
        c[bit / 8] ^= 1 << (bit % 8);
        assert_ne!(
            key.tag(&header, &c),
            tag,
            "ciphertext bit {bit} not covered"
        );
        c[bit / 8] ^= 1 << (bit % 8);
    }
    assert_eq!(key.tag(&header, &ct), tag, "tag is not deterministic");
}

#[test]
fn tag_separates_header_from_ciphertext() {
    let key = TagKey::from_bytes([3; 32]);
    // Moving a byte across the header/ciphertext boundary must change the tag.
    assert_ne!(key.tag(b"xhead", b"body"), key.tag(b"head", b"bodyx"));
    assert_ne!(key.tag(b"", b"bodyhead"), key.tag(b"head", b"body"));
    assert_ne!(key.tag(b"ab", b""), key.tag(b"a", b"b"));
}

#[test]
fn verify_accepts_the_tag_and_refuses_anything_else() {
    let ring = ring_with(&[1, 2]);
    let key = ring.tag_key(1, 5).unwrap();
    let ct = pattern(BLOCK_SIZE, 12);
    let tag = key.tag(b"header", &ct);
    key.verify(b"header", &ct, &tag).unwrap();
    for i in [0, 17, 31] {
        let mut bad = tag;
        bad[i] ^= 0x01;
        assert!(matches!(
            key.verify(b"header", &ct, &bad),
            Err(CryptoError::TagMismatch)
        ));
    }
    assert!(matches!(
        key.verify(b"headeR", &ct, &tag),
        Err(CryptoError::TagMismatch)
    ));
    // Other volume, other master version: other key.
    assert!(
        ring.tag_key(1, 6)
            .unwrap()
            .verify(b"header", &ct, &tag)
            .is_err()
    );
    assert!(
        ring.tag_key(2, 5)
            .unwrap()
            .verify(b"header", &ct, &tag)
            .is_err()
    );
    assert!(
        Arc::ptr_eq(&ring.tag_key(1, 5).unwrap(), &key),
        "tag key not cached"
    );
}

/// Every way a key byte could show in `Debug`: hex pairs (both cases) and decimal numbers.
fn assert_no_key_material(debug: &str, key: &[u8]) {
    assert!(debug.contains("redacted"), "{debug}");
    for pair in key.windows(2) {
        for hex in [
            format!("{:02x}{:02x}", pair[0], pair[1]),
            format!("{:02X}{:02X}", pair[0], pair[1]),
        ] {
            assert!(!debug.contains(&hex), "{debug} contains {hex}");
        }
    }
    for b in key {
        // Key bytes are chosen ≥ 100, so their decimal forms are three digits long.
        assert!(!debug.contains(&b.to_string()), "{debug} contains {b}");
        assert!(
            !debug.contains(&format!("{b:#x}")),
            "{debug} contains {b:#x}"
        );
    }
}

#[test]
fn debug_of_every_key_type_prints_no_key_material() {
    let bytes: [u8; 64] = std::array::from_fn(|i| 150 + i as u8);
    let k32: [u8; 32] = bytes[..32].try_into().unwrap();
    assert_no_key_material(&format!("{:?}", MasterKey::from_bytes(k32)), &k32);
    assert_no_key_material(&format!("{:?}", TagKey::from_bytes(k32)), &k32);
    assert_no_key_material(&format!("{:?}", XtsKey::from_bytes(bytes).unwrap()), &bytes);
    assert_no_key_material(&format!("{:?}", Prk::from_bytes(&k32).unwrap()), &k32);
    for backend in BACKENDS {
        let c = XtsCipher::with_backend(XtsKey::from_bytes(bytes).unwrap(), backend).unwrap();
        assert_no_key_material(&format!("{c:?}"), &bytes);
        assert_no_key_material(&format!("{c:#?}"), &bytes);
    }
    let ring = KeyRing::new([0; 16]);
    ring.insert(1, MasterKey::from_bytes(k32));
    let debug = format!("{ring:?}");
    assert!(debug.contains("versions: [1]"), "{debug}");
    for pair in k32.windows(2) {
        assert!(!debug.contains(&format!("{:02x}{:02x}", pair[0], pair[1])));
    }
    assert!(!debug.contains("150"), "{debug}");
}

#[test]
fn generated_master_keys_are_random() {
    let a = MasterKey::generate();
    let b = MasterKey::try_generate().unwrap();
    assert_ne!(a.expose(), b.expose());
    assert_ne!(a.expose(), &[0; 32]);
}

#[test]
fn one_cipher_serves_many_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<XtsCipher>();
    assert_send_sync::<KeyRing>();
    assert_send_sync::<TagKey>();
    assert_send_sync::<MasterKey>();

    for backend in BACKENDS {
        let cipher = Arc::new(XtsCipher::with_backend(test_key(13), backend).unwrap());
        let plain = pattern(2 * BLOCK_SIZE, 13);
        let expected: Vec<Vec<u8>> = (0..64).map(|t| encrypt_copy(&cipher, t, &plain)).collect();
        let expected = Arc::new(expected);
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let (cipher, plain, expected) = (cipher.clone(), plain.clone(), expected.clone());
                std::thread::spawn(move || {
                    for round in 0..200u64 {
                        let t = (round * 7 + n) % 64;
                        let mut buf = plain.clone();
                        cipher.encrypt(t, &mut buf).unwrap();
                        assert_eq!(buf, expected[t as usize]);
                        cipher.decrypt(t, &mut buf).unwrap();
                        assert_eq!(buf, plain);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker panicked");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any key with distinct halves, any tweak, 1–3 blocks, any backend: decrypt ∘ encrypt = id,
    /// and all backends give the same ciphertext.
    #[test]
    fn prop_round_trip_and_backends_agree(
        key in prop::array::uniform32(any::<u8>()),
        key2 in prop::array::uniform32(any::<u8>()),
        tweak in any::<u64>(),
        blocks in 1usize..=3,
        seed in any::<u64>(),
    ) {
        prop_assume!(key != key2);
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&key);
        k[32..].copy_from_slice(&key2);
        let plain = pattern(blocks * BLOCK_SIZE, seed);
        let mut first: Option<Vec<u8>> = None;
        for backend in BACKENDS {
            let c = XtsCipher::with_backend(XtsKey::from_bytes(k).unwrap(), backend).unwrap();
            let mut buf = plain.clone();
            c.encrypt(tweak, &mut buf).unwrap();
            prop_assert_ne!(&buf, &plain);
            match &first {
                None => first = Some(buf.clone()),
                Some(f) => prop_assert_eq!(f, &buf, "{:?} disagrees", backend),
            }
            c.decrypt(tweak, &mut buf).unwrap();
            prop_assert_eq!(&buf, &plain);
        }
    }

    /// Arbitrary data-unit lengths (multiples of 16 bytes) round-trip and agree across backends.
    #[test]
    fn prop_units_round_trip(
        unit_blocks in 1usize..=80,
        units in 1usize..=3,
        tweak in any::<u64>(),
        seed in any::<u64>(),
    ) {
        let unit = unit_blocks * 16;
        let plain = pattern(unit * units, seed);
        let mut first: Option<Vec<u8>> = None;
        for backend in BACKENDS {
            let c = XtsCipher::with_backend(test_key(seed as u8), backend).unwrap();
            let mut buf = plain.clone();
            c.encrypt_units(unit, tweak, &mut buf).unwrap();
            match &first {
                None => first = Some(buf.clone()),
                Some(f) => prop_assert_eq!(f, &buf, "{:?} disagrees", backend),
            }
            c.decrypt_units(unit, tweak, &mut buf).unwrap();
            prop_assert_eq!(&buf, &plain);
        }
    }
}
