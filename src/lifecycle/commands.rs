//! The key commands (`shardvol key ...`, `shardvol shares reissue`) as one request type, run
//! the same way by a server (control command `key`) and by the CLI on a stopped pool.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::kms::{self, LoadedShare};
use crate::layout::StripeId;
use crate::pool::{Pool, PoolError, kek_from_loaded};
use crate::volume::Volume;

/// Name of the control command that carries a [`KeyCommand`].
pub const CONTROL_COMMAND: &str = "key";

/// One key command with its arguments.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum KeyCommand {
    /// Versions, states, epochs, blocks per key, rotation progress.
    Status,
    /// New epoch now, and re-encryption of the chosen scope under it.
    Rotate {
        volume: Option<String>,
        stripe: Option<u64>,
    },
    /// New master key version.
    RotateMaster,
    Archive {
        version: u32,
    },
    Destroy {
        version: u32,
    },
    /// New KEK split. `shares` are the texts of current share files (with their names): the
    /// holders' consent, checked by combining them.
    Reissue {
        shares: Vec<(String, String)>,
        count: u8,
        threshold: u8,
        share_dir: PathBuf,
    },
}

fn volumes_of(pool: &Pool, name: Option<&str>) -> Result<Vec<Arc<Volume>>, PoolError> {
    match name {
        None => Ok(pool.volumes.values().cloned().collect()),
        Some(n) => pool
            .volumes
            .get(n)
            .cloned()
            .map(|v| vec![v])
            .ok_or_else(|| {
                PoolError::Invalid(format!(
                    "the pool has no volume named {n:?} (it has: {})",
                    pool.volumes.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }),
    }
}

/// Runs `cmd` on an open pool; `progress` receives intermediate JSON values (a server forwards
/// them to the client).
pub fn run(pool: &Pool, cmd: &KeyCommand, progress: &dyn Fn(Value)) -> Result<Value, PoolError> {
    let all: Vec<Arc<Volume>> = pool.volumes.values().cloned().collect();
    let keys = &pool.keys;
    match cmd {
        KeyCommand::Status => {
            serde_json::to_value(keys.status(&all)?).map_err(|e| PoolError::Invalid(e.to_string()))
        }
        KeyCommand::Rotate { volume, stripe } => {
            let vols = volumes_of(pool, volume.as_deref())?;
            if stripe.is_some() && vols.len() != 1 {
                return Err(PoolError::Invalid(
                    "--stripe needs --volume (a stripe number is per volume)".into(),
                ));
            }
            if let (Some(s), Some(v)) = (stripe, vols.first())
                && *s >= v.stripes()
            {
                return Err(PoolError::Invalid(format!(
                    "volume {} has stripes 0 to {}; {s} is past its end",
                    v.name(),
                    v.stripes() - 1
                )));
            }
            let (stripes, blocks) = keys.rotate_now(&vols, stripe.map(StripeId), &|d, t, b| {
                progress(json!({"stripes_done": d, "stripes": t, "blocks": b}))
            })?;
            let (version, epoch) = keys.write_key();
            Ok(json!({"stripes": stripes, "blocks": blocks, "version": version, "epoch": epoch}))
        }
        KeyCommand::RotateMaster => {
            let version = keys.rotate_master()?;
            Ok(json!({ "version": version }))
        }
        KeyCommand::Archive { version } => {
            keys.archive(*version, &all)?;
            Ok(json!({ "archived": version }))
        }
        KeyCommand::Destroy { version } => {
            keys.destroy(*version, &all)?;
            Ok(json!({ "destroyed": version }))
        }
        KeyCommand::Reissue {
            shares,
            count,
            threshold,
            share_dir,
        } => {
            let loaded = shares
                .iter()
                .map(|(origin, text)| {
                    Ok(LoadedShare {
                        source: origin.clone(),
                        share: kms::parse_share_file(text, std::path::Path::new(origin))?,
                    })
                })
                .collect::<Result<Vec<_>, PoolError>>()?;
            // The holders' consent: their shares must open the pool as it is now.
            drop(kek_from_loaded(&pool.store, &loaded)?);
            let files = keys.reissue(*count, *threshold, share_dir)?;
            Ok(json!({ "files": files, "shares": count, "threshold": threshold }))
        }
    }
}
