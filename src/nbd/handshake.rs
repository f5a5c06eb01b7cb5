//! Fixed newstyle handshake and option haggling.
//!
//! Promises:
//! - the server sends `NBDMAGIC`, `IHAVEOPT` and the flags `FIXED_NEWSTYLE | NO_ZEROES`; a
//!   client flag it does not know closes the connection (as the spec requires);
//! - every option except `NBD_OPT_EXPORT_NAME` gets a reply; unknown options get
//!   `NBD_REP_ERR_UNSUP` and negotiation goes on;
//! - no option payload longer than [`MAX_OPTION_LEN`] is read or allocated: it gets
//!   `NBD_REP_ERR_TOO_BIG` and the connection is closed (its bytes cannot be skipped safely);
//! - a bad option magic, an unknown export in `NBD_OPT_EXPORT_NAME`, or `NBD_OPT_ABORT` end the
//!   connection.
//!
//! Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO (NBD_INFO_EXPORT, NAME, DESCRIPTION,
//! BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`).
//! `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP` until TLS lands.
//!
//! The caller bounds the whole negotiation in time (`ServerConfig::handshake_timeout`).

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::config::MAX_OPTION_LEN;
use super::export::{Export, ExportTable};
use super::wire::{self, Parse};

/// Context id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase needs to know from the handshake.
#[derive(Debug)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Context id of `base:allocation` when the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// Transmission flags that were sent.
    pub flags: u16,
}

/// How option haggling ended.
#[derive(Debug)]
pub enum Outcome {
    /// Enter transmission.
    Transmission(Negotiated),
    /// Close the connection, for the reason given.
    Close(&'static str),
}

#[derive(Default)]
struct State {
    structured: bool,
    /// Export that `NBD_OPT_SET_META_CONTEXT` last selected `base:allocation` on.
    meta: Option<Arc<Export>>,
}

/// Runs the handshake on a fresh connection.
pub async fn negotiate<R, W>(r: &mut R, w: &mut W, exports: &ExportTable) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    wire::put_greeting(&mut out);
    send(w, &mut out).await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !wire::KNOWN_CLIENT_FLAGS != 0 {
        return Ok(Outcome::Close("unknown client flags"));
    }
    let no_zeroes = client_flags & wire::FLAG_C_NO_ZEROES != 0;
    let mut st = State::default();

