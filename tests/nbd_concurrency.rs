//! Pipelining, back-pressure, vanishing clients, multi-connection flushes and graceful
//! shutdown, against devices that delay or block on purpose.

mod nbd_support;

use std::collections::HashSet;
use std::io::Write;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbd_support::*;
use shardvol::nbd::wire::{self, Request};
use shardvol::nbd::{Export, ServerConfig};
use shardvol::volume::BlockDevice;

const READ: u16 = 0;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const MIB: u64 = 1024 * 1024;

#[test]
fn pipelined_requests_complete_out_of_order_each_answered_once() {
    const SLOW: u64 = 8; // requests on the first 8 blocks take 500 ms
    let dev = Arc::new(HookDevice::new(MIB, |call, off, _| {
        if call == Call::Read && off < SLOW * 4096 {
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }));
    dev.mem.write(0, &pattern(0, 64 * 4096, 5), false).unwrap();
    let srv = TestServer::start(
        vec![Export::new("vol0", dev.clone())],
        ServerConfig::default(),
    );
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);

    let start = Instant::now();
    for i in 0..64u64 {
        c.request(READ, 0, 1000 + i, i * 4096, 4096, &[]);
    }
    let mut order = Vec::new();
    for _ in 0..64 {
        let r = c.reply();
        assert_eq!(r.error, 0);
        let i = r.cookie - 1000;
        same(&r.data, &pattern(i * 4096, 4096, 5));
        order.push(r.cookie);
    }
    let elapsed = start.elapsed();
    let unique: HashSet<u64> = order.iter().copied().collect();
    assert_eq!(unique.len(), 64, "every cookie answered exactly once");
    assert_eq!(unique, (1000..1064).collect::<HashSet<u64>>());
    let last: HashSet<u64> = order[56..].iter().copied().collect();
    assert_eq!(
        last,
        (1000..1000 + SLOW).collect(),
        "the slow requests, sent first, are answered last"
    );
    assert!(
        dev.peak_inside.load(Ordering::SeqCst) >= SLOW,
        "the slow requests ran at the same time"
    );
    assert!(
        elapsed < Duration::from_millis(500 * SLOW / 2),
        "took {elapsed:?}"
    );

    // Writes pipelined the same way, over TCP with structured replies.
    let mut c = Raw::tcp(srv.tcp);
    c.go("vol0", true, false);
    for i in 0..64u64 {
        let data = pattern(i * 4096 + 100_000, 3000, 9);
        c.request(WRITE, 0, 5000 + i, i * 4096 + 100_000, 3000, &data);
    }
    let cookies: HashSet<u64> = (0..64)
        .map(|_| {
            let r = c.reply();
            assert_eq!(r.error, 0);
            r.cookie
        })
        .collect();
    assert_eq!(cookies, (5000..5064).collect());
    for i in 0..64u64 {
        let mut got = vec![0u8; 3000];
        dev.mem.read(i * 4096 + 100_000, &mut got).unwrap();
        same(&got, &pattern(i * 4096 + 100_000, 3000, 9));
    }
}

#[test]
fn bytes_in_flight_stay_bounded_when_the_device_stalls() {
    const BOUND: u32 = 4 * MIB as u32;
    const WRITES: u64 = 48;
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let dev = Arc::new(HookDevice::new(64 * MIB, move |call, _, _| {
        if call == Call::Write {
            g.wait();
        }
        Ok(())
    }));
    let config = ServerConfig {
        max_in_flight_bytes: BOUND,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(vec![Export::new("vol0", dev.clone())], config);
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);

    let sent = Arc::new(AtomicU64::new(0));
    let mut w = c.s.try_clone();
    let sent2 = sent.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..WRITES {
            let mut frame = Request {
                flags: 0,
                kind: WRITE,
                cookie: i,
                offset: i * MIB,
                len: MIB as u32,
            }
            .encode()
            .to_vec();
            frame.extend_from_slice(&pattern(i * MIB, MIB as usize, 3));
            w.write_all(&frame).unwrap();
            sent2.fetch_add(MIB, Ordering::SeqCst);
        }
    });

    // The server fills its budget, then stops reading; the client's writes then block.
    assert!(wait_until(Duration::from_secs(5), || {
        srv.stats.bytes_in_flight() == BOUND as u64
    }));
    std::thread::sleep(Duration::from_millis(300));
    let sent_stalled = sent.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        sent_stalled,
        "the client is blocked by back-pressure"
    );
    assert!(
        sent_stalled < WRITES * MIB / 2,
        "only the budget plus socket buffers were taken: {sent_stalled}"
    );
    assert!(srv.stats.bytes_in_flight() <= BOUND as u64);
    assert!(srv.stats.peak_bytes_in_flight() <= BOUND as u64);
    assert!(dev.inside() <= 4);

    gate.open();
    writer.join().unwrap();
    let mut answered = HashSet::new();
    for _ in 0..WRITES {
        let r = c.reply();
        assert_eq!(r.error, 0);
        assert!(answered.insert(r.cookie));
    }
    assert_eq!(answered.len() as u64, WRITES);
    let mut got = vec![0u8; MIB as usize];
    dev.mem.read((WRITES - 1) * MIB, &mut got).unwrap();
    same(&got, &pattern((WRITES - 1) * MIB, MIB as usize, 3));
    assert!(
        srv.stats.peak_bytes_in_flight() <= BOUND as u64,
        "peak {}",
        srv.stats.peak_bytes_in_flight()
    );
    assert!(wait_until(Duration::from_secs(2), || srv
        .stats
        .bytes_in_flight()
        == 0));
}

