//! Hot paths of the crypto layer, one core:
//! - `xts-encrypt/<backend>/<size>` and `xts-decrypt/<backend>/4KiB`: AES-256-XTS in place, per
//!   backend (AWS-LC with a reused context, AWS-LC with a fresh context per call = the
//!   contended fallback, pure Rust over `aes` 0.9);
//! - `aes-ecb/rustcrypto/4KiB`: bare AES-256 blocks with the `aes` crate, to see what the
//!   pure-Rust backend spends on the XTS masks;
//! - `tag/<mac>/4KiB`: keyed BLAKE3 as `TagKey::tag` does it (with its 32-byte header and the
//!   wipe of the hasher), bare keyed BLAKE3, and HMAC-SHA256 over the same input;
//! - `xts+tag/4KiB`: encrypt then tag one block, default backend: the write path's crypto cost;
//! - `kdf/*`: HKDF-Extract per master key, HKDF-Expand per shard key, and a full cache miss
//!   (derivation + cipher construction);
//! - `keyring/*`: cache hits of `KeyRing::shard_cipher` and `KeyRing::tag_key`.
//!
//! Run: `cargo bench --bench crypto -- --warm-up-time 1 --measurement-time 2`.
//!
//! On a shared, loaded machine wall time measures the neighbours as much as the code. With
//! `SHARDVOL_BENCH_CLOCK=cpu` in the environment the same benchmarks are timed with the
//! benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) instead: time spent descheduled is not
//! counted, so the figures are per core of actual work.

use std::hint::black_box;

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput};
use hkdf::hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use shardvol::crypto::kdf::Prk;
use shardvol::crypto::{KeyRing, MasterKey, ShardKeyId, TagKey, XtsBackend, XtsCipher, XtsKey};
use shardvol::layout::{ChunkIndex, StripeId};

const KIB: usize = 1024;

fn key() -> XtsKey {
    XtsKey::from_bytes(std::array::from_fn(|i| {
        (i as u8).wrapping_mul(37).wrapping_add(11)
    }))
    .expect("halves differ")
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 + 7) as u8).collect()
}

fn shard_id(stripe: u64) -> ShardKeyId {
    ShardKeyId {
        version: 1,
        volume: 3,
        stripe: StripeId(stripe),
        chunk: ChunkIndex(2),
        epoch: 9,
    }
}

