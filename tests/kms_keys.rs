//! KEK splitting, share files, combining and master-key wrapping.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use shardvol::crypto::MasterKey;
use shardvol::kms::{
    Kek, KmsError, LoadedShare, Share, WRAPPED_LEN, combine, encode_share_file, load_share_file,
    parse_share_file, split, unwrap_master, wrap_master, write_share_files,
};

const POOL: [u8; 16] = [0x11; 16];
const OTHER_POOL: [u8; 16] = [0x22; 16];

fn master() -> MasterKey {
    let mut b = [0u8; 32];
    rand::fill(&mut b[..]);
    MasterKey::from_bytes(b)
}

fn loaded(source: &str, share: &Share) -> LoadedShare {
    LoadedShare {
        source: source.to_string(),
        share: share.clone(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Splits a fresh KEK 3 of 5, writes the share files, and returns (kek, split id, files).
fn pool_with_files(dir: &Path) -> (Kek, [u8; 16], Vec<PathBuf>) {
    let kek = Kek::generate();
    let shares = split(&kek, POOL, 5, 3).unwrap();
    let split_id = shares[0].split_id;
    let files = write_share_files(dir, &shares).unwrap();
    (kek, split_id, files)
}

fn load_all(paths: &[&Path]) -> Vec<LoadedShare> {
    paths.iter().map(|p| load_share_file(p).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any `t` (or more) of `n` shares, in any order, give back the KEK.
    #[test]
    fn any_t_of_n_shares_recover_the_kek(
        (n, t, picked) in (1u8..=10)
            .prop_flat_map(|n| (Just(n), if n == 1 { 1u8..=1 } else { 2u8..=n }))
            .prop_flat_map(|(n, t)| {
                let all: Vec<usize> = (0..usize::from(n)).collect();
                (Just(n), Just(t), proptest::sample::subsequence(all, usize::from(t)..=usize::from(n)).prop_shuffle())
            })
    ) {
        let kek = Kek::generate();
        let shares = split(&kek, POOL, n, t).unwrap();
        prop_assert_eq!(shares.len(), usize::from(n));
        let given: Vec<LoadedShare> =
            picked.iter().map(|&i| loaded(&format!("share {i}"), &shares[i])).collect();
        let got = combine(&given, POOL, shares[0].split_id, t).unwrap();
        prop_assert_eq!(got.expose(), kek.expose());
    }

    /// `t - 1` shares are refused with the count, never combined into a key.
    #[test]
    fn fewer_than_t_shares_are_refused(n in 2u8..=10, t_off in 0u8..10) {
        let t = 2 + t_off % (n - 1);
        let kek = Kek::generate();
        let shares = split(&kek, POOL, n, t).unwrap();
        let given: Vec<LoadedShare> = shares[..usize::from(t - 1)]
            .iter()
            .enumerate()
            .map(|(i, s)| loaded(&format!("share {i}"), s))
            .collect();
        let err = combine(&given, POOL, shares[0].split_id, t).unwrap_err();
        prop_assert!(matches!(err, KmsError::TooFewShares { .. }), "{}", err);
        let expected = format!("{} shares given, this pool needs {}", t - 1, t);
        prop_assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn split_parameters_are_checked() {
    let kek = Kek::generate();
    for (n, t) in [(0, 0), (0, 1), (3, 0), (3, 4), (5, 1), (2, 1), (255, 1)] {
        let err = split(&kek, POOL, n, t).unwrap_err();
        assert!(matches!(err, KmsError::Share(_)), "{n} of {t}: {err}");
    }
    assert!(
        split(&kek, POOL, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("full copy")
    );
    for (n, t) in [(1, 1), (2, 2), (5, 3), (255, 2), (255, 255)] {
        let shares = split(&kek, POOL, n, t).unwrap();
        assert_eq!(shares.len(), usize::from(n));
        let idx: Vec<u8> = shares.iter().map(|s| s.index).collect();
        assert_eq!(idx, (1..=n).collect::<Vec<u8>>());
    }
}

#[test]
fn every_split_has_a_fresh_split_id() {
    let kek = Kek::generate();
    let a = split(&kek, POOL, 3, 2).unwrap();
    let b = split(&kek, POOL, 3, 2).unwrap();
    assert!(a.iter().all(|s| s.split_id == a[0].split_id));
    assert_ne!(a[0].split_id, b[0].split_id);
}

#[test]
fn share_files_round_trip_and_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shares");
    let kek = Kek::generate();
    let shares = split(&kek, POOL, 5, 3).unwrap();
    let files = write_share_files(&dir, &shares).unwrap();

    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for (s, f) in shares.iter().zip(&files) {
        assert_eq!(
            f.file_name().unwrap().to_str().unwrap(),
            format!("share-{}.txt", s.index)
        );
        assert_eq!(
            fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
        let text = fs::read_to_string(f).unwrap();
        assert!(text.starts_with("shardvol-share v1\n"), "{text}");
        assert!(text.contains(&format!("pool: {}\n", hex(&POOL))));
        assert!(text.contains(&format!("index: {}\n", s.index)));
        assert!(text.contains(&format!("secret: {}\n", hex(s.secret()))));
        let back = load_share_file(f).unwrap();
        assert_eq!(back.source, f.display().to_string());
        assert_eq!(
            (
                back.share.pool_id,
                back.share.split_id,
                back.share.index,
                back.share.threshold,
                back.share.count
            ),
            (s.pool_id, s.split_id, s.index, s.threshold, s.count)
        );
        assert_eq!(back.share.secret(), s.secret());
    }
    let given = load_all(&[&files[4], &files[0], &files[2]]);
    assert_eq!(
        combine(&given, POOL, shares[0].split_id, 3)
            .unwrap()
            .expose(),
        kek.expose()
    );
}

#[test]
fn share_files_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, files) = pool_with_files(tmp.path());
    let before = fs::read(&files[1]).unwrap();
    let other = split(&Kek::generate(), POOL, 5, 3).unwrap();
    let err = write_share_files(tmp.path(), &other).unwrap_err();
    assert!(matches!(err, KmsError::ShareFile { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&files[0].display().to_string()) && msg.contains("already exists"),
        "{msg}"
    );
    assert_eq!(fs::read(&files[1]).unwrap(), before);
}

#[test]
fn share_file_tolerates_crlf_and_comments() {
    let kek = Kek::generate();
    let shares = split(&kek, POOL, 3, 2).unwrap();
    let text = encode_share_file(&shares[1]);
    let crlf = text.replace('\n', "\r\n") + "\r\n# a note by the holder\r\n";
    let back = parse_share_file(&crlf, Path::new("mail-attachment.txt")).unwrap();
    assert_eq!(back.secret(), shares[1].secret());
    assert_eq!(back.index, 2);
}

/// Replaces the value of `field` in a share file's text.
fn edit_field(text: &str, field: &str, value: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with(&format!("{field}:")) {
                format!("{field}: {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn corrupt_share_files_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, files) = pool_with_files(&tmp.path().join("s"));
    let text = fs::read_to_string(&files[1]).unwrap();
    let secret_line = text.lines().find(|l| l.starts_with("secret: ")).unwrap();
    let secret_hex = &secret_line["secret: ".len()..];

    // One hex digit of the secret changed.
    let mut flipped = secret_hex.as_bytes().to_vec();
    flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "secret",
            edit_field(&text, "secret", &flipped),
            "checksum mismatch (corrupted or edited)",
        ),
        (
            "index",
            edit_field(&text, "index", "4"),
            "checksum mismatch (corrupted or edited)",
        ),
        (
            "threshold",
            edit_field(&text, "threshold", "2"),
            "checksum mismatch (corrupted or edited)",
        ),
        (
            "checksum",
            edit_field(&text, "checksum", "0011223344556677"),
            "checksum mismatch",
        ),
        (
            "missing",
            text.lines()
                .filter(|l| !l.starts_with("count:"))
                .collect::<Vec<_>>()
                .join("\n"),
            "\"count\" is missing",
        ),
        ("repeated", text.clone() + "index: 2\n", "appears twice"),
        ("unknown", text.clone() + "colour: blue\n", "unknown field"),
        (
            "short secret",
            edit_field(&text, "secret", &secret_hex[..40]),
            "expected 64 hex digits",
        ),
        (
            "bad hex",
            edit_field(&text, "secret", &format!("zz{}", &secret_hex[2..])),
            "not a hex digit",
        ),
        (
            "version",
            text.replacen("shardvol-share v1", "shardvol-share v9", 1),
            "not supported",
        ),
        (
            "garbage",
            "hello world\n".into(),
            "not a shardvol share file",
        ),
        ("empty", String::new(), "not a shardvol share file"),
        (
            "truncated",
            text[..text.find("checksum:").unwrap()].to_string(),
            "\"checksum\" is missing",
        ),
        // Cut anywhere: some format error, naming the file (checked below).
        ("cut", text[..text.len() / 2].to_string(), ""),
    ];
    for (name, body, want) in cases {
        let path = tmp
            .path()
            .join(format!("case-{}.txt", name.replace(' ', "-")));
        fs::write(&path, &body).unwrap();
        let err = load_share_file(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("share file {}: ", path.display())),
            "{name}: {msg}"
        );
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(
            !msg.contains(secret_hex) && !msg.contains(&secret_hex[2..]),
            "{name}: secret in {msg}"
        );
    }

    for cut in 0..text.len() - 1 {
        assert!(
            parse_share_file(&text[..cut], Path::new("cut")).is_err(),
            "prefix of {cut} bytes accepted"
        );
    }

    let binary = tmp.path().join("binary");
    fs::write(&binary, [0xffu8, 0xfe, 0, 1]).unwrap();
    assert!(
        load_share_file(&binary)
            .unwrap_err()
            .to_string()
            .contains("not a text file")
    );
    let big = tmp.path().join("big");
    fs::write(&big, vec![b'a'; 10_000]).unwrap();
    assert!(
        load_share_file(&big)
            .unwrap_err()
            .to_string()
            .contains("larger than")
    );
    let missing = tmp.path().join("nope.txt");
    let msg = load_share_file(&missing).unwrap_err().to_string();
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains("cannot open"),
        "{msg}"
    );
}

#[test]
fn duplicate_shares_are_refused_naming_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, split_id, files) = pool_with_files(&tmp.path().join("s"));
    let copy = tmp.path().join("copy-of-share-2.txt");
    fs::copy(&files[1], &copy).unwrap();

    let given = load_all(&[&files[0], &files[1], &copy]);
    let err = combine(&given, POOL, split_id, 3).unwrap_err();
    assert!(
        matches!(err, KmsError::DuplicateShare { index: 2, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&files[1].display().to_string()) && msg.contains(&copy.display().to_string()),
        "{msg}"
    );

    let given = load_all(&[&files[0], &files[3], &files[0]]);
    let msg = combine(&given, POOL, split_id, 3).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("{} was given twice", files[0].display())),
        "{msg}"
    );
}

#[test]
fn share_of_another_pool_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, split_id, files) = pool_with_files(&tmp.path().join("mine"));
    let foreign = split(&Kek::generate(), OTHER_POOL, 5, 3).unwrap();
    let foreign_files = write_share_files(&tmp.path().join("theirs"), &foreign).unwrap();

    let given = load_all(&[&files[0], &foreign_files[3], &files[2]]);
    let err = combine(&given, POOL, split_id, 3).unwrap_err();
    assert!(matches!(err, KmsError::ForeignPool { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&foreign_files[3].display().to_string()) && msg.contains("another pool"),
        "{msg}"
    );
    assert!(
        msg.contains(&hex(&OTHER_POOL)) && msg.contains(&hex(&POOL)),
        "{msg}"
    );
}