#[test]
fn requests_in_flight_are_bounded_by_count() {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let dev = Arc::new(HookDevice::new(MIB, move |call, _, _| {
        if call == Call::Flush {
            g.wait();
        }
        Ok(())
    }));
    let config = ServerConfig {
        max_requests_in_flight: 8,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(vec![Export::new("vol0", dev.clone())], config);
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    for i in 0..40 {
        c.request(FLUSH, 0, i, 0, 0, &[]);
    }
    assert!(wait_until(Duration::from_secs(5), || dev.inside() == 8));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        dev.peak_inside.load(Ordering::SeqCst),
        8,
        "never more than 8 requests at once"
    );
    assert!(
        srv.stats.requests() <= 9,
        "the reader stopped after the 9th request header"
    );
    gate.open();
    let cookies: HashSet<u64> = (0..40).map(|_| c.reply().cookie).collect();
    assert_eq!(cookies.len(), 40);
}

#[test]
fn queued_requests_of_a_vanished_client_never_run() {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let dev = Arc::new(HookDevice::new(MIB, move |call, _, _| {
        if call == Call::Write {
            g.wait();
        }
        Ok(())
    }));
    // Two worker threads, which the pool does not add to within the test: two writes enter
    // the device, the other 18 queue behind them.
    let config = ServerConfig {
        workers: 2,
        worker_stall: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(vec![Export::new("vol0", dev.clone())], config);
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    for i in 0..20u64 {
        c.request(WRITE, 0, i, i * 4096, 4096, &[0xee; 4096]);
    }
    assert!(wait_until(Duration::from_secs(5), || dev.inside() == 2));
    assert!(wait_until(Duration::from_secs(5), || srv.stats.requests() == 20));
    // Hard disconnect, as the Linux driver does to a connection whose request timed out.
    c.s.shutdown(Shutdown::Both);
    drop(c);
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .connections_lost()
        == 1));
    gate.open();
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .connections_open()
        == 0));
    assert_eq!(srv.stats.requests_skipped(), 18);
    assert_eq!(
        dev.calls.load(Ordering::SeqCst),
        2,
        "only the two writes already inside the device ran"
    );
    assert_eq!(dev.mem.allocated_blocks(), 2);
    assert_eq!(srv.stats.bytes_in_flight(), 0);
}

#[test]
fn clients_vanishing_mid_request_do_not_disturb_others() {
    let dev = mem(4 * MIB);
    let srv = TestServer::start(
        vec![Export::new("vol0", dev.clone())],
        ServerConfig::default(),
    );
    let mut b = Raw::unix(&srv.sock);
    b.go("vol0", false, false);
    assert_eq!(b.write(2 * MIB, b"other client", 0), 0);

    // Mid write payload.
    let mut a = Raw::tcp(srv.tcp);
    a.go("vol0", false, false);
    a.request(WRITE, 0, 1, 0, MIB as u32, &[0xab; 1000]);
    a.s.shutdown(Shutdown::Both);
    drop(a);
    // Mid request header.
    let mut a = Raw::unix(&srv.sock);
    a.go("vol0", false, false);
    a.send(
        &Request {
            flags: 0,
            kind: READ,
            cookie: 1,
            offset: 0,
            len: 1,
        }
        .encode()[..10],
    );
    drop(a);
    // Mid option.
    let mut a = Raw::unix(&srv.sock);
    a.start();
    a.send(&wire::IHAVEOPT.to_be_bytes()[..5]);
    drop(a);

    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .connections_open()
        == 1));
    assert_eq!(
        srv.stats.bytes_in_flight(),
        0,
        "the partial payload's budget was returned"
    );
    same(&b.read(2 * MIB, 12).unwrap(), b"other client");
    assert_eq!(
        dev.allocated_blocks(),
        1,
        "the partial write was never applied"
    );
    assert_eq!(b.write(0, b"still served", 0), 0);
}

