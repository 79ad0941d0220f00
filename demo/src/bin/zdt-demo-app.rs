//! The demo service: an HTTP server that follows the app-side contract zdt relies on.
//!
//! - warm-up of `--warmup`: `/` and `/readyz` answer 503, `/livez` 200;
//! - `/readyz` and `/livez` also on a per-instance admin port (`--admin-port`, 0 = any free port);
//! - every answer names the pid and version (`x-zdt-pid`, `x-zdt-version`, and the body);
//! - on SIGTERM: `/readyz` turns 503, the process stops accepting, closes its listener
//!   `--close-gap` later, finishes in-flight requests and exits;
//! - `--bind-at start` binds the public port at once (zdt mode: zdt sends it nothing until it is
//!   promoted); `--bind-at ready` binds only after warm-up (plain SO_REUSEPORT handover).
//!
//! It prints `admin=ADDR` and `bound=ADDR` lines on stdout as those sockets start listening.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use clap::{Parser, ValueEnum};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{net::TcpListener, signal::unix::SignalKind};

/// How the admin port's /readyz misbehaves (to test zdt's readiness check).
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ReadyzMode {
    Normal,
    /// 302 to /elsewhere.
    Redirect,
    /// Accepts, reads, never answers.
    Hang,
    /// Answers 200 after 2 s.
    Slow,
    /// Answers bytes that are not HTTP.
    Garbage,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BindAt {
    Start,
    Ready,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    addr: IpAddr,
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
    /// The admin port's address (default: --addr), e.g. ::1 for an admin port on IPv6 loopback.
    #[arg(long)]
    admin_addr: Option<IpAddr>,
    /// Bind the admin port with SO_REUSEPORT, so that another instance can share it (which
    /// makes its /readyz answer for whichever instance the kernel picks).
    #[arg(long)]
    admin_reuseport: bool,
    #[arg(long, default_value = "v1")]
    version: String,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, value_enum, default_value = "start")]
    bind_at: BindAt,
    /// Gap between the last accept() and close() of the listener after SIGTERM.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    close_gap: Duration,
    /// After the listener closed, how long connections keep being served as usual before idle
    /// ones are closed. A connection accepted just before SIGTERM may not have had its request
    /// read yet: closing it at once as "idle" would lose that request.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Time spent on each request of `/`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
    /// Never accept on the public port (a stuck process: connections pile up in its queue).
    #[arg(long)]
    no_accept: bool,
    /// Bind without SO_REUSEPORT (to see zdt refuse such a socket).
    #[arg(long)]
    no_reuseport: bool,
    #[arg(long, value_enum, default_value = "normal")]
    readyz_mode: ReadyzMode,
    /// Also bind a UDP socket on this port.
    #[arg(long)]
    udp_port: Option<u16>,
    /// Listen on both 0.0.0.0 and [::] with IPV6_V6ONLY=1 (two sockets: an IPv4 and an IPv6
    /// reuseport group), as nginx does with `listen 80; listen [::]:80;`.
    #[arg(long, conflicts_with = "dual_stack")]
    split: bool,
    /// Listen on one [::] socket with IPV6_V6ONLY=0 for both families, the default of Go, Java
    /// and Node.
    #[arg(long)]
    dual_stack: bool,
    /// Listening sockets per address of the public port, each with its own accept loop, as
    /// nginx's `reuseport` gives each worker its own.
    #[arg(long, default_value_t = 1)]
    sockets: usize,
    /// Wait this long after start before binding the public port (an app that loads its
    /// configuration first, a JVM). The admin port binds at once.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    bind_delay: Duration,
    /// Serve on this port too (a service on :80 and :443, say).
    #[arg(long)]
    extra_port: Option<u16>,
    /// On SIGUSR2, put a listener of another port (PORT+1) under the fd number of the public
    /// listener (dup2), keeping the public one open at another number: an fd that names
    /// another socket from one moment to the next, as a process that closes and reuses fd
    /// numbers has. Prints `swapped=FD`.
    #[arg(long)]
    swap_on_usr2: bool,
    /// With --swap-on-usr2: keep serving the public listener at its new number, as Go's
    /// `net.FileListener` does with a passed socket (it duplicates the fd, the app closes the
    /// passed one, and the next socket takes that number).
    #[arg(long, requires = "swap_on_usr2")]
    serve_moved: bool,
    /// On SIGHUP, re-create the public listeners in process: bind new ones (SO_REUSEPORT, the
    /// same addresses), accept on them, then close the old ones, as a Go server restarted in
    /// process or nginx reloading changed `listen` lines does. Prints `relistened=ADDR` per
    /// new listener.
    #[arg(long)]
    relisten_on_hup: bool,
    /// With --relisten-on-hup: the re-created listeners leave out --extra-port, as a reload
    /// that dropped a `listen` line does.
    #[arg(long, requires_all = ["relisten_on_hup", "extra_port"])]
    drop_extra_on_hup: bool,
    /// Of the sockets passed the systemd way, serve only the first N and leave the others open
    /// and never accepted from, as an app that takes one fd (`uvicorn --fd 3`) does.
    #[arg(long)]
    first_fds: Option<usize>,
}

