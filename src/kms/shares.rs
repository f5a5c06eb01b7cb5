//! Shamir shares of the KEK: split, combine, and the share file format (`docs/keys.md`).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use blahaj::Sharks;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use super::{KEK_LEN, Kek, KmsError, LoadedShare, Share, hex};

/// First line of every share file; the number is the format version.
pub const SHARE_FILE_VERSION_LINE: &str = "shardvol-share v1";

/// Largest share file accepted by [`load_share_file`]. A v1 file is about 300 bytes; the limit
/// only keeps a wrong path (a disk image, a log) from being read whole into memory.
pub const SHARE_FILE_MAX_LEN: u64 = 4096;

/// Bytes of SHA-256 kept as the share file checksum: enough to catch any typing or transmission
/// error (a 2^-64 miss rate); it is not a MAC (a forger recomputes it), see [`combine`].
const CHECKSUM_LEN: usize = 8;

/// Mode of share files: readable by their holder only.
const SHARE_FILE_MODE: u32 = 0o600;
/// Mode of a share directory that [`write_share_files`] creates.
const SHARE_DIR_MODE: u32 = 0o700;

/// Checks split parameters: `1 <= threshold <= count <= 255`, and `threshold >= 2` unless
/// `count == 1`. A threshold of 1 with several shares would make every share a full copy of the
/// KEK, which defeats splitting; a single share (1 of 1) is allowed for tests and single-operator
/// pools and says what it is.
pub fn validate_split_params(count: u8, threshold: u8) -> Result<(), KmsError> {
    if count == 0 {
        return Err(KmsError::Share("share count must be at least 1".into()));
    }
    if threshold == 0 {
        return Err(KmsError::Share("threshold must be at least 1".into()));
    }
    if threshold > count {
        return Err(KmsError::Share(format!(
            "threshold {threshold} is larger than the share count {count}: the pool could never be unlocked"
        )));
    }
    if threshold == 1 && count > 1 {
        return Err(KmsError::Share(format!(
            "threshold 1 with {count} shares would make every share a full copy of the key; \
             use a threshold of at least 2, or a single share (1 of 1)"
        )));
    }
    Ok(())
}

/// Splits `kek` into `count` shares, any `threshold` of which recover it. Every call draws a new
/// random split id, so the shares of two splits never combine.
pub fn split(
    kek: &Kek,
    pool_id: [u8; 16],
    count: u8,
    threshold: u8,
) -> Result<Vec<Share>, KmsError> {
    validate_split_params(count, threshold)?;
    let mut split_id = [0u8; 16];
    rand::fill(&mut split_id[..]);
    let mut shares = Vec::with_capacity(usize::from(count));
    for point in Sharks(threshold)
        .dealer(kek.expose())
        .take(usize::from(count))
    {
        // blahaj's byte form of a share is x ‖ y; x runs 1, 2, … and is the share index.
        let bytes = Zeroizing::new(Vec::from(&point));
        let mut secret = [0u8; KEK_LEN];
        secret.copy_from_slice(&bytes[1..]);
        shares.push(Share::from_parts(
            pool_id, split_id, bytes[0], threshold, count, secret,
        ));
        secret.zeroize();
    }
    Ok(shares)
}

/// Recovers the KEK from `shares` for the pool `pool_id` whose current split is `split_id` with
/// threshold `threshold` (from the pool record).
///
/// Refuses, naming the file(s): a share of another pool, a share of another split, a threshold
/// that differs from the pool's, two shares with the same index (or one file given twice), and
/// fewer than `threshold` shares. Every share given is used in the interpolation, so one forged
/// share among them changes the result; only [`super::unwrap_master`] can tell (it returns
/// [`KmsError::WrongKek`]).
pub fn combine(
    shares: &[LoadedShare],
    pool_id: [u8; 16],
    split_id: [u8; 16],
    threshold: u8,
) -> Result<Kek, KmsError> {
    if threshold == 0 {
        return Err(KmsError::Share(
            "the pool's threshold is 0 (damaged pool record)".into(),
        ));
    }
    for ls in shares {
        check_share(ls, pool_id, split_id, threshold)?;
    }
    for (i, later) in shares.iter().enumerate() {
        if let Some(earlier) = shares[..i]
            .iter()
            .find(|e| e.share.index == later.share.index)
        {
            return Err(KmsError::DuplicateShare {
                first: earlier.source.clone(),
                second: later.source.clone(),
                index: later.share.index,
            });
        }
    }
    if shares.len() < usize::from(threshold) {
        return Err(KmsError::TooFewShares {
            given: shares.len(),
            needed: threshold,
        });
    }

    let mut points = Vec::with_capacity(shares.len());
    for ls in shares {
        let mut bytes = Zeroizing::new(Vec::with_capacity(1 + KEK_LEN));
        bytes.push(ls.share.index);
        bytes.extend_from_slice(ls.share.secret());
        let point = blahaj::Share::try_from(&bytes[..])
            .map_err(|e| KmsError::Share(format!("{}: {e}", ls.source)))?;
        points.push(point);
    }
    let secret = Zeroizing::new(
        Sharks(threshold)
            .recover(&points)
            .map_err(|e| KmsError::Share(format!("the shares do not combine: {e}")))?,
    );
    if secret.len() != KEK_LEN {
        return Err(KmsError::Share(format!(
            "the shares combine to {} bytes, a key is {KEK_LEN}",
            secret.len()
        )));
    }
    let mut k = [0u8; KEK_LEN];
    k.copy_from_slice(&secret);
    let kek = Kek::from_bytes(k);
    k.zeroize();
    Ok(kek)
}

