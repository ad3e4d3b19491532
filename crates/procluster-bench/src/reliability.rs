//! Reliability scenarios against a supervised HTTP cluster on loopback, each
//! under load from a Rust load generator (blocking threads doing HTTP/1.1
//! `GET /` with `Connection: close`). A request fails when it cannot
//! connect, is reset, times out, or its response is incomplete or not 200.
//!
//! * `chaos`: SIGKILL a random worker every `--kill-interval-ms` for
//!   `--chaos-seconds` (reuseport and round-robin). The server is the bench's
//!   `supervised-server` with no restart delay and no breaker: the `hello`
//!   demo uses the default supervisor, whose backoff (100 ms doubling to
//!   15 s, reset only after 30 s of stable uptime) and breaker (more than 10
//!   failures in 60 s stops restarting) would empty the cluster after a
//!   dozen kills. Each kill SIGSTOPs the worker, lists the client connections
//!   it holds (pidfd_getfd + getpeername on its socket fds), then SIGKILLs
//!   it; every failed request must be one of those connections.
//! * `reload`: `--reloads` SIGHUPs in a row to the `hello` demo (each waits
//!   for `ReloadFinished` on its stderr and for every worker pid to change);
//!   zero failed requests (shared, round-robin, reuseport).
//! * `stop`: SIGTERM to the primary under load; exit code 0, no response cut
//!   short, no worker left; with `hello` and with slow (`--slow-ms`)
//!   requests on `supervised-server`.
//! * `kill-primary`: SIGKILL the `hello` primary under load; no worker alive
//!   a second later.
//! * `cycles`: `--cycles` worker kills on `supervised-server` (no backoff, no
//!   breaker), each waiting for the replacement's `WorkerReady`; the
//!   primary's fd count and RSS stay flat, no zombie children.
//!
//! The `reload` scenario also reloads the bench's own workers with a
//! `--shutdown-grace-ms` pause between their disconnect (they stop accepting
//! at once) and axum's graceful shutdown, as a control: hyper closes a
//! connection accepted just before its graceful shutdown without reading its
//! request, which is where `hello`'s failed requests come from.
//!
//! `RELIABILITY_VERBOSE=1` echoes the servers' stderr (supervisor events);
//! `RELIABILITY_DEBUG=1` prints each reload's timing and failed request.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::target_dir;
use crate::report::{Row, print_table, to_json};

#[derive(clap::Args)]
pub struct ReliabilityArgs {
    /// Scenarios to run, comma separated: chaos, reload, stop, kill-primary, cycles.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chaos,reload,stop,kill-primary,cycles"
    )]
    only: Vec<String>,
    /// Seconds of worker killing per policy in `chaos`.
    #[arg(long, default_value_t = 20)]
    chaos_seconds: u64,
    /// Milliseconds between two worker kills in `chaos`.
    #[arg(long, default_value_t = 100)]
    kill_interval_ms: u64,
    /// Concurrent connections of the load generator (also the per-worker
    /// bound on requests a killed worker can take down with it).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Rolling reloads in a row in `reload`.
    #[arg(long, default_value_t = 10)]
    reloads: u32,
    /// Crash/restart cycles in `cycles`.
    #[arg(long, default_value_t = 1000)]
    cycles: u32,
    /// Upper bound on the time of `cycles`, seconds.
    #[arg(long, default_value_t = 300)]
    cycles_max_seconds: u64,
    /// Policies of the `cycles` server, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "shared,round-robin,reuseport"
    )]
    cycles_policy: Vec<String>,
    /// Connect, read and write timeout of one request, milliseconds.
    #[arg(long, default_value_t = 3000)]
    request_timeout_ms: u64,
    /// Handling time of the slow requests in `stop`, milliseconds.
    #[arg(long, default_value_t = 300)]
    slow_ms: u64,
    /// Grace (ms) of the control reloads on the bench's own workers, which
    /// stop accepting at once but start axum's graceful shutdown this late.
    #[arg(long, default_value_t = 100)]
    shutdown_grace_ms: u64,
    /// Seed of the choice of worker to kill (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

// ------------------------------------------------------------------ /proc --

