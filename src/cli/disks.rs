//! Long admin jobs on the disks: `scrub`, `disk replace`, `disk add`, and `run_job`, which runs
//! them through the pool's server or, when none runs, on the stopped pool opened with shares.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use shardvol::pool;

use super::args::{DiskCommand, HealShares, ScrubArgs};
use super::report::human;

/// Prints progress lines on stderr, at most one a second (and the last).
fn progress_printer(what: &'static str) -> impl Fn(&shardvol::volume::scrub::Progress) {
    let last = std::cell::Cell::new(std::time::Instant::now());
    move |p| {
        if last.get().elapsed().as_secs_f64() < 1.0 && p.done < p.total {
            return;
        }
        last.set(std::time::Instant::now());
        let pct = if p.total == 0 {
            100.0
        } else {
            p.done as f64 * 100.0 / p.total as f64
        };
        eprintln!(
            "{what}: {}/{} stripes ({pct:.1}%), {}/s, ETA {:.0} s",
            p.done,
            p.total,
            human(p.bytes_per_s as u64),
            p.eta_s
        );
    }
}

/// Opens a stopped pool for an admin command, with its share files.
fn open_offline(pool_dir: &std::path::Path, s: &HealShares) -> Result<pool::Pool> {
    let mut files = s.share.clone();
    if let Some(d) = &s.share_dir {
        files.extend(pool::shares_in(d)?);
    }
    if files.is_empty() {
        bail!(
            "no server runs on {}: give --share FILE (up to the threshold) to work on the stopped pool",
            pool_dir.display()
        );
    }
    pool::Pool::open(pool_dir, &files)
        .with_context(|| format!("cannot open pool {}", pool_dir.display()))
}

/// Runs a long admin job through the pool's server (`command` over the control socket, its
/// progress printed as `what`), or, when no server runs, with `offline` on the stopped pool
/// opened with the share files.
fn run_job<R: serde::de::DeserializeOwned>(
    pool_dir: &std::path::Path,
    shares: &HealShares,
    command: &str,
    args: serde_json::Value,
    what: &'static str,
    offline: impl FnOnce(
        &pool::Pool,
        &dyn Fn(shardvol::volume::scrub::Progress),
    ) -> Result<R, pool::PoolError>,
) -> Result<R> {
    use shardvol::volume::scrub::Progress;
    let show = progress_printer(what);
    let online = shardvol::control::call(pool_dir, command, args, |v| {
        if let Ok(p) = serde_json::from_value::<Progress>(v.clone()) {
            show(&p);
        }
    })?;
    match online {
        Some(v) => Ok(serde_json::from_value(v)?),
        None => {
            let p = open_offline(pool_dir, shares)?;
            let r = offline(&p, &|pr| show(&pr));
            p.close().context("closing the pool")?;
            Ok(r?)
        }
    }
}

pub(crate) fn scrub(a: ScrubArgs) -> Result<()> {
    use shardvol::volume::scrub::{ScrubOptions, ScrubReport};
    let args = serde_json::json!({ "volume": a.volume, "repair": a.repair, "rate": a.rate });
    let report: ScrubReport = run_job(&a.pool, &a.shares, "scrub", args, "scrub", |p, show| {
        let opts = ScrubOptions {
            repair: a.repair,
            rate_bytes_per_s: a.rate,
        };
        p.scrub(&a.volume, &opts, show)
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "scrubbed {}: {} stripes, {} blocks and {} parity rows checked in {:.1} s ({}/s)",
            a.volume,
            report.stripes,
            report.blocks_checked,
            report.parity_checked,
            report.seconds,
            human((report.bytes_read as f64 / report.seconds.max(1e-9)) as u64)
        );
        println!(
            "bad: {}, repaired: {}, unrecoverable blocks: {}, blocks on failed disks (served from parity): {}",
            report.bad_found, report.repaired, report.unrecoverable, report.degraded
        );
        for b in report.bad.iter().take(20) {
            println!(
                "  stripe {} row {} chunk {} (disk {}){}: {}{}",
                b.stripe,
                b.row,
                b.chunk,
                b.disk,
                b.lba.map(|l| format!(" lba {l}")).unwrap_or_default(),
                b.what,
                if b.repaired { ", repaired" } else { "" }
            );
        }
        if report.bad.len() > 20 {
            println!("  ... {} more (--json lists them)", report.bad.len() - 20);
        }
        if report.bad_found > report.repaired && !a.repair {
            println!("run again with --repair to rewrite them");
        }
    }
    if report.unrecoverable > 0 {
        bail!(
            "{} blocks cannot be rebuilt from the surviving chunks",
            report.unrecoverable
        );
    }
    Ok(())
}

