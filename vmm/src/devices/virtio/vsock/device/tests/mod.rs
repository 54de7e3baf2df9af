//! vsock device + Unix muxer, driven through mock queues by a test guest: host- and
//! guest-initiated connections, refusal, many connections at once, back-pressure in both
//! directions, a 64 MiB transfer each way, and bad packets.

mod driver;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use driver::{Driver, Pkt, GUEST_BUF_ALLOC};

use super::EVENT_TRANSPORT_RESET;
use crate::devices::virtio::vsock::unix::connection::TX_BUF_SIZE;
use crate::devices::virtio::vsock::{op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::devices::virtio::VirtioDevice;

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("runvm-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A host program connects to guest port `port`; the guest accepts. Returns the host
/// stream (past its OK line) and the host-side port.
fn host_connect(d: &mut Driver, sock: &std::path::Path, port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let pkts = d.pump_until(|p| p.iter().any(|p| p.op == op::REQUEST && p.dst_port == port));
    let req = pkts.iter().find(|p| p.op == op::REQUEST).unwrap();
    let local = req.src_port;
    d.control(port, local, op::RESPONSE, 0);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), format!("OK {local}\n"));
    (s, local)
}

fn rw(src: u32, dst: u32, data: &[u8], fwd_cnt: u32) -> Pkt {
    Pkt {
        src_port: src,
        dst_port: dst,
        op: op::RW,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt,
        data: data.to_vec(),
    }
}

#[test]
fn a_restored_device_resets_the_guests_connections_before_any_new_one() {
    use vm_memory::{Bytes, GuestAddress};
    let dir = Dir::new("reset");
    let mut d = Driver::new(&dir.sock());
    d.mem
        .write_slice(&[0xff; 8], GuestAddress(driver::EV_BUF))
        .unwrap();
    d.post_event_buffer();
    d.dev.restored();
    assert!(d.dev.reset_pending());
    let used = d.ev.take_used();
    assert_eq!(used, vec![(0, 4)], "one transport-reset event");
    let mut id = [0u8; 4];
    d.mem
        .read_slice(&mut id, GuestAddress(driver::EV_BUF))
        .unwrap();
    assert_eq!(u32::from_le_bytes(id), EVENT_TRANSPORT_RESET);

    // A host program connects meanwhile: its REQUEST waits for the guest's reset.
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        d.pump().is_empty(),
        "nothing reaches the guest before its reset"
    );
    d.dev.check_reset_done();
    assert!(
        d.dev.reset_pending(),
        "an event-queue kick alone is not the guest's answer"
    );
    // The guest handled the event and gave the buffer back.
    d.post_event_buffer();
    d.dev.check_reset_done();
    assert!(!d.dev.reset_pending());
    let pkts = d.pump_until(|p| p.iter().any(|p| p.op == op::REQUEST));
    assert!(pkts
        .iter()
        .any(|p| p.op == op::REQUEST && p.dst_port == 1024));
}

#[test]
fn config_space_holds_the_guest_cid() {
    let dir = Dir::new("cfg");
    let d = Driver::new(&dir.sock());
    let mut b = [0u8; 8];
    d.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), driver::GUEST_CID);
    assert_eq!(d.dev.device_type(), 19);
    assert_eq!(d.dev.queue_max_sizes().len(), 3);
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_closes() {
    let dir = Dir::new("host");
    let mut d = Driver::new(&dir.sock());
    let (mut s, local) = host_connect(&mut d, &dir.sock(), 1024);

    s.write_all(b"hello guest").unwrap();
    let got = d.pump_until(|p| p.iter().map(|p| p.data.len()).sum::<usize>() >= 11);
    let data: Vec<u8> = got
        .iter()
        .filter(|p| p.op == op::RW)
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(data, b"hello guest");
    assert!(got
        .iter()
        .all(|p| p.src_port == local && p.dst_port == 1024));

    d.send(&rw(1024, local, b"hello host", 11));
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // Host half-closes: the guest gets SHUTDOWN(SEND) and can still send.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    d.pump_until(|p| {
        p.iter()
            .any(|p| p.op == op::SHUTDOWN && p.flags == SHUTDOWN_SEND)
    });
    d.send(&rw(1024, local, b"more", 11));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"more");

    // The guest closes: the host reads end of stream, the guest gets RST, the connection is gone.
    d.control(1024, local, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
    d.pump_until(|p| p.iter().any(|p| p.op == op::RST));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(d.dev.backend().connection_count(), 0);
}

