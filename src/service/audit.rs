//! Audit commands of a served pool: `audit verify` and `audit show` run by the server, which
//! holds the metadata store and the audit key, and the text both print (the same whether the
//! server or the CLI on a stopped pool does the work).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Service;
use crate::audit::{AuditLog, VerifyReport, format_time_utc};
use crate::control::Handlers;

/// What `audit verify` prints, and the first broken record if any.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditVerifyOutput {
    pub lines: Vec<String>,
    pub broken: Option<String>,
}

/// The report of a verification as text lines; `keyed`: whether MACs were checked.
pub fn audit_verify_output(path: &str, r: &VerifyReport, keyed: bool) -> AuditVerifyOutput {
    let mut lines = vec![format!("audit log {path}: {} records", r.records)];
    lines.push(match r.head {
        Some((seq, _)) => format!("chain head in the store: record {seq}"),
        None => "chain head in the store: none".to_string(),
    });
    if keyed {
        let unverifiable = if r.macs_unverifiable > 0 {
            format!(
                "; {} under archived or destroyed master keys not checked (later MACs cover them)",
                r.macs_unverifiable
            )
        } else {
            String::new()
        };
        lines.push(format!(
            "MACs: {} of {} checked and valid{unverifiable}",
            r.macs_checked, r.with_mac
        ));
    } else {
        lines.push(format!(
            "MACs: NOT checked ({} records carry one): pass --share FILE (t of them) to check them",
            r.with_mac
        ));
    }
    lines.push(format!(
        "sealed records (no MAC): {}, of which not yet attested: {}",
        r.sealed, r.unattested
    ));
    if let Some(t) = &r.torn_tail {
        lines.push(format!(
            "note: the log ends with a torn line of {} bytes at offset {} (an append interrupted by a crash); it is not part of the chain, and the next append removes it and records log-repaired",
            t.len, t.offset
        ));
    }
    if r.head_lag {
        lines.push(
            "note: the chain head in the store is one record behind the log (a crash between the two writes); the next append catches it up and records log-repaired"
                .to_string(),
        );
    }
    AuditVerifyOutput {
        lines,
        broken: r.first_broken.as_ref().map(|b| b.to_string()),
    }
}

/// The records of a log as `audit show` prints them: a table, or the stored JSON lines.
pub fn audit_show_lines(log: &AuditLog, json: bool) -> Result<Vec<String>, String> {
    let contents = log.read().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if !json {
        out.push(format!(
            "{:>6}  {:<20}  {:<15}  {:<7}  fields",
            "seq", "time (UTC)", "event", "mac"
        ));
    }
    for line in &contents.lines {
        match line {
            Ok(r) if json => out.push(r.to_json()),
            Ok(r) => {
                let mac = r
                    .key_version
                    .map_or_else(|| "sealed".to_string(), |v| format!("key v{v}"));
                let fields: Vec<String> =
                    r.fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                out.push(format!(
                    "{:>6}  {:<20}  {:<15}  {:<7}  {}",
                    r.seq,
                    format_time_utc(r.time_unix),
                    r.event,
                    mac,
                    fields.join(" ")
                ));
            }
            Err(msg) => out.push(format!("not a record: {msg}")),
        }
    }
    if let Some(t) = contents.torn_tail {
        out.push(format!(
            "note: torn last line of {} bytes at offset {} (an interrupted append)",
            t.len, t.offset
        ));
    }
    Ok(out)
}

/// Registers `audit_verify` and `audit_show`.
pub fn register(svc: &std::sync::Arc<Service>, h: &mut Handlers) {
    let s = svc.clone();
    h.add("audit_verify", move |_: &Value, _| {
        let p = s.pool().ok_or(
            "the pool is sealed: the server holds no key to check MACs with; unlock it first",
        )?;
        let (path, r) = p.audit_verify().map_err(|e| e.to_string())?;
        serde_json::to_value(audit_verify_output(&path, &r, true)).map_err(|e| e.to_string())
    });
    let s = svc.clone();
    h.add("audit_show", move |args: &Value, _| {
        let json = args.get("json").and_then(Value::as_bool).unwrap_or(false);
        let p = s
            .pool()
            .ok_or("the pool is sealed: stop the server to read its audit log offline")?;
        serde_json::to_value(audit_show_lines(&p.audit, json)?).map_err(|e| e.to_string())
    });
}
