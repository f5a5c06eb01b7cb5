//! The audit log: a real pool's log of ~20 records (creation, refused unlocks, an attested
//! unlock, events appended through the pool), then each kind of tampering, each of which
//! `verify` must catch and name by its first broken record; sealed records and attestation;
//! a torn tail and a head left behind by a crash; concurrent appends; the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use shardvol::audit::record::{hash_of, mac_of};
use shardvol::audit::{
    AuditError, AuditKey, AuditLog, EventKind, LOG_FILE, Problem, Record, fields,
};
use shardvol::crypto::TagKey;
use shardvol::crypto::kdf::Prk;
use shardvol::meta::MetaStore;
use shardvol::pool::{self, CreateOptions, DiskSpec, Pool, PoolError};

/// A pool whose log holds 20 records:
/// 1 pool-create, 2-3 unlock-refused (sealed), 4 attest 2..=3, 5 unlock, 6-20 events appended
/// through `Pool::audit`.
struct Fixture {
    _dir: tempfile::TempDir,
    pool: PathBuf,
    shares: Vec<PathBuf>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let share_dir = dir.path().join("shares");
    pool::create(&CreateOptions {
        pool: pool_dir.clone(),
        volume: "vol0".into(),
        size: 16 << 20,
        data: 2,
        parity: 1,
        chunk_size: 64 << 10,
        disks: DiskSpec::Files(3),
        shares: 3,
        threshold: 2,
        share_dir: share_dir.clone(),
        journal_size: 8 << 20,
    })
    .unwrap();
    let shares = pool::shares_in(&share_dir).unwrap();
    // Two refused unlocks: too few shares, the same share twice.
    assert!(Pool::open(&pool_dir, &shares[..1]).is_err());
    let twice = [shares[0].clone(), shares[0].clone()];
    assert!(Pool::open(&pool_dir, &twice).is_err());
    let p = Pool::open(&pool_dir, &shares[..2]).unwrap();
    for i in 0..15u32 {
        let kind = [
            EventKind::Rotate,
            EventKind::PolicyRefusal,
            EventKind::DiskFailed,
        ][i as usize % 3];
        let seq = p
            .audit(
                kind,
                fields([
                    ("volume", "vol0".to_string()),
                    ("epoch", i.to_string()),
                    ("outcome", "ok".to_string()),
                ]),
            )
            .unwrap();
        assert_eq!(seq, u64::from(i) + 6);
    }
    p.close().unwrap();
    drop(p);
    Fixture {
        _dir: dir,
        pool: pool_dir,
        shares,
    }
}

/// A copy of the fixture's log and store (the disks are not needed to check a log).
struct Case {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    store: Arc<MetaStore>,
    log: AuditLog,
    key: AuditKey,
}

fn case(f: &Fixture) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::copy(f.pool.join(LOG_FILE), d.join(LOG_FILE)).unwrap();
    std::fs::copy(f.pool.join(pool::STORE_FILE), d.join(pool::STORE_FILE)).unwrap();
    // The wrapped master keys live in the key-slot file beside the store.
    let slots = shardvol::kms::keyslots::KEYSLOTS_FILE;
    std::fs::copy(f.pool.join(slots), d.join(slots)).unwrap();
    let store = Arc::new(MetaStore::open(&d.join(pool::STORE_FILE)).unwrap());
    let ring = pool::unlock(&store, &f.shares[1..3]).unwrap();
    let key = AuditKey::from_ring(&ring, 1).unwrap();
    let log = AuditLog::open(&d, store.clone());
    Case {
        _dir: dir,
        dir: d,
        store,
        log,
        key,
    }
}

impl Case {
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(LOG_FILE))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
    fn write_lines(&self, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(self.dir.join(LOG_FILE), text).unwrap();
    }
    /// The first broken record, without and with the key.
    fn broken(&self) -> [Option<(u64, Problem)>; 2] {
        [None, Some(&self.key)].map(|k| {
            self.log
                .verify(k)
                .unwrap()
                .first_broken
                .map(|b| (b.seq, b.problem))
        })
    }
}

