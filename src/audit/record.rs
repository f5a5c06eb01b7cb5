//! One audit record: its canonical encoding, its hash, its MAC, and its JSON line.
//!
//! ```text
//! canonical = "shardvol/audit/1"            16 bytes, the encoding's domain and version
//!           ‖ seq          u64 BE
//!           ‖ time_unix    u64 BE
//!           ‖ key_version  u32 BE            0 when the record has no MAC
//!           ‖ len(event)   u32 BE ‖ event    UTF-8
//!           ‖ n(fields)    u32 BE
//!           ‖ for each field, keys in byte order: len(key) u32 BE ‖ key ‖ len(value) u32 BE ‖ value
//!           ‖ prev         32 bytes
//! hash      = SHA-256(canonical)
//! mac       = BLAKE3-keyed(audit key of key_version, hash ‖ le64(0))
//! ```
//!
//! Every variable-length part is preceded by its length and every other part has a fixed width,
//! so two different records never share a canonical encoding: the hash does not depend on how
//! the JSON line happens to be written (key order, spacing, escapes). The MAC input is the
//! 32-byte hash followed by the empty header of [`TagKey::tag`] (eight zero bytes); the key is
//! used for nothing else.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::TagKey;
use crate::kms::hex;

/// First 16 bytes of every canonical encoding: the format's domain label and version.
pub const ENCODING_LABEL: [u8; 16] = *b"shardvol/audit/1";
/// Length of a hash, a `prev` and a MAC.
pub const HASH_LEN: usize = 32;
/// `prev` of the first record.
pub const ZERO_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

/// A record's fields: names to values, kept sorted by name (the canonical order).
pub type Fields = BTreeMap<String, String>;

/// One record of the audit log, as read back and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 1 for the first record, then consecutive.
    pub seq: u64,
    /// Seconds since the Unix epoch, from the appending host's clock (informative: clocks step,
    /// so order is given by `seq`, never by time).
    pub time_unix: u64,
    /// The event kind's stable name (`EventKind::name`); unknown names are kept as they are.
    pub event: String,
    pub fields: Fields,
    /// Master key version whose audit key made `mac`; `None` for a record written sealed.
    pub key_version: Option<u32>,
    pub prev: [u8; HASH_LEN],
    pub hash: [u8; HASH_LEN],
    pub mac: Option<[u8; HASH_LEN]>,
}

/// The JSON line: field order fixed by this struct, hashes in lower-case hex.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    time_unix: u64,
    event: String,
    fields: Fields,
    key_version: Option<u32>,
    prev: String,
    hash: String,
    mac: Option<String>,
}

/// The canonical, length-prefixed encoding that the hash covers (see the module docs).
pub fn canonical(
    seq: u64,
    time_unix: u64,
    key_version: Option<u32>,
    event: &str,
    fields: &Fields,
    prev: &[u8; HASH_LEN],
) -> Vec<u8> {
    let size = 16
        + 8
        + 8
        + 4
        + 4
        + event.len()
        + 4
        + fields
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
        + HASH_LEN;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&ENCODING_LABEL);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&time_unix.to_be_bytes());
    out.extend_from_slice(&key_version.unwrap_or(0).to_be_bytes());
    put_bytes(&mut out, event.as_bytes());
    out.extend_from_slice(&len32(fields.len()).to_be_bytes());
    for (k, v) in fields {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    out.extend_from_slice(prev);
    out
}

/// Lengths are bounded far below 4 GiB by the writer and by the line length limit of the
/// reader; saturating keeps the function total all the same.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&len32(b.len()).to_be_bytes());
    out.extend_from_slice(b);
}

/// SHA-256 of the canonical encoding.
pub fn hash_of(
    seq: u64,
    time_unix: u64,
    key_version: Option<u32>,
    event: &str,
    fields: &Fields,
    prev: &[u8; HASH_LEN],
) -> [u8; HASH_LEN] {
    Sha256::digest(canonical(seq, time_unix, key_version, event, fields, prev)).into()
}

/// The MAC of a record hash under an audit key.
pub fn mac_of(key: &TagKey, hash: &[u8; HASH_LEN]) -> [u8; HASH_LEN] {
    key.tag(&[], hash)
}

/// Whether `mac` is the MAC of `hash` under `key` (constant-time comparison).
pub fn mac_ok(key: &TagKey, hash: &[u8; HASH_LEN], mac: &[u8; HASH_LEN]) -> bool {
    key.verify(&[], hash, mac).is_ok()
}

