//! Pool commands: `create`, `inspect`, `unlock`, `status`, and `recover` (a volume's image
//! rebuilt from disk files and shares alone).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use shardvol::now_unix;
use shardvol::pool::{self, CreateOptions, DiskSpec};

use super::args::{CreateArgs, RecoverArgs};
use super::report::{human, utc};

pub(crate) fn create(a: CreateArgs) -> Result<()> {
    let disks = if a.disk.is_empty() {
        DiskSpec::Files(a.disks.unwrap_or(usize::from(a.data + a.parity)))
    } else {
        DiskSpec::Paths(
            a.disk
                .iter()
                .map(|s| match s.rsplit_once(':') {
                    Some((p, d)) if !d.is_empty() && !d.contains('/') => {
                        (PathBuf::from(p), Some(d.to_string()))
                    }
                    _ => (PathBuf::from(s), None),
                })
                .collect(),
        )
    };
    let chunk_size = u32::try_from(a.chunk_size).context("chunk size too large")?;
    let share_dir = a.share_dir.clone().unwrap_or_else(|| a.pool.join("shares"));
    let opts = CreateOptions {
        pool: a.pool.clone(),
        volume: a.volume.clone(),
        size: a.size,
        data: a.data,
        parity: a.parity,
        chunk_size,
        disks,
        shares: a.shares,
        threshold: a.threshold,
        share_dir: share_dir.clone(),
        journal_size: a.journal_size,
    };
    let c = pool::create(&opts)
        .with_context(|| format!("cannot create volume {} in {}", a.volume, a.pool.display()))?;
    if c.new_pool {
        println!(
            "created pool {} (id {})",
            a.pool.display(),
            pool::hex(&c.pool_id)
        );
        println!(
            "volume {}: {}, {}+{} over {} disks, chunk {}",
            a.volume,
            human(a.size),
            a.data,
            a.parity,
            c.disks.len(),
            human(a.chunk_size)
        );
        println!(
            "{} shares written, {} needed to unlock:",
            c.share_files.len(),
            a.threshold
        );
        for f in &c.share_files {
            println!("  {}", f.display());
        }
        if a.share_dir.is_none() {
            eprintln!(
                "warning: the shares are stored inside the pool directory. Anyone who can read the pool and"
            );
            eprintln!(
                "         {} shares can read the data: hand each share to its holder and delete it here.",
                a.threshold
            );
        }
    } else {
        println!(
            "added volume {} ({}, {}+{}) to pool {}",
            a.volume,
            human(a.size),
            a.data,
            a.parity,
            a.pool.display()
        );
    }
    Ok(())
}

