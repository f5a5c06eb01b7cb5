//! shardvol: encrypted, erasure-coded, self-healing block volumes served over NBD.
//!
//! The data path, top to bottom:
//! - [`nbd`]: handshake, options, pipelined requests and replies;
//! - [`volume`]: byte ranges → blocks and stripes; journal, destaging, locking, read-modify-write;
//! - [`layout`]: geometry newtypes and placement (stripe → disks);
//! - [`crypto`]: AES-256-XTS per block, shard-key derivation, per-block tags;
//! - [`erasure`]: Reed-Solomon over ciphertext chunks;
//! - [`disk`]: the `Disk` trait: inline (page cache), io_uring and pread backends, memory and
//!   fault-injecting disks.
//!
//! Beside it: [`kms`] (KEK, shares, wrapping), [`meta`] (redb store, superblocks), [`pool`]
//! (creating, opening and describing a pool of disks and volumes; [`pool::recover`] rebuilds a
//! volume's image from disks and shares alone), [`lifecycle`] (epochs, master key versions,
//! archive and destroy, re-splitting the KEK, background re-encryption) and [`audit`] (the
//! hash-chained, MAC'd log of key events). Around them: [`service`] (a served pool, sealed or
//! unlocked), [`control`] (the admin socket) and [`config`] (TOML).

pub mod audit;
pub mod config;
pub mod control;
pub mod crypto;
pub mod disk;
pub mod erasure;
pub mod kms;
pub mod layout;
pub mod lifecycle;
pub mod meta;
pub mod nbd;
pub mod pool;
pub mod service;
pub mod volume;

/// Seconds since the Unix epoch (0 for a clock set before it): the wall-clock time that
/// records, schedules and the audit log carry.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
