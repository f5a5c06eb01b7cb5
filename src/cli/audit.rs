//! Audit log commands: `audit verify`, `audit show`, `audit restart`.

use anyhow::{Context, Result, bail};
use shardvol::pool;

use super::args::{AuditCommand, AuditKeyArgs};

/// Opens a pool's store and audit log for the `audit` commands, and its audit key when shares
/// are given (unwrapped the way `serve` unlocks, but nothing is recorded: these commands only
/// read the log, except `restart`).
fn open_audit(
    a: &AuditKeyArgs,
) -> Result<(shardvol::audit::AuditLog, Option<shardvol::audit::AuditKey>)> {
    use shardvol::audit::{AuditKey, AuditLog};
    use shardvol::meta::{KeyState, MetaStore};
    let store_path = a.pool.join(pool::STORE_FILE);
    if !pool::exists(&a.pool) {
        bail!(
            "{} is not a shardvol pool (no {})",
            a.pool.display(),
            pool::STORE_FILE
        );
    }
    let store = std::sync::Arc::new(MetaStore::open(&store_path)?);
    let mut shares = a.share.clone();
    if let Some(d) = &a.share_dir {
        shares.extend(pool::shares_in(d)?);
    }
    let key = if shares.is_empty() {
        None
    } else {
        let ring = pool::unlock(&store, &shares).context("cannot unlock the pool's keys")?;
        let active = store
            .keys()?
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .map(|k| k.version)
            .max()
            .unwrap_or(1);
        Some(AuditKey::from_ring(&ring, active)?)
    };
    Ok((AuditLog::open(&a.pool, store), key))
}

pub(crate) fn audit(c: AuditCommand) -> Result<()> {
    match c {
        AuditCommand::Verify(a) => audit_verify(&a),
        AuditCommand::Show { pool, json } => audit_show(&pool, json),
        AuditCommand::Restart(a) => {
            let (log, key) = open_audit(&a)?;
            let key = key.context(
                "restarting the audit log needs the pool's key: pass --share FILE once per share holder",
            )?;
            let r = log.restart(&key)?;
            println!(
                "set {} aside ({}); new log {} starts at record {}",
                r.old_log.display(),
                r.problem,
                log.path().display(),
                r.seq
            );
            Ok(())
        }
    }
}

fn audit_verify(a: &AuditKeyArgs) -> Result<()> {
    // A running server holds the store: it verifies with its own keys (MACs included).
    if let Some(v) =
        shardvol::control::call(&a.pool, "audit_verify", serde_json::Value::Null, |_| {})?
    {
        let out: shardvol::service::AuditVerifyOutput = serde_json::from_value(v)?;
        println!("(verified by the server running on {})", a.pool.display());
        return print_audit_verify(&out);
    }
    let (log, key) = open_audit(a)?;
    let r = log.verify(key.as_ref())?;
    print_audit_verify(&shardvol::service::audit_verify_output(
        &log.path().display().to_string(),
        &r,
        key.is_some(),
    ))
}

fn print_audit_verify(out: &shardvol::service::AuditVerifyOutput) -> Result<()> {
    for l in &out.lines {
        println!("{l}");
    }
    if let Some(b) = &out.broken {
        println!("(the counts above stop at the first broken record)");
        bail!("audit log broken at {b}");
    }
    println!("audit log intact");
    Ok(())
}

fn audit_show(pool_dir: &std::path::Path, json: bool) -> Result<()> {
    use shardvol::audit::AuditLog;
    use shardvol::meta::MetaStore;
    if let Some(v) = shardvol::control::call(
        pool_dir,
        "audit_show",
        serde_json::json!({ "json": json }),
        |_| {},
    )? {
        let lines: Vec<String> = serde_json::from_value(v)?;
        for l in lines {
            println!("{l}");
        }
        return Ok(());
    }
    if !pool::exists(pool_dir) {
        bail!(
            "{} is not a shardvol pool (no {})",
            pool_dir.display(),
            pool::STORE_FILE
        );
    }
    let store = std::sync::Arc::new(MetaStore::open(&pool_dir.join(pool::STORE_FILE))?);
    let log = AuditLog::open(pool_dir, store);
    for l in shardvol::service::audit_show_lines(&log, json).map_err(anyhow::Error::msg)? {
        println!("{l}");
    }
    Ok(())
}
