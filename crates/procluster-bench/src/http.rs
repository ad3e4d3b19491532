//! HTTP benchmarks under `wrk`: the `hello` example under each policy, the
//! ideal (independent processes, each with its own `SO_REUSEPORT` socket, no
//! procluster), and Node's cluster module (RR and NONE), in one run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::{Row, print_table, to_json};

#[derive(clap::Args)]
pub struct HttpArgs {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Workers per server.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Sequential connections for the per-worker spread.
    #[arg(long, default_value_t = 1000)]
    sequential: u32,
    /// Skip Node's servers.
    #[arg(long)]
    no_node: bool,
    /// wrk runs per figure; the median run is reported (how a handful of
    /// connections spread over the workers differs from run to run).
    #[arg(long, default_value_t = 5)]
    repeat: u32,
}

/// A server under test: a process group to start, measure and stop.
struct Server {
    name: String,
    primary: Child,
    port: u16,
    /// Extra processes (the ideal's second process).
    others: Vec<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.primary).chain(self.others.iter_mut()) {
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

pub(crate) fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("target dir").to_path_buf()
}

pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts `command` and waits for its `listening on http://…:PORT` line.
fn start(name: &str, mut command: Command) -> (Child, u16) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{name} exited before listening"))
            .expect("read");
        if let Some(rest) = line.strip_prefix("listening on http://") {
            break rest
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port in the listening line");
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, port)
}

fn server(name: &str, command: Command) -> Server {
    let (primary, port) = start(name, command);
    Server {
        name: name.to_string(),
        primary,
        port,
        others: Vec::new(),
    }
}

fn procluster_server(args: &HttpArgs, policy: &str, extra: &[&str]) -> Server {
    let hello = target_dir().join("examples/hello");
    let mut command = Command::new(&hello);
    command.args([
        "--workers",
        &args.workers.to_string(),
        "--port",
        "0",
        "--policy",
        policy,
    ]);
    command.args(extra);
    server(&format!("procluster {policy}"), command)
}

fn ideal_server(args: &HttpArgs) -> Server {
    let exe = std::env::current_exe().expect("current exe");
    let mut first = Command::new(&exe);
    first.args(["ideal-server", "--port", "0"]);
    let mut ideal = server("ideal", first);
    for _ in 1..args.workers {
        let mut next = Command::new(&exe);
        next.args(["ideal-server", "--port", &ideal.port.to_string()]);
        ideal.others.push(start("ideal", next).0);
    }
    ideal
}

fn node_server(args: &HttpArgs, policy: &str) -> Option<Server> {
    if args.no_node {
        return None;
    }
    let script = repo_root().join("bench/node/http-cluster.js");
    let mut command = Command::new("node");
    command.arg(script).args([
        "--workers",
        &args.workers.to_string(),
        "--port",
        "0",
        "--policy",
        policy,
    ]);
    command.args(["--max-seconds", "600"]);
    Some(server(&format!("node {policy}"), command))
}

/// What one wrk run measured.
#[derive(Clone, Copy)]
struct Load {
    /// Requests per second.
    rate: f64,
    /// 99th percentile of request latency, in milliseconds.
    p99_ms: f64,
}

/// Runs wrk `args.repeat` times; the run with the median rate.
fn wrk(server: &Server, args: &HttpArgs, close: bool) -> Load {
    let mut runs: Vec<Load> = (0..args.repeat.max(1))
        .map(|_| wrk_once(server, args, close))
        .collect();
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs[runs.len() / 2]
}

/// One wrk run against the server.
fn wrk_once(server: &Server, args: &HttpArgs, close: bool) -> Load {
    let mut command = Command::new("wrk");
    command.args([
        "-t2",
        &format!("-c{}", args.connections),
        &format!("-d{}s", args.seconds),
        "--latency",
    ]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(format!("http://127.0.0.1:{}/", server.port));
    let output = command.output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("{}: wrk reported errors:\n{text}", server.name);
    }
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output for {}:\n{text}", server.name));
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| milliseconds(v.trim()))
        .unwrap_or(f64::NAN);
    Load { rate, p99_ms }
}

/// Throughput against the ideal's `(keep-alive, close)` rates, and the
/// latency tail under `Connection: close`.
fn load_rows(
    rows: &mut Vec<Row>,
    name: &str,
    keep: Option<Load>,
    close: Load,
    (ideal_keep, ideal_close): (f64, f64),
) {
    if let Some(keep) = keep {
        rows.push(Row::ratio(
            &format!("{name} keep-alive"),
            "req/s",
            keep.rate,
            ideal_keep,
        ));
    }
    rows.push(Row::ratio(
        &format!("{name} Connection: close"),
        "req/s",
        close.rate,
        ideal_close,
    ));
    rows.push(p99_row(name, close));
}

fn p99_row(name: &str, load: Load) -> Row {
    Row::plain(
        &format!("{name} Connection: close latency p99"),
        "ms",
        load.p99_ms,
    )
}

fn cpu_row(rows: &mut Vec<Row>, name: &str, share: f64) {
    rows.push(Row::plain(
        &format!("{name} primary CPU under Connection: close"),
        "% of total",
        share,
    ));
}

fn spread_row(rows: &mut Vec<Row>, name: &str, args: &HttpArgs, spread: f64) {
    rows.push(Row::plain(
        &format!("{name} per-worker max/min, {} sequential", args.sequential),
        "ratio",
        spread,
    ));
}