#[test]
fn guest_refusal_closes_the_host_stream_without_ok() {
    let dir = Dir::new("refuse");
    let mut d = Driver::new(&dir.sock());
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    let pkts = d.pump_until(|p| p.iter().any(|p| p.op == op::REQUEST));
    let local = pkts[0].src_port;
    d.control(9, local, op::RST, 0);
    d.pump();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line for a refused connection");
    assert_eq!(d.dev.backend().connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_dropped() {
    let dir = Dir::new("badline");
    let mut d = Driver::new(&dir.sock());
    for junk in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
        let mut s = UnixStream::connect(dir.sock()).unwrap();
        s.write_all(junk).unwrap();
        s.set_nonblocking(true).unwrap();
        // The muxer closes the stream without a word.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            d.pump();
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(n) => panic!("unexpected answer {:?}", &b[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{e}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "junk {junk:?} was not dropped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(d.dev.backend().connection_count(), 0);
    // The muxer still works.
    let (_s, _) = host_connect(&mut d, &dir.sock(), 77);
}

#[test]
fn guest_initiated_connections_reach_host_listeners_or_get_rst() {
    let dir = Dir::new("guest");
    let mut d = Driver::new(&dir.sock());
    let listener = UnixListener::bind(format!("{}_5000", dir.sock().display())).unwrap();
    d.control(40000, 5000, op::REQUEST, 0);
    let p = d.pump_until(|p| !p.is_empty());
    assert_eq!(
        (p[0].op, p[0].src_port, p[0].dst_port),
        (op::RESPONSE, 5000, 40000)
    );
    let (mut host, _) = listener.accept().unwrap();
    d.send(&rw(40000, 5000, b"from guest", 0));
    let mut b = [0u8; 10];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"from guest");

    // No listener on 5001.
    d.control(40001, 5001, op::REQUEST, 0);
    let p = d.pump_until(|p| !p.is_empty());
    assert_eq!(
        (p[0].op, p[0].src_port, p[0].dst_port),
        (op::RST, 5001, 40001)
    );
    // Data for a connection that does not exist is answered with RST.
    d.send(&rw(40002, 5000, b"x", 0));
    let p = d.pump_until(|p| !p.is_empty());
    assert_eq!(p[0].op, op::RST);
}

#[test]
fn many_concurrent_connections_keep_their_data_apart() {
    let dir = Dir::new("many");
    let mut d = Driver::new(&dir.sock());
    let mut conns = Vec::new();
    for i in 0..40u32 {
        let (s, local) = host_connect(&mut d, &dir.sock(), 2000 + i);
        conns.push((s, local, 2000 + i));
    }
    // Interleave: every host writes, then every guest port answers.
    for (s, _, port) in &mut conns {
        s.write_all(format!("to {port}").as_bytes()).unwrap();
    }
    let got = d.pump_until(|p| p.iter().filter(|p| p.op == op::RW).count() >= 40);
    for (_, local, port) in &conns {
        let data: Vec<u8> = got
            .iter()
            .filter(|p| p.op == op::RW && p.dst_port == *port)
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(String::from_utf8(data).unwrap(), format!("to {port}"));
        assert!(got
            .iter()
            .filter(|p| p.dst_port == *port)
            .all(|p| p.src_port == *local));
    }
    for (_, local, port) in &conns {
        d.send(&rw(*port, *local, format!("from {port}").as_bytes(), 7));
    }
    for (s, _, port) in &mut conns {
        let want = format!("from {port}");
        let mut b = vec![0u8; want.len()];
        s.read_exact(&mut b).unwrap();
        assert_eq!(String::from_utf8(b).unwrap(), want);
    }
    assert_eq!(d.dev.backend().connection_count(), 40);
}

#[test]
fn a_host_that_stops_reading_bounds_what_the_vmm_buffers() {
    let dir = Dir::new("bp-host");
    let mut d = Driver::new(&dir.sock());
    let (s, local) = host_connect(&mut d, &dir.sock(), 3000);
    // The guest sends within the credit the host grants; the host reads nothing.
    let chunk = vec![0x5au8; 32 * 1024];
    let mut sent: u64 = 0;
    let mut host_fwd = 0u32;
    let mut host_buf_alloc = TX_BUF_SIZE;
    for _ in 0..2000 {
        for p in d.pump() {
            host_fwd = p.fwd_cnt;
            host_buf_alloc = p.buf_alloc;
        }
        let credit = u64::from(host_buf_alloc) - (sent - u64::from(host_fwd));
        if credit < chunk.len() as u64 {
            // A guest out of credit asks for an update and waits.
            d.control(3000, local, op::CREDIT_REQUEST, 0);
            continue;
        }
        d.send(&rw(3000, local, &chunk, 0));
        sent += chunk.len() as u64;
    }
    // What the host socket did not take waits in the VMM, never more than the credit.
    assert!(d.dev.backend().buffered_bytes() <= TX_BUF_SIZE as usize);
    assert!(
        sent < 64 << 20,
        "the guest kept sending without credit: {sent}"
    );
    drop(s);
}

#[test]
fn a_guest_that_stops_reading_stops_the_host_writer() {
    let dir = Dir::new("bp-guest");
    let mut d = Driver::new(&dir.sock());
    let (mut s, _) = host_connect(&mut d, &dir.sock(), 3001);
    s.set_nonblocking(true).unwrap();
    // The guest receives but never reports consumption (its fwd_cnt stays 0 because it
    // sends nothing): after GUEST_BUF_ALLOC bytes the VMM must stop reading the host.
    let chunk = vec![1u8; 64 * 1024];
    let mut written = 0usize;
    let mut received = 0usize;
    let mut blocked_rounds = 0;
    while blocked_rounds < 50 {
        match s.write(&chunk) {
            Ok(n) => {
                written += n;
                blocked_rounds = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => blocked_rounds += 1,
            Err(e) => panic!("{e}"),
        }
        received += d
            .pump()
            .iter()
            .filter(|p| p.op == op::RW)
            .map(|p| p.data.len())
            .sum::<usize>();
        assert!(written < 64 << 20, "host writes never blocked");
    }
    assert!(
        received <= GUEST_BUF_ALLOC as usize,
        "guest got {received} bytes beyond its buffer"
    );
    assert!(written > received, "the host socket holds the rest");
}

/// 64 MiB each way through the device, the muxer and a host socket, checked byte for byte.
#[test]
fn sixty_four_mib_each_way_arrive_intact() {
    const SIZE: usize = 64 << 20;
    let pattern = |i: usize| (i.wrapping_mul(2654435761) >> 13) as u8;
    let dir = Dir::new("bulk");
    let mut d = Driver::new(&dir.sock());
    let (s, local) = host_connect(&mut d, &dir.sock(), 4000);

    // Host -> guest.
    let mut ws = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let buf: Vec<u8> = (0..SIZE).map(pattern).collect();
        ws.write_all(&buf).unwrap();
    });
    let mut got = 0usize;
    let mut mismatch = None;
    let mut since_update = 0usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while got < SIZE {
        assert!(
            std::time::Instant::now() < deadline,
            "host->guest stalled at {got}"
        );
        for p in d.pump() {
            if p.op != op::RW {
                continue;
            }
            for (k, b) in p.data.iter().enumerate() {
                if mismatch.is_none() && *b != pattern(got + k) {
                    mismatch = Some(got + k);
                }
            }
            got += p.data.len();
            since_update += p.data.len();
        }
        // The guest tells the host it consumed what it got, as Linux does.
        if since_update >= (GUEST_BUF_ALLOC / 2) as usize {
            d.control(4000, local, op::CREDIT_UPDATE, 0);
            since_update = 0;
        }
    }
    writer.join().unwrap();
    assert_eq!(mismatch, None);
    assert_eq!(got, SIZE);

    // Guest -> host.
    let mut rs = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut total = 0usize;
        let mut bad = None;
        let mut buf = vec![0u8; 1 << 16];
        while total < SIZE {
            let n = rs.read(&mut buf).unwrap();
            assert!(n > 0, "early end of stream at {total}");
            for (k, b) in buf[..n].iter().enumerate() {
                if bad.is_none() && *b != pattern(total + k) {
                    bad = Some(total + k);
                }
            }
            total += n;
        }
        (total, bad)
    });
    let chunk_len = 60 * 1024;
    let mut sent = 0usize;
    let (mut host_fwd, mut host_alloc) = (0u32, TX_BUF_SIZE);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while sent < SIZE {
        assert!(
            std::time::Instant::now() < deadline,
            "guest->host stalled at {sent}"
        );
        for p in d.pump() {
            host_fwd = p.fwd_cnt;
            host_alloc = p.buf_alloc;
        }
        let in_flight = (sent as u32).wrapping_sub(host_fwd);
        let credit = host_alloc.saturating_sub(in_flight) as usize;
        let n = chunk_len.min(SIZE - sent).min(credit);
        if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let data: Vec<u8> = (sent..sent + n).map(pattern).collect();
        let fwd = *d.fwd.get(&(local, 4000)).unwrap_or(&0);
        d.send(&rw(4000, local, &data, fwd));
        sent += n;
    }
    // What the host socket has not taken yet leaves the VMM as the host reads.
    while !reader.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "guest->host tail stalled"
        );
        d.pump();
        std::thread::sleep(Duration::from_micros(200));
    }
    let (total, bad) = reader.join().unwrap();
    assert_eq!((total, bad), (SIZE, None));
}