fn record(line: &str) -> Record {
    Record::from_json(line.as_bytes()).unwrap()
}

#[test]
fn untouched_log_verifies_with_and_without_the_key() {
    let f = fixture();
    let c = case(&f);
    let recs = c.log.records().unwrap();
    assert_eq!(recs.len(), 20);
    let kinds: Vec<&str> = recs[..5].iter().map(|r| r.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "pool-create",
            "unlock-refused",
            "unlock-refused",
            "attest",
            "unlock"
        ]
    );
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.computed_hash(), r.hash);
    }
    let plain = c.log.verify(None).unwrap();
    assert!(plain.intact(), "{:?}", plain.first_broken);
    assert_eq!(plain.records, 20);
    assert_eq!(plain.macs_checked, 0, "no key, no MAC checked");
    assert_eq!(plain.head.map(|h| h.0), Some(20));
    let keyed = c.log.verify(Some(&c.key)).unwrap();
    assert!(keyed.intact(), "{:?}", keyed.first_broken);
    assert_eq!(keyed.with_mac, 18);
    assert_eq!(keyed.macs_checked, 18);
    assert_eq!(keyed.sealed, 2);
    assert_eq!(keyed.unattested, 0);
    assert!(keyed.torn_tail.is_none() && !keyed.head_lag);
}

#[test]
fn sealed_records_are_attested_at_the_next_unlock() {
    let f = fixture();
    let recs = {
        let c = case(&f);
        c.log.records().unwrap()
    };
    // The fixture's refused unlocks: sealed, and the attest record names exactly them.
    assert!(recs[1].mac.is_none() && recs[2].mac.is_none());
    assert_eq!(recs[1].fields["outcome"], "refused");
    assert!(
        recs[1].fields["reason"].contains("needs 2"),
        "{:?}",
        recs[1].fields
    );
    assert_eq!(recs[2].fields["shares"], "1,1");
    let attest = &recs[3];
    assert_eq!(attest.event, "attest");
    assert_eq!(attest.fields["from"], "2");
    assert_eq!(attest.fields["to"], "3");
    assert!(attest.mac.is_some());
    assert_eq!(recs[4].event, "unlock");
    assert_eq!(recs[4].fields["shares"], "1,2");

    // A sealed event after the pool closed: reported as not attested until the next unlock.
    {
        let store = Arc::new(MetaStore::open(&f.pool.join(pool::STORE_FILE)).unwrap());
        let log = AuditLog::open(&f.pool, store);
        let seq = log
            .append(EventKind::DiskReplaced, fields([("disk", "2")]), None)
            .unwrap();
        assert_eq!(seq, 21);
        let r = log.verify(None).unwrap();
        assert!(r.intact());
        assert_eq!(r.unattested, 1);
    }
    let p = Pool::open(&f.pool, &f.shares[..2]).unwrap();
    let r = p.audit.verify(None).unwrap();
    assert!(r.intact(), "{:?}", r.first_broken);
    assert_eq!(r.unattested, 0);
    let recs = p.audit.records().unwrap();
    assert_eq!(recs[21].event, "attest");
    assert_eq!(recs[21].fields["from"], "21");
    assert_eq!(recs[21].fields["to"], "21");
    assert_eq!(recs[22].event, "unlock");
    // Nothing sealed since: the next unlock writes no attest record.
    p.close().unwrap();
    drop(p);
    let p = Pool::open(&f.pool, &f.shares[1..3]).unwrap();
    let recs = p.audit.records().unwrap();
    assert_eq!(recs.len(), 24);
    assert_eq!(recs[23].event, "unlock");
}

#[test]
fn an_edited_field_is_a_hash_mismatch_at_that_record() {
    let f = fixture();
    let c = case(&f);
    let mut lines = c.lines();
    let mut v: serde_json::Value = serde_json::from_str(&lines[6]).unwrap();
    v["fields"]["outcome"] = "refused".into();
    lines[6] = v.to_string();
    c.write_lines(&lines);
    for b in c.broken() {
        assert_eq!(b, Some((7, Problem::HashMismatch)));
    }
    let b = c.log.verify(None).unwrap().first_broken.unwrap();
    assert_eq!(b.to_string(), "record 7: hash mismatch (edited)");
}

