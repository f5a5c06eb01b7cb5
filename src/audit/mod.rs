//! The audit log: an append-only, hash-chained, MAC'd record of every key event of a pool.
//!
//! `POOL/audit.log` holds one JSON object per line (format: [`record`] and `docs/audit.md`).
//! Each record carries the SHA-256 `hash` of a canonical encoding of its contents and of the
//! previous record's hash (`prev`), so editing, removing, inserting or reordering any record
//! breaks the chain from there on; and a `mac` of that hash under the *audit key*, derived by
//! HKDF from a master key ([`crate::crypto::kdf::AUDIT_KEY_LABEL`]), so that rewriting the chain
//! consistently needs the key. Records written while the pool is sealed carry no MAC; the next
//! unlock appends an `attest` record (with a MAC) naming the seqs it vouches for.
//! The (seq, hash) of the newest record is also kept in the metadata store
//! ([`MetaStore::audit_head`]), so that cutting records off the end is seen without a key.
//!
//! What this module promises:
//! - [`AuditLog::append`] returns only once the record is on stable storage (the line is written
//!   with O_APPEND and fsynced) and the store's head names it (one durable redb commit).
//!   Appends from several threads are serialised by one mutex: seqs are consecutive. Only one
//!   process appends: the store, which every appender holds open, is locked by redb.
//! - Before its first append, an `AuditLog` reads the whole log once and checks it. If the log's
//!   last record is not the store's head (allowing the one record a crash between the two writes
//!   leaves), it refuses to append ([`AuditError::Broken`]) rather than move the head past the
//!   damage; `restart` (with the pool unlocked) sets such a log aside and starts a new one.
//!   Damage further back is logged as a warning and left for `verify` to report: appending
//!   after it hides nothing.
//! - A torn last line (no line feed: a crash during an append) is not part of the chain:
//!   `verify` reports it as such, and the next append truncates it and records a `log-repaired`
//!   event naming its length and SHA-256. The same append catches up a head left one record
//!   behind, and says so in a `log-repaired` record too.
//! - [`AuditLog::verify`] reads the log and names the first broken record and what is wrong
//!   ([`Problem`]): a malformed line, a missing or moved record, a hash or `prev` mismatch, a MAC
//!   that is missing where one is required, wrong, or made under a key the pool never had, an
//!   attestation with a bad range, a log shorter than the head, a head that does not match.
//!   Without a key it checks everything but the MACs themselves.
//!
//! What it cannot promise: someone holding the master key (`t` shares) and write access to the
//! log and the store can rewrite history consistently; someone with write access alone can add
//! sealed records at the end (unauthenticated, and shown as such until the next unlock attests
//! them). See `docs/audit.md`.
//!
//! No key material reaches the log: records hold hashes and MACs; field values are supplied by
//! the caller, who must not pass secrets.

#![forbid(unsafe_code)]

pub mod record;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::crypto::kdf::Prk;
use crate::crypto::{CryptoError, KeyRing, MasterKey, TagKey};
use crate::meta::{MetaError, MetaStore};
use crate::now_unix;
use record::{HASH_LEN, ZERO_HASH, hash_of, mac_of, mac_ok};
use verify::{Checked, Checker, Item, ScanEnd, hash_hex, scan};

pub use record::{Fields, Record, format_time_utc};
pub use verify::{Broken, Problem, TornTail, VerifyReport};

/// Name of the log inside a pool directory.
pub const LOG_FILE: &str = "audit.log";
/// Longest line read or written. A record with the largest allowed fields, every byte escaped,
/// stays under it; the limit only keeps a damaged file from being read as one huge line.
pub const MAX_LINE_LEN: usize = 256 << 10;
/// Most fields per record.
pub const MAX_FIELDS: usize = 32;
/// Longest field name: 1-64 bytes of `a-z`, `0-9`, `_`, `-`.
pub const MAX_FIELD_NAME_LEN: usize = 64;
/// Longest field value in bytes; longer values (error messages with long paths) are cut at a
/// character boundary and end with "…".
pub const MAX_VALUE_LEN: usize = 1024;
/// Mode of a new log: the owner writes, the group reads.
const LOG_MODE: u32 = 0o640;