#[test]
fn a_stalled_export_does_not_hold_up_another() {
    // Every write to "stuck" blocks until the gate opens; "free" is a plain memory device.
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let stuck = Arc::new(HookDevice::new(MIB, move |call, _, _| {
        if call == Call::Write {
            g.wait();
        }
        Ok(())
    }));
    let free = mem(MIB);
    let config = ServerConfig {
        workers: 2,
        worker_stall: Duration::from_millis(50),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(
        vec![
            Export::new("stuck", stuck.clone()),
            Export::new("free", free.clone()),
        ],
        config,
    );
    let mut a = Raw::unix(&srv.sock);
    a.go("stuck", false, false);
    // Four writes: both worker threads block inside "stuck", two more wait in the queue.
    for i in 0..4u64 {
        a.request(WRITE, 0, i, i * 4096, 4096, &[0x5a; 4096]);
    }
    assert!(wait_until(Duration::from_secs(5), || stuck.inside() >= 2));
    let mut b = Raw::unix(&srv.sock);
    b.go("free", false, false);
    // Served although the two base threads are blocked: the pool grew.
    assert_eq!(b.write(0, b"served meanwhile", 0), 0);
    same(&b.read(0, 16).unwrap(), b"served meanwhile");
    gate.open();
    let cookies: HashSet<u64> = (0..4).map(|_| a.reply().cookie).collect();
    assert_eq!(cookies.len(), 4, "every stuck write answered once released");
}

#[test]
fn flush_on_one_connection_covers_writes_from_another() {
    let dev = mem(MIB);
    let srv = TestServer::start(
        vec![Export::new("vol0", dev.clone())],
        ServerConfig::default(),
    );
    let mut a = Raw::unix(&srv.sock);
    let (_, flags) = a.go("vol0", false, false);
    assert_ne!(flags & wire::FLAG_CAN_MULTI_CONN, 0);
    let mut b = Raw::tcp(srv.tcp);
    b.go("vol0", false, false);
    assert_eq!(a.write(4096, &[9; 4096], 0), 0);
    assert_eq!(b.call(FLUSH, 0, 0, 0, &[]).error, 0);
    dev.crash();
    same(&b.read(4096, 4096).unwrap(), &[9; 4096]);
}

#[test]
fn graceful_shutdown_answers_in_flight_requests_and_flushes() {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let dev = Arc::new(HookDevice::new(MIB, move |call, _, _| {
        if call == Call::Write {
            g.wait();
        }
        Ok(())
    }));
    let mut srv = TestServer::start(
        vec![Export::new("vol0", dev.clone())],
        ServerConfig::default(),
    );
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    let mut negotiating = Raw::unix(&srv.sock);
    negotiating.greeting();
    for i in 0..4u64 {
        c.request(WRITE, 0, i, i * 4096, 4096, &[i as u8 + 1; 4096]);
    }
    assert!(wait_until(Duration::from_secs(5), || dev.inside() == 4));
    let (sock, tcp) = (srv.sock.clone(), srv.tcp);
    let stopper = std::thread::spawn(move || {
        srv.shutdown(Duration::from_secs(10)).unwrap();
        srv
    });
    assert!(
        negotiating.is_closed(),
        "connections still negotiating are closed"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !stopper.is_finished(),
        "shutdown waits for the writes in flight"
    );
    assert_eq!(dev.mem.flush_count(), 0);
    gate.open();
    let srv = stopper.join().unwrap();
    let mut got: Vec<u64> = (0..4)
        .map(|_| {
            let r = c.reply();
            assert_eq!(r.error, 0);
            r.cookie
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3]);
    assert!(c.is_closed());
    assert!(
        dev.mem.flush_count() >= 1,
        "exports are flushed at shutdown"
    );
    dev.mem.crash();
    let mut b = [0u8; 1];
    dev.mem.read(3 * 4096, &mut b).unwrap();
    assert_eq!(b, [4], "in-flight writes were made durable");
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_err(),
        "no longer accepting"
    );
    assert!(std::net::TcpStream::connect(tcp).is_err());
    drop(srv);
}

