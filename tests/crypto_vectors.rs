//! Published test vectors for the crypto layer, read from `tests/data/`:
//! - `xts_ieee1619.txt`: IEEE 1619 XTS-AES-256 vectors 10–14 (512-byte data units), run through
//!   every XTS backend, both directions;
//! - `hkdf_rfc5869.txt`: RFC 5869 HKDF-SHA256 test cases 1–3, through `kdf::Prk` (extract then
//!   expand, and expand from the published PRK).

use std::collections::HashMap;
use std::path::Path;

use shardvol::crypto::kdf::Prk;
use shardvol::crypto::{XtsBackend, XtsCipher, XtsKey};

const BACKENDS: [XtsBackend; 3] = [
    XtsBackend::AwsLc,
    XtsBackend::AwsLcFreshContext,
    XtsBackend::RustCrypto,
];

/// `[Name]` sections of `key = value` lines; `#` starts a comment line.
fn sections(file: &str) -> Vec<(String, HashMap<String, String>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out: Vec<(String, HashMap<String, String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push((name.to_string(), HashMap::new()));
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let section = out
            .last_mut()
            .unwrap_or_else(|| panic!("{line:?} before any section"));
        section
            .1
            .insert(key.trim().to_string(), value.trim().to_string());
    }
    out
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn field<'a>(name: &str, fields: &'a HashMap<String, String>, key: &str) -> &'a str {
    fields
        .get(key)
        .unwrap_or_else(|| panic!("{name}: no {key}"))
}

#[test]
fn xts_aes_256_ieee1619_vectors_10_to_14() {
    let vectors = sections("xts_ieee1619.txt");
    let names: Vec<&str> = vectors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Vector 10",
            "Vector 11",
            "Vector 12",
            "Vector 13",
            "Vector 14"
        ]
    );
    for (name, f) in &vectors {
        let key: [u8; 64] = [hex(field(name, f, "Key1")), hex(field(name, f, "Key2"))]
            .concat()
            .try_into()
            .expect("two 32-byte keys");
        let dusn = u64::from_str_radix(field(name, f, "DUSN"), 16).expect("DUSN");
        let unit: usize = field(name, f, "DataUnitLength").parse().expect("length");
        let ptx = hex(field(name, f, "PTX"));
        let ctx = hex(field(name, f, "CTX"));
        assert_eq!((ptx.len(), ctx.len()), (unit, unit), "{name}: lengths");
        for backend in BACKENDS {
            let cipher =
                XtsCipher::with_backend(XtsKey::from_bytes(key).unwrap(), backend).unwrap();
            let mut buf = ptx.clone();
            cipher.encrypt_units(unit, dusn, &mut buf).unwrap();
            assert!(buf == ctx, "{name}, {backend:?}: wrong ciphertext");
            cipher.decrypt_units(unit, dusn, &mut buf).unwrap();
            assert!(buf == ptx, "{name}, {backend:?}: wrong plaintext");
        }
    }
}

/// Vectors 10–14 have consecutive-looking but unrelated sequence numbers; vector 10's unit
/// followed by a second unit must come out as vector 10 then the unit encrypted under DUSN+1.
#[test]
fn xts_multi_unit_buffer_matches_units_one_by_one() {
    let vectors = sections("xts_ieee1619.txt");
    let (name, f) = &vectors[0];
    let key: [u8; 64] = [hex(field(name, f, "Key1")), hex(field(name, f, "Key2"))]
        .concat()
        .try_into()
        .unwrap();
    let dusn = u64::from_str_radix(field(name, f, "DUSN"), 16).unwrap();
    let ptx = hex(field(name, f, "PTX"));
    for backend in BACKENDS {
        let cipher = XtsCipher::with_backend(XtsKey::from_bytes(key).unwrap(), backend).unwrap();
        let mut two = [ptx.clone(), ptx.clone()].concat();
        cipher.encrypt_units(512, dusn, &mut two).unwrap();
        assert_eq!(two[..512], hex(field(name, f, "CTX"))[..], "{backend:?}");
        let mut second = ptx.clone();
        cipher.encrypt_units(512, dusn + 1, &mut second).unwrap();
        assert_eq!(two[512..], second[..], "{backend:?}");
    }
}

#[test]
fn hkdf_sha256_rfc5869_test_cases_1_to_3() {
    let cases = sections("hkdf_rfc5869.txt");
    let names: Vec<&str> = cases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Test Case 1", "Test Case 2", "Test Case 3"]);
    for (name, f) in &cases {
        let ikm = hex(field(name, f, "IKM"));
        let salt = hex(field(name, f, "salt"));
        let info = hex(field(name, f, "info"));
        let len: usize = field(name, f, "L").parse().expect("L");
        let prk = hex(field(name, f, "PRK"));
        let okm = hex(field(name, f, "OKM"));
        assert_eq!(okm.len(), len, "{name}: OKM length");

        let mut out = vec![0u8; len];
        Prk::extract(&salt, &ikm).expand(&info, &mut out).unwrap();
        assert_eq!(out, okm, "{name}: extract + expand");

        out.fill(0);
        Prk::from_bytes(&prk)
            .unwrap()
            .expand(&info, &mut out)
            .unwrap();
        assert_eq!(out, okm, "{name}: expand from the published PRK");
    }
}
