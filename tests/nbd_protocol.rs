//! NBD protocol conformance, byte by byte: handshake, options, commands, replies and the
//! answers to malformed or hostile input. The device is the in-memory reference model, which
//! the tests also inspect directly.

mod nbd_support;

use std::sync::Arc;
use std::time::Duration;

use nbd_support::*;
use shardvol::nbd::wire;
use shardvol::nbd::{Export, ServerConfig};
use shardvol::volume::mem::MemDevice;
use shardvol::volume::{BlockDevice, VolumeError};

const READ: u16 = 0;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const WRITE_ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;

const SIZE: u64 = 1 << 20;

/// A server with a writable `vol0` (1 MiB) and a read-only `ro` (64 KiB holding "hello").
fn server() -> (TestServer, Arc<MemDevice>) {
    let dev = mem(SIZE);
    let ro = Arc::new(MemDevice::new_read_only(64 * 1024, b"hello").unwrap());
    let exports = vec![
        Export::new("vol0", dev.clone()).with_description("test volume"),
        Export::new("ro", ro)
            .with_description("read-only")
            .with_read_only(true),
    ];
    (TestServer::start(exports, ServerConfig::default()), dev)
}

#[test]
fn greeting_and_export_name_reply_bytes() {
    let (srv, _dev) = server();
    // With NO_ZEROES: size (8) + flags (2), nothing else; the next bytes are a reply.
    let mut c = Raw::unix(&srv.sock);
    let g = c.greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..18], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
    c.send(&3u32.to_be_bytes());
    c.send_opt(wire::OPT_EXPORT_NAME, b"vol0");
    assert_eq!(c.u64(), SIZE);
    let flags = c.u16();
    let want = wire::FLAG_HAS_FLAGS
        | wire::FLAG_SEND_FLUSH
        | wire::FLAG_SEND_FUA
        | wire::FLAG_SEND_TRIM
        | wire::FLAG_SEND_WRITE_ZEROES
        | wire::FLAG_SEND_FAST_ZERO
        | wire::FLAG_SEND_CACHE
        | wire::FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    let r = c.call(FLUSH, 0, 0, 0, &[]);
    assert!(r.simple && r.error == 0);

    // Without NO_ZEROES: 124 zero bytes follow the flags.
    let mut c = Raw::unix(&srv.sock);
    c.greeting();
    c.send(&1u32.to_be_bytes());
    c.send_opt(wire::OPT_EXPORT_NAME, b"vol0");
    assert_eq!(c.u64(), SIZE);
    c.u16();
    assert_eq!(c.read_exact_vec(124), vec![0u8; 124]);
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, 0);

    // Unknown export with EXPORT_NAME: the server can only close.
    let mut c = Raw::unix(&srv.sock);
    c.start();
    c.send_opt(wire::OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
}

#[test]
fn unknown_client_flags_and_bad_option_magic_close() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.greeting();
    c.send(&0x4u32.to_be_bytes());
    assert!(c.is_closed());

    let mut c = Raw::unix(&srv.sock);
    c.start();
    let mut b = 0x1234u64.to_be_bytes().to_vec();
    b.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0]);
    c.send(&b);
    assert!(c.is_closed());
}

