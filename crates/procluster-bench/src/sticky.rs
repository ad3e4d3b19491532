//! Sticky sessions under load: the `hello` example under `sticky:ip` (the
//! kernel's path and the primary's) and `sticky:cookie=sid`, beside
//! round-robin, reuseport and the ideal (independent processes, each with
//! its own `SO_REUSEPORT` socket), and Node's cluster with
//! `@socket.io/sticky` (npm, installed under `target/`), in one run.
//!
//! wrk sends every request from one address with one set of headers, which
//! would put every connection of a sticky run on one worker; the load here
//! comes from a generator of this bench instead, for every row alike:
//! `--connections` connections, each request from one of `--clients`
//! clients, each client with its own loopback address (127.50.x.y) and its
//! own cookie (`sid=client-N`). Under keep-alive a connection keeps its
//! client; under `Connection: close` each request is a new connection of
//! the next client.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{Row, print_table, to_json};

#[derive(clap::Args)]
pub struct StickyArgs {
    /// Seconds per load run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Distinct clients (addresses and cookies).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Workers per server.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Runs per figure; the median run is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Skip Node's server.
    #[arg(long)]
    no_node: bool,
}

/// A server under test, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    name: String,
    children: Vec<Child>,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `command` and waits for its `listening on http://…:PORT` line.
fn start(name: &str, mut command: Command) -> Result<(Child, u16), String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            return Err(format!("{name} exited before listening"));
        };
        if let Some(rest) = line.strip_prefix("listening on http://") {
            break rest
                .rsplit(':')
                .next()
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| format!("no port in {line:?}"))?;
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, port))
}

fn hello(args: &StickyArgs, name: &str, policy: &str, extra: &[&str]) -> Result<Server, String> {
    let mut command = Command::new(crate::http::target_dir().join("examples/hello"));
    command
        .args(["--workers", &args.workers.to_string(), "--port", "0"])
        .args(["--policy", policy])
        .args(extra);
    let (child, port) = start(name, command)?;
    Ok(Server {
        name: name.into(),
        children: vec![child],
        port,
    })
}

fn ideal(args: &StickyArgs) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut first = Command::new(&exe);
    first.args(["ideal-server", "--port", "0"]);
    let (child, port) = start("ideal", first)?;
    let mut server = Server {
        name: "ideal".into(),
        children: vec![child],
        port,
    };
    for _ in 1..args.workers {
        let mut next = Command::new(&exe);
        next.args(["ideal-server", "--port", &port.to_string()]);
        server.children.push(start("ideal", next)?.0);
    }
    Ok(server)
}

/// Installs `@socket.io/sticky` where the bench keeps its Node packages
/// (under `target/`, never committed) and returns that `node_modules`.
fn socket_io_sticky() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-node");
    let modules = dir.join("node_modules");
    if modules.join("@socket.io/sticky").is_dir() {
        return Some(modules);
    }
    std::fs::create_dir_all(&dir).ok()?;
    let status = Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .arg("@socket.io/sticky@1")
        .status();
    match status {
        Ok(s) if s.success() => Some(modules),
        other => {
            eprintln!("cannot install @socket.io/sticky ({other:?}); its rows are left out");
            None
        }
    }
}

fn node_sticky(args: &StickyArgs) -> Option<Server> {
    if args.no_node {
        return None;
    }
    let modules = socket_io_sticky()?;
    let script = crate::http::repo_root().join("bench/node/sticky-cluster.js");
    let mut command = Command::new("node");
    command
        .arg(script)
        .args(["--workers", &args.workers.to_string()])
        .env("NODE_PATH", modules);
    match start("node @socket.io/sticky", command) {
        Ok((child, port)) => Some(Server {
            name: "node @socket.io/sticky".into(),
            children: vec![child],
            port,
        }),
        Err(error) => {
            eprintln!("{error}; its rows are left out");
            None
        }
    }
}