#[test]
fn a_deleted_record_is_named_missing() {
    let f = fixture();
    let c = case(&f);
    let mut lines = c.lines();
    lines.remove(9); // record 10
    c.write_lines(&lines);
    for b in c.broken() {
        assert_eq!(b, Some((10, Problem::Missing { found: 11 })));
    }
}

#[test]
fn swapped_records_are_named_out_of_order() {
    let f = fixture();
    let c = case(&f);
    let mut lines = c.lines();
    lines.swap(4, 5); // records 5 and 6
    c.write_lines(&lines);
    for b in c.broken() {
        assert_eq!(b, Some((5, Problem::OutOfOrder { found: 6 })));
    }
}

#[test]
fn truncated_last_records_are_caught_by_the_head_in_the_store() {
    let f = fixture();
    let c = case(&f);
    let lines = c.lines();
    c.write_lines(&lines[..17]);
    for b in c.broken() {
        assert_eq!(b, Some((18, Problem::Truncated { head: 20, last: 17 })));
    }
    // The whole log deleted.
    std::fs::remove_file(c.dir.join(LOG_FILE)).unwrap();
    for b in c.broken() {
        assert_eq!(b, Some((1, Problem::Truncated { head: 20, last: 0 })));
    }
}

/// Rewrites record `at` (1-based) with `edit` and recomputes every hash from there on, keeping
/// the old MACs; moves the store's head to the new last hash. Only a MAC check can tell.
fn rewrite_chain(c: &Case, at: usize, edit: impl FnOnce(&mut Record)) {
    let mut recs: Vec<Record> = c.lines().iter().map(|l| record(l)).collect();
    edit(&mut recs[at - 1]);
    for i in at - 1..recs.len() {
        if i > 0 {
            recs[i].prev = recs[i - 1].hash;
        }
        recs[i].hash = recs[i].computed_hash();
    }
    let lines: Vec<String> = recs.iter().map(Record::to_json).collect();
    c.write_lines(&lines);
    let last = recs.last().unwrap();
    c.store.put_audit_head(last.seq, &last.hash).unwrap();
}

#[test]
fn a_forged_record_with_a_correct_hash_fails_its_mac() {
    let f = fixture();
    let c = case(&f);
    rewrite_chain(&c, 12, |r| {
        r.fields.insert("outcome".into(), "refused".into());
    });
    let [plain, keyed] = c.broken();
    // Without the key the rewritten chain is consistent: this is what the MACs are for.
    assert_eq!(plain, None);
    assert_eq!(keyed, Some((12, Problem::MacInvalid { version: 1 })));

    // A record appended by hand: correct hash and prev, head updated, a made-up MAC.
    let c = case(&f);
    let mut lines = c.lines();
    let last = record(lines.last().unwrap());
    let fl = fields([("volume", "vol0")]);
    let hash = hash_of(21, last.time_unix, Some(1), "destroy", &fl, &last.hash);
    let forged = Record {
        seq: 21,
        time_unix: last.time_unix,
        event: "destroy".into(),
        fields: fl.clone(),
        key_version: Some(1),
        prev: last.hash,
        hash,
        mac: Some(mac_of(&TagKey::from_bytes([7; 32]), &hash)),
    };
    lines.push(forged.to_json());
    c.write_lines(&lines);
    c.store.put_audit_head(21, &hash).unwrap();
    let [plain, keyed] = c.broken();
    assert_eq!(plain, None);
    assert_eq!(keyed, Some((21, Problem::MacInvalid { version: 1 })));

    // The same, claiming no MAC: a destroy record is only written unlocked, so even without
    // the key its missing MAC is caught.
    let hash = hash_of(21, last.time_unix, None, "destroy", &fl, &last.hash);
    let sealed = Record {
        key_version: None,
        mac: None,
        hash,
        ..forged.clone()
    };
    lines.pop();
    lines.push(sealed.to_json());
    c.write_lines(&lines);
    c.store.put_audit_head(21, &hash).unwrap();
    for b in c.broken() {
        assert_eq!(
            b,
            Some((
                21,
                Problem::MacMissing {
                    event: "destroy".into()
                }
            ))
        );
    }

    // A MAC under a master key version the pool never had.
    let hash = hash_of(21, last.time_unix, Some(9), "destroy", &fl, &last.hash);
    let other = Record {
        key_version: Some(9),
        mac: Some([1; 32]),
        hash,
        ..forged
    };
    lines.pop();
    lines.push(other.to_json());
    c.write_lines(&lines);
    c.store.put_audit_head(21, &hash).unwrap();
    for b in c.broken() {
        assert_eq!(b, Some((21, Problem::MacUnknownVersion { version: 9 })));
    }
}

