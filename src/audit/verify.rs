//! Reading the log line by line, and checking it: seq order, hashes, the `prev` chain, MACs,
//! attestations, and the chain head kept in the metadata store.
//!
//! The checker is fed one line at a time (memory stays at one line, whatever the log's size)
//! and stops judging at the first problem it finds, which it names by seq; it keeps reading to
//! count the lines and, after a seq gap, to tell a moved record from a deleted one.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::path::Path;

use super::record::{HASH_LEN, Record, ZERO_HASH};
use super::{AuditKey, EventKind, MAX_LINE_LEN};
use crate::kms::hex;

/// A last line without its line feed: an append that a crash interrupted (or bytes added by
/// hand). It is not part of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Byte offset where the torn line starts (the length of the log without it).
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What is wrong with the first broken record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The line where this record should be is not a valid record.
    Malformed { line: u64, msg: String },
    /// The next line holds a later record and this one appears nowhere after it.
    Missing { found: u64 },
    /// The next line holds another record, and this one comes later in the log.
    OutOfOrder { found: u64 },
    /// The record's contents do not give its hash.
    HashMismatch,
    /// The record's `prev` is not the hash of the record before it.
    PrevMismatch,
    /// A kind of record that is only written unlocked carries no MAC.
    MacMissing { event: String },
    /// The MAC does not verify under the audit key of its master key version.
    MacInvalid { version: u32 },
    /// The MAC names a master key version that the pool does not have.
    MacUnknownVersion { version: u32 },
    /// An `attest` record whose range is not the records just before it.
    AttestRange { detail: String },
    /// The store's chain head is a later record than the log's last one.
    Truncated { head: u64, last: u64 },
    /// This record is the store's chain head by seq, but its hash differs.
    HeadMismatch,
    /// This record lies beyond the store's chain head (by more than the one record a crash
    /// can leave).
    BeyondHead { head: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Malformed { line, msg } => {
                write!(f, "line {line} is not a valid record ({msg})")
            }
            Problem::Missing { found } => {
                write!(f, "missing (deleted): the next line is record {found}")
            }
            Problem::OutOfOrder { found } => write!(
                f,
                "out of order (reordered): record {found} stands in its place and it comes later"
            ),
            Problem::HashMismatch => write!(f, "hash mismatch (edited)"),
            Problem::PrevMismatch => write!(
                f,
                "prev is not the hash of the record before it (that record was rewritten, or \
                 records were inserted or removed)"
            ),
            Problem::MacMissing { event } => write!(
                f,
                "no MAC on a {event} record, which is only written with the pool unlocked (forged)"
            ),
            Problem::MacInvalid { version } => write!(
                f,
                "MAC does not verify under master key version {version} (forged, or edited with \
                 its hash recomputed)"
            ),
            Problem::MacUnknownVersion { version } => write!(
                f,
                "MAC claims master key version {version}, which this pool does not have (forged)"
            ),
            Problem::AttestRange { detail } => {
                write!(f, "attest record with a bad range: {detail}")
            }
            Problem::Truncated { head, last } => {
                if *last == 0 {
                    write!(
                        f,
                        "missing: the log is empty but the chain head in the store is record {head} (truncated or deleted)"
                    )
                } else {
                    write!(
                        f,
                        "missing: the log ends at record {last} but the chain head in the store is record {head} (truncated)"
                    )
                }
            }
            Problem::HeadMismatch => write!(
                f,
                "does not match the chain head in the store (the log was rewritten, or the store's head altered)"
            ),
            Problem::BeyondHead { head } => write!(
                f,
                "beyond the chain head in the store (record {head}): appended outside shardvol, or the store rolled back"
            ),
        }
    }
}

/// The first broken record and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub seq: u64,
    pub problem: Problem,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {}", self.seq, self.problem)
    }
}

/// What [`super::AuditLog::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete lines read (valid records or not).
    pub records: u64,
    /// Records carrying a MAC.
    pub with_mac: u64,
    /// MACs checked and found valid (0 when no key was given).
    pub macs_checked: u64,
    /// MACs that could not be checked: made under a master key version that the pool still
    /// lists but that is not loaded (archived or destroyed). Later MACs cover them (the chain).
    pub macs_unverifiable: u64,
    /// Records written sealed (no MAC).
    pub sealed: u64,
    /// Sealed records after the last `attest` record: not vouched for yet.
    pub unattested: u64,
    /// The chain head in the store: (seq, hash).
    pub head: Option<(u64, [u8; HASH_LEN])>,
    /// The log holds one record beyond the store's head (a crash between the two writes).
    pub head_lag: bool,
    pub torn_tail: Option<TornTail>,
    pub first_broken: Option<Broken>,
}