#[test]
fn share_of_an_older_split_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let kek = Kek::generate();
    let old = split(&kek, POOL, 5, 3).unwrap();
    let old_files = write_share_files(&tmp.path().join("old"), &old).unwrap();
    let new = split(&kek, POOL, 5, 3).unwrap();
    let new_files = write_share_files(&tmp.path().join("new"), &new).unwrap();

    let given = load_all(&[&new_files[0], &new_files[1], &old_files[2]]);
    let err = combine(&given, POOL, new[0].split_id, 3).unwrap_err();
    assert!(matches!(err, KmsError::OtherSplit { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&old_files[2].display().to_string()) && msg.contains("another split"),
        "{msg}"
    );
}

#[test]
fn share_with_another_threshold_is_refused() {
    let kek = Kek::generate();
    let shares = split(&kek, POOL, 5, 3).unwrap();
    let given: Vec<LoadedShare> = shares.iter().take(3).map(|s| loaded("x", s)).collect();
    let err = combine(&given, POOL, shares[0].split_id, 2).unwrap_err();
    assert!(
        matches!(
            err,
            KmsError::ThresholdMismatch {
                found: 3,
                expected: 2,
                ..
            }
        ),
        "{err}"
    );
}

/// A share whose secret was changed and whose checksum was recomputed passes every check that
/// combine can make, and combines into a wrong KEK: the wrap check must catch it.
#[test]
fn forged_share_with_recomputed_checksum_gives_wrong_kek() {
    let tmp = tempfile::tempdir().unwrap();
    let (kek, split_id, files) = pool_with_files(&tmp.path().join("s"));
    let mk = master();
    let wrapped = wrap_master(&kek, &mk, POOL, 1);

    let genuine = load_share_file(&files[2]).unwrap().share;
    let mut secret = *genuine.secret();
    secret[7] ^= 0x5a;
    let forged = Share::from_parts(
        genuine.pool_id,
        genuine.split_id,
        genuine.index,
        genuine.threshold,
        genuine.count,
        secret,
    );
    let forged_path = tmp.path().join("share-3-forged.txt");
    fs::write(&forged_path, encode_share_file(&forged).as_bytes()).unwrap();

    let given = load_all(&[&files[0], &files[1], &forged_path]);
    let combined =
        combine(&given, POOL, split_id, 3).expect("a forged share is not detectable by combine");
    assert_ne!(combined.expose(), kek.expose());
    assert!(matches!(
        unwrap_master(&combined, &wrapped, POOL, 1),
        Err(KmsError::WrongKek)
    ));

    // More shares than needed, one of them forged: still refused, never a wrong master key.
    let given = load_all(&[&files[0], &files[1], &forged_path, &files[3]]);
    let combined = combine(&given, POOL, split_id, 3).unwrap();
    assert!(matches!(
        unwrap_master(&combined, &wrapped, POOL, 1),
        Err(KmsError::WrongKek)
    ));

    // The genuine shares still unlock.
    let given = load_all(&[&files[0], &files[1], &files[2]]);
    let combined = combine(&given, POOL, split_id, 3).unwrap();
    assert_eq!(
        unwrap_master(&combined, &wrapped, POOL, 1)
            .unwrap()
            .expose(),
        mk.expose()
    );
}