#[test]
fn a_corrupted_head_in_the_store_is_caught() {
    let f = fixture();
    let c = case(&f);
    c.store.put_audit_head(20, &[0x5a; 32]).unwrap();
    for b in c.broken() {
        assert_eq!(b, Some((20, Problem::HeadMismatch)));
    }
    // A head beyond the log: records cut off.
    c.store.put_audit_head(25, &[0x5a; 32]).unwrap();
    for b in c.broken() {
        assert_eq!(b, Some((21, Problem::Truncated { head: 25, last: 20 })));
    }
    // A head rolled back to record 15 (its true hash): records 17.. lie beyond it (16 would be
    // the one record a crash can leave).
    let r15 = record(&c.lines()[14]);
    c.store.put_audit_head(15, &r15.hash).unwrap();
    for b in c.broken() {
        assert_eq!(b, Some((17, Problem::BeyondHead { head: 15 })));
    }
    // The append path refuses to continue such a log rather than move the head past it.
    let err = c
        .log
        .append(EventKind::DiskFailed, fields([("disk", "1")]), None)
        .unwrap_err();
    assert!(matches!(err, AuditError::Broken { .. }), "{err}");
    assert!(err.to_string().contains("shardvol audit restart"), "{err}");
}

#[test]
fn a_malformed_line_is_named() {
    let f = fixture();
    let c = case(&f);
    let mut lines = c.lines();
    lines[8] = "{\"seq\": 9, oops".into();
    c.write_lines(&lines);
    for b in c.broken() {
        let (seq, problem) = b.unwrap();
        assert_eq!(seq, 9);
        assert!(
            matches!(problem, Problem::Malformed { line: 9, .. }),
            "{problem:?}"
        );
    }
}

