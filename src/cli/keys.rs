//! Key commands: `key status|rotate|rotate-master|archive|destroy` and `shares reissue`, run on
//! the pool's server or on the stopped pool opened with `--share`.

use anyhow::{Context, Result, bail};
use shardvol::lifecycle::commands::KeyCommand;
use shardvol::pool;

use super::args::{KeyCmd, KeyTarget, SharesCmd};
use super::report::utc;

/// Runs a key command on the pool's server, or on the stopped pool opened with `--share`.
fn run_key(t: &KeyTarget, cmd: &KeyCommand) -> Result<serde_json::Value> {
    use std::io::Write;
    let show = |p: &serde_json::Value| {
        if let (Some(d), Some(n)) = (p["stripes_done"].as_u64(), p["stripes"].as_u64()) {
            eprint!(
                "\r  re-encrypting: stripe {d} of {n}, {} blocks",
                p["blocks"]
            );
            let _ = std::io::stderr().flush();
            if d == n {
                eprintln!();
            }
        }
    };
    let args = serde_json::to_value(cmd)?;
    if let Some(v) = shardvol::control::call(
        &t.pool,
        shardvol::lifecycle::commands::CONTROL_COMMAND,
        args,
        show,
    )? {
        return Ok(v);
    }
    if t.share.is_empty() {
        bail!(
            "no server runs on {}: give share files with --share FILE (repeat until the threshold is met) to open the stopped pool",
            t.pool.display()
        );
    }
    let config = match &t.config {
        Some(p) => shardvol::config::Config::load(p)?,
        None => shardvol::config::Config::default(),
    };
    let policy = shardvol::kms::policy::KeyPolicy::from_config(&config);
    let p = pool::Pool::open_with(&t.pool, &t.share, &policy)
        .with_context(|| format!("cannot open pool {}", t.pool.display()))?;
    let result = shardvol::lifecycle::commands::run(&p, cmd, &|v| show(&v));
    let closed = p.close().context("closing the pool");
    let v = result?;
    closed?;
    Ok(v)
}

pub(crate) fn key_cmd(k: KeyCmd) -> Result<()> {
    match k {
        KeyCmd::Status { target, json } => {
            let v = run_key(&target, &KeyCommand::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let st: shardvol::lifecycle::KeyStatus = serde_json::from_value(v)?;
            println!(
                "pool {}  key split {}  unlock: {} of {} shares",
                st.pool_id, st.split_id, st.threshold, st.shares
            );
            println!(
                "new writes: master version {}, epoch {} (started {}); epochs last {} s, blocks older than {} s are re-encrypted",
                st.write_version,
                st.current_epoch.number,
                utc(st.current_epoch.start_unix),
                st.epoch_period_secs,
                st.max_age_secs
            );
            println!("master key versions:");
            for v in &st.versions {
                let mut extra = String::new();
                if let Some(t) = v.destroy_after_unix {
                    extra = format!("  destroyed after {}", utc(t));
                }
                if let Some(t) = v.destroyed_unix {
                    extra = format!("  destroyed {}", utc(t));
                }
                println!(
                    "  version {:<4} {:<10} created {}  {:>10} blocks{extra}",
                    v.version,
                    v.state,
                    utc(v.created_unix),
                    v.blocks
                );
            }
            println!("blocks per key:");
            for k in &st.keys {
                let start = k
                    .epoch_start_unix
                    .map_or("before the kept history".into(), utc);
                println!(
                    "  version {:<4} epoch {:<6} (started {start})  {:>10} blocks",
                    k.version, k.epoch, k.blocks
                );
            }
            if st.unknown_blocks > 0 {
                println!(
                    "  {} blocks of unknown key (destaged before stamps were kept; re-encryption records them)",
                    st.unknown_blocks
                );
            }
            let r = &st.rotation;
            println!(
                "rotation task: {}; {} stripes / {} blocks re-encrypted ({} hot stripes), {} stale stripes left, {:.1} MB/s{}",
                if r.running { "running" } else { "not running" },
                r.stripes_done,
                r.blocks_done,
                r.hot_stripes_done,
                r.remaining_stripes,
                r.rate_mb_s,
                r.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        KeyCmd::Rotate {
            target,
            volume,
            stripe,
        } => {
            let v = run_key(&target, &KeyCommand::Rotate { volume, stripe })?;
            println!(
                "epoch {} started; {} stripes visited, {} blocks re-encrypted under version {}",
                v["epoch"], v["stripes"], v["blocks"], v["version"]
            );
        }
        KeyCmd::RotateMaster { target } => {
            let v = run_key(&target, &KeyCommand::RotateMaster)?;
            println!(
                "master key version {} is active: new writes use it; older blocks are re-encrypted by the rotation task (or now: `shardvol key rotate`)",
                v["version"]
            );
        }
        KeyCmd::Archive { target, version } => {
            run_key(&target, &KeyCommand::Archive { version })?;
            println!(
                "master key version {version} archived: not used for reading; destroyed when rotation.retention ends"
            );
        }
        KeyCmd::Destroy { target, version } => {
            run_key(&target, &KeyCommand::Destroy { version })?;
            println!(
                "master key version {version} destroyed: erased from the key slots and from both superblock slots of every disk"
            );
        }
    }
    Ok(())
}

/// Runs a `shares` subcommand.
pub(crate) fn shares_cmd(c: SharesCmd) -> Result<()> {
    match c {
        SharesCmd::Reissue {
            target,
            shares,
            threshold,
            share_dir,
        } => {
            let texts = target
                .share
                .iter()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .map(|t| (f.display().to_string(), t))
                        .with_context(|| format!("cannot read share file {}", f.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            if texts.is_empty() {
                bail!(
                    "give the current shares with --share FILE (as many as the pool's threshold)"
                );
            }
            let share_dir = std::path::absolute(&share_dir)?;
            let cmd = KeyCommand::Reissue {
                shares: texts,
                count: shares,
                threshold,
                share_dir,
            };
            let v = run_key(&target, &cmd)?;
            println!(
                "new key split: {} shares, {} needed to unlock; the old shares no longer work. Hand each file to its holder:",
                shares, threshold
            );
            for f in v["files"].as_array().into_iter().flatten() {
                println!("  {}", f.as_str().unwrap_or_default());
            }
            Ok(())
        }
    }
}