/// Checks one share on its own against the pool: its pool, its split and its threshold. Used
/// by [`combine`] and by an unlock that receives shares one at a time.
pub fn check_share(
    ls: &LoadedShare,
    pool_id: [u8; 16],
    split_id: [u8; 16],
    threshold: u8,
) -> Result<(), KmsError> {
    let s = &ls.share;
    if s.pool_id != pool_id {
        return Err(KmsError::ForeignPool {
            file: ls.source.clone(),
            found: hex::encode(&s.pool_id),
            expected: hex::encode(&pool_id),
        });
    }
    if s.split_id != split_id {
        return Err(KmsError::OtherSplit {
            file: ls.source.clone(),
            found: hex::encode(&s.split_id),
            expected: hex::encode(&split_id),
        });
    }
    if s.threshold != threshold {
        return Err(KmsError::ThresholdMismatch {
            file: ls.source.clone(),
            found: s.threshold,
            expected: threshold,
        });
    }
    Ok(())
}

/// File name of share `index`: `share-<index>.txt`.
pub fn share_file_name(index: u8) -> String {
    format!("share-{index}.txt")
}

/// The canonical text of the fields, the input of the checksum. Holds the secret: wiped on drop.
fn canonical_fields(s: &Share) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "{SHARE_FILE_VERSION_LINE}\npool: {}\nsplit: {}\nindex: {}\nthreshold: {}\ncount: {}\nsecret: {}\n",
        hex::encode(&s.pool_id),
        hex::encode(&s.split_id),
        s.index,
        s.threshold,
        s.count,
        Zeroizing::new(hex::encode(s.secret())).as_str(),
    ))
}

fn checksum(s: &Share) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(canonical_fields(s).as_bytes());
    let mut c = [0u8; CHECKSUM_LEN];
    c.copy_from_slice(&digest[..CHECKSUM_LEN]);
    c
}

/// The text of a share file: the canonical fields, a comment for the holder, the checksum.
/// Holds the secret: wiped on drop.
pub fn encode_share_file(s: &Share) -> Zeroizing<String> {
    let fields = canonical_fields(s);
    let (version_line, rest) = fields.split_once('\n').unwrap_or((fields.as_str(), ""));
    Zeroizing::new(format!(
        "{version_line}\n\
         # Share {} of {} of the key of shardvol pool {}; any {} shares unlock the pool.\n\
         # Keep this file private. It is checked by the checksum below: do not edit it.\n\
         {rest}checksum: {}\n",
        s.index,
        s.count,
        hex::encode(&s.pool_id),
        s.threshold,
        hex::encode(&checksum(s)),
    ))
}