impl VerifyReport {
    /// True when no problem was found (a torn tail and a head one record behind are the traces
    /// of a crash, not problems).
    pub fn intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// One complete line of the log.
pub(crate) enum Item {
    Rec(Record),
    Bad { line: u64, msg: String },
}

/// Where a scan ended.
pub(crate) struct ScanEnd {
    pub torn: Option<TornTail>,
}

/// Reads `path` line by line, handing each complete line to `f`. A missing file is an empty
/// log. Lines longer than [`MAX_LINE_LEN`] are reported as bad without being held in memory.
pub(crate) fn scan(path: &Path, mut f: impl FnMut(Item)) -> io::Result<ScanEnd> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(ScanEnd { torn: None }),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::new(file);
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut line = 0u64;
    let cap = MAX_LINE_LEN as u64 + 1;
    loop {
        buf.clear();
        let n = (&mut r).take(cap).read_until(b'\n', &mut buf)? as u64;
        if n == 0 {
            return Ok(ScanEnd { torn: None });
        }
        if buf.last() == Some(&b'\n') {
            line += 1;
            buf.pop();
            f(match Record::from_json(&buf) {
                Ok(rec) => Item::Rec(rec),
                Err(msg) => Item::Bad { line, msg },
            });
            offset += n;
            continue;
        }
        if n < cap {
            return Ok(ScanEnd {
                torn: Some(TornTail { offset, len: n }),
            });
        }
        // An over-long line: skip to its end without keeping it.
        let mut len = n;
        let ended = loop {
            buf.clear();
            let m = (&mut r).take(cap).read_until(b'\n', &mut buf)? as u64;
            len += m;
            if m == 0 {
                break false;
            }
            if buf.last() == Some(&b'\n') {
                break true;
            }
        };
        if !ended {
            return Ok(ScanEnd {
                torn: Some(TornTail { offset, len }),
            });
        }
        line += 1;
        f(Item::Bad {
            line,
            msg: format!("{len} bytes, longer than the limit of {MAX_LINE_LEN}"),
        });
        offset += len;
    }
}

/// What a check found: the report, the last complete line, and the first sealed seq after the
/// last `attest` record.
pub(crate) struct Checked {
    pub report: VerifyReport,
    pub last: Option<Result<Record, String>>,
    pub pending_attest_from: Option<u64>,
}

/// The streaming checker behind `verify` (and behind the check an append makes first).
pub(crate) struct Checker<'a> {
    key: Option<&'a AuditKey>,
    /// Master key versions listed in the store (any state).
    known: BTreeSet<u32>,
    expected: u64,
    prev: [u8; HASH_LEN],
    /// Hash of the record whose seq is the head's, met while the chain was intact.
    head_hash_seen: Option<[u8; HASH_LEN]>,
    /// After a seq gap: the seq looked for further on, to tell "moved" from "deleted".
    looking_for: Option<u64>,
    report: VerifyReport,
    /// The last complete line, parsed or not.
    last: Option<Result<Record, String>>,
    /// First sealed seq after the last `attest` record.
    pending_attest_from: Option<u64>,
}

impl<'a> Checker<'a> {
    pub fn new(
        key: Option<&'a AuditKey>,
        known: BTreeSet<u32>,
        head: Option<(u64, [u8; HASH_LEN])>,
    ) -> Self {
        Self {
            key,
            known,
            expected: 1,
            prev: ZERO_HASH,
            head_hash_seen: None,
            looking_for: None,
            report: VerifyReport {
                head,
                ..VerifyReport::default()
            },
            last: None,
            pending_attest_from: None,
        }
    }

    fn broken(&mut self, seq: u64, problem: Problem) {
        if self.report.first_broken.is_none() {
            self.report.first_broken = Some(Broken { seq, problem });
        }
    }