#[test]
fn a_guest_overrunning_its_credit_loses_the_connection() {
    let dir = Dir::new("overrun");
    let mut d = Driver::new(&dir.sock());
    let (s, local) = host_connect(&mut d, &dir.sock(), 3002);
    let chunk = vec![0u8; 60 * 1024];
    // Ignore credit entirely; the host reads nothing.
    // Twice the buffer: more than the buffer and the host socket can hold together.
    for _ in 0..(2 * TX_BUF_SIZE as usize / chunk.len()) {
        d.send(&rw(3002, local, &chunk, 0));
    }
    let p = d.pump_until(|p| p.iter().any(|p| p.op == op::RST));
    assert!(p.iter().any(|p| p.op == op::RST && p.dst_port == 3002));
    assert_eq!(d.dev.backend().connection_count(), 0);
    assert_eq!(d.dev.backend().buffered_bytes(), 0);
    drop(s);
}

#[test]
fn the_socket_file_is_removed_with_the_device() {
    let dir = Dir::new("cleanup");
    let d = Driver::new(&dir.sock());
    assert!(dir.sock().exists());
    drop(d);
    assert!(!dir.sock().exists());
}

#[test]
fn a_guest_that_connects_to_closed_ports_and_never_reads_queues_a_bounded_number_of_rsts() {
    let dir = Dir::new("rstflood");
    let mut d = Driver::new(&dir.sock());
    // The driver's RX buffers fill first; the rest must wait in the muxer's queue.
    for port in 0..3000 {
        d.control(50000 + port, 7000, op::REQUEST, 0);
    }
    let queued = d.dev.backend().queued_rsts();
    assert!(queued > 0 && queued <= 1024, "{queued} RSTs queued");
    let got = d.pump_until(|p| p.len() >= queued);
    assert!(got.iter().all(|p| p.op == op::RST));
    assert!(got.len() < 3000, "{} RSTs for 3000 connects", got.len());
    assert_eq!(d.dev.backend().queued_rsts(), 0);
    assert_eq!(d.dev.backend().connection_count(), 0);
}