/// Parses the text of a share file; `source` (usually the path) names it in every error.
///
/// Accepts LF or CRLF line ends, a leading byte-order mark, blank lines and `#` comment lines anywhere after the first line,
/// fields in any order, hex in either case. Refuses a missing, repeated or unknown field, a value
/// out of range, and a checksum that does not match the fields.
pub fn parse_share_file(text: &str, source: &Path) -> Result<Share, KmsError> {
    let err = |msg: String| KmsError::ShareFile {
        path: source.to_path_buf(),
        msg,
    };
    // A byte-order mark, as some editors add, is not part of the first line.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().map(str::trim);
    match lines.next() {
        Some(SHARE_FILE_VERSION_LINE) => {}
        Some(l) if l.starts_with("shardvol-share v") => {
            return Err(err(format!(
                "format {:?} is not supported by this version (it reads {SHARE_FILE_VERSION_LINE:?})",
                l
            )));
        }
        _ => {
            return Err(err(format!(
                "not a shardvol share file (the first line is not {SHARE_FILE_VERSION_LINE:?})"
            )));
        }
    }

    const FIELDS: [&str; 7] = [
        "pool",
        "split",
        "index",
        "threshold",
        "count",
        "secret",
        "checksum",
    ];
    let mut values: [Option<&str>; 7] = [None; 7];
    for (n, line) in lines.enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line_no = n + 2;
        let Some((key, value)) = line.split_once(':') else {
            return Err(err(format!("line {line_no}: expected \"field: value\"")));
        };
        let key = key.trim();
        let Some(slot) = FIELDS.iter().position(|f| *f == key) else {
            return Err(err(format!("line {line_no}: unknown field {key:?}")));
        };
        if values[slot].is_some() {
            return Err(err(format!("line {line_no}: field {key:?} appears twice")));
        }
        values[slot] = Some(value.trim());
    }
    let field =
        |i: usize| values[i].ok_or_else(|| err(format!("field {:?} is missing", FIELDS[i])));
    let number = |i: usize| -> Result<u8, KmsError> {
        field(i)?.parse::<u8>().map_err(|_| {
            err(format!(
                "field {:?} must be a number from 0 to 255",
                FIELDS[i]
            ))
        })
    };

    let pool_id =
        hex::decode_array::<16>(field(0)?).map_err(|e| err(format!("field \"pool\": {e}")))?;
    let split_id =
        hex::decode_array::<16>(field(1)?).map_err(|e| err(format!("field \"split\": {e}")))?;
    let index = number(2)?;
    let threshold = number(3)?;
    let count = number(4)?;
    let mut secret = hex::decode_array::<KEK_LEN>(field(5)?)
        .map_err(|e| err(format!("field \"secret\": {e}")))?;
    let share = Share::from_parts(pool_id, split_id, index, threshold, count, secret);
    secret.zeroize();
    let stored = hex::decode_array::<CHECKSUM_LEN>(field(6)?)
        .map_err(|e| err(format!("field \"checksum\": {e}")))?;

    if stored != checksum(&share) {
        return Err(err("checksum mismatch (corrupted or edited)".into()));
    }
    validate_split_params(count, threshold).map_err(|e| err(e.to_string()))?;
    if index == 0 || index > count {
        return Err(err(format!("index {index} is outside 1..={count}")));
    }
    Ok(share)
}

/// Reads and checks one share file. Every error names the file.
pub fn load_share_file(path: &Path) -> Result<LoadedShare, KmsError> {
    let err = |msg: String| KmsError::ShareFile {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut raw = Zeroizing::new(Vec::new());
    file.take(SHARE_FILE_MAX_LEN + 1)
        .read_to_end(&mut raw)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if raw.len() as u64 > SHARE_FILE_MAX_LEN {
        return Err(err(format!(
            "larger than {SHARE_FILE_MAX_LEN} bytes: not a share file"
        )));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| err("not a text file".into()))?;
    let share = parse_share_file(text, path)?;
    Ok(LoadedShare {
        source: path.display().to_string(),
        share,
    })
}

/// Writes one file per share, `share-<index>.txt` in `dir`, mode 0600, and returns their paths.
///
/// Creates `dir` with mode 0700 if it does not exist (an existing directory keeps its mode).
/// Never overwrites: if any target file exists, nothing is written and the error names it. The
/// files and the directory are fsynced before returning. If writing fails part way, the files
/// already written stay (each is complete or caught by its checksum).
pub fn write_share_files(dir: &Path, shares: &[Share]) -> Result<Vec<PathBuf>, KmsError> {
    for (i, s) in shares.iter().enumerate() {
        if shares[..i].iter().any(|e| e.index == s.index) {
            return Err(KmsError::Share(format!(
                "two shares with index {} to write",
                s.index
            )));
        }
    }
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(KmsError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    "exists and is not a directory",
                ),
            });
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(SHARE_DIR_MODE)
                .create(dir)
                .map_err(|source| KmsError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Err(source) => {
            return Err(KmsError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    }

    let paths: Vec<PathBuf> = shares
        .iter()
        .map(|s| dir.join(share_file_name(s.index)))
        .collect();
    let exists = |path: &Path| {
        KmsError::ShareFile {
        path: path.to_path_buf(),
        msg: "already exists; refusing to overwrite a share (move it away or choose another directory)"
            .into(),
    }
    };
    for path in &paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(exists(path));
        }
    }
    for (s, path) in shares.iter().zip(&paths) {
        let io = |source: std::io::Error| KmsError::Io {
            path: path.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SHARE_FILE_MODE)
            .open(path)
            .map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    exists(path)
                } else {
                    io(e)
                }
            })?;
        // The umask can only clear bits of the mode; set it exactly in case it cleared 0600's.
        f.set_permissions(fs::Permissions::from_mode(SHARE_FILE_MODE))
            .map_err(io)?;
        f.write_all(encode_share_file(s).as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| KmsError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(paths)
}