/// The kinds of audit events, with their stable names (the `event` of a record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    PoolCreate,
    UnlockAttempt,
    Unlock,
    UnlockRefused,
    Seal,
    Rotate,
    RotateMaster,
    Archive,
    Destroy,
    Reissue,
    PolicyRefusal,
    DiskFailed,
    DiskReplaced,
    DiskAdded,
    Attest,
    LogRepaired,
}

impl EventKind {
    /// Every kind, in the order of the docs.
    pub const ALL: [EventKind; 16] = [
        EventKind::PoolCreate,
        EventKind::UnlockAttempt,
        EventKind::Unlock,
        EventKind::UnlockRefused,
        EventKind::Seal,
        EventKind::Rotate,
        EventKind::RotateMaster,
        EventKind::Archive,
        EventKind::Destroy,
        EventKind::Reissue,
        EventKind::PolicyRefusal,
        EventKind::DiskFailed,
        EventKind::DiskReplaced,
        EventKind::DiskAdded,
        EventKind::Attest,
        EventKind::LogRepaired,
    ];

    /// The stable name written in records. Never change one: old logs hold them.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::PoolCreate => "pool-create",
            EventKind::UnlockAttempt => "unlock-attempt",
            EventKind::Unlock => "unlock",
            EventKind::UnlockRefused => "unlock-refused",
            EventKind::Seal => "seal",
            EventKind::Rotate => "rotate",
            EventKind::RotateMaster => "rotate-master",
            EventKind::Archive => "archive",
            EventKind::Destroy => "destroy",
            EventKind::Reissue => "reissue",
            EventKind::PolicyRefusal => "policy-refusal",
            EventKind::DiskFailed => "disk-failed",
            EventKind::DiskReplaced => "disk-replaced",
            EventKind::DiskAdded => "disk-added",
            EventKind::Attest => "attest",
            EventKind::LogRepaired => "log-repaired",
        }
    }

    /// The kind of a stable name; `None` for a name this build does not know.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Kinds that only happen with the pool unlocked, so their records must carry a MAC:
    /// appending one without a key is refused, and `verify` flags one without a MAC as forged.
    /// The others (unlock attempts and refusals, disk events, policy refusals, repairs) may be
    /// recorded sealed.
    pub fn requires_mac(self) -> bool {
        matches!(
            self,
            EventKind::PoolCreate
                | EventKind::Unlock
                | EventKind::Seal
                | EventKind::Rotate
                | EventKind::RotateMaster
                | EventKind::Archive
                | EventKind::Destroy
                | EventKind::Reissue
                | EventKind::Attest
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Builds [`Fields`] from pairs, e.g. `fields([("volume", "vol0"), ("outcome", "ok")])`.
pub fn fields<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Fields {
    pairs
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A record that cannot be written as asked (a bad field name, a kind that needs a key).
    #[error("audit record: {0}")]
    Invalid(String),
    /// The log's end does not continue the store's chain head: appending is refused.
    #[error(
        "audit log {path}: {msg}. New records are refused so that the chain head is not moved past \
         the damage: run `shardvol audit verify --pool {pool}` to see it, then `shardvol audit \
         restart --pool {pool} --share FILE...` to set this log aside and start a new one"
    )]
    Broken {
        path: PathBuf,
        pool: String,
        msg: String,
    },
    /// `restart` on a log that verifies.
    #[error("audit log {path} verifies ({records} records): there is nothing to restart")]
    NotBroken { path: PathBuf, records: u64 },
    #[error("audit key: {0}")]
    Key(#[from] CryptoError),
}

/// The audit keys of the loaded master key versions, and the version that MACs new records.
/// Wiped on drop (each is a [`TagKey`]); `Debug` shows versions only.
pub struct AuditKey {
    keys: BTreeMap<u32, TagKey>,
    current: u32,
}

impl AuditKey {
    /// One version's key, which also MACs new records.
    pub fn new(version: u32, key: TagKey) -> Self {
        Self {
            keys: BTreeMap::from([(version, key)]),
            current: version,
        }
    }

    /// The audit key of master key `version` of pool `pool_id` (at pool creation, before the
    /// key goes into a ring).
    pub fn from_master(
        pool_id: &[u8; 16],
        master: &MasterKey,
        version: u32,
    ) -> Result<Self, AuditError> {
        Ok(Self::new(
            version,
            Prk::for_master(pool_id, master).audit_key()?,
        ))
    }

    /// The audit keys of every version loaded in `ring`; `current` MACs new records.
    pub fn from_ring(ring: &KeyRing, current: u32) -> Result<Self, AuditError> {
        let mut keys = BTreeMap::new();
        for v in ring.versions() {
            keys.insert(v, ring.audit_key(v)?);
        }
        if !keys.contains_key(&current) {
            return Err(CryptoError::UnknownVersion(current).into());
        }
        Ok(Self { keys, current })
    }

    /// Adds (or replaces) one version's key; with `make_current`, new records use it (after a
    /// master-key rotation).
    pub fn insert(&mut self, version: u32, key: TagKey, make_current: bool) {
        self.keys.insert(version, key);
        if make_current {
            self.current = version;
        }
    }

    /// The version that MACs new records.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// Versions whose MACs can be checked.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    fn mac(&self, hash: &[u8; HASH_LEN]) -> [u8; HASH_LEN] {
        // `current` is always a key of the map (constructors and `insert` keep it so).
        self.keys
            .get(&self.current)
            .map_or([0; HASH_LEN], |k| mac_of(k, hash))
    }

    /// `Some(valid)` when `version`'s key is here, `None` when it is not.
    pub fn verify(
        &self,
        version: u32,
        hash: &[u8; HASH_LEN],
        mac: &[u8; HASH_LEN],
    ) -> Option<bool> {
        self.keys.get(&version).map(|k| mac_ok(k, hash, mac))
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("versions", &self.versions())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// The end of a checked log: what the next record continues.
struct Tail {
    seq: u64,
    hash: [u8; HASH_LEN],
    /// First sealed record after the last `attest` record.
    pending_attest_from: Option<u64>,
}

/// Everything `read` found: the records (or why a line is not one) and a torn tail.
#[derive(Debug)]
pub struct LogContents {
    pub lines: Vec<Result<Record, String>>,
    pub torn_tail: Option<TornTail>,
}

/// What `restart` did.
#[derive(Debug)]
pub struct Restarted {
    /// Where the old log now is.
    pub old_log: PathBuf,
    /// What was wrong with it.
    pub problem: String,
    /// Seq of the new log's first record (1).
    pub seq: u64,
}

/// A pool's audit log. Cheap to open (nothing is read until used); share it with an `Arc`.
pub struct AuditLog {
    path: PathBuf,
    store: Arc<MetaStore>,
    /// `None` until the log has been read and checked by the first append (and again after a
    /// failed append, so that the next one re-reads and repairs).
    tail: Mutex<Option<Tail>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Checks field names and cuts over-long values (see [`MAX_VALUE_LEN`]).
fn clean_fields(mut fields: Fields) -> Result<Fields, AuditError> {
    if fields.len() > MAX_FIELDS {
        return Err(AuditError::Invalid(format!(
            "{} fields, at most {MAX_FIELDS} allowed",
            fields.len()
        )));
    }
    for (name, value) in fields.iter_mut() {
        let ok = !name.is_empty()
            && name.len() <= MAX_FIELD_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(AuditError::Invalid(format!(
                "field name {name:?}: use 1-{MAX_FIELD_NAME_LEN} of a-z, 0-9, '_', '-'"
            )));
        }
        if value.len() > MAX_VALUE_LEN {
            let mut cut = MAX_VALUE_LEN - '…'.len_utf8();
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
    }
    Ok(fields)
}

impl AuditLog {
    /// The log of the pool in `pool_dir`, whose store is `store`.
    pub fn open(pool_dir: &Path, store: Arc<MetaStore>) -> Self {
        Self {
            path: pool_dir.join(LOG_FILE),
            store,
            tail: Mutex::new(None),
        }
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
        |source| AuditError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Tail>> {
        // A panic during an append leaves an unknown tail: forget it and re-read.
        self.tail.lock().unwrap_or_else(|e| {
            let mut g = e.into_inner();
            *g = None;
            self.tail.clear_poison();
            g
        })
    }

    /// Appends one record, MAC'd under `key`'s current version, or sealed (no MAC) when `key`
    /// is `None`. Returns its seq once it is durable and the store's head names it.
    pub fn append(
        &self,
        kind: EventKind,
        fields: Fields,
        key: Option<&AuditKey>,
    ) -> Result<u64, AuditError> {
        if key.is_none() && kind.requires_mac() {
            return Err(AuditError::Invalid(format!(
                "a {kind} record is written only with the pool unlocked (it needs the audit key)"
            )));
        }
        let fields = clean_fields(fields)?;
        let mut guard = self.lock();
        let result = self.append_locked(&mut guard, kind, fields, key);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn append_locked(
        &self,
        guard: &mut Option<Tail>,
        kind: EventKind,
        fields: Fields,
        key: Option<&AuditKey>,
    ) -> Result<u64, AuditError> {
        if guard.is_none() {
            *guard = Some(self.prepare(key)?);
        }
        let tail = guard
            .as_mut()
            .ok_or_else(|| AuditError::Invalid("no tail".into()))?;
        self.write_record(tail, kind, fields, key)
    }

    /// Appends an `attest` record vouching for the sealed records written since the last one
    /// (`from`..=`to`, the record just before it), if there are any. Returns its seq.
    pub fn attest(&self, key: &AuditKey) -> Result<Option<u64>, AuditError> {
        let mut guard = self.lock();
        let result = (|| {
            if guard.is_none() {
                *guard = Some(self.prepare(Some(key))?);
            }
            let tail = guard
                .as_mut()
                .ok_or_else(|| AuditError::Invalid("no tail".into()))?;
            let Some(from) = tail.pending_attest_from else {
                return Ok(None);
            };
            let to = tail.seq;
            let f = fields([("from", from.to_string()), ("to", to.to_string())]);
            self.write_record(tail, EventKind::Attest, f, Some(key))
                .map(Some)
        })();
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// Master key versions the store lists (any state).
    fn known_versions(&self) -> Result<BTreeSet<u32>, AuditError> {
        Ok(self.store.keys()?.into_iter().map(|k| k.version).collect())
    }

    /// Reads and checks the whole log (MACs too when `key` is given). Errors only when the log
    /// or the store cannot be read; what is wrong with the log is in the report.
    pub fn verify(&self, key: Option<&AuditKey>) -> Result<VerifyReport, AuditError> {
        let _guard = self.lock();
        Ok(self.check(key)?.report)
    }

    fn check(&self, key: Option<&AuditKey>) -> Result<Checked, AuditError> {
        let head = self.store.audit_head()?;
        let mut checker = Checker::new(key, self.known_versions()?, head);
        let end = scan(&self.path, |item| checker.feed(item)).map_err(self.io())?;
        Ok(checker.finish(&end))
    }

    /// Every line of the log: a record, or why the line is not one; and a torn tail.
    pub fn read(&self) -> Result<LogContents, AuditError> {
        let mut lines = Vec::new();
        let end: ScanEnd = scan(&self.path, |item| {
            lines.push(match item {
                Item::Rec(r) => Ok(r),
                Item::Bad { line, msg } => Err(format!("line {line}: {msg}")),
            })
        })
        .map_err(self.io())?;
        Ok(LogContents {
            lines,
            torn_tail: end.torn,
        })
    }

    /// The records of the log; an error naming the first line that is not one.
    pub fn records(&self) -> Result<Vec<Record>, AuditError> {
        self.read()?
            .lines
            .into_iter()
            .map(|l| {
                l.map_err(|msg| AuditError::Invalid(format!("{}: {msg}", self.path.display())))
            })
            .collect()
    }

    fn broken(&self, msg: String) -> AuditError {
        AuditError::Broken {
            path: self.path.clone(),
            pool: self
                .path
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            msg,
        }
    }

    /// Reads and checks the log before the first append: finds what the next record continues,
    /// refuses an end that does not match the store's head, repairs a torn tail and a head left
    /// one record behind (each repair is recorded).
    fn prepare(&self, key: Option<&AuditKey>) -> Result<Tail, AuditError> {
        let Checked {
            report,
            last,
            pending_attest_from: pending,
        } = self.check(key)?;
        if let Some(b) = &report.first_broken {
            warn!(log = %self.path.display(), "audit log broken at {b}; run `shardvol audit verify`");
        }
        let (hs, hh) = report.head.unwrap_or((0, ZERO_HASH));
        let mut lagging = None;
        let mut tail = match last {
            None if hs == 0 => Tail {
                seq: 0,
                hash: ZERO_HASH,
                pending_attest_from: None,
            },
            None => {
                return Err(self.broken(format!(
                    "the log is empty but the chain head in the store is record {hs}"
                )));
            }
            Some(Err(msg)) => {
                return Err(self.broken(format!("its last line is not a valid record ({msg})")));
            }
            Some(Ok(r)) => {
                if r.computed_hash() != r.hash {
                    return Err(self.broken(format!(
                        "its last record ({}) does not match its hash",
                        r.seq
                    )));
                }
                let at_head = r.seq == hs && r.hash == hh;
                if !at_head && r.seq == hs + 1 && r.prev == hh {
                    let mac_bad = match (r.key_version, r.mac, key) {
                        (Some(v), Some(m), Some(k)) => k.verify(v, &r.hash, &m) == Some(false),
                        (None, _, _) => {
                            EventKind::from_name(&r.event).is_some_and(|k| k.requires_mac())
                        }
                        _ => false,
                    };
                    if mac_bad {
                        return Err(self.broken(format!(
                            "its last record ({}) is one beyond the chain head in the store and its MAC does not verify",
                            r.seq
                        )));
                    }
                    lagging = Some(r.seq);
                } else if !at_head {
                    return Err(self.broken(format!(
                        "the log ends at record {} but the chain head in the store is record {hs}{}",
                        r.seq,
                        if r.seq == hs { " with another hash" } else { "" }
                    )));
                }
                Tail {
                    seq: r.seq,
                    hash: r.hash,
                    pending_attest_from: pending,
                }
            }
        };
        if let Some(torn) = report.torn_tail {
            let removed = self.cut_torn_tail(torn)?;
            let f = fields([
                (
                    "reason",
                    "torn last line removed (an append interrupted by a crash)".into(),
                ),
                ("offset", torn.offset.to_string()),
                ("removed_bytes", torn.len.to_string()),
                ("removed_sha256", removed),
            ]);
            self.write_record(&mut tail, EventKind::LogRepaired, f, key)?;
        }
        if let Some(seq) = lagging {
            let f = fields([
                (
                    "reason",
                    "chain head in the store caught up (it was one record behind the log)"
                        .to_string(),
                ),
                ("record", seq.to_string()),
                ("head_was", hs.to_string()),
            ]);
            self.write_record(&mut tail, EventKind::LogRepaired, f, key)?;
        }
        Ok(tail)
    }

    /// Truncates the log to `torn.offset` (fsynced); returns the SHA-256 (hex) of what was cut.
    fn cut_torn_tail(&self, torn: TornTail) -> Result<String, AuditError> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(self.io())?;
        f.seek(SeekFrom::Start(torn.offset)).map_err(self.io())?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f.read(&mut buf).map_err(self.io())?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        f.set_len(torn.offset).map_err(self.io())?;
        f.sync_all().map_err(self.io())?;
        Ok(hash_hex(&hasher.finalize().into()))
    }

    /// Writes the record that continues `tail`, fsyncs it, moves the store's head to it.
    fn write_record(
        &self,
        tail: &mut Tail,
        kind: EventKind,
        fields: Fields,
        key: Option<&AuditKey>,
    ) -> Result<u64, AuditError> {
        let seq = tail.seq + 1;
        let time_unix = now_unix();
        let key_version = key.map(AuditKey::current_version);
        let event = kind.name().to_string();
        let hash = hash_of(seq, time_unix, key_version, &event, &fields, &tail.hash);
        let rec = Record {
            seq,
            time_unix,
            event,
            fields,
            key_version,
            prev: tail.hash,
            hash,
            mac: key.map(|k| k.mac(&hash)),
        };
        let mut line = rec.to_json();
        if line.len() > MAX_LINE_LEN {
            return Err(AuditError::Invalid(format!(
                "record of {} bytes, longer than the limit of {MAX_LINE_LEN}",
                line.len()
            )));
        }
        line.push('\n');
        let created = !self.path.exists();
        let mut f: File = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(LOG_MODE)
            .open(&self.path)
            .map_err(self.io())?;
        f.write_all(line.as_bytes()).map_err(self.io())?;
        f.sync_data().map_err(self.io())?;
        if created && let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io())?;
        }
        self.store.put_audit_head(seq, &hash)?;
        tail.seq = seq;
        tail.hash = hash;
        if kind == EventKind::Attest {
            tail.pending_attest_from = None;
        } else if key.is_none() {
            tail.pending_attest_from.get_or_insert(seq);
        }
        Ok(seq)
    }

    /// Sets a broken log aside (renamed `audit.log.broken-<unix time>`) and starts a new one
    /// whose first record, a MAC'd `log-repaired`, names the old file, its SHA-256, the old
    /// chain head and the problem. Refused when the log verifies under `key`.
    pub fn restart(&self, key: &AuditKey) -> Result<Restarted, AuditError> {
        let mut guard = self.lock();
        *guard = None;
        let report = self.check(Some(key))?.report;
        let Some(broken) = report.first_broken else {
            return Err(AuditError::NotBroken {
                path: self.path.clone(),
                records: report.records,
            });
        };
        let problem = broken.to_string();
        let mut old = self
            .path
            .with_extension(format!("log.broken-{}", now_unix()));
        let mut n = 1;
        while old.exists() {
            n += 1;
            old = self
                .path
                .with_extension(format!("log.broken-{}-{n}", now_unix()));
        }
        let old_sha = match fs::read(&self.path) {
            Ok(bytes) => hash_hex(&Sha256::digest(&bytes).into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no file".into(),
            Err(e) => return Err(self.io()(e)),
        };
        if self.path.exists() {
            fs::rename(&self.path, &old).map_err(self.io())?;
        }
        let (hs, hh) = report.head.unwrap_or((0, ZERO_HASH));
        let old_name = old
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut tail = Tail {
            seq: 0,
            hash: ZERO_HASH,
            pending_attest_from: None,
        };
        let f = fields([
            (
                "reason",
                "log restarted: the previous log was set aside".to_string(),
            ),
            ("old_log", old_name),
            ("old_log_sha256", old_sha),
            ("old_head_seq", hs.to_string()),
            ("old_head_hash", hash_hex(&hh)),
            ("problem", problem.clone()),
        ]);
        let seq = self.write_record(&mut tail, EventKind::LogRepaired, f, Some(key))?;
        *guard = Some(tail);
        Ok(Restarted {
            old_log: old,
            problem,
            seq,
        })
    }
}