#[test]
fn list_shows_every_export_with_its_description() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    let r = c.opt(wire::OPT_LIST, &[]);
    assert_eq!(r.len(), 3);
    let entries: Vec<(String, String)> = r[..2]
        .iter()
        .map(|x| {
            assert_eq!(x.kind, wire::REP_SERVER);
            let n = u32::from_be_bytes(x.data[..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(x.data[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(x.data[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            ("vol0".into(), "test volume".into()),
            ("ro".into(), "read-only".into())
        ]
    );
    assert_eq!(r[2].kind, wire::REP_ACK);
    // LIST must carry no data.
    assert_eq!(c.opt(wire::OPT_LIST, b"x")[0].kind, wire::REP_ERR_INVALID);
}

#[test]
fn info_reports_size_flags_name_description_and_block_sizes() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    let r = c.opt(
        wire::OPT_INFO,
        &info_payload(
            "ro",
            &[
                wire::INFO_NAME,
                wire::INFO_DESCRIPTION,
                wire::INFO_BLOCK_SIZE,
            ],
        ),
    );
    assert_eq!(r.last().unwrap().kind, wire::REP_ACK);
    let info = |t: u16| {
        r.iter()
            .find(|x| x.kind == wire::REP_INFO && x.data[..2] == t.to_be_bytes())
            .unwrap()
    };
    let e = &info(wire::INFO_EXPORT).data;
    assert_eq!(e.len(), 12);
    assert_eq!(u64::from_be_bytes(e[2..10].try_into().unwrap()), 64 * 1024);
    let flags = u16::from_be_bytes(e[10..12].try_into().unwrap());
    assert_ne!(flags & wire::FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES),
        0
    );
    assert_eq!(&info(wire::INFO_NAME).data[2..], b"ro");
    assert_eq!(&info(wire::INFO_DESCRIPTION).data[2..], b"read-only");
    let bs = &info(wire::INFO_BLOCK_SIZE).data;
    assert_eq!(bs.len(), 14);
    let v = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((v(2), v(6), v(10)), (1, 4096, 32 * 1024 * 1024));

    // INFO leaves us in negotiation; after STRUCTURED_REPLY the flags gain SEND_DF.
    assert_eq!(
        c.opt(wire::OPT_STRUCTURED_REPLY, &[])[0].kind,
        wire::REP_ACK
    );
    assert_eq!(
        c.opt(wire::OPT_STRUCTURED_REPLY, b"x")[0].kind,
        wire::REP_ERR_INVALID
    );
    let r = c.opt(wire::OPT_GO, &info_payload("", &[]));
    let e = &r
        .iter()
        .find(|x| x.kind == wire::REP_INFO && x.data[..2] == [0, 0])
        .unwrap()
        .data;
    assert_eq!(
        u64::from_be_bytes(e[2..10].try_into().unwrap()),
        SIZE,
        "empty name = default export"
    );
    assert_ne!(
        u16::from_be_bytes(e[10..12].try_into().unwrap()) & wire::FLAG_SEND_DF,
        0
    );
    let name = r
        .iter()
        .find(|x| x.kind == wire::REP_INFO && x.data[..2] == [0, 1])
        .unwrap();
    assert_eq!(
        &name.data[2..],
        b"vol0",
        "default export's canonical name is sent"
    );
    assert_eq!(r.last().unwrap().kind, wire::REP_ACK);
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, 0);
}

#[test]
fn go_to_unknown_export_fails_and_negotiation_continues() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    let r = c.opt(wire::OPT_GO, &info_payload("missing", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, wire::REP_ERR_UNKNOWN);
    // Malformed GO: name length beyond the payload.
    let r = c.opt(wire::OPT_GO, &[0, 0, 0, 50, b'a']);
    assert_eq!(r[0].kind, wire::REP_ERR_INVALID);
    let r = c.opt(wire::OPT_GO, &info_payload("vol0", &[]));
    assert_eq!(r.last().unwrap().kind, wire::REP_ACK);
    assert!(c.read(0, 16).is_ok());
}

#[test]
fn unsupported_options_get_err_unsup_and_abort_acks() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    let r = c.opt(99, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(r[0].kind, wire::REP_ERR_UNSUP);
    assert_eq!(c.opt(wire::OPT_STARTTLS, &[])[0].kind, wire::REP_ERR_UNSUP);
    assert_eq!(
        c.opt(11, &[])[0].kind,
        wire::REP_ERR_UNSUP,
        "extended headers are not offered"
    );
    let r = c.opt(wire::OPT_ABORT, &[]);
    assert_eq!(r[0].kind, wire::REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn oversized_option_is_refused_without_reading_it() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    let r = c.opt_reply();
    assert_eq!(r.kind, wire::REP_ERR_TOO_BIG);
    assert!(c.is_closed());
    // The server is unharmed.
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    assert!(c.read(0, 1).is_ok());
}

#[test]
fn meta_context_list_and_set() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    // LIST with no query lists base:allocation.
    let r = c.opt(wire::OPT_LIST_META_CONTEXT, &meta_payload("vol0", &[]));
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, wire::REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    // The "base:" wildcard too; unknown namespaces are ignored.
    let r = c.opt(
        wire::OPT_LIST_META_CONTEXT,
        &meta_payload("vol0", &["base:", "qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.len(), 2);
    let r = c.opt(
        wire::OPT_LIST_META_CONTEXT,
        &meta_payload("vol0", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, wire::REP_ACK);
    // SET needs structured replies first.
    let r = c.opt(
        wire::OPT_SET_META_CONTEXT,
        &meta_payload("vol0", &["base:allocation"]),
    );
    assert_eq!(r[0].kind, wire::REP_ERR_INVALID);
    c.opt(wire::OPT_STRUCTURED_REPLY, &[]);
    // A query without a namespace, a query past the payload's end, an unknown export.
    assert_eq!(
        c.opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_payload("vol0", &["nocolon"])
        )[0]
        .kind,
        wire::REP_ERR_INVALID
    );
    let mut bad = meta_payload("vol0", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    assert_eq!(
        c.opt(wire::OPT_SET_META_CONTEXT, &bad)[0].kind,
        wire::REP_ERR_INVALID
    );
    assert_eq!(
        c.opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_payload("zz", &["base:allocation"])
        )[0]
        .kind,
        wire::REP_ERR_UNKNOWN
    );
    let r = c.opt(
        wire::OPT_SET_META_CONTEXT,
        &meta_payload("vol0", &["base:allocation", "base:allocation"]),
    );
    assert_eq!(r.len(), 2, "one context reply, then ACK: {r:?}");
    let id = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
    assert_eq!(
        c.opt(wire::OPT_GO, &info_payload("vol0", &[]))
            .last()
            .unwrap()
            .kind,
        wire::REP_ACK
    );
    let rep = c.call(BLOCK_STATUS, 0, 0, 4096, &[]);
    assert_eq!(rep.error, 0);
    assert_eq!(block_status_descriptors(&rep.chunks[0]).0, id);
}

#[test]
fn block_status_needs_a_context_for_the_same_export() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.start();
    c.opt(wire::OPT_STRUCTURED_REPLY, &[]);
    c.opt(
        wire::OPT_SET_META_CONTEXT,
        &meta_payload("ro", &["base:allocation"]),
    );
    c.opt(wire::OPT_GO, &info_payload("vol0", &[]));
    let r = c.call(BLOCK_STATUS, 0, 0, 4096, &[]);
    assert_eq!(r.error, wire::EINVAL);
}

#[test]
fn unaligned_writes_read_back_over_unix_and_tcp() {
    let (srv, dev) = server();
    for mut c in [Raw::unix(&srv.sock), Raw::tcp(srv.tcp)] {
        c.go("vol0", false, false);
        let cases: [(u64, usize); 5] = [
            (0, 1),
            (1, 4095),
            (4095, 2),
            (12_345, 70_000),
            (SIZE - 3, 3),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(off, len, i as u8);
            assert_eq!(c.write(off, &data, 0), 0);
            same(&c.read(off, len as u32).unwrap(), &data);
            let mut direct = vec![0u8; len];
            dev.read(off, &mut direct).unwrap();
            assert_eq!(direct, data, "the device holds exactly what was written");
        }
        // A zero-length read and write succeed and change nothing.
        assert_eq!(c.read(5, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(c.write(5, &[], 0), 0);
    }
}

#[test]
fn fua_and_flush_make_writes_durable() {
    let (srv, dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    assert_eq!(c.write(0, &[1; 4096], 0), 0);
    assert_eq!(c.write(8192, &[2; 4096], wire::CMD_FLAG_FUA), 0);
    assert_eq!(dev.fua_count(), 1);
    dev.crash();
    same(&c.read(0, 4096).unwrap(), &vec![0; 4096]); // unflushed write lost in the crash
    same(&c.read(8192, 4096).unwrap(), &vec![2; 4096]); // FUA write survived
    assert_eq!(c.write(0, &[3; 100], 0), 0);
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, 0);
    assert_eq!(dev.flush_count(), 1);
    dev.crash();
    same(&c.read(0, 100).unwrap(), &[3; 100]); // flushed write survived
    // TRIM with FUA is durable too.
    assert_eq!(c.call(TRIM, wire::CMD_FLAG_FUA, 8192, 4096, &[]).error, 0);
    dev.crash();
    same(&c.read(8192, 4096).unwrap(), &vec![0; 4096]);
    // FLUSH with a non-zero length is malformed.
    assert_eq!(c.call(FLUSH, 0, 0, 1, &[]).error, wire::EINVAL);
}

#[test]
fn trim_zeroes_and_block_status_report_the_pattern() {
    let (srv, dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", true, true);
    assert_eq!(c.write(0, &[0xaa; 16 * 4096], 0), 0);
    assert_eq!(c.call(TRIM, 0, 4 * 4096, 4 * 4096, &[]).error, 0);
    same(&c.read(4 * 4096, 4 * 4096).unwrap(), &vec![0; 4 * 4096]);
    // Zeroes without NO_HOLE punch a hole; with NO_HOLE they stay allocated.
    assert_eq!(c.call(WRITE_ZEROES, 0, 10 * 4096, 2 * 4096, &[]).error, 0);
    assert_eq!(
        c.call(WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE, 13 * 4096, 4096, &[])
            .error,
        0
    );
    same(&c.read(10 * 4096, 2 * 4096).unwrap(), &vec![0; 2 * 4096]);
    same(&c.read(13 * 4096, 4096).unwrap(), &vec![0; 4096]);
    same(&c.read(12 * 4096, 4096).unwrap(), &vec![0xaa; 4096]);
    let blocks_before = dev.allocated_blocks();
    let r = c.call(BLOCK_STATUS, 0, 0, 32 * 4096, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks.len(), 1);
    assert_ne!(r.chunks[0].flags & wire::REPLY_FLAG_DONE, 0);
    let (_, d) = block_status_descriptors(&r.chunks[0]);
    let h = wire::STATE_HOLE | wire::STATE_ZERO;
    let k = 4096;
    assert_eq!(
        d,
        vec![
            (4 * k, 0),
            (4 * k, h),
            (2 * k, 0),
            (2 * k, h),
            (4 * k, 0),
            (16 * k, h)
        ]
    );
    // REQ_ONE: exactly one descriptor, no longer than the request.
    let r = c.call(BLOCK_STATUS, wire::CMD_FLAG_REQ_ONE, 4096, 2 * 4096, &[]);
    assert_eq!(block_status_descriptors(&r.chunks[0]).1, vec![(2 * k, 0)]);
    // Unaligned query: the first and last descriptors are cut to it.
    let r = c.call(BLOCK_STATUS, 0, 4 * 4096 - 10, 20, &[]);
    assert_eq!(
        block_status_descriptors(&r.chunks[0]).1,
        vec![(10, 0), (10, h)]
    );
    assert_eq!(
        dev.allocated_blocks(),
        blocks_before,
        "block status changes nothing"
    );
    // Zero-length and out-of-range queries.
    assert_eq!(c.call(BLOCK_STATUS, 0, 0, 0, &[]).error, wire::EINVAL);
    assert_eq!(
        c.call(BLOCK_STATUS, 0, SIZE - 1, 2, &[]).error,
        wire::EINVAL
    );
}

#[test]
fn fast_zero_is_refused_when_it_would_not_be_fast() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    assert_eq!(c.write(0, &[7; 3 * 4096], 0), 0);
    let fz = wire::CMD_FLAG_FAST_ZERO;
    assert_eq!(
        c.call(WRITE_ZEROES, fz | wire::CMD_FLAG_NO_HOLE, 0, 4096, &[])
            .error,
        wire::ENOTSUP
    );
    assert_eq!(c.call(WRITE_ZEROES, fz, 100, 200, &[]).error, wire::ENOTSUP);
    same(&c.read(0, 4096).unwrap(), &vec![7; 4096]); // a refused fast zero changes nothing
    assert_eq!(c.call(WRITE_ZEROES, fz, 100, 2 * 4096, &[]).error, 0);
    let got = c.read(0, 3 * 4096).unwrap();
    assert!(got[..100].iter().all(|&b| b == 7));
    assert!(got[100..100 + 2 * 4096].iter().all(|&b| b == 0));
    assert!(got[100 + 2 * 4096..].iter().all(|&b| b == 7));
}

#[test]
fn cache_is_accepted_and_range_checked() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    assert_eq!(c.call(CACHE, 0, 0, 65536, &[]).error, 0);
    assert_eq!(c.call(CACHE, 0, SIZE, 1, &[]).error, wire::EINVAL);
    assert_eq!(
        c.call(CACHE, wire::CMD_FLAG_NO_HOLE, 0, 1, &[]).error,
        wire::EINVAL
    );
}

#[test]
fn structured_read_is_one_offset_data_chunk() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", true, false);
    let data = pattern(777, 5000, 9);
    assert_eq!(c.write(777, &data, 0), 0);
    let r = c.call(READ, wire::CMD_FLAG_DF, 777, 5000, &[]);
    assert_eq!(r.chunks.len(), 1);
    let ch = &r.chunks[0];
    assert_eq!(
        (ch.kind, ch.flags),
        (wire::REPLY_TYPE_OFFSET_DATA, wire::REPLY_FLAG_DONE)
    );
    assert_eq!(u64::from_be_bytes(ch.payload[..8].try_into().unwrap()), 777);
    assert_eq!(&ch.payload[8..], &data[..]);
    // Zero-length read: a lone NONE chunk.
    let r = c.call(READ, 0, 0, 0, &[]);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(
        (r.chunks[0].kind, r.chunks[0].flags),
        (wire::REPLY_TYPE_NONE, wire::REPLY_FLAG_DONE)
    );
    // Errors come as an error chunk with a message, never as a simple reply to a READ.
    let r = c.call(READ, 0, SIZE, 1, &[]);
    assert!(!r.simple);
    assert_eq!(r.chunks[0].kind, wire::REPLY_TYPE_ERROR);
    assert_eq!(r.error, wire::EINVAL);
    assert!(r.message.contains("outside"), "{}", r.message);
}

#[test]
fn bad_requests_get_the_spec_errors() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    // Unknown command.
    assert_eq!(c.call(42, 0, 0, 0, &[]).error, wire::EINVAL);
    // Flags not valid for the command, and unknown flag bits.
    assert_eq!(
        c.call(READ, wire::CMD_FLAG_NO_HOLE, 0, 1, &[]).error,
        wire::EINVAL
    );
    assert_eq!(c.call(READ, 0x8000, 0, 1, &[]).error, wire::EINVAL);
    assert_eq!(
        c.call(READ, wire::CMD_FLAG_DF, 0, 1, &[]).error,
        wire::EINVAL,
        "DF needs structured replies"
    );
    // A refused WRITE still has its payload consumed: the stream stays in sync.
    assert_eq!(
        c.call(WRITE, wire::CMD_FLAG_REQ_ONE, 0, 5, b"hello").error,
        wire::EINVAL
    );
    // Ranges past the end: EINVAL for reads and trims, ENOSPC for writes and zeroes.
    assert_eq!(c.read(SIZE - 1, 2), Err(wire::EINVAL));
    assert_eq!(c.read(u64::MAX, 1), Err(wire::EINVAL), "offset overflow");
    assert_eq!(c.call(TRIM, 0, SIZE, 1, &[]).error, wire::EINVAL);
    assert_eq!(c.write(SIZE - 2, b"abc", 0), wire::ENOSPC);
    assert_eq!(
        c.call(WRITE_ZEROES, 0, SIZE - 2, 3, &[]).error,
        wire::ENOSPC
    );
    // Length over the 32 MiB maximum on READ: EINVAL, connection stays usable.
    assert_eq!(c.read(0, 32 * 1024 * 1024 + 1), Err(wire::EINVAL));
    // Block status without negotiation.
    assert_eq!(c.call(BLOCK_STATUS, 0, 0, 1, &[]).error, wire::EINVAL);
    same(&c.read(0, 3).unwrap(), &[0; 3]); // nothing was written by refused requests
    assert_eq!(srv.stats.connections_open(), 1);
}

#[test]
fn read_only_export_refuses_changes_with_eperm() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    let (_, flags) = c.go("ro", false, false);
    assert_ne!(flags & wire::FLAG_READ_ONLY, 0);
    assert_eq!(c.write(0, b"x", 0), wire::EPERM);
    assert_eq!(c.write(0, b"x", wire::CMD_FLAG_FUA), wire::EPERM);
    assert_eq!(c.call(TRIM, 0, 0, 1, &[]).error, wire::EPERM);
    assert_eq!(c.call(WRITE_ZEROES, 0, 0, 1, &[]).error, wire::EPERM);
    same(&c.read(0, 5).unwrap(), b"hello");
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, 0);
}

#[test]
fn oversized_write_is_refused_then_the_connection_closes() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    let cookie = c.cookie();
    c.request(WRITE, 0, cookie, 0, 64 * 1024 * 1024, &[0u8; 1000]);
    let r = c.reply();
    assert_eq!((r.cookie, r.error), (cookie, wire::EINVAL));
    assert!(c.is_closed());
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .connections_open()
        == 0));
    assert_eq!(
        srv.stats.peak_bytes_in_flight(),
        0,
        "the oversized payload was never buffered"
    );
}