struct App {
    version: String,
    pid: u32,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Set by SIGUSR1: /readyz answers 503 from then on (a process that stops being ready);
    /// `/` still answers.
    unready: AtomicBool,
    delay: Duration,
    readyz_mode: ReadyzMode,
}

fn listener(
    addr: SocketAddr,
    reuseport: bool,
    v6only: bool,
    backlog: i32,
) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    // The kernel puts a socket into the port's reuseport group only if SO_REUSEPORT is set
    // before bind(); this is the one change zdt asks of an app.
    if reuseport {
        s.set_reuse_port(true)?;
    }
    if let SocketAddr::V6(a) = addr {
        // An IPv4-mapped address takes IPv4 only: the kernel refuses to bind it IPv6-only.
        s.set_only_v6(v6only && a.ip().to_ipv4_mapped().is_none())?;
    }
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

fn response(status: u16, app: &App, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-zdt-pid", app.pid.to_string())
        .header("x-zdt-version", app.version.as_str())
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(format!(
            "{body} version={} pid={}\n",
            app.version, app.pid
        ))))
        .expect("valid response")
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    app: Arc<App>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ready = app.ready.load(Ordering::SeqCst);
    // After SIGUSR1 the process still serves, but says it is not ready (lost a dependency, say).
    let draining = app.draining.load(Ordering::SeqCst) || app.unready.load(Ordering::SeqCst);
    if req.uri().path() == "/readyz" {
        match app.readyz_mode {
            ReadyzMode::Redirect => {
                let mut r = response(302, &app, "moved");
                r.headers_mut().insert(
                    "location",
                    hyper::header::HeaderValue::from_static("/elsewhere"),
                );
                return Ok(r);
            }
            ReadyzMode::Hang => std::future::pending::<()>().await,
            ReadyzMode::Slow => tokio::time::sleep(Duration::from_secs(2)).await,
            ReadyzMode::Normal | ReadyzMode::Garbage => {}
        }
    }
    Ok(match req.uri().path() {
        "/livez" => response(200, &app, "alive"),
        "/readyz" | "/healthz" if ready && !draining => response(200, &app, "ready"),
        "/readyz" | "/healthz" => response(503, &app, "not ready"),
        _ if !ready => response(503, &app, "warming up"),
        _ => {
            if !app.delay.is_zero() {
                tokio::time::sleep(app.delay).await;
            }
            response(200, &app, "hello")
        }
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Listening sockets passed the systemd way (sd_listen_fds(3)): LISTEN_PID is this process,
/// LISTEN_FDS of them starting at fd 3.
fn inherited() -> anyhow::Result<Option<Vec<TcpListener>>> {
    let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: i32 = n.parse()?;
    (3..3 + n)
        .map(|fd| {
            // SAFETY: the fds were handed to us for our use, once, by the process that exec'd us.
            let std: std::net::TcpListener = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
            std.set_nonblocking(true)?;
            Ok(TcpListener::from_std(std)?)
        })
        .collect::<anyhow::Result<_>>()
        .map(Some)
}

fn serve(stream: tokio::net::TcpStream, app: &Arc<App>, graceful: &GracefulShutdown) {
    let _ = stream.set_nodelay(true);
    let app = app.clone();
    let conn = http1::Builder::new().serve_connection(
        TokioIo::new(stream),
        service_fn(move |r| handle(r, app.clone())),
    );
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _ = conn.await;
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Many listening sockets (--sockets) and their connections need more open files than the
    // default soft limit.
    zdt_ctl::raise_nofile_limit();
    let app = Arc::new(App {
        version: args.version.clone(),
        pid: std::process::id(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        unready: AtomicBool::new(false),
        delay: args.delay,
        readyz_mode: args.readyz_mode,
    });
    let mut sigusr1 = tokio::signal::unix::signal(SignalKind::user_defined1())?;
    let unready_app = app.clone();
    tokio::spawn(async move {
        while sigusr1.recv().await.is_some() {
            unready_app.unready.store(true, Ordering::SeqCst);
        }
    });
    let _udp = match args.udp_port {
        Some(p) => Some(std::net::UdpSocket::bind(SocketAddr::new(args.addr, p))?),
        None => None,
    };
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let graceful = GracefulShutdown::new();

    // Admin port: readiness of *this* instance, whoever owns the public port.
    let admin = listener(
        SocketAddr::new(args.admin_addr.unwrap_or(args.addr), args.admin_port),
        args.admin_reuseport,
        true,
        128,
    )?;
    println!("admin={}", admin.local_addr()?);
    let admin_app = app.clone();
    tokio::spawn(async move {
        let never = GracefulShutdown::new();
        while let Ok((mut s, _)) = admin.accept().await {
            if admin_app.readyz_mode == ReadyzMode::Garbage {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"\x00\x01garbage, not HTTP\r\n\r\n").await;
                continue;
            }
            serve(s, &admin_app, &never);
        }
    });

    let ports = std::iter::once(args.port).chain(args.extra_port);
    let addrs: Vec<SocketAddr> = ports
        .flat_map(|port| {
            let addrs = if args.split {
                vec![
                    SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
                    SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port),
                ]
            } else if args.dual_stack {
                vec![SocketAddr::new(
                    std::net::Ipv6Addr::UNSPECIFIED.into(),
                    port,
                )]
            } else {
                vec![SocketAddr::new(args.addr, port)]
            };
            addrs
                .into_iter()
                .flat_map(|a| std::iter::repeat_n(a, args.sockets.max(1)))
        })
        .collect();
    let bind = || -> anyhow::Result<Vec<TcpListener>> {
        // Sockets handed over the systemd way (zdt-ctl exec, or socket activation) are used as
        // they are; otherwise bind our own.
        let listeners = match inherited()? {
            Some(mut l) => {
                if let Some(n) = args.first_fds {
                    // Kept open (leaked), never accepted: the kernel still queues on them.
                    for rest in l.split_off(n.min(l.len())) {
                        std::mem::forget(rest);
                    }
                }
                l
            }
            None => addrs
                .iter()
                .map(|a| listener(*a, !args.no_reuseport, !args.dual_stack, args.backlog))
                .collect::<std::io::Result<_>>()?,
        };
        for l in &listeners {
            println!("bound={}", l.local_addr()?);
        }
        Ok(listeners)
    };
    let mut listeners = match args.bind_at {
        BindAt::Start => {
            tokio::time::sleep(args.bind_delay).await;
            bind()?
        }
        BindAt::Ready => Vec::new(),
    };
    // One accept task per listener, all feeding one channel; they stop when `stop` flips.
    let (conn_tx, mut conns) = tokio::sync::mpsc::channel::<tokio::net::TcpStream>(1024);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let accepts: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> = Default::default();
    let spawn_accepts = |ls: &Vec<Arc<TcpListener>>| {
        for l in ls {
            let (l, tx, mut stop) = (l.clone(), conn_tx.clone(), stop.clone());
            accepts
                .lock()
                .expect("accept tasks")
                .push(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            r = l.accept() => if let Ok((s, _)) = r {
                                let _ = tx.send(s).await;
                            },
                            _ = stop.changed() => break,
                        }
                    }
                }));
        }
    };
    let mut open: Vec<Arc<TcpListener>> = listeners.drain(..).map(Arc::new).collect();
    if let (true, Some(first)) = (args.swap_on_usr2, open.first()) {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let fd = first.as_raw_fd();
        let other = SocketAddr::new(args.addr, args.port + 1);
        let mut usr2 = tokio::signal::unix::signal(SignalKind::user_defined2())?;
        let (serve_moved, tx, mut stop) = (args.serve_moved, conn_tx.clone(), stop.clone());
        tokio::spawn(async move {
            while usr2.recv().await.is_some() {
                let Ok(l) = listener(other, true, true, 128).and_then(|l| l.into_std()) else {
                    continue;
                };
                let new = l.into_raw_fd();
                // SAFETY: plain fd calls on descriptors of this process. The public listener
                // stays open under the dup, so it keeps listening.
                let moved = unsafe {
                    let moved = libc::dup(fd);
                    libc::dup2(new, fd);
                    libc::close(new);
                    moved
                };
                println!("swapped={fd}");
                if !serve_moved {
                    continue;
                }
                use std::os::fd::FromRawFd;
                // SAFETY: `moved` is this process's own new descriptor of the listener.
                let std_l = unsafe { std::net::TcpListener::from_raw_fd(moved) };
                let Ok(l) = std_l
                    .set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(std_l))
                else {
                    continue;
                };
                loop {
                    tokio::select! {
                        r = l.accept() => if let Ok((s, _)) = r {
                            let _ = tx.send(s).await;
                        },
                        _ = stop.changed() => break,
                    }
                }
            }
        });
    }
    if !args.no_accept {
        spawn_accepts(&open);
    }
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let warm = tokio::time::sleep(args.warmup);
    tokio::pin!(warm);
    let mut warming = true;
    let mut last_accept_ms = 0;
    // One loop from bind to SIGTERM: a warming process accepts too, and answers 503.
    loop {
        tokio::select! {
            Some(s) = conns.recv() => {
                last_accept_ms = unix_ms();
                serve(s, &app, &graceful);
            }
            _ = &mut warm, if warming => {
                warming = false;
                if open.is_empty() {
                    open = bind()?.into_iter().map(Arc::new).collect();
                    if !args.no_accept {
                        spawn_accepts(&open);
                    }
                }
                app.ready.store(true, Ordering::SeqCst);
                println!("ready");
            }
            _ = hup.recv(), if args.relisten_on_hup && !open.is_empty() => {
                let new: Vec<Arc<TcpListener>> = addrs
                    .iter()
                    .filter(|a| !(args.drop_extra_on_hup && Some(a.port()) == args.extra_port))
                    .map(|a| listener(*a, true, !args.dual_stack, args.backlog).map(Arc::new))
                    .collect::<std::io::Result<_>>()?;
                // The old accept tasks first out of the list, then the new ones in: the old
                // listeners close once their tasks have ended and `open` lets go of them.
                let old: Vec<_> = accepts.lock().expect("accept tasks").drain(..).collect();
                if !args.no_accept {
                    spawn_accepts(&new);
                }
                for t in old {
                    t.abort();
                    let _ = t.await;
                }
                for l in &new {
                    println!("relistened={}", l.local_addr()?);
                }
                open = new;
            }
            _ = sigterm.recv() => break,
        }
    }
    // SIGTERM: not ready any more; no more accept(); the listeners stay open for the gap (their
    // queues still fill if anyone sends them connections), then close.
    app.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    // Connections accept() already took are ours: serve them. Wait for the accept tasks to
    // stop, then serve what they handed over but the loop above had not picked up yet (dropping
    // those would reset them).
    let tasks: Vec<_> = accepts.lock().expect("accept tasks").drain(..).collect();
    for t in tasks {
        let _ = t.await;
    }
    while let Ok(s) = conns.try_recv() {
        last_accept_ms = unix_ms();
        serve(s, &app, &graceful);
    }
    println!("last_accept_ms={last_accept_ms}");
    tokio::time::sleep(args.close_gap).await;
    // The accept tasks have dropped their references; this is the last one of each listener.
    drop(open);
    drop(conns);
    println!("closed");
    // The contract: keep serving what was already accepted for a grace period, then finish
    // in-flight requests and close idle keep-alive connections.
    tokio::time::sleep(args.drain_grace).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}