#[test]
fn wrap_unwrap_round_trip() {
    let kek = Kek::generate();
    let mk = master();
    let w1 = wrap_master(&kek, &mk, POOL, 7);
    let w2 = wrap_master(&kek, &mk, POOL, 7);
    assert_eq!(w1.len(), WRAPPED_LEN);
    assert_ne!(w1, w2, "every wrap draws a fresh nonce");
    assert!(
        !w1.windows(32).any(|w| w == mk.expose()),
        "the key appears in the clear"
    );
    for w in [&w1, &w2] {
        assert_eq!(
            unwrap_master(&kek, w, POOL, 7).unwrap().expose(),
            mk.expose()
        );
    }
}

#[test]
fn unwrap_refuses_wrong_kek_pool_version_and_any_modified_byte() {
    let kek = Kek::generate();
    let mk = master();
    let w = wrap_master(&kek, &mk, POOL, 3);
    let wrong = |r: Result<MasterKey, KmsError>| matches!(r, Err(KmsError::WrongKek));
    assert!(wrong(unwrap_master(&Kek::generate(), &w, POOL, 3)));
    assert!(wrong(unwrap_master(&kek, &w, OTHER_POOL, 3)));
    assert!(wrong(unwrap_master(&kek, &w, POOL, 4)));
    assert!(wrong(unwrap_master(&kek, &w, POOL, 2)));
    for i in 0..w.len() {
        let mut bad = w.clone();
        bad[i] ^= 0x01;
        assert!(
            wrong(unwrap_master(&kek, &bad, POOL, 3)),
            "byte {i} flipped"
        );
    }
    let Err(err) = unwrap_master(&kek, &w[..w.len() - 1], POOL, 3) else {
        panic!("short input unwrapped")
    };
    assert!(
        matches!(
            err,
            KmsError::BadWrappedKey {
                len: 59,
                expected: 60
            }
        ),
        "{err}"
    );
    assert_eq!(
        KmsError::WrongKek.to_string(),
        "the shares given do not unlock this pool (the key they combine to does not open the master key)"
    );
}