fn xts<M: Measurement>(c: &mut Criterion<M>) {
    let backends = [
        ("aws-lc", XtsBackend::AwsLc),
        ("aws-lc-fresh-ctx", XtsBackend::AwsLcFreshContext),
        ("rustcrypto", XtsBackend::RustCrypto),
    ];
    let mut g = c.benchmark_group("xts-encrypt");
    for size in [4 * KIB, 64 * KIB] {
        g.throughput(Throughput::Bytes(size as u64));
        for (name, backend) in backends {
            let cipher = XtsCipher::with_backend(key(), backend).unwrap();
            let mut buf = data(size);
            g.bench_function(format!("{name}/{}KiB", size / KIB), |b| {
                b.iter(|| {
                    cipher
                        .encrypt(black_box(1000), black_box(&mut buf))
                        .unwrap()
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("xts-decrypt");
    g.throughput(Throughput::Bytes(4 * KIB as u64));
    for (name, backend) in [backends[0], backends[2]] {
        let cipher = XtsCipher::with_backend(key(), backend).unwrap();
        let mut buf = data(4 * KIB);
        g.bench_function(format!("{name}/4KiB"), |b| {
            b.iter(|| {
                cipher
                    .decrypt(black_box(1000), black_box(&mut buf))
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn tag<M: Measurement>(c: &mut Criterion<M>) {
    let block = data(4 * KIB);
    let header = [0x5au8; 32];
    let key_bytes = [7u8; 32];
    let mut g = c.benchmark_group("tag");
    g.throughput(Throughput::Bytes(4 * KIB as u64));

    let tag_key = TagKey::from_bytes(key_bytes);
    g.bench_function("blake3-tagkey/4KiB", |b| {
        b.iter(|| tag_key.tag(black_box(&header), black_box(&block)))
    });
    g.bench_function("blake3-bare/4KiB", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new_keyed(&key_bytes);
            h.update(black_box(&block));
            h.update(black_box(&header));
            h.finalize()
        })
    });
    let hmac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key_bytes).unwrap();
    g.bench_function("hmac-sha256/4KiB", |b| {
        b.iter(|| {
            let mut m = hmac.clone();
            m.update(black_box(&block));
            m.update(black_box(&header));
            m.finalize().into_bytes()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("xts+tag");
    g.throughput(Throughput::Bytes(4 * KIB as u64));
    let cipher = XtsCipher::new(key()).unwrap();
    let mut buf = data(4 * KIB);
    g.bench_function("4KiB", |b| {
        b.iter(|| {
            cipher.encrypt(black_box(1000), &mut buf).unwrap();
            tag_key.tag(black_box(&header), &buf)
        })
    });
    g.finish();
}

fn kdf<M: Measurement>(c: &mut Criterion<M>) {
    let pool = [0x42u8; 16];
    let master = MasterKey::from_bytes([0x24; 32]);
    let prk = Prk::for_master(&pool, &master);
    let mut g = c.benchmark_group("kdf");
    g.bench_function("hkdf-extract (per master key)", |b| {
        b.iter(|| Prk::for_master(black_box(&pool), &master))
    });
    g.bench_function("hkdf-expand shard key", |b| {
        b.iter(|| prk.shard_key(black_box(&shard_id(17))).unwrap())
    });
    g.bench_function("hkdf-expand tag key", |b| {
        b.iter(|| prk.tag_key(black_box(3)).unwrap())
    });
    let ring = KeyRing::new(pool);
    ring.insert(1, MasterKey::from_bytes([0x24; 32]));
    g.bench_function("cache miss: derive + XtsCipher::new (aws-lc)", |b| {
        b.iter(|| ring.derive_shard_cipher(black_box(shard_id(17))).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("keyring");
    // Fill the cache a little so the hit is not on an otherwise empty map.
    for stripe in 0..1000 {
        ring.shard_cipher(shard_id(stripe)).unwrap();
    }
    g.bench_function("shard_cipher hit", |b| {
        b.iter(|| ring.shard_cipher(black_box(shard_id(17))).unwrap())
    });
    ring.tag_key(1, 3).unwrap();
    g.bench_function("tag_key hit", |b| {
        b.iter(|| ring.tag_key(1, black_box(3)).unwrap())
    });
    g.finish();
}

/// CPU time consumed by the calling thread.
struct ThreadCpuTime;

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec`; CLOCK_THREAD_CPUTIME_ID is supported by every
    // Linux this project runs on, and the return code is checked.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu_time()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_time().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as for wall time: reuse its formatting and throughput units.
        WALL.formatter()
    }
}

/// Reference point for the pure-Rust backend: bare AES-256 over 256 blocks with the `aes` crate,
/// without the XTS tweak masks.
fn aes_ecb<M: Measurement>(c: &mut Criterion<M>) {
    let aes = <aes::Aes256 as aes::cipher::KeyInit>::new_from_slice(&[3u8; 32]).unwrap();
    let mut buf = data(4 * KIB);
    let mut g = c.benchmark_group("aes-ecb");
    g.throughput(Throughput::Bytes(4 * KIB as u64));
    g.bench_function("rustcrypto/4KiB", |b| {
        b.iter(|| {
            let (blocks, _) = aes::cipher::Array::slice_as_chunks_mut(black_box(&mut buf));
            aes::cipher::BlockCipherEncrypt::encrypt_blocks(&aes, blocks);
        })
    });
    g.finish();
}

fn run<M: Measurement>(mut c: Criterion<M>) {
    xts(&mut c);
    aes_ecb(&mut c);
    tag(&mut c);
    kdf(&mut c);
    c.final_summary();
}

fn main() {
    if std::env::var_os("SHARDVOL_BENCH_CLOCK").is_some_and(|v| v == "cpu") {
        run(Criterion::default()
            .with_measurement(ThreadCpuTime)
            .configure_from_args());
    } else {
        run(Criterion::default().configure_from_args());
    }
}
