//! NBD protocol server: serves [`BlockDevice`](crate::volume::BlockDevice)s to NBD clients
//! (the Linux kernel's nbd driver, qemu, libnbd, fio).
//!
//! - [`wire`]: magic numbers, flags, codes, frame encoders and decoders (byte tables there and
//!   in `docs/nbd.md`);
//! - [`handshake`]: fixed newstyle negotiation and options (LIST, INFO, GO, EXPORT_NAME,
//!   STRUCTURED_REPLY, LIST/SET_META_CONTEXT for `base:allocation`);
//! - [`transmission`]: pipelined requests, out-of-order replies, the in-flight bound;
//! - [`errors`]: the one mapping from volume errors to NBD errors;
//! - [`export`]: exports and the run-time replaceable [`ExportTable`];
//! - [`server`]: listeners, accept loops, graceful shutdown; [`systemd`]: socket activation
//!   and readiness notification;
//! - [`workers`]: the fixed pool of threads that run volume calls;
//! - [`config`]: every limit, with its reason, and the server's counters.
//!
//! What the binary calls:
//!
//! ```no_run
//! # async fn f(dev: std::sync::Arc<dyn shardvol::volume::BlockDevice>) -> std::io::Result<()> {
//! use std::sync::Arc;
//! use shardvol::nbd::{Export, ExportTable, Listener, ServerConfig, serve};
//! let exports = Arc::new(ExportTable::empty()); // sealed: no exports yet
//! let mut listeners = shardvol::nbd::listeners_from_systemd()?;
//! if listeners.is_empty() {
//!     listeners.push(Listener::bind_tcp("127.0.0.1:10809").await?);
//! }
//! // After unlock, from anywhere that holds the Arc:
//! exports.set(vec![Export::new("vol0", dev)]).expect("unique names");
//! shardvol::nbd::sd_notify_ready()?;
//! serve(listeners, exports, ServerConfig::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

pub mod config;
pub mod errors;
pub mod export;
pub mod handshake;
pub mod server;
pub mod systemd;
pub mod transmission;
pub mod wire;
pub mod workers;

pub use config::{ServerConfig, ServerStats};
pub use errors::nbd_error;
pub use export::{Export, ExportError, ExportTable};
pub use server::{Listener, Server, serve};
pub use systemd::{listeners_from_systemd, sd_notify, sd_notify_ready};