#[test]
fn bad_request_magic_closes_after_answering_earlier_requests() {
    let (srv, _dev) = server();
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    let cookie = c.cookie();
    c.request(WRITE, 0, cookie, 0, 4, b"abcd");
    let mut junk = [0u8; 28];
    junk[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&junk);
    let r = c.reply();
    assert_eq!((r.cookie, r.error), (cookie, 0));
    assert!(c.is_closed());
}

#[test]
fn volume_errors_map_to_eio_with_the_failing_offset() {
    let dev = Arc::new(HookDevice::new(SIZE, |call, off, len| match call {
        Call::Read if off <= 8192 && off + len > 8192 => Err(VolumeError::Unrecoverable {
            lba: 2,
            why: "tag mismatch".into(),
        }),
        Call::Write if off == 0 => Err(VolumeError::Io("disk gone".into())),
        Call::Flush => Err(VolumeError::Io("fsync failed".into())),
        _ => Ok(()),
    }));
    let srv = TestServer::start(vec![Export::new("vol0", dev)], ServerConfig::default());
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", true, false);
    let r = c.call(READ, 0, 4096, 3 * 4096, &[]);
    assert_eq!(r.error, wire::EIO);
    assert_eq!(r.chunks.len(), 1, "no data chunk for a failed read");
    assert_eq!(r.chunks[0].kind, wire::REPLY_TYPE_ERROR_OFFSET);
    let p = &r.chunks[0].payload;
    assert_eq!(
        u64::from_be_bytes(p[p.len() - 8..].try_into().unwrap()),
        8192
    );
    assert!(r.message.contains("tag mismatch"));
    assert_eq!(c.write(0, b"x", 0), wire::EIO);
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, wire::EIO);
    assert!(c.read(0, 4096).is_ok(), "other ranges still work");

    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    assert_eq!(
        c.read(8000, 500),
        Err(wire::EIO),
        "simple replies carry the error code"
    );
}