#[test]
fn a_torn_tail_is_reported_then_removed_by_the_next_append() {
    let f = fixture();
    let c = case(&f);
    let path = c.dir.join(LOG_FILE);
    let intact_len = std::fs::metadata(&path).unwrap().len();
    // Half of a record line, without its line feed: an append cut short by a crash.
    let half = &c.lines()[19][..100];
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(half.as_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let r = c.log.verify(Some(&c.key)).unwrap();
    assert!(
        r.intact(),
        "a torn tail is not tampering: {:?}",
        r.first_broken
    );
    assert_eq!(r.records, 20);
    let torn = r.torn_tail.unwrap();
    assert_eq!((torn.offset, torn.len), (intact_len, 100));

    let seq = c
        .log
        .append(EventKind::DiskFailed, fields([("disk", "0")]), Some(&c.key))
        .unwrap();
    assert_eq!(seq, 22, "record 21 records the repair");
    let recs = c.log.records().unwrap();
    assert_eq!(recs.len(), 22);
    assert_eq!(recs[20].event, "log-repaired");
    assert_eq!(recs[20].fields["removed_bytes"], "100");
    assert_eq!(recs[20].fields["offset"], intact_len.to_string());
    assert_eq!(recs[21].event, "disk-failed");
    let r = c.log.verify(Some(&c.key)).unwrap();
    assert!(r.intact() && r.torn_tail.is_none(), "{r:?}");
    assert_eq!(r.macs_checked, 20);
}

#[test]
fn a_head_one_record_behind_is_a_crash_and_is_caught_up() {
    let f = fixture();
    let c = case(&f);
    // A crash after the log's fsync and before the store's commit leaves the head at 19.
    let r19 = record(&c.lines()[18]);
    c.store.put_audit_head(19, &r19.hash).unwrap();
    let r = c.log.verify(Some(&c.key)).unwrap();
    assert!(r.intact(), "{:?}", r.first_broken);
    assert!(r.head_lag);
    let seq = c
        .log
        .append(EventKind::PolicyRefusal, fields([("client", "cn=x")]), None)
        .unwrap();
    assert_eq!(seq, 22);
    let recs = c.log.records().unwrap();
    assert_eq!(recs[20].event, "log-repaired");
    assert_eq!(recs[20].fields["record"], "20");
    assert_eq!(recs[20].fields["head_was"], "19");
    let r = c.log.verify(Some(&c.key)).unwrap();
    assert!(r.intact() && !r.head_lag, "{r:?}");
    assert_eq!(c.store.audit_head().unwrap().map(|h| h.0), Some(22));
    assert_eq!(r.unattested, 2, "both new records were written sealed");
}

#[test]
fn a_broken_log_can_be_set_aside_and_restarted() {
    let f = fixture();
    let c = case(&f);
    let lines = c.lines();
    c.write_lines(&lines[..10]);
    assert!(matches!(
        c.log
            .append(EventKind::DiskFailed, fields([("disk", "1")]), Some(&c.key)),
        Err(AuditError::Broken { .. })
    ));
    let r = c.log.restart(&c.key).unwrap();
    assert_eq!(r.seq, 1);
    assert!(r.problem.contains("record 11"), "{}", r.problem);
    assert_eq!(
        std::fs::read_to_string(&r.old_log).unwrap().lines().count(),
        10
    );
    let recs = c.log.records().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].event, "log-repaired");
    assert_eq!(recs[0].fields["old_head_seq"], "20");
    let rep = c.log.verify(Some(&c.key)).unwrap();
    assert!(rep.intact() && rep.macs_checked == 1, "{rep:?}");
    assert_eq!(
        c.log
            .append(EventKind::DiskFailed, fields([("disk", "1")]), None)
            .unwrap(),
        2
    );
    // An intact log is not restarted.
    assert!(matches!(
        c.log.restart(&c.key),
        Err(AuditError::NotBroken { .. })
    ));
}

#[test]
fn concurrent_appends_stay_consecutive() {
    let f = fixture();
    let c = case(&f);
    let log = Arc::new(c.log);
    let key = Arc::new(c.key);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            let key = key.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        log.append(
                            EventKind::PolicyRefusal,
                            fields([("thread", t.to_string()), ("i", i.to_string())]),
                            Some(&key),
                        )
                        .unwrap()
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = t0.elapsed();
    seqs.sort_unstable();
    assert_eq!(seqs, (21..=60).collect::<Vec<_>>());
    let t1 = Instant::now();
    let r = log.verify(Some(&key)).unwrap();
    let verify_time = t1.elapsed();
    assert!(r.intact(), "{:?}", r.first_broken);
    assert_eq!(r.records, 60);
    eprintln!(
        "40 appends from 4 threads: {:.2} ms each (fsync + store commit); verify of 60 records with MACs: {:.1} µs per record",
        elapsed.as_secs_f64() * 1e3 / 40.0,
        verify_time.as_secs_f64() * 1e6 / 60.0
    );
}

#[test]
fn appends_refuse_what_they_cannot_write() {
    let f = fixture();
    let c = case(&f);
    let err = c
        .log
        .append(EventKind::RotateMaster, fields([("version", "2")]), None)
        .unwrap_err();
    assert!(err.to_string().contains("needs the audit key"), "{err}");
    let err = c
        .log
        .append(EventKind::Seal, fields([("Bad Name", "x")]), Some(&c.key))
        .unwrap_err();
    assert!(err.to_string().contains("field name"), "{err}");
    // An over-long value is cut, not refused.
    let seq = c
        .log
        .append(
            EventKind::UnlockRefused,
            fields([("reason", "é".repeat(2000))]),
            None,
        )
        .unwrap();
    let recs = c.log.records().unwrap();
    let v = &recs[seq as usize - 1].fields["reason"];
    assert!(v.len() <= 1024 && v.ends_with('…'), "{}", v.len());
    assert!(c.log.verify(Some(&c.key)).unwrap().intact());
}