impl Record {
    /// The hash this record's contents give (to compare with [`Record::hash`]).
    pub fn computed_hash(&self) -> [u8; HASH_LEN] {
        hash_of(
            self.seq,
            self.time_unix,
            self.key_version,
            &self.event,
            &self.fields,
            &self.prev,
        )
    }

    /// The record as one JSON line, without the line feed.
    pub fn to_json(&self) -> String {
        let line = Line {
            seq: self.seq,
            time_unix: self.time_unix,
            event: self.event.clone(),
            fields: self.fields.clone(),
            key_version: self.key_version,
            prev: hex::encode(&self.prev),
            hash: hex::encode(&self.hash),
            mac: self.mac.map(|m| hex::encode(&m)),
        };
        // A struct of integers, strings and a string map always serialises.
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// Parses one JSON line (without its line feed). The error says what is wrong.
    pub fn from_json(text: &[u8]) -> Result<Self, String> {
        let line: Line = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let h = |name: &str, s: &str| {
            hex::decode_array::<HASH_LEN>(s).map_err(|e| format!("{name}: {e}"))
        };
        if line.event.is_empty() {
            return Err("event is empty".into());
        }
        let mac = line.mac.as_deref().map(|m| h("mac", m)).transpose()?;
        match (line.key_version, mac) {
            (Some(0), _) => return Err("key_version 0 (master versions start at 1)".into()),
            (Some(_), None) => return Err("key_version without a mac".into()),
            (None, Some(_)) => return Err("mac without a key_version".into()),
            _ => {}
        }
        Ok(Self {
            seq: line.seq,
            time_unix: line.time_unix,
            event: line.event,
            fields: line.fields,
            key_version: line.key_version,
            prev: h("prev", &line.prev)?,
            hash: h("hash", &line.hash)?,
            mac,
        })
    }
}

/// `YYYY-MM-DD hh:mm:ssZ` (UTC) of a Unix time, for `shardvol audit show`.
pub fn format_time_utc(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(i64::MAX / 2);
    let secs = unix % 86_400;
    // Civil date from a day count (H. Hinnant's algorithm, proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn canonical_encoding_matches_its_byte_table() {
        let prev = [0xAB; 32];
        let enc = canonical(
            0x0102,
            0x0304,
            Some(7),
            "unlock",
            &fields(&[("b", "2"), ("a", "xy")]),
            &prev,
        );
        let mut want = Vec::new();
        want.extend_from_slice(b"shardvol/audit/1");
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0x02]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x03, 0x04]);
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 6]);
        want.extend_from_slice(b"unlock");
        want.extend_from_slice(&[0, 0, 0, 2]);
        // Keys in byte order: "a" before "b", whatever order they were given in.
        want.extend_from_slice(&[0, 0, 0, 1, b'a', 0, 0, 0, 2, b'x', b'y']);
        want.extend_from_slice(&[0, 0, 0, 1, b'b', 0, 0, 0, 1, b'2']);
        want.extend_from_slice(&prev);
        assert_eq!(enc, want);
        assert_eq!(enc.len(), 16 + 8 + 8 + 4 + 4 + 6 + 4 + 11 + 10 + 32);
    }

    #[test]
    fn no_mac_encodes_key_version_zero() {
        let enc = canonical(1, 2, None, "e", &Fields::new(), &ZERO_HASH);
        assert_eq!(&enc[32..36], &[0, 0, 0, 0]);
        assert_ne!(
            hash_of(1, 2, None, "e", &Fields::new(), &ZERO_HASH),
            hash_of(1, 2, Some(1), "e", &Fields::new(), &ZERO_HASH)
        );
    }

    #[test]
    fn length_prefixes_keep_shifted_boundaries_apart() {
        // The same bytes split differently between key and value, or between event and a
        // field, must hash differently.
        let a = hash_of(1, 0, None, "e", &fields(&[("ab", "c")]), &ZERO_HASH);
        let b = hash_of(1, 0, None, "e", &fields(&[("a", "bc")]), &ZERO_HASH);
        assert_ne!(a, b);
        let c = hash_of(1, 0, None, "ea", &fields(&[("b", "")]), &ZERO_HASH);
        let d = hash_of(1, 0, None, "e", &fields(&[("ab", "")]), &ZERO_HASH);
        assert_ne!(c, d);
        // One field holding "k=v" is not two fields.
        let e = hash_of(
            1,
            0,
            None,
            "e",
            &fields(&[("a", "1"), ("b", "2")]),
            &ZERO_HASH,
        );
        let f = hash_of(1, 0, None, "e", &fields(&[("a", "1b2")]), &ZERO_HASH);
        assert_ne!(e, f);
    }

    #[test]
    fn hash_is_sha256_of_the_encoding_and_every_part_counts() {
        let fl = fields(&[("volume", "vol0")]);
        let base = hash_of(5, 100, Some(1), "rotate", &fl, &[1; 32]);
        let enc = canonical(5, 100, Some(1), "rotate", &fl, &[1; 32]);
        let direct: [u8; 32] = Sha256::digest(&enc).into();
        assert_eq!(base, direct);
        let variants = [
            hash_of(6, 100, Some(1), "rotate", &fl, &[1; 32]),
            hash_of(5, 101, Some(1), "rotate", &fl, &[1; 32]),
            hash_of(5, 100, Some(2), "rotate", &fl, &[1; 32]),
            hash_of(5, 100, Some(1), "rotatE", &fl, &[1; 32]),
            hash_of(
                5,
                100,
                Some(1),
                "rotate",
                &fields(&[("volume", "vol1")]),
                &[1; 32],
            ),
            hash_of(5, 100, Some(1), "rotate", &fl, &[2; 32]),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
    }

    #[test]
    fn json_line_round_trips_and_key_order_does_not_matter() {
        let fl = fields(&[("z", "last"), ("a", "first \"quoted\"\nnewline")]);
        let hash = hash_of(3, 9, Some(2), "seal", &fl, &[4; 32]);
        let r = Record {
            seq: 3,
            time_unix: 9,
            event: "seal".into(),
            fields: fl,
            key_version: Some(2),
            prev: [4; 32],
            hash,
            mac: Some([5; 32]),
        };
        let line = r.to_json();
        assert!(!line.contains('\n'), "one record, one line");
        assert_eq!(Record::from_json(line.as_bytes()).unwrap(), r);
        // The same record with its JSON keys in another order still parses to the same record
        // and the same hash.
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let obj = v.as_object().unwrap();
        let mut parts: Vec<String> = obj
            .iter()
            .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
            .collect();
        parts.reverse();
        let shuffled = format!("{{{}}}", parts.join(" , "));
        let back = Record::from_json(shuffled.as_bytes()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.computed_hash(), r.hash);
    }

    #[test]
    fn malformed_lines_are_refused_with_a_reason() {
        let ok = Record {
            seq: 1,
            time_unix: 0,
            event: "unlock".into(),
            fields: Fields::new(),
            key_version: None,
            prev: ZERO_HASH,
            hash: ZERO_HASH,
            mac: None,
        }
        .to_json();
        assert!(Record::from_json(ok.as_bytes()).is_ok());
        let cases = [
            (
                ok.replace("\"mac\":null", "\"mac\":null,\"x\":1"),
                "unknown",
            ),
            (
                ok.replace("\"key_version\":null", "\"key_version\":3"),
                "without a mac",
            ),
            (ok.replace(&"0".repeat(64), &"0".repeat(63)), "hex digits"),
            (ok.replace("\"unlock\"", "\"\""), "empty"),
            ("{\"seq\":".to_string(), "not JSON"),
        ];
        for (text, want) in cases {
            let err = Record::from_json(text.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn mac_depends_on_key_and_hash() {
        let k1 = TagKey::from_bytes([1; 32]);
        let k2 = TagKey::from_bytes([2; 32]);
        let m = mac_of(&k1, &[9; 32]);
        assert!(mac_ok(&k1, &[9; 32], &m));
        assert!(!mac_ok(&k2, &[9; 32], &m));
        assert!(!mac_ok(&k1, &[8; 32], &m));
        // The documented construction: keyed BLAKE3 over hash ‖ le64(0).
        let mut input = vec![9u8; 32];
        input.extend_from_slice(&[0; 8]);
        assert_eq!(m, *blake3::keyed_hash(&[1; 32], &input).as_bytes());
    }

    #[test]
    fn utc_times_format() {
        assert_eq!(format_time_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time_utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_time_utc(1_700_000_000), "2023-11-14 22:13:20Z");
    }
}
