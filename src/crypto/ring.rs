//! The key ring: unlocked master keys of a pool, and bounded caches of what is derived from them.
//!
//! Contract:
//! - [`KeyRing::insert`] turns a master key into its HKDF PRK (salt = pool id) and drops (wipes)
//!   the master key; inserting a version that is already present replaces it and forgets every
//!   cipher and tag key derived from the old key.
//! - [`KeyRing::remove`] forgets a version and everything derived from it: once it returns, no
//!   call can obtain a cipher or tag key of that version (handles already given out stay
//!   usable until dropped; the key material is wiped when the last handle goes).
//! - [`KeyRing::shard_cipher`] and [`KeyRing::tag_key`] return shared handles; an unknown
//!   version is [`CryptoError::UnknownVersion`].
//! - `KeyRing` is `Send + Sync`; all methods take `&self`.
//!
//! Caches: derived ciphers and tag keys are kept in [`ClockCache`]s of bounded size, split in
//! [`CACHE_SHARDS`] independently locked shards so that threads working on different stripes
//! rarely meet on one lock. Eviction is CLOCK (second chance): an entry survives one sweep of the
//! hand for each time it was used since the last sweep; a new entry starts unreferenced, so a
//! one-off scan of many shards does not push out the entries that are in use. A hit costs a
//! hash, one uncontended lock and an `Arc` clone (see `docs/crypto.md` for figures); a miss costs
//! one HKDF-Expand and a key check, the AES key schedule being built on first use.
//!
//! Locking: the version map is an `RwLock` held for reading during a derivation and its
//! insertion in the cache, and for writing while a version is replaced or removed and its
//! entries purged. So an entry of a removed version can never be inserted after the purge.
//! Lock order: version map, then a cache shard.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use super::kdf::Prk;
use super::xts::{XtsBackend, XtsCipher};
use super::{CryptoError, MasterKey, ShardKeyId, TagKey};

/// Number of independently locked shards of each cache. 16 is well above the number of I/O
/// threads of a small server, so two threads rarely contend, and small enough that a purge
/// (which visits every shard) stays cheap.
pub const CACHE_SHARDS: usize = 16;
/// Default number of shard ciphers kept: 4096 (≈ 1.5 KiB each with both AWS-LC contexts, so
/// ≈ 6 MiB at most). With 1 MiB chunks that covers 4 GiB of recently used data per epoch;
/// a miss costs about one HKDF-Expand, so a larger working set degrades gracefully.
pub const CIPHER_CACHE_ENTRIES: usize = 4096;
/// Default number of tag keys kept: one per (master version, volume) in use; 256 covers far more
/// volumes than a server exports at once.
pub const TAG_CACHE_ENTRIES: usize = 256;

/// Identity of a tag key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TagKeyId {
    version: u32,
    volume: u64,
}

/// Keys that can pick their cache shard cheaply (the shard's `HashMap` still hashes with
/// SipHash and random keys, so a client choosing block numbers cannot flood one bucket).
trait CacheKey: Copy + Eq + Hash {
    fn spread(&self) -> u64;
    fn version(&self) -> u32;
}

/// Fibonacci hashing: multiply by 2^64/φ and keep the top bits.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl CacheKey for ShardKeyId {
    fn spread(&self) -> u64 {
        (self.stripe.0 ^ self.volume.rotate_left(23) ^ (u64::from(self.chunk.0) << 48))
            .wrapping_add(u64::from(self.epoch) << 32 | u64::from(self.version))
            .wrapping_mul(GOLDEN)
    }
    fn version(&self) -> u32 {
        self.version
    }
}

impl CacheKey for TagKeyId {
    fn spread(&self) -> u64 {
        (self.volume ^ u64::from(self.version).rotate_left(32)).wrapping_mul(GOLDEN)
    }
    fn version(&self) -> u32 {
        self.version
    }
}

struct Slot<K, V> {
    key: K,
    value: V,
    referenced: bool,
}