/// Client `n`'s address.
fn client_address(n: usize) -> IpAddr {
    IpAddr::from([127, 50, (n / 250) as u8, (n % 250 + 1) as u8])
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
struct Load {
    /// Requests per second.
    rate: f64,
    /// Request latency percentiles (connection included under close), µs.
    p50_us: f64,
    p99_us: f64,
    /// Requests per answering worker.
    per_worker: BTreeMap<String, u64>,
    errors: u64,
}

impl Load {
    fn spread(&self) -> f64 {
        let max = self.per_worker.values().max().copied().unwrap_or(0) as f64;
        let min = self.per_worker.values().min().copied().unwrap_or(0) as f64;
        if self.per_worker.len() < 2 {
            f64::INFINITY
        } else {
            max / min.max(1.0)
        }
    }
}

/// One request from client `client` on `stream`; the worker named in the
/// answer.
async fn request(
    stream: &mut tokio::net::TcpStream,
    client: usize,
    close: bool,
    buffer: &mut Vec<u8>,
) -> std::io::Result<String> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: bench\r\nCookie: theme=dark; sid=client-{client}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    );
    stream.write_all(request.as_bytes()).await?;
    buffer.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]);
                let worker = body.split(" (pid").next().unwrap_or(&body).to_string();
                return Ok(worker);
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn connect(port: u16, client: usize) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(client_address(client), 0))?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One connection's loop until `until`.
async fn drive(
    port: u16,
    first_client: usize,
    step: usize,
    clients: usize,
    close: bool,
    until: Instant,
) -> (Vec<u32>, BTreeMap<String, u64>, u64) {
    let mut latencies = Vec::new();
    let mut per_worker = BTreeMap::new();
    let mut errors = 0;
    let mut buffer = Vec::with_capacity(4096);
    let mut client = first_client % clients;
    let mut kept: Option<tokio::net::TcpStream> = None;
    while Instant::now() < until {
        let started = Instant::now();
        let stream = match kept.take() {
            Some(stream) => Ok(stream),
            None => connect(port, client).await,
        };
        let answered = match stream {
            Ok(mut stream) => match request(&mut stream, client, close, &mut buffer).await {
                Ok(worker) => {
                    if !close {
                        kept = Some(stream);
                    }
                    Ok(worker)
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match answered {
            Ok(worker) => {
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                *per_worker.entry(worker).or_default() += 1;
            }
            Err(_) => errors += 1,
        }
        if close || kept.is_none() {
            client = (client + step) % clients;
        }
    }
    (latencies, per_worker, errors)
}

fn load_once(server: &Server, args: &StickyArgs, close: bool) -> Load {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("load generator runtime");
    let port = server.port;
    let (connections, clients) = (args.connections.max(1), args.clients.max(1));
    let seconds = args.seconds;
    runtime.block_on(async move {
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..connections {
            tasks.spawn(drive(port, c, connections, clients, close, until));
        }
        let mut latencies = Vec::new();
        let mut load = Load::default();
        while let Some(done) = tasks.join_next().await {
            let (l, per_worker, errors) = done.expect("a load task");
            latencies.extend(l);
            for (worker, n) in per_worker {
                *load.per_worker.entry(worker).or_default() += n;
            }
            load.errors += errors;
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(f64::NAN, |v| f64::from(*v))
        };
        load.rate = latencies.len() as f64 / elapsed;
        load.p50_us = at(0.5);
        load.p99_us = at(0.99);
        load
    })
}

/// `args.repeat` runs; the one with the median rate.
fn load(server: &Server, args: &StickyArgs, close: bool) -> Load {
    let mut runs: Vec<Load> = (0..args.repeat.max(1))
        .map(|_| load_once(server, args, close))
        .collect();
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let median = runs.swap_remove(runs.len() / 2);
    if median.errors > 0 {
        eprintln!("{}: {} failed requests", server.name, median.errors);
    }
    median
}

/// The rows of one server: keep-alive and close throughput against the
/// references, latency, and the spread of requests over workers.
fn rows_of(rows: &mut Vec<Row>, name: &str, keep: &Load, close: &Load, refs: (f64, f64)) {
    rows.push(Row::ratio(
        &format!("{name} keep-alive"),
        "req/s",
        keep.rate,
        refs.0,
    ));
    rows.push(Row::ratio(
        &format!("{name} Connection: close"),
        "req/s",
        close.rate,
        refs.1,
    ));
    rows.push(Row::plain(
        &format!("{name} Connection: close latency p50"),
        "µs",
        close.p50_us,
    ));
    rows.push(Row::plain(
        &format!("{name} Connection: close latency p99"),
        "µs",
        close.p99_us,
    ));
    rows.push(Row::plain(
        &format!("{name} Connection: close per-worker max/min"),
        "ratio",
        close.spread(),
    ));
}

pub fn run(args: StickyArgs) -> Result<(), String> {
    let hello_path = crate::http::target_dir().join("examples/hello");
    if !hello_path.exists() {
        return Err(format!(
            "{} is missing: run `cargo build --release --example hello` first",
            hello_path.display()
        ));
    }
    let mut rows = Vec::new();
    let mut figures = serde_json::Map::new();
    let measure = |server: Server| -> (Load, Load) {
        let keep = load(&server, &args, false);
        let close = load(&server, &args, true);
        eprintln!(
            "{}: keep-alive {:.0} req/s, close {:.0} req/s, p50 {:.0} µs",
            server.name, keep.rate, close.rate, close.p50_us
        );
        (keep, close)
    };
    let (ideal_keep, ideal_close) = measure(ideal(&args)?);
    rows_of(
        &mut rows,
        "ideal (2 × SO_REUSEPORT)",
        &ideal_keep,
        &ideal_close,
        (ideal_keep.rate, ideal_close.rate),
    );
    let refs = (ideal_keep.rate, ideal_close.rate);
    let mut by_name: BTreeMap<&str, (Load, Load)> = BTreeMap::new();
    let servers: [(&str, &str, &[&str]); 5] = [
        ("round-robin", "round-robin", &[]),
        ("reuseport", "reuseport", &[]),
        ("sticky:ip (kernel)", "sticky:ip", &[]),
        ("sticky:ip (primary)", "sticky:ip", &["--sticky-in-primary"]),
        ("sticky:cookie=sid", "sticky:cookie=sid", &[]),
    ];
    for (name, policy, extra) in servers {
        let measured = measure(hello(&args, name, policy, extra)?);
        rows_of(&mut rows, name, &measured.0, &measured.1, refs);
        by_name.insert(name, measured);
    }
    if let Some(server) = node_sticky(&args) {
        let (keep, close) = measure(server);
        rows_of(&mut rows, "node @socket.io/sticky", &keep, &close, refs);
    }
    // Against the policies a sticky one replaces.
    let close_of = |name: &str| by_name[name].1.clone();
    let (rr, reuseport) = (close_of("round-robin"), close_of("reuseport"));
    let (cookie, kernel) = (
        close_of("sticky:cookie=sid"),
        close_of("sticky:ip (kernel)"),
    );
    rows.push(Row::ratio(
        "sticky:cookie=sid Connection: close, against round-robin",
        "req/s",
        cookie.rate,
        rr.rate,
    ));
    rows.push(Row::ratio(
        "sticky:ip (kernel) Connection: close, against reuseport",
        "req/s",
        kernel.rate,
        reuseport.rate,
    ));
    rows.push(Row::plain(
        "sticky:cookie=sid added p50 latency over round-robin",
        "µs",
        cookie.p50_us - rr.p50_us,
    ));
    for (name, (keep, close)) in &by_name {
        figures.insert(
            (*name).to_string(),
            serde_json::json!({
                "keep_alive_per_worker": keep.per_worker,
                "close_per_worker": close.per_worker,
            }),
        );
    }
    print_table(&rows, "value", "reference");
    println!(
        "{}",
        serde_json::json!({
            "bench": "sticky", "seconds": args.seconds, "connections": args.connections,
            "clients": args.clients, "workers": args.workers, "rows": to_json(&rows),
            "per_worker": figures,
        })
    );
    Ok(())
}
