//! Key lifecycle through a running server (control socket) and through the CLI: a sealed
//! server unlocked share by share, access windows, key commands over the socket, re-splitting,
//! and the `shardvol key ...` commands on a stopped pool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};
use shardvol::config::{Config, Hours};
use shardvol::control;
use shardvol::pool::{self, CreateOptions, DiskSpec};
use shardvol::service::{Service, UnlockProgress};
use shardvol::volume::BlockDevice;

fn create(dir: &Path, shares: u8, threshold: u8) -> Vec<PathBuf> {
    pool::create(&CreateOptions {
        pool: dir.to_path_buf(),
        volume: "vol0".into(),
        size: 16 << 20,
        data: 2,
        parity: 1,
        chunk_size: 64 << 10,
        disks: DiskSpec::Files(3),
        shares,
        threshold,
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

fn key(dir: &Path, args: Value) -> Result<Value, String> {
    control::call(dir, "key", args, |_| {})
        .map_err(|e| e.to_string())
        .map(|v| v.expect("server runs"))
}

/// A service with its control socket served on a runtime; stopped and closed on drop.
struct Running {
    svc: Arc<Service>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(dir: &Path, config: Config) -> Running {
        let svc = Service::new(dir, config, false).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(async { control::bind(dir) }).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(control::serve(
            listener,
            control::socket_path(dir),
            Arc::new(svc.handlers()),
            async {
                let _ = stopped.await;
            },
        ));
        Running {
            svc,
            rt,
            stop: Some(stop),
            server: Some(server),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = self.rt.block_on(h);
        }
        self.svc.close().unwrap();
    }
}

#[test]
fn sealed_server_unlocks_share_by_share_then_key_commands_run_over_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let shares = create(&dir, 3, 3);
    let data: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    // Three blocks in each of two stripes (2+1, 64 KiB chunks: 128 KiB per stripe).
    const SECOND: u64 = 128 << 10;
    // The background rotation re-keys stale stripes on its own, at most `rotation.rate`: at
    // 100 bytes/s it re-keys one stripe after the new master version and then waits two
    // minutes, so the other stripe still needs version 1 when `destroy` is tried (at the
    // default rate it could re-key both before a slow test thread got there).
    let mut slow_rotation = Config::default();
    slow_rotation.rotation.rate = 0.0001;
    {
        let r = Running::start(&dir, slow_rotation);
        let e = key(&dir, json!({"op": "status"})).unwrap_err();
        assert!(e.contains("sealed"), "{e}");
        assert_eq!(unlock(&dir, &shares[0]).unwrap().have, 1);
        let p = unlock(&dir, &shares[1]).unwrap();
        assert_eq!((p.have, p.need, p.unlocked), (2, 3, false));
        assert!(r.svc.exports.list().is_empty(), "2 of 3: sealed");
        assert!(unlock(&dir, &shares[2]).unwrap().unlocked);
        assert_eq!(r.svc.exports.list().len(), 1, "3 of 3: exported");
        let vol = r.svc.pool().unwrap().volumes["vol0"].clone();
        vol.write(0, &data, true).unwrap();
        vol.write(SECOND, &data, true).unwrap();

        let st = key(&dir, json!({"op": "status"})).unwrap();
        assert_eq!(st["write_version"], 1);
        assert_eq!(st["versions"][0]["blocks"], 6);
        let status = control::call(&dir, "status", json!(null), |_| {})
            .unwrap()
            .unwrap();
        assert_eq!(status["keys"]["rotation"]["running"], true, "{status}");
        let v0 = &status["volumes"][0];
        assert_eq!(v0["journal_size_bytes"], 8 << 20, "{status}");
        assert!(v0["journal_used_bytes"].is_u64(), "open volume: {status}");

        assert_eq!(
            key(&dir, json!({"op": "rotate-master"})).unwrap()["version"],
            2
        );
        let e = key(&dir, json!({"op": "destroy", "version": 1})).unwrap_err();
        assert!(e.contains("blocks still need it"), "{e}");
        let mut steps = 0;
        let r2 = control::call(&dir, "key", json!({"op": "rotate"}), |_| steps += 1)
            .unwrap()
            .unwrap();
        // What the background task did not re-key yet: one stripe or both.
        assert!(r2["blocks"] == 3 || r2["blocks"] == 6, "{r2}");
        assert!(steps >= 1, "progress is streamed");
        key(&dir, json!({"op": "destroy", "version": 1})).unwrap();
        let st = key(&dir, json!({"op": "status"})).unwrap();
        assert_eq!(st["versions"][0]["state"], "destroyed");
        assert_eq!(st["versions"][1]["blocks"], 6);

        // Re-split over the socket: needs the current shares, writes new ones.
        let texts: Vec<(String, String)> = shares
            .iter()
            .map(|f| (f.display().to_string(), std::fs::read_to_string(f).unwrap()))
            .collect();
        let new_dir = tmp.path().join("new");
        let e = key(
            &dir,
            json!({"op": "reissue", "shares": texts[..2], "count": 3, "threshold": 2, "share_dir": new_dir}),
        )
        .unwrap_err();
        assert!(e.contains("2 shares given, this pool needs 3"), "{e}");
        key(
            &dir,
            json!({"op": "reissue", "shares": texts, "count": 3, "threshold": 2, "share_dir": new_dir}),
        )
        .unwrap();
        for at in [0, SECOND] {
            let mut b = vec![0u8; data.len()];
            vol.read(at, &mut b).unwrap();
            assert_eq!(b, data);
        }

        // Every key event is in the audit log, in order, and the chain verifies.
        let pool = r.svc.pool().unwrap();
        let events: Vec<String> = pool
            .audit
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect();
        let pos = |e: &str| {
            events
                .iter()
                .position(|x| x == e)
                .unwrap_or_else(|| panic!("no {e} event in {events:?}"))
        };
        assert!(events.iter().filter(|e| *e == "unlock-attempt").count() >= 3);
        assert!(pos("unlock") < pos("rotate-master"));
        assert!(pos("rotate-master") < pos("rotate"));
        assert!(pos("rotate") < pos("destroy"));
        assert!(pos("destroy") < pos("reissue"));
        let report = pool.audit.verify(None).unwrap();
        assert!(report.intact(), "{report:?}");
    }
    // Restarted sealed: an old share is refused by name; two new ones open it.
    let new = pool::shares_in(&tmp.path().join("new")).unwrap();
    let r = Running::start(&dir, Config::default());
    let e = unlock(&dir, &shares[0]).unwrap_err();
    assert!(
        e.contains("another split") && e.contains("share-1.txt"),
        "{e}"
    );
    unlock(&dir, &new[0]).unwrap();
    assert!(unlock(&dir, &new[2]).unwrap().unlocked);
    let vol = r.svc.pool().unwrap().volumes["vol0"].clone();
    for at in [0, SECOND] {
        let mut b = vec![0u8; data.len()];
        vol.read(at, &mut b).unwrap();
        assert_eq!(b, data);
    }
    drop(vol);
    drop(r);
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert_eq!(
        log.matches("\"seal\"").count(),
        2,
        "each server stop seals the pool: {log}"
    );
}

#[test]
fn a_server_outside_its_unlock_window_refuses_every_share() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let shares = create(&dir, 3, 2);
    let hour = (shardvol::now_unix() % 86_400 / 3600) as u8;
    let mut config = Config::default();
    config.unlock.allowed_hours =
        Hours::parse(&format!("{:02}-{:02}", (hour + 3) % 24, (hour + 5) % 24)).unwrap();
    let r = Running::start(&dir, config);
    let e = unlock(&dir, &shares[0]).unwrap_err();
    assert!(
        e.contains("refused by policy") && e.contains("allowed_hours"),
        "{e}"
    );
    assert!(r.svc.is_sealed());
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(
        log.contains("policy-refusal"),
        "the refusal is audited: {log}"
    );
    let status = control::call(&dir, "status", json!(null), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(status["unlock"]["have"], 0, "nothing kept: {status}");
    // Share files given at start are refused the same way.
    drop(r);
    let mut config = Config::default();
    config.unlock.not_after = Some(shardvol::config::Date::parse("2001-01-01").unwrap());
    let svc = Service::new(&dir, config, false).unwrap();
    let e = svc.unlock_with_files(&shares[..2]).unwrap_err().to_string();
    assert!(
        e.contains("not_after") && e.contains("2001-01-01 23:59:59"),
        "{e}"
    );
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardvol"))
        .args(args)
        .env("SHARDVOL_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn cli_key_commands_on_a_stopped_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let shares = create(&dir, 3, 2);
    {
        let p = pool::Pool::open(&dir, &shares[..2]).unwrap();
        p.volumes["vol0"].write(0, &[5u8; 8192], true).unwrap();
        p.close().unwrap();
    }
    let d = dir.to_str().unwrap();
    let s1 = shares[0].to_str().unwrap();
    let s2 = shares[1].to_str().unwrap();
    let (ok, out) = cli(&["key", "status", "--pool", d]);
    assert!(
        !ok && out.contains("no server runs") && out.contains("--share"),
        "{out}"
    );
    let (ok, out) = cli(&[
        "key",
        "rotate-master",
        "--pool",
        d,
        "--share",
        s1,
        "--share",
        s2,
    ]);
    assert!(ok && out.contains("version 2 is active"), "{out}");
    let (ok, out) = cli(&[
        "key", "destroy", "1", "--pool", d, "--share", s1, "--share", s2,
    ]);
    assert!(!ok && out.contains("2 blocks still need it"), "{out}");
    let (ok, out) = cli(&["key", "rotate", "--pool", d, "--share", s1, "--share", s2]);
    assert!(
        ok && out.contains("2 blocks re-encrypted under version 2"),
        "{out}"
    );
    let (ok, out) = cli(&[
        "key", "archive", "1", "--pool", d, "--share", s1, "--share", s2,
    ]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&[
        "key", "status", "--json", "--pool", d, "--share", s1, "--share", s2,
    ]);
    assert!(ok, "{out}");
    let st: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(st["versions"][0]["state"], "archived");
    assert_eq!(st["versions"][1]["blocks"], 2);
    let (ok, out) = cli(&[
        "key", "rotate", "--pool", d, "--share", s1, "--share", s2, "--volume", "nope",
    ]);
    assert!(!ok && out.contains("no volume named \"nope\""), "{out}");
    let new_dir = tmp.path().join("fresh");
    let (ok, out) = cli(&[
        "shares",
        "reissue",
        "--pool",
        d,
        "--share",
        s1,
        "--share",
        s2,
        "--shares",
        "2",
        "--threshold",
        "2",
        "--share-dir",
        new_dir.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("old shares no longer work"), "{out}");
    let (ok, out) = cli(&["key", "status", "--pool", d, "--share", s1, "--share", s2]);
    assert!(!ok && out.contains("another split"), "{out}");
}