/// One shard: slots in a ring swept by the CLOCK hand, and an index from key to slot.
struct Shard<K, V> {
    index: HashMap<K, usize>,
    slots: Vec<Slot<K, V>>,
    hand: usize,
    capacity: usize,
}

impl<K: CacheKey, V: Clone> Shard<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            hand: 0,
            capacity,
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        let slot = &mut self.slots[*self.index.get(key)?];
        slot.referenced = true;
        Some(slot.value.clone())
    }

    /// Inserts `value` unless `key` is present (another thread derived it first), and returns
    /// the value now cached, so that every caller shares one handle.
    fn insert(&mut self, key: K, value: V) -> V {
        if let Some(existing) = self.get(&key) {
            return existing;
        }
        let slot = Slot {
            key,
            value: value.clone(),
            referenced: false,
        };
        if self.slots.len() < self.capacity {
            self.index.insert(key, self.slots.len());
            self.slots.push(slot);
            return value;
        }
        // Every pass clears the bits it skips, so this stops within two sweeps.
        while self.slots[self.hand].referenced {
            self.slots[self.hand].referenced = false;
            self.hand = (self.hand + 1) % self.slots.len();
        }
        let victim = self.hand;
        self.index.remove(&self.slots[victim].key);
        self.index.insert(key, victim);
        self.slots[victim] = slot;
        self.hand = (victim + 1) % self.slots.len();
        value
    }

    fn purge_version(&mut self, version: u32) {
        self.slots.retain(|s| s.key.version() != version);
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key, i))
            .collect();
        self.hand = 0;
    }
}

/// A bounded map split into [`CACHE_SHARDS`] locked shards, evicting by CLOCK.
struct ClockCache<K, V> {
    shards: Vec<Mutex<Shard<K, V>>>,
}

impl<K: CacheKey, V: Clone> ClockCache<K, V> {
    /// At least `capacity` entries in total (rounded up to a multiple of the shard count).
    fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(CACHE_SHARDS).max(1);
        Self {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K, V>> {
        // Top bits of the Fibonacci hash: CACHE_SHARDS is a power of two.
        let i = (key.spread() >> (64 - CACHE_SHARDS.trailing_zeros())) as usize;
        // A panic while a shard is locked can only come from an allocation failure, after
        // which the shard is still a valid map: carry on with it.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, key: &K) -> Option<V> {
        self.shard(key).get(key)
    }

    fn insert(&self, key: K, value: V) -> V {
        self.shard(&key).insert(key, value)
    }

    fn purge_version(&self, version: u32) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .purge_version(version);
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).slots.len())
            .sum()
    }
}

const _: () = assert!(CACHE_SHARDS.is_power_of_two());

/// Holds the unlocked master keys of a pool and derives (and caches) shard ciphers and tag keys.
///
/// Only the HKDF PRK of each master key is kept. Ciphers and tag keys are cached in bounded
/// CLOCK caches ([`CIPHER_CACHE_ENTRIES`], [`TAG_CACHE_ENTRIES`]); [`KeyRing::remove`] and
/// [`KeyRing::insert`] over an existing version purge that version's entries before returning,
/// and nothing derived from a removed key can be handed out afterwards. `Send + Sync`; every
/// method takes `&self`.
pub struct KeyRing {
    pool_id: [u8; 16],
    backend: XtsBackend,
    versions: RwLock<BTreeMap<u32, Prk>>,
    ciphers: ClockCache<ShardKeyId, Arc<XtsCipher>>,
    tags: ClockCache<TagKeyId, Arc<TagKey>>,
}

impl KeyRing {
    /// An empty ring for pool `pool_id`, default XTS backend and cache sizes.
    pub fn new(pool_id: [u8; 16]) -> Self {
        Self::with_options(pool_id, XtsBackend::DEFAULT, CIPHER_CACHE_ENTRIES)
    }

