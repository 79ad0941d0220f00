//! A UDP request/response service for the UDP suite, shaped as a QUIC server behaves across a
//! handover: it answers each datagram with `PID STATE PAYLOAD`, where STATE is
//! - `warming` until `--warmup` has passed (its admin port's /readyz answers 503 meanwhile),
//! - `ok` once ready,
//! - `bye` after SIGTERM: as a QUIC server's GOAWAY, it tells each client to move on (to a new
//!   flow), and keeps answering the flows it has until none sent anything for `--idle`, or
//!   `--grace` passed; then it exits.
//!
//! It binds `[::]:PORT` dual-stack with SO_REUSEPORT, or takes fd 3 (LISTEN_FDS=1, as
//! `zdt-ctl exec --listen :PORT/udp` passes it). Prints `admin=ADDR` and `bound=ADDR`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::FromRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The UDP port to bind (ignored with LISTEN_FDS).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// After SIGTERM: exit once no datagram came for this long.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// After SIGTERM: exit after this long at the latest.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Exit at once on SIGTERM, dropping what is queued (an app that cuts its flows).
    #[arg(long)]
    abrupt: bool,
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let socket = if std::env::var("LISTEN_FDS").as_deref() == Ok("1") {
        // SAFETY: fd 3 is the socket the systemd protocol passes, ours from now on.
        unsafe { UdpSocket::from_raw_fd(3) }
    } else {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
        s.set_reuse_port(true)?;
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from(([0u16; 8], args.port)).into())?;
        s.into()
    };
    let admin = TcpListener::bind("127.0.0.1:0")?;
    println!("admin={}", admin.local_addr()?);
    println!("bound={}", socket.local_addr()?);
    let warmup = args.warmup;
    std::thread::spawn(move || {
        for c in admin.incoming().flatten() {
            let mut c = c;
            let mut buf = [0u8; 1024];
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = c.read(&mut buf);
            let ready = started.elapsed() >= warmup && !TERM.load(Ordering::SeqCst);
            let (code, body) = if ready {
                ("200 OK", "ok")
            } else {
                ("503 Service Unavailable", "no")
            };
            let _ = write!(
                c,
                "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let pid = std::process::id();
    let mut buf = [0u8; 2048];
    let mut term_at: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        if TERM.load(Ordering::SeqCst) {
            let at = *term_at.get_or_insert_with(Instant::now);
            let idle = at.elapsed() >= args.idle && last.elapsed() >= args.idle;
            if args.abrupt || idle || at.elapsed() >= args.grace {
                println!("exiting after {} ms", at.elapsed().as_millis());
                return Ok(());
            }
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        last = Instant::now();
        let state = if TERM.load(Ordering::SeqCst) {
            "bye"
        } else if started.elapsed() < args.warmup {
            "warming"
        } else {
            "ok"
        };
        let mut out = format!("{pid} {state} ").into_bytes();
        out.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&out, from);
    }
}