pub(crate) fn inspect(pool_dir: PathBuf, json: bool) -> Result<()> {
    if shardvol::control::call(&pool_dir, "ping", serde_json::Value::Null, |_| {})?.is_some() {
        bail!(
            "a server is running on {}: it holds the metadata store; use `shardvol status --pool {}` (or stop the server to inspect)",
            pool_dir.display(),
            pool_dir.display()
        );
    }
    let info = pool::inspect(&pool_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!(
        "pool {}  id {}  unlock: {} of {} shares",
        pool_dir.display(),
        info.pool_id,
        info.threshold,
        info.shares
    );
    println!("volumes:");
    for v in &info.volumes {
        println!(
            "  {:<12} {:>10}  {}+{}  chunk {:<8} stripes {:<8} allocated {:>10}  journal {}",
            v.name,
            human(v.size),
            v.data_chunks,
            v.parity_chunks,
            human(u64::from(v.chunk_size)),
            v.stripes,
            human(v.allocated_blocks * 4096),
            human(v.journal_size)
        );
    }
    println!("disks:");
    for d in &info.disks {
        println!(
            "  {:>3}  {:<8} {:<12} {:>10}  superblock {}  {}",
            d.id,
            d.state,
            d.domain,
            human(d.size),
            d.superblock,
            d.path
        );
    }
    println!("master keys:");
    for k in &info.keys {
        println!("  version {}  {}", k.version, k.state);
    }
    Ok(())
}

pub(crate) fn unlock(pool_dir: PathBuf, share: PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(&share)
        .with_context(|| format!("cannot read share file {}", share.display()))?;
    // Check the file locally first: a damaged file is named before anything is sent.
    shardvol::kms::parse_share_file(&text, &share)?;
    let args = serde_json::json!({ "share": text, "origin": share.display().to_string() });
    let Some(v) = shardvol::control::call(&pool_dir, "unlock", args, |_| {})? else {
        bail!(
            "no server runs on {}: start `shardvol serve --pool {}` first (it starts sealed and waits for shares)",
            pool_dir.display(),
            pool_dir.display()
        );
    };
    let p: shardvol::service::UnlockProgress = serde_json::from_value(v)?;
    if p.unlocked {
        println!(
            "pool unlocked: {} of {} shares; the volumes are exported",
            p.have, p.need
        );
    } else {
        println!(
            "share accepted: {} of {}; the pool stays sealed until {} more holder(s) run `shardvol unlock`",
            p.have,
            p.need,
            p.need - p.have
        );
    }
    Ok(())
}

pub(crate) fn status(pool_dir: PathBuf, json: bool) -> Result<()> {
    let v = match shardvol::control::call(&pool_dir, "status", serde_json::Value::Null, |_| {})? {
        Some(v) => v,
        None => serde_json::to_value(shardvol::service::Status::offline(&pool_dir)?)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let st: shardvol::service::Status = serde_json::from_value(v)?;
    println!("pool {}: {}", st.pool, st.state);
    if let Some(u) = &st.unlock {
        println!("  unlock: {} of {} shares given", u.have, u.need);
    }
    println!("volumes:");
    for v in &st.volumes {
        print!(
            "  {:<12} {:<9} {:>10} used of {:>10}",
            v.name,
            v.state,
            human(v.allocated_bytes),
            human(v.size)
        );
        match v.journal_used_bytes {
            Some(j) => print!(
                "  journal {} used of {}",
                human(j),
                human(v.journal_size_bytes)
            ),
            None => print!("  journal {}", human(v.journal_size_bytes)),
        }
        println!();
        if let Some(c) = &v.counters {
            println!(
                "      written {} blocks ({} whole stripes without the journal), read {}, rebuilt {}, repaired {}, rollbacks {}, destage errors {}",
                c.blocks_written,
                c.stripes_written_whole,
                c.blocks_read,
                c.blocks_reconstructed,
                c.blocks_repaired,
                c.rollbacks_detected,
                c.destage_errors
            );
        }
    }
    for v in &st.volumes {
        if let Some(s) = &v.last_scrub {
            println!(
                "  {}: last scrub {} s ago{}: {} blocks, {} parity rows checked, {} bad, {} repaired, {} unrecoverable",
                v.name,
                now_unix().saturating_sub(s.finished_unix),
                if s.repair { " (repair)" } else { "" },
                s.blocks_checked,
                s.parity_checked,
                s.bad_found,
                s.repaired,
                s.unrecoverable
            );
        }
        if let Some(due) = v.next_scrub_unix {
            let first = if v.last_scrub.is_some() {
                "next"
            } else {
                "never scrubbed; first"
            };
            println!("  {}: {first} scheduled scrub at {}", v.name, utc(due));
        }
    }
    if let Some(r) = &st.rebalance {
        println!(
            "rebalance: onto disk {}, {:.1}% of the stripes moved; `shardvol disk add` with its path resumes it",
            r.disk, r.percent
        );
    }
    println!("disks:");
    for d in &st.disks {
        println!("  {:>3}  {:<10} {:<12} {}", d.id, d.state, d.domain, d.path);
        if let Some(c) = &d.counters {
            println!(
                "       I/O errors {}, tag failures {}, repaired {}, rebuilt chunks {}",
                c.io_errors, c.tag_failures, c.repaired, c.rebuilt_chunks
            );
        }
        if let Some(r) = &d.rebuild {
            println!(
                "       rebuilding: {:.1}% (volume {} stripe {}); `shardvol disk replace` with the same path resumes it",
                r.percent, r.volume, r.stripe
            );
        }
    }
    if let Some(k) = &st.keys {
        let r = &k.rotation;
        println!(
            "keys: writes use master version {} epoch {}; rotation {}: {} stripes / {} blocks re-encrypted, {} stale stripes left, {:.1} MB/s",
            k.write_version,
            k.write_epoch,
            if r.running { "running" } else { "stopped" },
            r.stripes_done,
            r.blocks_done,
            r.remaining_stripes,
            r.rate_mb_s
        );
    }
    Ok(())
}

/// Exit status of `recover` when the image was written but some blocks could not be read.
const EXIT_INCOMPLETE: i32 = 2;

pub(crate) fn recover(a: RecoverArgs) -> Result<()> {
    use shardvol::pool::recover::{RecoverOptions, describe_blocks, recover};
    let mut shares = a.share.clone();
    if let Some(d) = &a.share_dir {
        shares.extend(pool::shares_in(d)?);
    }
    let r = recover(&RecoverOptions {
        disks: a.disk.clone(),
        shares,
        volume: a.volume.clone(),
        output: a.output.clone(),
        force: a.force,
        progress: !a.quiet,
    })
    .with_context(|| format!("cannot recover volume {}", a.volume))?;
    println!(
        "recovered volume {} ({}) of pool {} into {}",
        r.volume,
        human(r.size),
        r.pool_id,
        a.output.display()
    );
    println!(
        "  pool description: superblock seq {} from {}",
        r.superblock_seq,
        r.superblock_from.display()
    );
    let used = r.disks.iter().filter(|d| d.missing.is_none()).count();
    println!("  disks: {used} used, {} missing", r.disks.len() - used);
    for d in &r.disks {
        let path = d.path.as_ref().unwrap_or(&d.recorded).display();
        match &d.missing {
            None => println!("    disk {:>3}  used     {path}", d.id),
            Some(why) => println!("    disk {:>3}  missing  {path}: {why}", d.id),
        }
    }
    for (p, note) in &r.notes {
        println!("  note: {}: {note}", p.display());
    }
    if r.journal_lost {
        println!(
            "  journal: every journal disk is missing; writes that were only in the journal are not in the image"
        );
    }
    if r.journaled_blocks > 0 {
        println!(
            "  journal: {} blocks could not be destaged (disks missing) and were read from the journal",
            r.journaled_blocks
        );
    }
    println!(
        "  allocation rebuilt from block metadata: {} blocks ({}) in {} stripes; {} rows repaired, {} uncertain, {} chunk areas unreadable",
        r.scan.allocated,
        human(r.scan.allocated * 4096),
        r.scan.stripes,
        r.scan.repaired_rows,
        r.scan.uncertain_rows,
        r.scan.unreadable_chunks
    );
    println!(
        "  copied {} of data, wrote {} (zeros left as holes) in {:.1} s; replayed journal held {} in memory",
        human(r.bytes_copied),
        human(r.bytes_written),
        r.seconds,
        human(r.overlay_bytes)
    );
    if !r.unreadable.is_empty() {
        eprintln!(
            "error: the image is incomplete: {} could not be read and are zeros in {}",
            describe_blocks(&r.unreadable),
            a.output.display()
        );
        std::process::exit(EXIT_INCOMPLETE);
    }
    Ok(())
}
