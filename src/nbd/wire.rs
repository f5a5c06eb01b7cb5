//! NBD wire format: magic numbers, flags, option and command codes, and the encoders and
//! decoders of every frame the server sends or receives. All integers are big-endian.
//!
//! Byte tables of every frame are in `docs/nbd.md` ("Wire structs"); the ones used on every
//! request are repeated here.
//!
//! Request (client → server, 28 bytes, then `length` bytes of data for `NBD_CMD_WRITE`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x25609513` |
//! | 4 | 2 | command flags |
//! | 6 | 2 | command type |
//! | 8 | 8 | cookie (opaque, echoed in the reply) |
//! | 16 | 8 | offset |
//! | 24 | 4 | length |
//!
//! Simple reply (16 bytes, then the data of a successful `NBD_CMD_READ`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x67446698` |
//! | 4 | 4 | error (0 = success) |
//! | 8 | 8 | cookie |
//!
//! Structured reply chunk (20 bytes, then `length` bytes of payload):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x668e33ef` |
//! | 4 | 2 | flags (`NBD_REPLY_FLAG_DONE` = 1) |
//! | 6 | 2 | chunk type |
//! | 8 | 8 | cookie |
//! | 16 | 4 | payload length |
//!
//! This module does no I/O and never allocates by a client-given size: decoders work on
//! fixed-size arrays or on slices the caller already bounded.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Handshake flags this server sends.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Client flags this server understands; any other bit makes it close the connection.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// The name the spec gives an option code, for logs.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        4 => "PEEK_EXPORT",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        11 => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Error values (the spec fixes them; they happen to equal Linux errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Name of the one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Size constraints advertised with `NBD_INFO_BLOCK_SIZE`. They are the spec's defaults, so
/// clients that never ask for them (`NBD_OPT_EXPORT_NAME`) obey them too.
/// Minimum: any byte alignment works (the volume does read-modify-write of partial blocks).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred: the volume's 4 KiB block; smaller or unaligned writes cost a read-modify-write.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Maximum payload of one READ or WRITE: 32 MiB, the largest the spec says a client may
/// expect to work everywhere; it bounds the buffer one request can make the server allocate.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Header plus offset field of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: bytes before the data.
pub const OFFSET_DATA_PREFIX: usize = STRUCTURED_HEADER_LEN + 8;
/// Longest error message sent in an error chunk (the spec's string limit).
pub const MAX_STRING: usize = 4096;

/// Transmission commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    /// Decodes a command type; `None` for types this server does not know.
    pub fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            _ => return None,
        })
    }

    /// The name the spec uses, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::Disc => "DISC",
            Self::Flush => "FLUSH",
            Self::Trim => "TRIM",
            Self::Cache => "CACHE",
            Self::WriteZeroes => "WRITE_ZEROES",
            Self::BlockStatus => "BLOCK_STATUS",
        }
    }

    /// Commands that change the export's contents (refused with EPERM when read-only).
    pub fn modifies(self) -> bool {
        matches!(self, Self::Write | Self::Trim | Self::WriteZeroes)
    }

    /// Command flags valid for this command (FUA is valid on every command when advertised).
    pub fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Self::Read => CMD_FLAG_DF,
                Self::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Self::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

/// A decoded request header. `kind` stays raw so that an unknown type can still be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// A request header did not start with [`REQUEST_MAGIC`]: the stream cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl Request {
    /// Decodes a request header.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes a request header (used by tests and tools that speak to the server).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Appends the greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
pub fn put_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
}