    /// An empty ring with a chosen XTS backend and cipher-cache size (at least
    /// [`CACHE_SHARDS`] entries are kept).
    pub fn with_options(
        pool_id: [u8; 16],
        backend: XtsBackend,
        cipher_cache_entries: usize,
    ) -> Self {
        Self {
            pool_id,
            backend,
            versions: RwLock::new(BTreeMap::new()),
            ciphers: ClockCache::new(cipher_cache_entries),
            tags: ClockCache::new(TAG_CACHE_ENTRIES),
        }
    }

    /// Loads master key `version` (replacing, and purging everything derived from, a key
    /// previously loaded under that number). The master key is wiped on return; only its PRK is
    /// kept.
    pub fn insert(&self, version: u32, key: MasterKey) {
        let prk = Prk::for_master(&self.pool_id, &key);
        drop(key);
        let mut versions = self
            .versions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if versions.insert(version, prk).is_some() {
            self.purge(version);
        }
    }

    /// Forgets master key `version` and everything derived from it. `false` if it was not
    /// loaded.
    pub fn remove(&self, version: u32) -> bool {
        let mut versions = self
            .versions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let removed = versions.remove(&version).is_some();
        self.purge(version);
        removed
    }

    /// Loaded master-key versions, ascending.
    pub fn versions(&self) -> Vec<u32> {
        self.versions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// The AES-256-XTS cipher of shard `id`, from the cache or derived (then cached).
    pub fn shard_cipher(&self, id: ShardKeyId) -> Result<Arc<XtsCipher>, CryptoError> {
        if let Some(cipher) = self.ciphers.get(&id) {
            return Ok(cipher);
        }
        let versions = self.versions.read().unwrap_or_else(PoisonError::into_inner);
        let prk = versions
            .get(&id.version)
            .ok_or(CryptoError::UnknownVersion(id.version))?;
        let cipher = Arc::new(XtsCipher::with_backend(prk.shard_key(&id)?, self.backend)?);
        Ok(self.ciphers.insert(id, cipher))
    }

    /// The cipher of shard `id`, derived afresh and not cached (for checks and measurements).
    pub fn derive_shard_cipher(&self, id: ShardKeyId) -> Result<XtsCipher, CryptoError> {
        let versions = self.versions.read().unwrap_or_else(PoisonError::into_inner);
        let prk = versions
            .get(&id.version)
            .ok_or(CryptoError::UnknownVersion(id.version))?;
        XtsCipher::with_backend(prk.shard_key(&id)?, self.backend)
    }

    /// The tag key of `volume` under master key `version`, from the cache or derived.
    pub fn tag_key(&self, version: u32, volume: u64) -> Result<Arc<TagKey>, CryptoError> {
        let id = TagKeyId { version, volume };
        if let Some(key) = self.tags.get(&id) {
            return Ok(key);
        }
        let versions = self.versions.read().unwrap_or_else(PoisonError::into_inner);
        let prk = versions
            .get(&version)
            .ok_or(CryptoError::UnknownVersion(version))?;
        Ok(self.tags.insert(id, Arc::new(prk.tag_key(volume)?)))
    }

    /// The audit log's MAC key under master key `version` (derived afresh, not cached: it is
    /// asked for once per unlock).
    pub fn audit_key(&self, version: u32) -> Result<TagKey, CryptoError> {
        let versions = self.versions.read().unwrap_or_else(PoisonError::into_inner);
        versions
            .get(&version)
            .ok_or(CryptoError::UnknownVersion(version))?
            .audit_key()
    }

    /// Number of shard ciphers currently cached.
    pub fn cached_ciphers(&self) -> usize {
        self.ciphers.len()
    }

    /// Called with the version map write-locked.
    fn purge(&self, version: u32) {
        self.ciphers.purge_version(version);
        self.tags.purge_version(version);
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("versions", &self.versions())
            .field("backend", &self.backend)
            .field("cached_ciphers", &self.cached_ciphers())
            .finish_non_exhaustive()
    }
}
