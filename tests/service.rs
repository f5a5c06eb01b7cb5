//! The served pool: a server started without shares is sealed (nothing exported) until `t`
//! distinct valid shares arrive over the control socket; bad shares are refused on their own.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use shardvol::config::Config;
use shardvol::control;
use shardvol::pool::{self, CreateOptions, DiskSpec};
use shardvol::service::{Service, UnlockProgress};

fn create(dir: &Path) -> Vec<std::path::PathBuf> {
    pool::create(&CreateOptions {
        pool: dir.to_path_buf(),
        volume: "vol0".into(),
        size: 16 << 20,
        data: 2,
        parity: 1,
        chunk_size: 64 << 10,
        disks: DiskSpec::Files(3),
        shares: 5,
        threshold: 3,
        share_dir: dir.join("shares"),
        journal_size: 8 << 20,
    })
    .unwrap()
    .share_files
}

fn unlock(dir: &Path, share: &Path) -> Result<UnlockProgress, String> {
    let text = std::fs::read_to_string(share).unwrap();
    control::call(
        dir,
        "unlock",
        json!({"share": text, "origin": share.display().to_string()}),
        |_| {},
    )
    .map_err(|e| e.to_string())
    .map(|v| serde_json::from_value(v.expect("server runs")).unwrap())
}

#[test]
fn sealed_until_threshold_then_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let shares = create(&dir);
    let other = tmp.path().join("other");
    let foreign = create(&other);

    let svc = Service::new(&dir, Config::default(), false).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(async { control::bind(&dir) }).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(control::serve(
        listener,
        control::socket_path(&dir),
        Arc::new(svc.handlers()),
        async {
            let _ = stopped.await;
        },
    ));

    assert!(svc.is_sealed());
    assert!(svc.exports.list().is_empty(), "sealed: nothing exported");
    let p = unlock(&dir, &shares[0]).unwrap();
    assert_eq!((p.have, p.need, p.unlocked), (1, 3, false));
    let e = unlock(&dir, &shares[0]).unwrap_err();
    assert!(e.contains("already given"), "{e}");
    let e = unlock(&dir, &foreign[1]).unwrap_err();
    assert!(
        e.contains(&foreign[1].display().to_string()),
        "foreign share named: {e}"
    );
    // One hex digit of the secret changed: the file's checksum refuses it.
    let text = std::fs::read_to_string(&shares[1]).unwrap();
    let at = text.find("secret: ").unwrap() + 8;
    let mut corrupt = text.clone().into_bytes();
    corrupt[at] = if corrupt[at] == b'0' { b'1' } else { b'0' };
    let corrupt = String::from_utf8(corrupt).unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, &corrupt).unwrap();
    let e = unlock(&dir, &bad).unwrap_err();
    assert!(e.contains("bad.txt"), "corrupt share named: {e}");
    let p = unlock(&dir, &shares[1]).unwrap();
    assert_eq!((p.have, p.unlocked), (2, false));
    assert!(svc.exports.list().is_empty(), "2 of 3: still sealed");
    let status = control::call(&dir, "status", json!(null), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(status["state"], "sealed");
    let p = unlock(&dir, &shares[4]).unwrap();
    assert!(p.unlocked);
    assert_eq!(svc.exports.list().len(), 1, "3 of 3: exported");
    let status = control::call(&dir, "status", json!(null), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(status["state"], "unlocked");
    assert_eq!(status["volumes"][0]["name"], "vol0");

    // The server verifies its audit log with its own keys; an edited record is named.
    let v = control::call(&dir, "audit_verify", json!(null), |_| {})
        .unwrap()
        .unwrap();
    assert!(v["broken"].is_null(), "{v}");
    assert!(
        v["lines"].to_string().contains("checked and valid"),
        "MACs checked: {v}"
    );
    let log = dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("pool-create", "pool-crEate", 1)).unwrap();
    let v = control::call(&dir, "audit_verify", json!(null), |_| {})
        .unwrap()
        .unwrap();
    assert!(
        v["broken"].as_str().is_some_and(|b| b.contains("record 1")),
        "edited record named: {v}"
    );
    std::fs::write(&log, text).unwrap();

    stop.send(()).unwrap();
    rt.block_on(server).unwrap();
    svc.close().unwrap();
    assert!(svc.exports.list().is_empty());
}