/// Fields of /proc/PID/stat after the command name: state is index 0,
/// ppid 1, starttime 19.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Direct children of `pid` (zombies included).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut found = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                found = true;
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    if !found {
        // No /proc/PID/task/*/children: scan every process's parent.
        if let Ok(all) = std::fs::read_dir("/proc") {
            for entry in all.flatten() {
                let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid) {
                    out.push(child);
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Children that are not zombies.
fn live_children(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|&c| state(c).is_some_and(|s| s != 'Z'))
        .collect()
}

fn zombie_children(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|&c| state(c) == Some('Z'))
        .collect()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kb(pid: u32) -> u64 {
    crate::supervision::rss_bytes(pid).unwrap_or(0) / 1024
}

fn signal(pid: u32, signal: rustix::process::Signal) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::kill_process(p, signal).is_ok())
}

/// Waits (≤ `limit`) until every thread of `pid` is stopped.
fn wait_stopped(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let all_stopped = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|s| matches!(s, "T" | "t" | "Z" | "X"))
            })
        });
        if all_stopped {
            return;
        }
        std::thread::yield_now();
    }
}

/// The client ports of the TCP connections to `server_port` that `pid`
/// holds, read through pidfd_getfd; `None` when the kernel refuses.
fn held_client_ports(pid: u32, server_port: u16) -> Option<Vec<u16>> {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let pidfd = pidfd_open(Pid::from_raw(pid as i32)?, PidfdFlags::empty()).ok()?;
    let mut ports = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let fd = match pidfd_getfd(pidfd.as_fd(), target, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::PERM) | Err(rustix::io::Errno::NOSYS) => return None,
            Err(_) => continue,
        };
        let local = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok());
        let peer = rustix::net::getpeername(&fd)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        // Our copy closes here, before the kill: it must not keep the
        // connection open.
        drop(fd);
        if let (Some(local), Some(peer)) = (local, peer)
            && local.port() == server_port
        {
            ports.push(peer.port());
        }
    }
    Some(ports)
}

// ------------------------------------------------------------------ load --

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Failure {
    /// The connection was refused.
    Refused,
    /// Another connect error (timeout...).
    ConnectFailed,
    /// Connected, then reset or closed before any response byte.
    Unanswered,
    /// Part of a response, then reset or closed.
    Cut,
    /// Connected, no complete response within the timeout.
    Timeout,
    /// A complete response that is not 200.
    BadStatus,
}

#[derive(Clone, Debug)]
struct Failed {
    kind: Failure,
    /// Client port; 0 when it never connected.
    port: u16,
    start: Instant,
    end: Instant,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// Whether `buf` holds a complete response, and whether it is a 200.
fn complete(buf: &[u8]) -> Option<bool> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let ok = head.starts_with("HTTP/1.1 200");
    let length: usize = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })?;
    (buf.len() >= end + 4 + length).then_some(ok)
}

fn request(addr: SocketAddr, timeout: Duration) -> Result<(), Failed> {
    let start = Instant::now();
    let fail = |kind, port| Failed {
        kind,
        port,
        start,
        end: Instant::now(),
    };
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            return Err(fail(Failure::Refused, 0));
        }
        Err(_) => return Err(fail(Failure::ConnectFailed, 0)),
    };
    let port = stream.local_addr().map_or(0, |a| a.port());
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.write_all(REQUEST) {
        let kind = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Unanswered,
        };
        return Err(fail(kind, port));
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    let ended = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break Some(Failure::Timeout);
            }
            Err(_) => break Some(Failure::Cut),
        }
    };
    match complete(&buf) {
        Some(true) => Ok(()),
        Some(false) => Err(fail(Failure::BadStatus, port)),
        None => Err(fail(
            match (ended, buf.is_empty()) {
                (Some(Failure::Timeout), _) => Failure::Timeout,
                (_, true) => Failure::Unanswered,
                (_, false) => Failure::Cut,
            },
            port,
        )),
    }
}

struct LoadShared {
    began: Instant,
    stop: AtomicBool,
    ok: AtomicU64,
    per_second: Vec<AtomicU64>,
    failures: Mutex<Vec<Failed>>,
}

/// The load generator: `connections` threads, each one request at a time.
struct Load {
    shared: Arc<LoadShared>,
    threads: Vec<JoinHandle<()>>,
}

struct LoadResult {
    ok: u64,
    per_second: Vec<u64>,
    failures: Vec<Failed>,
}