#[test]
fn a_client_that_stops_reading_replies_is_cut_off() {
    let config = ServerConfig {
        max_in_flight_bytes: 8 * MIB as u32,
        reply_write_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(vec![Export::new("vol0", mem(64 * MIB))], config);
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    for i in 0..64u64 {
        c.request(READ, 0, i, i * MIB, MIB as u32, &[]);
    }
    // Replies pile up, the socket fills, a reply write times out: the connection is dropped
    // and its memory returned, without the client ever reading.
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .connections_open()
        == 0));
    assert_eq!(srv.stats.bytes_in_flight(), 0);
    assert!(srv.stats.peak_bytes_in_flight() <= 8 * MIB);
}

#[test]
fn shutdown_is_not_held_up_by_a_client_stalled_mid_payload() {
    let mut srv = TestServer::start(vec![Export::new("vol0", mem(MIB))], ServerConfig::default());
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    c.request(WRITE, 0, 77, 0, 65536, &[1; 100]);
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .bytes_in_flight()
        == 65536));
    let t = Instant::now();
    srv.shutdown(Duration::from_secs(5)).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
    let r = c.reply();
    assert_eq!((r.cookie, r.error), (77, wire::ESHUTDOWN));
    assert!(c.is_closed());
}

#[test]
fn a_stalled_request_is_reported_while_it_still_runs() {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let dev = Arc::new(HookDevice::new(MIB, move |call, _, _| {
        if call == Call::Flush {
            g.wait();
        }
        Ok(())
    }));
    let config = ServerConfig {
        slow_request_warning: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(vec![Export::new("vol0", dev)], config);
    let mut c = Raw::unix(&srv.sock);
    c.go("vol0", false, false);
    c.request(FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(
        c.read(0, 1).unwrap(),
        vec![0],
        "other requests are not held up"
    );
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats
        .slow_requests()
        == 1));
    gate.open();
    assert_eq!(c.reply().cookie, 1);
    assert_eq!(srv.stats.slow_requests(), 1);
}

#[test]
fn small_writes_run_on_the_connection_unless_the_device_would_wait() {
    // A device that takes writes at once (in memory), and one that never does (the hook
    // device: its writes always go to a worker thread).
    let now = mem(MIB);
    let hooked = Arc::new(HookDevice::new(MIB, |_, _, _| Ok(())));
    let srv = TestServer::start(
        vec![
            Export::new("now", now.clone()),
            Export::new("hooked", hooked.clone()),
        ],
        ServerConfig::default(),
    );
    let mut a = Raw::unix(&srv.sock);
    a.go("now", false, false);
    assert_eq!(a.write(0, &[1; 4096], 0), 0);
    assert_eq!(srv.stats.writes_now(), 1, "a small write went to a worker");
    // FUA waits for a sync, and 128 KiB is over the bound: both go to a worker.
    assert_eq!(a.write(4096, &[2; 4096], wire::CMD_FLAG_FUA), 0);
    assert_eq!(a.write(65536, &[3; 131072], 0), 0);
    assert_eq!(srv.stats.writes_now(), 1);
    same(&a.read(0, 4096).unwrap(), &[1; 4096]);
    same(&a.read(4096, 4096).unwrap(), &[2; 4096]);
    same(&a.read(65536, 131072).unwrap(), &[3; 131072]);
    // Pipelined small writes, each answered once, all taken at once.
    for i in 0..32u64 {
        a.request(WRITE, 0, 100 + i, i * 4096, 4096, &[i as u8 + 10; 4096]);
    }
    let mut cookies = HashSet::new();
    for _ in 0..32 {
        let r = a.reply();
        assert_eq!(r.error, 0);
        assert!(cookies.insert(r.cookie));
    }
    assert_eq!(srv.stats.writes_now(), 33);
    for i in 0..32u64 {
        same(&a.read(i * 4096, 4096).unwrap(), &[i as u8 + 10; 4096]);
    }

    let mut b = Raw::unix(&srv.sock);
    b.go("hooked", false, false);
    assert_eq!(b.write(0, &[4; 4096], 0), 0);
    assert_eq!(hooked.calls.load(Ordering::SeqCst), 1);
    assert_eq!(srv.stats.writes_now(), 33);
    same(&b.read(0, 4096).unwrap(), &[4; 4096]);
}