/// Appends an option reply: magic, option, reply type, length, data.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_SERVER` reply for one export of `NBD_OPT_LIST`.
pub fn put_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    put_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size.to_be_bytes());
    d[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`).
pub fn put_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` with this server's constraints.
pub fn put_info_block_size(out: &mut Vec<u8>, option: u32) {
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    d[6..10].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    d[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_META_CONTEXT`: context id and name.
pub fn put_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    put_option_reply(out, option, REP_META_CONTEXT, &d);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the
/// client set `NBD_FLAG_C_NO_ZEROES`.
pub fn put_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Writes a simple reply header into `out[..16]`.
pub fn simple_reply_header(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured reply chunk header into `out[..20]`.
pub fn structured_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// A complete simple reply without data.
pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = vec![0u8; SIMPLE_REPLY_LEN];
    simple_reply_header(&mut v, error, cookie);
    v
}

/// A complete `NBD_REPLY_TYPE_NONE` chunk with `NBD_REPLY_FLAG_DONE`.
pub fn structured_done(cookie: u64) -> Vec<u8> {
    let mut v = vec![0u8; STRUCTURED_HEADER_LEN];
    structured_header(&mut v, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    v
}

/// A complete final error chunk: `NBD_REPLY_TYPE_ERROR`, or `NBD_REPLY_TYPE_ERROR_OFFSET`
/// when `offset` is given. The message is cut to [`MAX_STRING`] bytes on a char boundary.
pub fn structured_error(cookie: u64, error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let (kind, tail) = match offset {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
        None => (REPLY_TYPE_ERROR, 0),
    };
    let len = 4 + 2 + msg.len() + tail;
    let mut v = vec![0u8; STRUCTURED_HEADER_LEN];
    structured_header(&mut v, REPLY_FLAG_DONE, kind, cookie, len as u32);
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    if let Some(off) = offset {
        v.extend_from_slice(&off.to_be_bytes());
    }
    v
}

/// A complete final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id, then (length, flags)
/// descriptors.
pub fn block_status_chunk(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut v = vec![0u8; STRUCTURED_HEADER_LEN];
    v.reserve(len);
    structured_header(
        &mut v,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    );
    v.extend_from_slice(&context.to_be_bytes());
    for &(l, f) in descriptors {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

/// Bounds-checked reader over an option payload that the caller already read in full.
pub struct Parse<'a> {
    buf: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit length followed by that many bytes.
    pub fn string32(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_checks_magic() {
        let r = Request {
            flags: 3,
            kind: 1,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 77,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b), Ok(r));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(Request::decode(&bad), Err(BadMagic(0x0060_9513)));
    }

    #[test]
    fn greeting_bytes() {
        let mut v = Vec::new();
        put_greeting(&mut v);
        assert_eq!(&v[..8], b"NBDMAGIC");
        assert_eq!(&v[8..16], b"IHAVEOPT");
        assert_eq!(&v[16..], &[0, 3]);
    }

    #[test]
    fn error_chunk_layout_and_message_cut() {
        let v = structured_error(9, EIO, "boom", Some(4096));
        assert_eq!(&v[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([v[6], v[7]]), REPLY_TYPE_ERROR_OFFSET);
        assert_eq!(
            u32::from_be_bytes(v[16..20].try_into().unwrap()),
            4 + 2 + 4 + 8
        );
        assert_eq!(&v[26..30], b"boom");
        assert_eq!(u64::from_be_bytes(v[30..38].try_into().unwrap()), 4096);
        let long = "é".repeat(3000); // 6000 bytes, 2-byte chars
        let v = structured_error(1, EIO, &long, None);
        let msg_len = u16::from_be_bytes([v[24], v[25]]) as usize;
        assert!(msg_len <= MAX_STRING && msg_len.is_multiple_of(2));
        assert!(std::str::from_utf8(&v[26..26 + msg_len]).is_ok());
    }

    #[test]
    fn parse_refuses_reads_past_the_end() {
        let data = [0, 0, 0, 9, b'a'];
        let mut p = Parse::new(&data);
        assert_eq!(p.string32(), None);
        let mut p = Parse::new(&data[..4]);
        assert_eq!(p.u32(), Some(9));
        assert_eq!(p.u16(), None);
    }
}
