//! A TCP measuring tool for the network benchmark, built static so it runs in a guest as
//! on the host:
//!
//!   net-bench serve PORT          accept connections: a first byte `s` sinks the stream
//!                                 and answers its length; `p` echoes each byte back
//!   net-bench stream ADDR MIB     sends MIB MiB, prints `MiB/s`
//!   net-bench rtt ADDR COUNT      COUNT one-byte round trips, prints the median in `us`
//!   net-bench udp ADDR TEXT       sends TEXT in one UDP datagram

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn serve(port: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(format!("0.0.0.0:{port}"))?;
    println!("listening");
    for conn in listener.incoming() {
        let mut s = conn?;
        s.set_nodelay(true)?;
        std::thread::spawn(move || {
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).is_err() {
                return;
            }
            let _ = match mode[0] {
                b's' => sink(&mut s),
                _ => echo(&mut s),
            };
        });
    }
    Ok(())
}

fn sink(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    s.write_all(&total.to_be_bytes())
}

fn echo(s: &mut TcpStream) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            return Ok(());
        }
        s.write_all(&b)?;
    }
}

fn stream(addr: &str, mib: u64) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"s")?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got)?;
    let secs = t.elapsed().as_secs_f64();
    let total = u64::from_be_bytes(got);
    if total != mib << 20 {
        return Err(std::io::Error::other(format!(
            "sent {} bytes, {total} arrived",
            mib << 20
        )));
    }
    println!("{:.1}", mib as f64 / secs);
    Ok(())
}

fn rtt(addr: &str, count: usize) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.write_all(b"p")?;
    let mut times = Vec::with_capacity(count);
    let mut b = [7u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    println!("{:.0}", times[times.len() / 2]);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| std::io::Error::other(format!("{s:?} is not a number")))
    };
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", port] => serve(port),
        ["stream", addr, mib] => parsed(mib).and_then(|m| stream(addr, m)),
        ["rtt", addr, count] => parsed(count).and_then(|c| rtt(addr, c as usize)),
        ["udp", addr, text] => std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.send_to(text.as_bytes(), addr))
            .map(drop),
        _ => Err(std::io::Error::other(
            "usage: net-bench serve PORT | stream ADDR MIB | rtt ADDR COUNT | udp ADDR TEXT",
        )),
    };
    if let Err(e) = result {
        eprintln!("net-bench: {e}");
        std::process::exit(1);
    }
}