impl LoadResult {
    fn summary(&self) -> String {
        let mut by_kind = std::collections::BTreeMap::<Failure, usize>::new();
        for f in &self.failures {
            *by_kind.entry(f.kind).or_default() += 1;
        }
        if by_kind.is_empty() {
            "none".into()
        } else {
            by_kind
                .iter()
                .map(|(k, n)| format!("{k:?} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

impl Load {
    fn start(port: u16, connections: usize, timeout: Duration) -> Self {
        let shared = Arc::new(LoadShared {
            began: Instant::now(),
            stop: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            per_second: (0..3600).map(|_| AtomicU64::new(0)).collect(),
            failures: Mutex::new(Vec::new()),
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let threads = (0..connections)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    while !shared.stop.load(Ordering::Relaxed) {
                        match request(addr, timeout) {
                            Ok(()) => {
                                shared.ok.fetch_add(1, Ordering::Relaxed);
                                let second = shared.began.elapsed().as_secs() as usize;
                                if let Some(b) = shared.per_second.get(second) {
                                    b.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(failed) => {
                                let refused = failed.kind == Failure::Refused;
                                shared.failures.lock().unwrap().push(failed);
                                if refused {
                                    // Nothing listens: do not spin.
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Self { shared, threads }
    }

    fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    fn failures(&self) -> usize {
        self.shared.failures.lock().unwrap().len()
    }

    fn finish(self) -> LoadResult {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let seconds = self.shared.began.elapsed().as_secs() as usize + 1;
        LoadResult {
            ok: self.shared.ok.load(Ordering::Relaxed),
            per_second: self.shared.per_second[..seconds.min(3600)]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            failures: std::mem::take(&mut *self.shared.failures.lock().unwrap()),
        }
    }
}

// ---------------------------------------------------------------- server --

/// A supervised server process: its stdout's `listening on` line gives the
/// port, its stderr (supervisor events, one `{:?}` per line) is read line by
/// line.
struct Server {
    name: String,
    child: Child,
    pid: u32,
    port: u16,
    stderr: Receiver<String>,
    /// Worker pids seen, with their start times: the ones still running
    /// are killed when the server is dropped.
    seen_workers: HashSet<(u32, Option<u64>)>,
}

impl Server {
    fn spawn(name: &str, mut command: Command) -> Result<Self, String> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .strip_prefix("listening on http://")
                    .and_then(|r| r.rsplit(':').next()?.parse::<u16>().ok())
                {
                    let _ = port_tx.send(port);
                }
            }
        });
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RELIABILITY_VERBOSE").is_some() {
                    eprintln!("  | {line}");
                }
                if err_tx.send(line).is_err() {
                    // Nobody reads any more: keep draining.
                }
            }
        });
        let pid = child.id();
        let mut server = Self {
            name: name.into(),
            child,
            pid,
            port: 0,
            stderr: err_rx,
            seen_workers: HashSet::new(),
        };
        server.port = port_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("{name} did not print its listening line within 30 s"))?;
        server.note_workers();
        Ok(server)
    }

    fn hello(policy: &str, workers: usize) -> Result<Self, String> {
        let hello = target_dir().join("examples/hello");
        if !hello.exists() {
            return Err(format!(
                "{} is missing: cargo build --release -p procluster --example hello",
                hello.display()
            ));
        }
        let mut command = Command::new(hello);
        command.args([
            "--workers",
            &workers.to_string(),
            "--port",
            "0",
            "--policy",
            policy,
        ]);
        Self::spawn(&format!("hello {policy}"), command)
    }

    fn supervised(policy: &str, workers: usize, extra: &[&str]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = Command::new(exe);
        command
            .args([
                "supervised-server",
                "--workers",
                &workers.to_string(),
                "--port",
                "0",
                "--policy",
                policy,
            ])
            .args(extra);
        Self::spawn(&format!("supervised-server {policy}"), command)
    }

    fn workers(&mut self) -> Vec<u32> {
        let live = live_children(self.pid);
        self.seen_workers
            .extend(live.iter().map(|&p| (p, start_time(p))));
        live
    }

    fn note_workers(&mut self) {
        let _ = self.workers();
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits ≤ `timeout` for a stderr line containing any of `wanted`.
    fn wait_line(&self, wanted: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if wanted.iter().any(|w| line.contains(w)) => return Some(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits ≤ `timeout` for the primary to exit; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.note_workers();
        if self.alive() {
            signal(self.pid, rustix::process::Signal::TERM);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                eprintln!("{}: still running 10 s after SIGTERM; killed", self.name);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for &(pid, started) in &self.seen_workers {
            // Only our own leftovers: the same process (same start time),
            // still running.
            if started.is_some()
                && start_time(pid) == started
                && state(pid).is_some_and(|s| s != 'Z')
            {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

// ---------------------------------------------------------------- report --

struct Report {
    rows: Vec<Row>,
    checks: Vec<(String, bool, String)>,
}

impl Report {
    fn row(&mut self, name: &str, unit: &'static str, value: f64) {
        self.rows.push(Row::plain(name, unit, value));
    }

    fn check(&mut self, name: &str, pass: bool, detail: String) {
        println!("  {} {name}: {detail}", if pass { "PASS" } else { "FAIL" });
        self.checks.push((name.into(), pass, detail));
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

// ------------------------------------------------------------- scenarios --

struct Kill {
    /// When the worker's connections were listed (it was stopped then).
    at: Instant,
    /// The client ports it held; `None` when they could not be read.
    ports: Option<Vec<u16>>,
}

fn chaos(args: &ReliabilityArgs, policy: &str, rng: &mut Rng, report: &mut Report) {
    let scenario = format!("chaos {policy}");
    println!(
        "{scenario}: {} s, a kill every {} ms",
        args.chaos_seconds, args.kill_interval_ms
    );
    let mut server = match Server::supervised(policy, 2, &["--backoff-ms", "0", "--no-breaker"]) {
        Ok(s) => s,
        Err(e) => return report.check(&scenario, false, e),
    };
    let timeout = Duration::from_millis(args.request_timeout_ms);
    let load = Load::start(server.port, args.connections, timeout);
    std::thread::sleep(Duration::from_millis(500));
    let chaos_began = Instant::now();
    let first_second = load.shared.began.elapsed().as_secs() as usize + 1;
    let interval = Duration::from_millis(args.kill_interval_ms.max(1));
    let mut kills: Vec<Kill> = Vec::new();
    let mut tick = 0u32;
    let mut no_worker_ticks = 0u32;
    while chaos_began.elapsed() < Duration::from_secs(args.chaos_seconds) {
        let workers = server.workers();
        if workers.is_empty() {
            no_worker_ticks += 1;
        } else {
            let victim = workers[(rng.next() % workers.len() as u64) as usize];
            if signal(victim, rustix::process::Signal::STOP) {
                // SIGSTOP is asynchronous: list its connections only once
                // every thread has stopped.
                wait_stopped(victim, Duration::from_millis(100));
                let ports = held_client_ports(victim, server.port);
                let at = Instant::now();
                signal(victim, rustix::process::Signal::KILL);
                kills.push(Kill { at, ports });
            }
        }
        tick += 1;
        let next = chaos_began + interval * tick;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let last_second = load.shared.began.elapsed().as_secs() as usize;
    // Recovery: every worker back, still serving.
    let recovered = {
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.workers().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        server.workers().len() == 2
    };
    let ok_before = load.ok();
    std::thread::sleep(Duration::from_millis(500));
    let serving_after = load.ok() > ok_before;
    let result = load.finish();
    let primary_alive = server.alive();

    let n_kills = kills.len();
    let exact = kills.iter().all(|k| k.ports.is_some());
    let held: usize = kills
        .iter()
        .filter_map(|k| k.ports.as_ref())
        .map(Vec::len)
        .sum();
    let bound = n_kills * args.connections;
    // A failure is accounted for when a killed worker held its connection
    // (or, without pidfd_getfd, when a kill happened while it was open).
    let unaccounted: Vec<&Failed> = result
        .failures
        .iter()
        .filter(|f| {
            !kills.iter().any(|k| {
                f.start <= k.at
                    && k.at <= f.end
                    && k.ports.as_ref().is_none_or(|p| p.contains(&f.port))
            })
        })
        .collect();
    let window = result
        .per_second
        .get(first_second..last_second.min(result.per_second.len()))
        .unwrap_or(&[]);
    let min_per_second = window.iter().copied().min().unwrap_or(0);
    let failures = result.failures.len();

    report.row(
        &format!("{scenario}: successful requests"),
        "count",
        result.ok as f64,
    );
    report.row(
        &format!("{scenario}: failed requests"),
        "count",
        failures as f64,
    );
    report.row(
        &format!("{scenario}: workers killed"),
        "count",
        n_kills as f64,
    );
    if exact {
        report.row(
            &format!("{scenario}: connections held by killed workers"),
            "count",
            held as f64,
        );
    }
    report.row(
        &format!("{scenario}: failures not held by a killed one"),
        "count",
        unaccounted.len() as f64,
    );
    report.row(
        &format!("{scenario}: fewest successes in a second"),
        "req/s",
        min_per_second as f64,
    );
    report.check(
        &format!("{scenario}: primary alive and serving afterwards"),
        primary_alive && recovered && serving_after,
        format!(
            "primary alive {primary_alive}, 2 workers back {recovered}, serving {serving_after}"
        ),
    );
    report.check(
        &format!("{scenario}: successes grow every second"),
        !window.is_empty() && min_per_second > 0,
        format!(
            "fewest successes in one of {} whole seconds: {min_per_second} (ticks without a worker to kill: {no_worker_ticks})",
            window.len()
        ),
    );
    report.check(
        &format!("{scenario}: failures ≤ kills × {} connections", args.connections),
        failures <= bound,
        format!(
            "{failures} failures ({}), {n_kills} kills, bound {bound}: a worker cannot hold more requests than the load generator has in flight",
            result.summary()
        ),
    );
    if exact {
        report.check(
            &format!("{scenario}: failures ≤ connections the killed workers held"),
            failures <= held,
            format!(
                "{failures} failures, {held} client connections held at the kills (pidfd_getfd)"
            ),
        );
    }
    let attribution = if exact {
        "its client port was held by a worker stopped and killed during the request"
    } else {
        "a kill happened during the request (pidfd_getfd unavailable: timing only)"
    };
    let lost = format!(
        "{} of {failures} failures unaccounted ({attribution}){}",
        unaccounted.len(),
        unaccounted
            .first()
            .map(|f| format!("; first: {:?} port {}", f.kind, f.port))
            .unwrap_or_default()
    );
    if policy == "round-robin" {
        report.check(
            &format!("{scenario}: no queued connection lost"),
            unaccounted.is_empty(),
            lost,
        );
    } else {
        println!("  info {scenario}: {lost}");
    }
}

/// `grace_ms`: `None` reloads the `hello` demo; `Some(ms)` the bench's
/// supervised-server whose workers wait `ms` after their disconnect before
/// axum's graceful shutdown (a control for the diagnosis of failures).
fn reload(args: &ReliabilityArgs, policy: &str, grace_ms: Option<u64>, report: &mut Report) {
    let scenario = match grace_ms {
        None => format!("reload {policy}"),
        Some(ms) => format!("reload {policy} bench worker, {ms} ms grace"),
    };
    println!("{scenario}: {} rolling reloads under load", args.reloads);
    let server = match grace_ms {
        None => Server::hello(policy, 2),
        Some(ms) => Server::supervised(policy, 2, &["--shutdown-grace-ms", &ms.to_string()]),
    };
    let mut server = match server {
        Ok(s) => s,
        Err(e) => return report.check(&scenario, false, e),
    };
    let load = Load::start(
        server.port,
        args.connections,
        Duration::from_millis(args.request_timeout_ms),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut durations = Vec::new();
    let mut problem = None;
    for i in 1..=args.reloads {
        let before: HashSet<u32> = server.workers().into_iter().collect();
        let start = Instant::now();
        signal(server.pid, rustix::process::Signal::HUP);
        match server.wait_line(
            &["ReloadFinished", "ReloadFailed", "ReloadRejected"],
            Duration::from_secs(30),
        ) {
            Some(line) if line.contains("ReloadFinished") => {}
            Some(line) => {
                problem = Some(format!("reload {i}: {line}"));
                break;
            }
            None => {
                problem = Some(format!("reload {i}: no ReloadFinished within 30 s"));
                break;
            }
        }
        durations.push(start.elapsed().as_secs_f64() * 1000.0);
        if std::env::var_os("RELIABILITY_DEBUG").is_some() {
            eprintln!(
                "reload {i}: SIGHUP at {:?}, finished at {:?}",
                start - load.shared.began,
                Instant::now() - load.shared.began
            );
        }
        // The old workers finish their requests and exit: every pid changes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now: Vec<u32> = server.workers();
            if now.len() == 2 && now.iter().all(|p| !before.contains(p)) {
                break;
            }
            if Instant::now() > deadline {
                problem = Some(format!(
                    "reload {i}: workers {now:?} 10 s after ReloadFinished, before {before:?}"
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if problem.is_some() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let began = load.shared.began;
    let result = load.finish();
    if std::env::var_os("RELIABILITY_DEBUG").is_some() {
        for f in &result.failures {
            eprintln!(
                "failure {:?} port {} from {:?} to {:?}",
                f.kind,
                f.port,
                f.start - began,
                f.end - began
            );
        }
    }
    durations.sort_by(f64::total_cmp);
    report.row(
        &format!("{scenario}: successful requests"),
        "count",
        result.ok as f64,
    );
    report.row(
        &format!("{scenario}: failed requests"),
        "count",
        result.failures.len() as f64,
    );
    if !durations.is_empty() {
        report.row(
            &format!("{scenario}: SIGHUP → ReloadFinished, median"),
            "ms",
            durations[durations.len() / 2],
        );
    }
    report.check(
        &format!(
            "{scenario}: {} reloads, every worker replaced",
            args.reloads
        ),
        problem.is_none(),
        problem.unwrap_or_else(|| format!("{} reloads done", durations.len())),
    );
    let detail = format!("{} ok, failures: {}", result.ok, result.summary());
    if grace_ms.is_none() {
        report.check(
            &format!("{scenario}: zero failed requests"),
            result.failures.is_empty(),
            detail,
        );
    } else {
        println!("  info {scenario}: {detail}");
    }
}

fn graceful_stop(args: &ReliabilityArgs, policy: &str, slow: bool, report: &mut Report) {
    let scenario = if slow {
        format!("stop {policy} slow {} ms", args.slow_ms)
    } else {
        format!("stop {policy}")
    };
    let server = if slow {
        Server::supervised(policy, 2, &["--delay-ms", &args.slow_ms.to_string()])
    } else {
        Server::hello(policy, 2)
    };
    let mut server = match server {
        Ok(s) => s,
        Err(e) => return report.check(&scenario, false, e),
    };
    println!("{scenario}: SIGTERM to the primary under load");
    let load = Load::start(
        server.port,
        args.connections,
        Duration::from_millis(args.request_timeout_ms.max(args.slow_ms * 3)),
    );
    std::thread::sleep(Duration::from_millis(if slow { 1000 } else { 500 }));
    let workers = server.workers();
    let failures_before = load.failures();
    let ok_before = load.ok();
    let sigterm = Instant::now();
    signal(server.pid, rustix::process::Signal::TERM);
    let status = server.wait_exit(Duration::from_secs(20));
    let exit_ms = sigterm.elapsed().as_secs_f64() * 1000.0;
    // Requests still open finish (or fail) within their timeout.
    std::thread::sleep(Duration::from_millis(200));
    let result = load.finish();
    let after: Vec<&Failed> = result
        .failures
        .iter()
        .filter(|f| f.end >= sigterm)
        .collect();
    let cut = after
        .iter()
        .filter(|f| matches!(f.kind, Failure::Cut | Failure::Timeout | Failure::BadStatus))
        .count();
    let unanswered = after
        .iter()
        .filter(|f| f.kind == Failure::Unanswered)
        .count();
    // Closed unanswered well before the primary exited (and closed the
    // listeners): dropped by a worker, not by the listener's close.
    let closing = sigterm + Duration::from_secs_f64(exit_ms / 1000.0);
    let dropped_early = after
        .iter()
        .filter(|f| f.kind == Failure::Unanswered && f.end + Duration::from_millis(20) < closing)
        .count();
    let refused = after
        .iter()
        .filter(|f| matches!(f.kind, Failure::Refused | Failure::ConnectFailed))
        .count();
    let served_after = result.ok - ok_before;
    let left: Vec<u32> = workers
        .iter()
        .copied()
        .filter(|&p| state(p).is_some_and(|s| s != 'Z'))
        .collect();
    report.row(
        &format!("{scenario}: completed after SIGTERM"),
        "count",
        served_after as f64,
    );
    report.row(
        &format!("{scenario}: cut after SIGTERM"),
        "count",
        cut as f64,
    );
    report.row(
        &format!("{scenario}: connected, closed unanswered"),
        "count",
        unanswered as f64,
    );
    report.row(
        &format!("{scenario}: of which ≥ 20 ms before exit"),
        "count",
        dropped_early as f64,
    );
    report.row(
        &format!("{scenario}: refused after close"),
        "count",
        refused as f64,
    );
    report.row(
        &format!("{scenario}: SIGTERM → primary exit"),
        "ms",
        exit_ms,
    );
    report.check(
        &format!("{scenario}: primary exits 0"),
        status.is_some_and(|s| s.success()),
        format!("{status:?} after {exit_ms:.0} ms"),
    );
    report.check(
        &format!("{scenario}: zero responses cut"),
        cut == 0 && failures_before == 0,
        format!(
            "{cut} cut/timed out, {failures_before} failures before SIGTERM; not counted: {unanswered} connected but closed unanswered (queued when the listener closed), {refused} refused"
        ),
    );
    report.check(
        &format!("{scenario}: no worker left"),
        left.is_empty(),
        format!("workers {workers:?}, still alive {left:?}"),
    );
}

fn kill_primary(args: &ReliabilityArgs, policy: &str, report: &mut Report) {
    let scenario = format!("kill-primary {policy}");
    println!("{scenario}: SIGKILL the hello primary under load");
    let mut server = match Server::hello(policy, 2) {
        Ok(s) => s,
        Err(e) => return report.check(&scenario, false, e),
    };
    let load = Load::start(
        server.port,
        args.connections,
        Duration::from_millis(args.request_timeout_ms),
    );
    std::thread::sleep(Duration::from_millis(500));
    let workers: Vec<(u32, Option<u64>)> = server
        .workers()
        .into_iter()
        .map(|p| (p, start_time(p)))
        .collect();
    signal(server.pid, rustix::process::Signal::KILL);
    let _ = server.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let mut alive = Vec::new();
    let mut zombies = 0;
    for &(pid, started) in &workers {
        if start_time(pid) != started || started.is_none() {
            continue;
        }
        match state(pid) {
            Some('Z') => zombies += 1,
            Some(_) => alive.push(pid),
            None => {}
        }
    }
    let result = load.finish();
    report.row(
        &format!("{scenario}: workers alive 1 s later"),
        "count",
        alive.len() as f64,
    );
    report.check(
        &format!("{scenario}: no worker alive 1 s later"),
        !workers.is_empty() && alive.is_empty(),
        format!(
            "workers {:?}, alive {alive:?}, zombies (dead, not reaped by their new parent) {zombies}; load: {} ok, {} failed",
            workers.iter().map(|w| w.0).collect::<Vec<_>>(),
            result.ok,
            result.failures.len()
        ),
    );
}

fn cycles(args: &ReliabilityArgs, policy: &str, report: &mut Report) {
    let scenario = format!("cycles {policy}");
    println!(
        "{scenario}: {} worker kills, each waiting for its replacement",
        args.cycles
    );
    let mut server = match Server::supervised(policy, 2, &["--backoff-ms", "0", "--no-breaker"]) {
        Ok(s) => s,
        Err(e) => return report.check(&scenario, false, e),
    };
    // Both initial workers ready before the first kill.
    for _ in 0..2 {
        if server
            .wait_line(&["WorkerReady"], Duration::from_secs(10))
            .is_none()
        {
            return report.check(&scenario, false, "no initial WorkerReady".into());
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fd_start, rss_start) = (fd_count(server.pid), rss_kb(server.pid));
    let (mut fd_warm, mut rss_warm) = (fd_start, rss_start);
    let warm_up = (args.cycles / 10).max(1);
    let began = Instant::now();
    let limit = Duration::from_secs(args.cycles_max_seconds);
    let mut done = 0u32;
    let mut unreaped = 0u32;
    let mut problem = None;
    while done < args.cycles {
        if began.elapsed() > limit {
            problem = Some(format!(
                "time bound of {} s reached",
                args.cycles_max_seconds
            ));
            break;
        }
        let workers = server.workers();
        let Some(&victim) = workers.get(done as usize % workers.len().max(1)) else {
            problem = Some("no worker to kill".into());
            break;
        };
        signal(victim, rustix::process::Signal::KILL);
        if server
            .wait_line(&["WorkerReady"], Duration::from_secs(10))
            .is_none()
        {
            problem = Some(format!(
                "cycle {}: no replacement ready within 10 s",
                done + 1
            ));
            break;
        }
        // The Exit (so the reaping) precedes the restart.
        if state(victim) == Some('Z') {
            unreaped += 1;
        }
        done += 1;
        if done == warm_up {
            (fd_warm, rss_warm) = (fd_count(server.pid), rss_kb(server.pid));
        }
    }
    let elapsed = began.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (fd_end, rss_end) = (fd_count(server.pid), rss_kb(server.pid));
    let zombies = zombie_children(server.pid);
    let serving = request(
        SocketAddr::from(([127, 0, 0, 1], server.port)),
        Duration::from_secs(3),
    )
    .is_ok();
    report.row(&format!("{scenario}: cycles done"), "count", done as f64);
    report.row(
        &format!("{scenario}: per cycle, kill → replacement ready"),
        "ms",
        elapsed.as_secs_f64() * 1000.0 / done.max(1) as f64,
    );
    report.row(
        &format!("{scenario}: primary fds at start"),
        "count",
        fd_start as f64,
    );
    report.row(
        &format!("{scenario}: primary fds at end"),
        "count",
        fd_end as f64,
    );
    report.row(
        &format!("{scenario}: primary RSS at start"),
        "KiB",
        rss_start as f64,
    );
    report.row(
        &format!("{scenario}: primary RSS after {warm_up} cycles"),
        "KiB",
        rss_warm as f64,
    );
    report.row(
        &format!("{scenario}: primary RSS at end"),
        "KiB",
        rss_end as f64,
    );
    report.check(
        &format!(
            "{scenario}: {} cycles within {} s",
            args.cycles, args.cycles_max_seconds
        ),
        problem.is_none() && done == args.cycles && serving,
        format!(
            "{done} cycles in {:.1} s, serving afterwards {serving}{}",
            elapsed.as_secs_f64(),
            problem.map(|p| format!("; {p}")).unwrap_or_default()
        ),
    );
    report.check(
        &format!("{scenario}: primary fd count flat"),
        fd_end <= fd_start.max(fd_warm),
        format!("start {fd_start}, after {warm_up} cycles {fd_warm}, end {fd_end}"),
    );
    // Flat: at most 1 KiB per cycle after the warm-up (a leak of a worker's
    // bookkeeping, buffers included, would exceed it), within [1, 2] MiB:
    // glibc's per-thread arenas (tokio's blocking threads come and go) grow
    // RSS in steps of a few hundred KiB that are not leaks.
    let growth = rss_end.saturating_sub(rss_warm);
    let allowed = u64::from(done.saturating_sub(warm_up)).clamp(1024, 2048);
    report.check(
        &format!("{scenario}: primary RSS flat"),
        growth <= allowed,
        format!(
            "start {rss_start} KiB, after {warm_up} cycles {rss_warm} KiB, end {rss_end} KiB (growth {growth} KiB after the warm-up, allowed {allowed} KiB: 1 KiB per cycle, within 1-2 MiB)"
        ),
    );
    report.check(
        &format!("{scenario}: no zombie children"),
        zombies.is_empty() && unreaped == 0,
        format!(
            "{} zombies at the end; {unreaped} killed workers still unreaped when their replacement was ready",
            zombies.len()
        ),
    );
}

pub fn run(args: ReliabilityArgs) -> Result<(), String> {
    let known = ["chaos", "reload", "stop", "kill-primary", "cycles"];
    if let Some(bad) = args.only.iter().find(|s| !known.contains(&s.as_str())) {
        return Err(format!(
            "--only: unknown scenario {bad:?}; known: {}",
            known.join(", ")
        ));
    }
    let wants = |s: &str| args.only.iter().any(|o| o == s);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("reliability: seed {seed}");
    let mut rng = Rng(seed | 1);
    let mut report = Report {
        rows: Vec::new(),
        checks: Vec::new(),
    };
    if wants("chaos") {
        for policy in ["reuseport", "round-robin"] {
            chaos(&args, policy, &mut rng, &mut report);
        }
    }
    if wants("reload") {
        for policy in ["shared", "round-robin", "reuseport"] {
            reload(&args, policy, None, &mut report);
        }
        for policy in ["shared", "round-robin", "reuseport"] {
            reload(&args, policy, Some(args.shutdown_grace_ms), &mut report);
        }
    }
    if wants("stop") {
        for slow in [false, true] {
            for policy in ["shared", "round-robin", "reuseport"] {
                graceful_stop(&args, policy, slow, &mut report);
            }
        }
    }
    if wants("kill-primary") {
        for policy in ["shared", "round-robin", "reuseport"] {
            kill_primary(&args, policy, &mut report);
        }
    }
    if wants("cycles") {
        for policy in &args.cycles_policy {
            cycles(&args, policy, &mut report);
        }
    }
    println!();
    print_table(&report.rows, "value", "-");
    let failed: Vec<&(String, bool, String)> = report.checks.iter().filter(|c| !c.1).collect();
    println!(
        "checks: {} passed, {} failed",
        report.checks.len() - failed.len(),
        failed.len()
    );
    for (name, _, detail) in &failed {
        println!("  FAIL {name}: {detail}");
    }
    let checks: Vec<_> = report
        .checks
        .iter()
        .map(|(name, pass, detail)| serde_json::json!({ "check": name, "pass": pass, "detail": detail }))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "bench": "reliability", "seed": seed, "connections": args.connections,
            "chaos_seconds": args.chaos_seconds, "kill_interval_ms": args.kill_interval_ms,
            "reloads": args.reloads, "cycles": args.cycles,
            "rows": to_json(&report.rows), "checks": checks, "pass": failed.is_empty(),
        })
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} reliability check(s) failed", failed.len()))
    }
}
