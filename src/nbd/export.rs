//! Exports and the export table.
//!
//! An [`Export`] is one named [`BlockDevice`] as clients see it. The [`ExportTable`] is shared
//! by every connection and can be replaced at run time ([`ExportTable::set`]): a sealed server
//! starts with an empty table and gains exports after unlock. A connection looks its export up
//! once, at `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`, and keeps that `Arc<Export>` for its life;
//! replacing the table affects new negotiations only.

use std::sync::{Arc, RwLock};

use super::wire;
use crate::volume::BlockDevice;

/// One export: a device under a name.
pub struct Export {
    /// Name clients ask for (`nbd://host/NAME`). At most 4096 bytes, no NUL.
    pub name: String,
    /// Free text shown by `nbdinfo` and `NBD_OPT_LIST`. At most 4096 bytes, no NUL.
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes, trims and write-zeroes with `NBD_EPERM` and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
}

impl Export {
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            device,
            read_only: false,
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Transmission flags for this export: exactly the features that work.
    /// `structured` says whether structured replies were negotiated (needed for `SEND_DF`).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        // CAN_MULTI_CONN: the volume API promises that FLUSH makes every completed write
        // durable, whichever connection wrote it, and there is no per-connection cache.
        let mut f = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_CACHE
            | wire::FLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= wire::FLAG_READ_ONLY;
        } else {
            f |= wire::FLAG_SEND_FUA
                | wire::FLAG_SEND_TRIM
                | wire::FLAG_SEND_WRITE_ZEROES
                | wire::FLAG_SEND_FAST_ZERO;
        }
        if structured {
            // Every read is answered with exactly one content chunk, so DF always holds.
            f |= wire::FLAG_SEND_DF;
        }
        f
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Why an export list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("two exports are named {0:?}")]
    Duplicate(String),
    #[error("export name or description {0:?} is longer than 4096 bytes or contains NUL")]
    BadString(String),
}

/// The exports a server offers, replaceable at run time. Lookups take a read lock for the
/// time of a clone of an `Arc`.
#[derive(Default)]
pub struct ExportTable {
    exports: RwLock<Vec<Arc<Export>>>,
}

impl ExportTable {
    /// An empty table: every `NBD_OPT_GO` gets `NBD_REP_ERR_UNKNOWN` until [`Self::set`].
    pub fn empty() -> Self {
        Self::default()
    }

    /// A table holding `exports`.
    pub fn new(exports: Vec<Export>) -> Result<Self, ExportError> {
        let t = Self::empty();
        t.set(exports)?;
        Ok(t)
    }

    /// Replaces every export. Connections already in transmission keep their export.
    pub fn set(&self, exports: Vec<Export>) -> Result<(), ExportError> {
        for (i, e) in exports.iter().enumerate() {
            for s in [&e.name, &e.description] {
                if s.len() > wire::MAX_STRING || s.contains('\0') {
                    return Err(ExportError::BadString(s.chars().take(64).collect()));
                }
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ExportError::Duplicate(e.name.clone()));
            }
        }
        let exports = exports.into_iter().map(Arc::new).collect();
        *self.exports.write().unwrap_or_else(|e| e.into_inner()) = exports;
        Ok(())
    }

    /// The export called `name`; the empty name means the default export, the first one.
    pub fn get(&self, name: &[u8]) -> Option<Arc<Export>> {
        let list = self.exports.read().unwrap_or_else(|e| e.into_inner());
        if name.is_empty() {
            return list.first().cloned();
        }
        list.iter().find(|e| e.name.as_bytes() == name).cloned()
    }

    /// Every export, in table order.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::mem::MemDevice;

    fn dev() -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(4096))
    }

    #[test]
    fn table_lookup_default_and_swap() {
        let t = ExportTable::empty();
        assert!(t.get(b"").is_none());
        t.set(vec![Export::new("a", dev()), Export::new("b", dev())])
            .unwrap();
        assert_eq!(t.get(b"").unwrap().name, "a");
        assert_eq!(t.get(b"b").unwrap().name, "b");
        assert!(t.get(b"c").is_none());
        assert_eq!(
            t.set(vec![Export::new("x", dev()), Export::new("x", dev())]),
            Err(ExportError::Duplicate("x".into()))
        );
        assert_eq!(
            t.list().len(),
            2,
            "a refused list leaves the table unchanged"
        );
        assert!(t.set(vec![Export::new("a\0", dev())]).is_err());
    }

    #[test]
    fn flags_follow_read_only_and_structured() {
        let rw = Export::new("a", dev());
        let f = rw.transmission_flags(false);
        assert_eq!(f & wire::FLAG_READ_ONLY, 0);
        assert_ne!(f & wire::FLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(f & wire::FLAG_SEND_DF, 0);
        assert_ne!(rw.transmission_flags(true) & wire::FLAG_SEND_DF, 0);
        let ro = Export::new("a", dev()).with_read_only(true);
        let f = ro.transmission_flags(false);
        assert_ne!(f & wire::FLAG_READ_ONLY, 0);
        assert_eq!(
            f & (wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES | wire::FLAG_SEND_FUA),
            0
        );
    }
}