#[test]
fn event_names_are_stable() {
    let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "pool-create",
            "unlock-attempt",
            "unlock",
            "unlock-refused",
            "seal",
            "rotate",
            "rotate-master",
            "archive",
            "destroy",
            "reissue",
            "policy-refusal",
            "disk-failed",
            "disk-replaced",
            "disk-added",
            "attest",
            "log-repaired"
        ]
    );
    for k in EventKind::ALL {
        assert_eq!(EventKind::from_name(k.name()), Some(k));
    }
    assert_eq!(EventKind::from_name("unlock-failed"), None);
}

#[test]
fn audit_key_is_hkdf_expand_with_its_own_label() {
    use hkdf::Hkdf;
    let pool_id = [3u8; 16];
    let master = [9u8; 32];
    let prk = Prk::extract(&pool_id, &master);
    let mut okm = [0u8; 32];
    Hkdf::<sha2::Sha256>::new(Some(&pool_id), &master)
        .expand(b"shardvol/aud-key", &mut okm)
        .unwrap();
    let hash = [0x42; 32];
    let ours = mac_of(&prk.audit_key().unwrap(), &hash);
    assert_eq!(ours, mac_of(&TagKey::from_bytes(okm), &hash));
    // And it is not the tag key of any volume 0 (a different info).
    assert_ne!(ours, mac_of(&prk.tag_key(0).unwrap(), &hash));
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardvol"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("SHARDVOL_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_verify_and_show() {
    let f = fixture();
    let pool = s(&f.pool);
    let (code, out, _) = cli(&["audit", "verify", "--pool", pool]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("MACs: NOT checked"), "{out}");
    assert!(out.contains("audit log intact"), "{out}");
    let (code, out, err) = cli(&[
        "audit",
        "verify",
        "--pool",
        pool,
        "--share",
        s(&f.shares[0]),
        "--share",
        s(&f.shares[2]),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("MACs: 18 of 18 checked and valid"), "{out}");

    let (code, out, _) = cli(&["audit", "show", "--pool", pool, "--json"]);
    assert_eq!(code, 0);
    let recs: Vec<Record> = out.lines().map(record).collect();
    assert_eq!(recs.len(), 20);
    let (code, out, _) = cli(&["audit", "show", "--pool", pool]);
    assert_eq!(code, 0);
    assert!(out.lines().nth(4).unwrap().contains("attest"), "{out}");
    assert!(out.contains("sealed"), "{out}");

    // Edited: non-zero exit, the record named.
    let path = f.pool.join(LOG_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[16] = lines[16].replace("\"outcome\":\"ok\"", "\"outcome\":\"no\"");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let (code, _, err) = cli(&["audit", "verify", "--pool", pool]);
    assert_ne!(code, 0);
    assert!(
        err.contains("audit log broken at record 17: hash mismatch (edited)"),
        "{err}"
    );
    // The pool still opens (the damage is behind the head), and says so in its log.
    let p = Pool::open(&f.pool, &f.shares[..2]).unwrap();
    p.close().unwrap();
    drop(p);
    // Wrong shares are refused with the reason, not a wrong key.
    let (code, _, err) = cli(&[
        "audit",
        "verify",
        "--pool",
        pool,
        "--share",
        s(&f.shares[0]),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("needs 2"), "{err}");
    // restart needs the key.
    let (code, _, err) = cli(&["audit", "restart", "--pool", pool]);
    assert_ne!(code, 0);
    assert!(err.contains("--share"), "{err}");
}

#[test]
fn pool_open_refuses_a_log_cut_short() {
    let f = fixture();
    let path = f.pool.join(LOG_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().take(12).collect();
    std::fs::write(&path, kept.join("\n") + "\n").unwrap();
    let err = match Pool::open(&f.pool, &f.shares[..2]) {
        Err(e) => e,
        Ok(_) => panic!("a pool whose audit log lost its last records must not open silently"),
    };
    assert!(
        matches!(err, PoolError::Audit(AuditError::Broken { .. })),
        "{err}"
    );
    // Restart with the shares, then the pool opens again.
    let (code, out, err) = cli(&[
        "audit",
        "restart",
        "--pool",
        s(&f.pool),
        "--share",
        s(&f.shares[0]),
        "--share",
        s(&f.shares[1]),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("starts at record 1"), "{out}");
    let p = Pool::open(&f.pool, &f.shares[..2]).unwrap();
    let recs = p.audit.records().unwrap();
    assert_eq!(
        recs.iter().map(|r| r.event.as_str()).collect::<Vec<_>>(),
        ["log-repaired", "unlock"]
    );
    assert!(p.audit.verify(None).unwrap().intact());
}

#[test]
fn a_record_rewritten_with_its_own_hash_breaks_the_next_prev() {
    let f = fixture();
    let c = case(&f);
    let mut lines = c.lines();
    let mut r = record(&lines[7]);
    r.fields.insert("volume".into(), "vol9".into());
    r.hash = r.computed_hash();
    lines[7] = r.to_json();
    c.write_lines(&lines);
    let [plain, keyed] = c.broken();
    // Without the key the first inconsistency is record 9's prev; the MAC names record 8.
    assert_eq!(plain, Some((9, Problem::PrevMismatch)));
    assert_eq!(keyed, Some((8, Problem::MacInvalid { version: 1 })));
}

#[test]
fn store_keeps_the_chain_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = MetaStore::create(&path).unwrap();
    assert_eq!(store.audit_head().unwrap(), None, "a new store has no head");
    store.put_audit_head(7, &[0xAB; 32]).unwrap();
    store.put_audit_head(8, &[0xCD; 32]).unwrap();
    drop(store);
    let store = MetaStore::open(&path).unwrap();
    assert_eq!(store.audit_head().unwrap(), Some((8, [0xCD; 32])));
}

/// A 20 000-record log written directly (the append path's fsyncs would take a minute):
/// verify reads it in one pass; prints the cost per record, with and without MACs.
#[test]
fn a_large_log_verifies_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MetaStore::create(&dir.path().join(pool::STORE_FILE)).unwrap());
    store
        .put_key(&shardvol::meta::KeyRecord {
            version: 1,
            wrapped: vec![0; 60],
            state: shardvol::meta::KeyState::Active,
            created_unix: 0,
        })
        .unwrap();
    let key = TagKey::from_bytes([5; 32]);
    let mut text = String::new();
    let mut prev = [0u8; 32];
    const N: u64 = 20_000;
    for seq in 1..=N {
        let fl = fields([
            ("volume", "vol0".to_string()),
            ("epoch", seq.to_string()),
            ("outcome", "ok".to_string()),
        ]);
        let hash = hash_of(seq, 1_700_000_000 + seq, Some(1), "rotate", &fl, &prev);
        let r = Record {
            seq,
            time_unix: 1_700_000_000 + seq,
            event: "rotate".into(),
            fields: fl,
            key_version: Some(1),
            prev,
            hash,
            mac: Some(mac_of(&key, &hash)),
        };
        text.push_str(&r.to_json());
        text.push('\n');
        prev = hash;
    }
    std::fs::write(dir.path().join(LOG_FILE), &text).unwrap();
    store.put_audit_head(N, &prev).unwrap();
    let log = AuditLog::open(dir.path(), store);
    let audit_key = AuditKey::new(1, key);
    let t0 = Instant::now();
    let plain = log.verify(None).unwrap();
    let t_plain = t0.elapsed();
    let t1 = Instant::now();
    let keyed = log.verify(Some(&audit_key)).unwrap();
    let t_keyed = t1.elapsed();
    assert!(plain.intact() && keyed.intact(), "{:?}", keyed.first_broken);
    assert_eq!(keyed.macs_checked, N);
    eprintln!(
        "{N} records, {} bytes ({} per record): verify {:.2} µs/record without the key, {:.2} with MACs",
        text.len(),
        text.len() as u64 / N,
        t_plain.as_secs_f64() * 1e6 / N as f64,
        t_keyed.as_secs_f64() * 1e6 / N as f64
    );
}