#[test]
fn many_stalled_host_sockets_together_buffer_at_most_the_muxer_limit() {
    use crate::devices::virtio::vsock::unix::MAX_BUFFERED;
    let dir = Dir::new("bp-total");
    let mut d = Driver::new(&dir.sock());
    // Enough connections that their credits together exceed the limit by far (host
    // socket buffers take a part of each).
    let n = 2 * MAX_BUFFERED / TX_BUF_SIZE as usize;
    let conns: Vec<(UnixStream, u32)> = (0..n as u32)
        .map(|i| host_connect(&mut d, &dir.sock(), 4000 + i))
        .collect();
    // Each guest connection sends within its own credit; no host socket reads.
    let chunk = vec![0xa5u8; 60 * 1024];
    for (i, (_, local)) in conns.iter().enumerate() {
        for _ in 0..(TX_BUF_SIZE as usize / chunk.len()) {
            d.send(&rw(4000 + i as u32, *local, &chunk, 0));
        }
    }
    let p = d.pump_until(|p| p.iter().any(|p| p.op == op::RST));
    assert!(d.dev.backend().buffered_bytes() <= MAX_BUFFERED);
    assert!(
        p.iter().filter(|p| p.op == op::RST).count() < n,
        "only overflowing ones reset"
    );
    drop(conns);
}