/// Runs a `disk` subcommand.
pub(crate) fn disk_cmd(c: DiskCommand) -> Result<()> {
    match c {
        DiskCommand::Replace {
            pool,
            disk,
            with,
            rate,
            json,
            shares,
        } => disk_replace(pool, disk, with, rate, json, shares),
        DiskCommand::Add {
            pool,
            disk,
            rate,
            json,
            shares,
        } => disk_add(pool, &disk, rate, json, shares),
    }
}

fn disk_replace(
    pool_dir: PathBuf,
    disk: u32,
    with: PathBuf,
    rate: u64,
    json: bool,
    shares: HealShares,
) -> Result<()> {
    use shardvol::pool::{RebuildOptions, RebuildReport};
    let with = std::path::absolute(&with).unwrap_or(with);
    let args = serde_json::json!({ "disk": disk, "with": with, "rate": rate });
    let report: RebuildReport = run_job(
        &pool_dir,
        &shares,
        "disk_replace",
        args,
        "rebuild",
        |p, show| {
            let opts = RebuildOptions {
                rate_bytes_per_s: rate,
                stop: None,
            };
            p.replace_disk(shardvol::layout::DiskId(disk), &with, &opts, show)
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "disk {} is now {}{}: {} chunks rebuilt, {} read, {} written in {:.1} s ({}/s)",
            report.disk,
            report.path,
            if report.resumed { " (resumed)" } else { "" },
            report.chunks,
            human(report.bytes_read),
            human(report.bytes_written),
            report.seconds,
            human((report.bytes_written as f64 / report.seconds.max(1e-9)) as u64)
        );
    }
    if report.unrecoverable > 0 {
        bail!(
            "{} blocks could not be rebuilt (more than m chunks of their rows are lost)",
            report.unrecoverable
        );
    }
    Ok(())
}

fn disk_add(
    pool_dir: PathBuf,
    disk: &str,
    rate: u64,
    json: bool,
    shares: HealShares,
) -> Result<()> {
    use shardvol::pool::{AddOptions, AddReport};
    // PATH:DOMAIN, unless the whole argument names an existing file (a path with a colon).
    let (path, domain) = match disk.rsplit_once(':') {
        Some((p, d)) if !d.is_empty() && !std::path::Path::new(disk).exists() => {
            (PathBuf::from(p), Some(d.to_string()))
        }
        _ => (PathBuf::from(disk), None),
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    let args = serde_json::json!({ "path": path, "domain": domain, "rate": rate });
    let report: AddReport = run_job(
        &pool_dir,
        &shares,
        "disk_add",
        args,
        "rebalance",
        |p, show| {
            let opts = AddOptions {
                domain: domain.clone(),
                rate_bytes_per_s: rate,
                stop: None,
            };
            p.add_disk(&path, &opts, show)
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "disk {} ({}, domain {}) is in the pool{}: {} stripes rewritten, {} chunks moved, {} of data in {:.1} s ({}/s)",
            report.disk,
            report.path,
            report.domain,
            if report.resumed {
                " (rebalance resumed)"
            } else {
                ""
            },
            report.moved,
            report.chunks_moved,
            human(report.bytes),
            report.seconds,
            human((report.bytes as f64 / report.seconds.max(1e-9)) as u64)
        );
    }
    Ok(())
}