    pub fn feed(&mut self, item: Item) {
        self.report.records += 1;
        let rec = match item {
            Item::Bad { line, msg } => {
                self.last = Some(Err(format!("line {line}: {msg}")));
                let seq = self.expected;
                self.broken(seq, Problem::Malformed { line, msg });
                return;
            }
            Item::Rec(rec) => rec,
        };
        if rec.mac.is_some() {
            self.report.with_mac += 1;
        } else {
            self.report.sealed += 1;
        }
        if self.report.first_broken.is_some() {
            if self.looking_for == Some(rec.seq)
                && let Some(b) = &mut self.report.first_broken
                && let Problem::Missing { found } = b.problem
            {
                b.problem = Problem::OutOfOrder { found };
            }
            self.last = Some(Ok(rec));
            return;
        }
        self.check(&rec);
        self.last = Some(Ok(rec));
    }

    fn check(&mut self, rec: &Record) {
        let seq = rec.seq;
        if seq != self.expected {
            let expected = self.expected;
            if seq > expected {
                self.looking_for = Some(expected);
                self.broken(expected, Problem::Missing { found: seq });
            } else {
                self.broken(expected, Problem::OutOfOrder { found: seq });
            }
            return;
        }
        if rec.computed_hash() != rec.hash {
            return self.broken(seq, Problem::HashMismatch);
        }
        if rec.prev != self.prev {
            return self.broken(seq, Problem::PrevMismatch);
        }
        let kind = EventKind::from_name(&rec.event);
        match (rec.key_version, rec.mac) {
            (Some(version), Some(mac)) => {
                if let Some(key) = self.key {
                    match key.verify(version, &rec.hash, &mac) {
                        Some(true) => self.report.macs_checked += 1,
                        Some(false) => return self.broken(seq, Problem::MacInvalid { version }),
                        None if self.known.contains(&version) => self.report.macs_unverifiable += 1,
                        None => return self.broken(seq, Problem::MacUnknownVersion { version }),
                    }
                } else if !self.known.contains(&version) {
                    return self.broken(seq, Problem::MacUnknownVersion { version });
                }
            }
            _ => {
                if kind.is_some_and(|k| k.requires_mac()) {
                    let event = rec.event.clone();
                    return self.broken(seq, Problem::MacMissing { event });
                }
                self.report.unattested += 1;
                self.pending_attest_from.get_or_insert(seq);
            }
        }
        if kind == Some(EventKind::Attest) {
            if let Err(detail) = attest_range(rec) {
                return self.broken(seq, Problem::AttestRange { detail });
            }
            self.report.unattested = 0;
            self.pending_attest_from = None;
        }
        if self.report.head.is_some_and(|(hs, _)| hs == seq) {
            self.head_hash_seen = Some(rec.hash);
        }
        self.prev = rec.hash;
        self.expected += 1;
    }

    /// Compares the intact chain with the store's head and records the torn tail.
    pub fn finish(mut self, end: &ScanEnd) -> Checked {
        self.report.torn_tail = end.torn;
        if self.report.first_broken.is_none() {
            let last = self.expected - 1;
            let (hs, hh) = self.report.head.unwrap_or((0, ZERO_HASH));
            if last < hs {
                self.broken(last + 1, Problem::Truncated { head: hs, last });
            } else if hs > 0 && self.head_hash_seen != Some(hh) {
                self.broken(hs, Problem::HeadMismatch);
            } else if last == hs + 1 {
                self.report.head_lag = true;
            } else if last > hs + 1 {
                self.broken(hs + 2, Problem::BeyondHead { head: hs });
            }
        }
        Checked {
            report: self.report,
            last: self.last,
            pending_attest_from: self.pending_attest_from,
        }
    }
}

/// Checks an `attest` record's `from` and `to`: `1 <= from <= to = seq - 1`.
fn attest_range(rec: &Record) -> Result<(), String> {
    let get = |name: &str| -> Result<u64, String> {
        rec.fields
            .get(name)
            .ok_or_else(|| format!("no {name:?} field"))?
            .parse::<u64>()
            .map_err(|_| format!("{name:?} is not a number"))
    };
    let (from, to) = (get("from")?, get("to")?);
    if from == 0 || from > to || to + 1 != rec.seq {
        return Err(format!(
            "from {from} to {to} in record {} (it must end at the record before it)",
            rec.seq
        ));
    }
    Ok(())
}

/// Lower-case hex of a hash, for messages and fields.
pub fn hash_hex(h: &[u8; HASH_LEN]) -> String {
    hex::encode(h)
}