    loop {
        let magic = r.read_u64().await?;
        if magic != wire::IHAVEOPT {
            return Ok(Outcome::Close("bad option magic"));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        debug!(option, name = wire::option_name(option), len, "option");
        if len > MAX_OPTION_LEN {
            if option != wire::OPT_EXPORT_NAME {
                let msg = format!("option payload of {len} bytes exceeds {MAX_OPTION_LEN}");
                wire::put_option_reply(&mut out, option, wire::REP_ERR_TOO_BIG, msg.as_bytes());
                send(w, &mut out).await?;
            }
            return Ok(Outcome::Close("option payload too long"));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match option {
            wire::OPT_EXPORT_NAME => {
                let Some(export) = exports.get(&data) else {
                    return Ok(Outcome::Close("NBD_OPT_EXPORT_NAME for an unknown export"));
                };
                let n = finish(&st, export);
                wire::put_export_name_reply(&mut out, n.export.device.size(), n.flags, no_zeroes);
                send(w, &mut out).await?;
                return Ok(Outcome::Transmission(n));
            }
            wire::OPT_ABORT => {
                wire::put_option_reply(&mut out, option, wire::REP_ACK, &[]);
                // The client may already have closed: a failed ACK changes nothing.
                let _ = send(w, &mut out).await;
                return Ok(Outcome::Close("client aborted negotiation"));
            }
            wire::OPT_LIST => {
                if !data.is_empty() {
                    error_reply(
                        &mut out,
                        option,
                        wire::REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    for e in exports.list() {
                        wire::put_rep_server(&mut out, &e.name, &e.description);
                    }
                    wire::put_option_reply(&mut out, option, wire::REP_ACK, &[]);
                }
            }
            wire::OPT_INFO | wire::OPT_GO => {
                if let Some(n) = info_or_go(&mut out, option, &data, &st, exports) {
                    send(w, &mut out).await?;
                    return Ok(Outcome::Transmission(n));
                }
            }
            wire::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error_reply(
                        &mut out,
                        option,
                        wire::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    st.structured = true;
                    wire::put_option_reply(&mut out, option, wire::REP_ACK, &[]);
                }
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                meta_context(&mut out, option, &data, &mut st, exports);
            }
            wire::OPT_STARTTLS => {
                error_reply(
                    &mut out,
                    option,
                    wire::REP_ERR_UNSUP,
                    "TLS is not available on this server",
                );
            }
            _ => {
                error_reply(
                    &mut out,
                    option,
                    wire::REP_ERR_UNSUP,
                    "option not supported",
                );
            }
        }
        send(w, &mut out).await?;
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    w.write_all(out).await?;
    w.flush().await?;
    out.clear();
    Ok(())
}

fn error_reply(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    wire::put_option_reply(out, option, reply, message.as_bytes());
}

fn finish(st: &State, export: Arc<Export>) -> Negotiated {
    let base_allocation = match &st.meta {
        Some(m) if Arc::ptr_eq(m, &export) => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    let flags = export.transmission_flags(st.structured);
    info!(
        export = %export.name,
        size = export.device.size(),
        structured = st.structured,
        base_allocation = base_allocation.is_some(),
        flags = format_args!("{flags:#06x}"),
        "entering transmission"
    );
    Negotiated {
        export,
        structured: st.structured,
        base_allocation,
        flags,
    }
}

/// Answers `NBD_OPT_INFO` / `NBD_OPT_GO` into `out`; returns the negotiated state when a GO
/// succeeded.
fn info_or_go(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    st: &State,
    exports: &ExportTable,
) -> Option<Negotiated> {
    let mut p = Parse::new(data);
    let parsed = (|| {
        let name = p.string32()?;
        let n = p.u16()? as usize;
        let reqs: Vec<u16> = (0..n).map(|_| p.u16()).collect::<Option<_>>()?;
        (p.remaining() == 0).then_some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        error_reply(
            out,
            option,
            wire::REP_ERR_INVALID,
            "malformed NBD_OPT_INFO/NBD_OPT_GO payload",
        );
        return None;
    };
    let Some(export) = exports.get(name) else {
        error_reply(out, option, wire::REP_ERR_UNKNOWN, "no such export");
        return None;
    };
    let flags = export.transmission_flags(st.structured);
    wire::put_info_export(out, option, export.device.size(), flags);
    if name.is_empty() || reqs.contains(&wire::INFO_NAME) {
        wire::put_info_string(out, option, wire::INFO_NAME, &export.name);
    }
    if reqs.contains(&wire::INFO_DESCRIPTION) && !export.description.is_empty() {
        wire::put_info_string(out, option, wire::INFO_DESCRIPTION, &export.description);
    }
    // Sent even when not asked for: clients ignore what they did not request, and those that
    // look at it learn the 32 MiB maximum payload.
    wire::put_info_block_size(out, option);
    wire::put_option_reply(out, option, wire::REP_ACK, &[]);
    (option == wire::OPT_GO).then(|| finish(st, export))
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` into `out`.
fn meta_context(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    st: &mut State,
    exports: &ExportTable,
) {
    let set = option == wire::OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the selection even when it fails.
        st.meta = None;
        if !st.structured {
            error_reply(
                out,
                option,
                wire::REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
    }
    let mut p = Parse::new(data);
    let parsed = (|| {
        let name = p.string32()?;
        let n = p.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            // Each query takes at least 4 bytes, so this loop ends within `data.len() / 4`.
            queries.push(p.string32()?);
        }
        (p.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        error_reply(
            out,
            option,
            wire::REP_ERR_INVALID,
            "malformed meta context payload",
        );
        return;
    };
    if queries.iter().any(|q| !q.contains(&b':')) {
        error_reply(
            out,
            option,
            wire::REP_ERR_INVALID,
            "a meta context query lacks its namespace",
        );
        return;
    }
    let Some(export) = exports.get(name) else {
        error_reply(out, option, wire::REP_ERR_UNKNOWN, "no such export");
        return;
    };
    let matches = if set {
        queries
            .iter()
            .any(|q| *q == wire::BASE_ALLOCATION.as_bytes())
    } else {
        queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == b"base:" || *q == wire::BASE_ALLOCATION.as_bytes())
    };
    if matches {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        wire::put_meta_context(out, option, id, wire::BASE_ALLOCATION);
        if set {
            st.meta = Some(export);
        }
    }
    wire::put_option_reply(out, option, wire::REP_ACK, &[]);
}