#[test]
fn debug_output_has_no_key_material() {
    let kek = Kek::from_bytes([0xab; 32]);
    let shown = format!("{kek:?} {kek:#?}");
    assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");

    let shares = split(&kek, POOL, 3, 2).unwrap();
    for s in &shares {
        let ls = loaded("share file", s);
        let shown = format!("{s:?} {s:#?} {ls:?}");
        assert!(!shown.contains(&hex(s.secret())), "{shown}");
        assert!(!shown.contains(&format!("{:?}", s.secret())), "{shown}");
        assert!(
            shown.contains("redacted") && shown.contains(&hex(&POOL)),
            "{shown}"
        );
        assert!(!shown.contains(&hex(&kek.expose()[..4])), "{shown}");
    }
    // The errors that describe shares carry ids and file names, never secrets.
    let given: Vec<LoadedShare> = shares.iter().take(1).map(|s| loaded("f", s)).collect();
    let msg = combine(&given, OTHER_POOL, shares[0].split_id, 2)
        .unwrap_err()
        .to_string();
    assert!(!msg.contains(&hex(shares[0].secret())), "{msg}");
}

/// The example share file in docs/keys.md is a valid file (its checksum included).
#[test]
fn share_file_example_in_the_docs_parses() {
    let doc = include_str!("../docs/keys.md");
    let start = doc
        .find("```text\nshardvol-share v1")
        .expect("example in docs/keys.md")
        + "```text\n".len();
    let len = doc[start..].find("```").unwrap();
    let share = parse_share_file(&doc[start..start + len], Path::new("docs/keys.md")).unwrap();
    assert_eq!((share.index, share.threshold, share.count), (2, 3, 5));
    assert_eq!(hex(&share.pool_id), "5c1e0f3a9b7d42e88a61f0c2d4b39e17");
    // Written back, it is the same text.
    assert_eq!(encode_share_file(&share).as_str(), &doc[start..start + len]);
}