/// wrk's durations: `812.00us`, `2.13ms`, `1.20s`.
fn milliseconds(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1000.0),
        "ms" => Some(number),
        "s" => Some(number * 1000.0),
        "m" => Some(number * 60_000.0),
        _ => None,
    }
}

/// CPU time (user + system, clock ticks) of one process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

/// CPU time of the whole machine (all states but idle), clock ticks.
fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let first = stat.lines().next().unwrap_or("");
    let values: Vec<u64> = first
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    values.iter().sum::<u64>()
        - values.get(3).copied().unwrap_or(0)
        - values.get(4).copied().unwrap_or(0)
}

/// wrk, and the primary's share of all CPU used meanwhile (percent).
fn wrk_with_primary_share(server: &Server, args: &HttpArgs, close: bool) -> (Load, f64) {
    let pid = server.primary.id();
    let (primary_before, busy_before) = (cpu_ticks(pid), busy_ticks());
    let rate = wrk(server, args, close);
    let (primary_after, busy_after) = (cpu_ticks(pid), busy_ticks());
    let share = (primary_after - primary_before) as f64 / (busy_after - busy_before).max(1) as f64;
    (rate, share * 100.0)
}

/// `max/min` of connections per worker over sequential `Connection: close`
/// requests.
fn spread(server: &Server, count: u32) -> f64 {
    let mut per_worker = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..count {
        let body = get_once(server.port);
        let id = body.split(" (pid").next().unwrap_or(&body).to_string();
        *per_worker.entry(id).or_default() += 1;
    }
    let max = per_worker.values().max().copied().unwrap_or(0) as f64;
    let min = per_worker.values().min().copied().unwrap_or(0) as f64;
    if per_worker.len() < 2 {
        f64::INFINITY
    } else {
        max / min.max(1.0)
    }
}

fn get_once(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

pub fn run(args: HttpArgs) -> Result<(), String> {
    let hello = target_dir().join("examples/hello");
    if !Path::new(&hello).exists() {
        return Err(format!(
            "{} is missing: run `cargo build --release --example hello` first",
            hello.display()
        ));
    }
    let mut rows = Vec::new();
    let ideal = ideal_server(&args);
    let ideal_keep = wrk(&ideal, &args, false).rate;
    let ideal_close = wrk(&ideal, &args, true);
    drop(ideal);
    rows.push(Row::plain(
        "ideal (2 × SO_REUSEPORT) keep-alive",
        "req/s",
        ideal_keep,
    ));
    rows.push(Row::plain(
        "ideal (2 × SO_REUSEPORT) Connection: close",
        "req/s",
        ideal_close.rate,
    ));
    rows.push(p99_row("ideal (2 × SO_REUSEPORT)", ideal_close));
    let ideal_rates = (ideal_keep, ideal_close.rate);
    for policy in ["shared", "round-robin", "reuseport"] {
        let server = procluster_server(&args, policy, &[]);
        let (keep, share) = wrk_with_primary_share(&server, &args, false);
        let (close, close_share) = wrk_with_primary_share(&server, &args, true);
        let spread = spread(&server, args.sequential);
        drop(server);
        load_rows(&mut rows, policy, Some(keep), close, ideal_rates);
        rows.push(Row::plain(
            &format!("{policy} primary CPU under keep-alive"),
            "% of total",
            share,
        ));
        cpu_row(&mut rows, policy, close_share);
        spread_row(&mut rows, policy, &args, spread);
    }
    // The hello primary runs under SCHED_BATCH; the same without it.
    let server = procluster_server(&args, "round-robin", &["--normal-scheduling"]);
    let (close, close_share) = wrk_with_primary_share(&server, &args, true);
    drop(server);
    let name = "round-robin, primary under normal scheduling";
    load_rows(&mut rows, name, None, close, ideal_rates);
    cpu_row(&mut rows, name, close_share);
    for policy in ["rr", "none"] {
        let Some(server) = node_server(&args, policy) else {
            continue;
        };
        let keep = wrk(&server, &args, false);
        let close = wrk(&server, &args, true);
        let spread = spread(&server, args.sequential);
        drop(server);
        let name = format!("node {policy}");
        load_rows(&mut rows, &name, Some(keep), close, ideal_rates);
        spread_row(&mut rows, &name, &args, spread);
    }
    print_table(&rows, "value", "ideal");
    println!(
        "{}",
        serde_json::json!({ "bench": "http", "seconds": args.seconds, "connections": args.connections, "workers": args.workers, "rows": to_json(&rows) })
    );
    Ok(())
}

/// The ideal server: one process, its own `SO_REUSEPORT` socket, the same
/// handler as the `hello` example, no procluster.
pub async fn ideal_server_main(port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(1024)?;
    let listener = tokio::net::TcpListener::from_std(socket.into())?;
    let port = listener.local_addr()?.port();
    let greeting = format!("hello from worker 1 (pid {})", std::process::id());
    let app = axum::Router::new().fallback(axum::routing::get(move || {
        let greeting = greeting.clone();
        async move { greeting }
    }));
    println!("listening on http://127.0.0.1:{port}");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            terminate.recv().await;
        })
        .await?;
    Ok(())
}