#[test]
fn disc_answers_requests_in_flight_before_closing() {
    let dev = Arc::new(HookDevice::new(SIZE, |call, _, _| {
        if call == Call::Write {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }));
    let srv = TestServer::start(
        vec![Export::new("vol0", dev.clone())],
        ServerConfig::default(),
    );
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    for i in 0..4u64 {
        c.request(WRITE, 0, 100 + i, i * 4096, 4096, &[i as u8 + 1; 4096]);
    }
    c.disc();
    let mut cookies: Vec<u64> = (0..4)
        .map(|_| c.reply())
        .map(|r| {
            assert_eq!(r.error, 0);
            r.cookie
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, vec![100, 101, 102, 103]);
    assert!(c.is_closed());
    let mut b = [0u8; 1];
    dev.read(3 * 4096, &mut b).unwrap();
    assert_eq!(b, [4]);
}

#[test]
fn exports_can_appear_at_run_time() {
    let srv = TestServer::start(vec![], ServerConfig::default());
    let mut c = Raw::unix(&srv.sock);
    c.start();
    assert_eq!(
        c.opt(wire::OPT_LIST, &[]).len(),
        1,
        "sealed: no exports listed"
    );
    assert_eq!(
        c.opt(wire::OPT_GO, &info_payload("", &[]))[0].kind,
        wire::REP_ERR_UNKNOWN
    );
    srv.exports
        .set(vec![Export::new("late", mem(8192))])
        .unwrap();
    let r = c.opt(wire::OPT_GO, &info_payload("late", &[]));
    assert_eq!(r.last().unwrap().kind, wire::REP_ACK);
    assert_eq!(c.write(0, b"ok", 0), 0);
    // Removing the export does not cut the connection that uses it.
    srv.exports.set(vec![]).unwrap();
    same(&c.read(0, 2).unwrap(), b"ok");
}

/// Deterministic xorshift generator: the storm below is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

#[test]
fn hostile_request_storm_never_corrupts_data() {
    const DEV: u64 = 256 * 1024;
    let dev = mem(DEV);
    let srv = TestServer::start(
        vec![Export::new("vol0", dev.clone())],
        ServerConfig::default(),
    );
    let mut model = vec![0u8; DEV as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let connect = |structured: bool| {
        let mut c = Raw::unix(&srv.sock);
        c.go("vol0", structured, structured);
        c
    };
    let mut structured = false;
    let mut c = connect(structured);
    let mut closes = 0;
    let mut tally = std::collections::BTreeMap::new();
    for n in 0..1500u64 {
        let kind = rng.pick(&[0u16, 0, 1, 1, 1, 3, 4, 4, 5, 6, 6, 7, 8, 9, 200]);
        let flags = match rng.below(4) {
            0 => rng.next() as u16,
            1 => rng.pick(&[
                wire::CMD_FLAG_FUA,
                wire::CMD_FLAG_NO_HOLE,
                wire::CMD_FLAG_FAST_ZERO,
            ]),
            _ => 0,
        };
        let offset = match rng.below(5) {
            0 => DEV - rng.below(8),
            1 => u64::MAX - rng.below(4096),
            _ => rng.below(DEV),
        };
        let len = match rng.below(8) {
            0 => 0,
            1 if kind == WRITE => wire::MAX_PAYLOAD + 1 + rng.below(1 << 20) as u32,
            1 => rng.next() as u32,
            _ => 1 + rng.below(20_000) as u32,
        };
        let (offset, len) = if kind == FLUSH && rng.below(2) == 0 {
            (0, 0)
        } else {
            (offset, len)
        };
        let payload: Vec<u8> = if kind == WRITE && len <= wire::MAX_PAYLOAD {
            (0..len).map(|i| (i as u8) ^ (n as u8)).collect()
        } else {
            Vec::new()
        };
        let cookie = c.cookie();
        c.request(kind, flags, cookie, offset, len, &payload);
        let r = c.reply();
        assert_eq!(r.cookie, cookie);
        let allowed = [0, wire::EINVAL, wire::ENOSPC, wire::ENOTSUP];
        assert!(allowed.contains(&r.error), "request {n}: error {}", r.error);
        let end = offset.checked_add(len as u64);
        let in_range = end.is_some_and(|e| e <= DEV);
        if !in_range || kind > 7 {
            assert_ne!(
                r.error, 0,
                "request {n} (kind {kind}, {offset}+{len}) must fail"
            );
        }
        if kind == WRITE && len > wire::MAX_PAYLOAD {
            assert_eq!(r.error, wire::EINVAL);
            assert!(c.is_closed(), "an oversized WRITE ends the connection");
            closes += 1;
            structured = !structured;
            c = connect(structured);
            continue;
        }
        *tally.entry((kind, r.error)).or_insert(0u32) += 1;
        if r.error != 0 {
            continue;
        }
        let range = offset as usize..(offset + len as u64) as usize;
        match kind {
            READ => same(&r.data, &model[range]),
            WRITE => model[range].copy_from_slice(&payload),
            TRIM | WRITE_ZEROES => model[range].fill(0),
            _ => {}
        }
    }
    assert!(closes > 0, "the storm included oversized writes");
    for kind in [READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS] {
        assert!(
            tally.get(&(kind, 0)).is_some_and(|&n| n > 0),
            "no command {kind} succeeded: {tally:?}"
        );
    }
    let mut got = vec![0u8; DEV as usize];
    dev.read(0, &mut got).unwrap();
    same(&got, &model);
    let mut c = connect(true);
    same(&c.read(0, DEV as u32).unwrap(), &model);
}
