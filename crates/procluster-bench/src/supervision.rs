//! Supervision: the bench binary as an HTTP worker, a supervised HTTP server
//! with the settings the `hello` demo does not expose, and the supervision
//! benchmarks.
//!
//! * `http_worker_main`: when the primary sets [`WORKER_MODE_ENV`] to
//!   `http`, a `procluster-bench` worker serves the `hello` example's
//!   handler (`hello from worker <id> (pid <pid>)`) on [`LISTEN_ENV`]
//!   (default `127.0.0.1:0`), optionally after [`DELAY_ENV`] milliseconds.
//! * `procluster-bench supervised-server`: a supervised cluster of those
//!   workers, printing `listening on http://127.0.0.1:PORT` once every worker
//!   listens and every supervisor event to stderr with `{:?}`, like `hello`,
//!   with flags for the restart backoff, the breaker and a handling delay.
//!   SIGHUP reloads, SIGTERM/SIGINT stop gracefully, SIGTTIN/SIGTTOU scale.
//! * `procluster-bench supervision`: crash → replacement listening latency
//!   (in this process, no backoff), rolling reload duration, and the
//!   primary's RSS with 16 workers beside Node's.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use procluster::Policy;
use procluster::primary::{Cluster, Event};
use procluster::supervisor::{
    BackoffConfig, Report, SupervisedCluster, SupervisionOptions, SupervisorConfig,
};
use procluster::worker::Worker;

use crate::http::{repo_root, target_dir};
use crate::report::{Row, print_table, to_json};

/// Set to `http` in a worker's environment: serve HTTP instead of the IPC
/// bench protocol.
pub const WORKER_MODE_ENV: &str = "PROCLUSTER_BENCH_WORKER";
/// The address an HTTP worker listens on through the primary.
pub const LISTEN_ENV: &str = "PROCLUSTER_BENCH_LISTEN";
/// Milliseconds an HTTP worker waits before answering.
pub const DELAY_ENV: &str = "PROCLUSTER_BENCH_DELAY_MS";
/// Milliseconds between the worker's disconnect (its cluster listeners close
/// at once) and axum's graceful shutdown, so that connections accepted just
/// before have their request read (hyper closes a connection that has not
/// sent its first bytes when the graceful shutdown starts).
pub const GRACE_ENV: &str = "PROCLUSTER_BENCH_SHUTDOWN_GRACE_MS";

fn env_ms(key: &str) -> Duration {
    Duration::from_millis(
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

/// Whether this worker was started as an HTTP worker.
pub fn is_http_worker() -> bool {
    std::env::var(WORKER_MODE_ENV).is_ok_and(|v| v == "http")
}

/// The HTTP worker: the `hello` example's handler, with an optional delay.
pub async fn http_worker_main(worker: Worker) -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::var(LISTEN_ENV).unwrap_or_else(|_| "127.0.0.1:0".into());
    let delay = env_ms(DELAY_ENV);
    let grace = env_ms(GRACE_ENV);
    let listener = worker.listen_tcp(&address).await?;
    let greeting = format!(
        "hello from worker {} (pid {})",
        worker.id(),
        std::process::id()
    );
    let app = Router::new().fallback(get(move || {
        let greeting = greeting.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            greeting
        }
    }));
    let shutdown = worker.shutdown_signal();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tokio::time::sleep(grace).await;
        })
        .await?;
    Ok(())
}

/// A cluster of `procluster-bench` HTTP workers listening on `address`.
fn http_cluster(
    policy: Policy,
    address: &str,
    delay_ms: u64,
    grace_ms: u64,
) -> procluster::Result<Cluster> {
    Cluster::builder()
        .own_process_group(true)
        .policy(policy)
        .env(WORKER_MODE_ENV, "http")
        .env(LISTEN_ENV, address)
        .env(DELAY_ENV, delay_ms.to_string())
        .env(GRACE_ENV, grace_ms.to_string())
        .build()
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// shared, round-robin or reuseport.
    #[arg(long, default_value = "shared")]
    policy: String,
    /// Initial restart delay in ms (the default supervisor's is 100, doubling
    /// up to 15 s); 0 restarts at once, without jitter.
    #[arg(long)]
    backoff_ms: Option<u64>,
    /// Disable the crash-loop breaker.
    #[arg(long)]
    no_breaker: bool,
    /// Milliseconds each request waits before its answer.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Milliseconds a disconnected worker waits, no longer accepting,
    /// before axum's graceful shutdown starts (0: at once, like `hello`).
    #[arg(long, default_value_t = 0)]
    shutdown_grace_ms: u64,
}

/// `procluster-bench supervised-server`: the `hello` demo's primary, with
/// the backoff, the breaker and the handling delay settable.
pub async fn server_main(args: ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let policy: Policy = args.policy.parse().map_err(|e| format!("--policy: {e}"))?;
    let cluster = http_cluster(
        policy,
        &format!("127.0.0.1:{}", args.port),
        args.delay_ms,
        args.shutdown_grace_ms,
    )?;
    let mut supervisor = SupervisorConfig::default();
    supervisor.workers = args.workers;
    if let Some(ms) = args.backoff_ms {
        supervisor.backoff.initial = Duration::from_millis(ms);
        if ms == 0 {
            supervisor.backoff = no_backoff();
        }
    }
    if args.no_breaker {
        supervisor.breaker = None;
    }
    let mut options = SupervisionOptions::default();
    options.supervisor = supervisor;
    options.handle_signals = true;
    let mut supervised = SupervisedCluster::start(cluster, options)?;
    let mut listening = HashSet::new();
    let mut announced = false;
    while let Some(event) = supervised.next_event().await {
        match event {
            Report::Cluster(Event::Listening { worker, address }) if !announced => {
                listening.insert(worker.id());
                if listening.len() == args.workers {
                    announced = true;
                    let port = address.rsplit(':').next().unwrap_or("?");
                    println!("listening on http://127.0.0.1:{port}");
                }
            }
            Report::Cluster(Event::Error { error, .. }) => eprintln!("{error}"),
            Report::Supervisor(event) => eprintln!("{event:?}"),
            _ => {}
        }
    }
    if let Err(error) = supervised.wait().await {
        eprintln!("supervised-server: {error}");
        std::process::exit(1);
    }
    Ok(())
}

/// Restarts at once: no delay, no jitter.
fn no_backoff() -> BackoffConfig {
    let mut backoff = BackoffConfig::default();
    backoff.initial = Duration::ZERO;
    backoff.multiplier = 1.0;
    backoff.max = Duration::ZERO;
    backoff.jitter = 0.0;
    backoff
}

#[derive(clap::Args)]
pub struct SupervisionArgs {
    /// Crashes timed (the median is reported).
    #[arg(long, default_value_t = 20)]
    crashes: usize,
    /// Rolling reloads timed (the median is reported).
    #[arg(long, default_value_t = 5)]
    reloads: usize,
    /// Workers in the rolling reload.
    #[arg(long, default_value_t = 4)]
    reload_workers: usize,
    /// Workers for the primary RSS figure.
    #[arg(long, default_value_t = 16)]
    rss_workers: usize,
    /// Skip Node's primary.
    #[arg(long)]
    no_node: bool,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

type BenchError = Box<dyn std::error::Error + Send + Sync>;

async fn event_within(
    supervised: &mut SupervisedCluster,
    deadline: Instant,
) -> Result<Report, BenchError> {
    match tokio::time::timeout_at(deadline.into(), supervised.next_event()).await {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err("the supervised cluster ended unexpectedly".into()),
        Err(_) => Err("timed out waiting for a supervised cluster event".into()),
    }
}

/// Starts a supervised cluster of HTTP workers without restart delay or
/// breaker and waits until all listen; returns their pids by worker id.
async fn supervised_http(
    workers: usize,
) -> Result<(SupervisedCluster, BTreeMap<procluster::WorkerId, u32>), BenchError> {
    let cluster = http_cluster(Policy::Shared, "127.0.0.1:0", 0, 0)?;
    let mut options = SupervisionOptions::default();
    options.supervisor.workers = workers;
    options.supervisor.backoff = no_backoff();
    options.supervisor.breaker = None;
    let mut supervised = SupervisedCluster::start(cluster, options)?;
    let mut live = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.len() < workers {
        if let Report::Cluster(Event::Listening { worker, .. }) =
            event_within(&mut supervised, deadline).await?
        {
            live.insert(worker.id(), worker.pid());
        }
    }
    Ok((supervised, live))
}

async fn stop(supervised: SupervisedCluster) -> Result<(), BenchError> {
    supervised.handle().stop()?;
    tokio::time::timeout(Duration::from_secs(15), supervised.wait())
        .await
        .map_err(|_| "the supervised cluster did not stop within 15 s")??;
    Ok(())
}

/// Crash → replacement listening, per crash: (kill → Exit seen, kill → Listening).
async fn crash_latencies(crashes: usize) -> Result<Vec<(f64, f64)>, BenchError> {
    let (mut supervised, mut live) = supervised_http(2).await?;
    let mut samples = Vec::with_capacity(crashes);
    for i in 0..crashes {
        // Let the previous replacement settle into its accept loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (&victim, &pid) = live.iter().nth(i % live.len()).ok_or("no worker")?;
        let pid = rustix::process::Pid::from_raw(pid as i32).ok_or("bad pid")?;
        let killed = Instant::now();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
        let deadline = killed + Duration::from_secs(10);
        let mut exited = None;
        loop {
            match event_within(&mut supervised, deadline).await? {
                Report::Cluster(Event::Exit { worker, .. }) if worker.id() == victim => {
                    exited = Some(killed.elapsed());
                    live.remove(&victim);
                }
                Report::Cluster(Event::Listening { worker, .. })
                    if !live.contains_key(&worker.id()) =>
                {
                    let listening = killed.elapsed();
                    live.insert(worker.id(), worker.pid());
                    samples.push((ms(exited.unwrap_or(listening)), ms(listening)));
                    break;
                }
                _ => {}
            }
        }
    }
    stop(supervised).await?;
    Ok(samples)
}

/// Rolling reload durations (ms), `handle.reload()` call to its answer.
async fn reload_durations(workers: usize, reloads: usize) -> Result<Vec<f64>, BenchError> {
    let (mut supervised, _) = supervised_http(workers).await?;
    let handle = supervised.handle();
    // Keep reading events so none pile up.
    let drain = tokio::spawn(async move {
        while supervised.next_event().await.is_some() {}
        supervised
    });
    let mut durations = Vec::with_capacity(reloads);
    for _ in 0..reloads {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), handle.reload())
            .await
            .map_err(|_| "a reload took over 60 s")??;
        durations.push(ms(start.elapsed()));
    }
    handle.stop()?;
    tokio::time::timeout(Duration::from_secs(15), drain)
        .await
        .map_err(|_| "the supervised cluster did not stop within 15 s")??;
    Ok(durations)
}

/// VmRSS of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts `command`, waits (≤ 60 s) for its `listening on` line, lets it
/// settle for a second and returns the primary's VmRSS in MB.
fn primary_rss_mb(name: &str, mut command: Command) -> Result<f64, BenchError> {
    let mut child: Child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    struct Reap<'a>(&'a mut Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let pid = self.0.id() as i32;
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let pid = child.id();
    let _reap = Reap(&mut child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("listening on http://") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .map_err(|_| format!("{name} did not print its listening line within 60 s"))?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_bytes(pid).ok_or_else(|| format!("no VmRSS for {name}"))?;
    Ok(rss as f64 / (1024.0 * 1024.0))
}

pub async fn run(args: SupervisionArgs) -> Result<(), BenchError> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();

    let crashes = crash_latencies(args.crashes).await?;
    let mut to_listening: Vec<f64> = crashes.iter().map(|c| c.1).collect();
    let mut to_exit: Vec<f64> = crashes.iter().map(|c| c.0).collect();
    let crash_median = median(&mut to_listening);
    let crash_max = to_listening.last().copied().unwrap_or(f64::NAN);
    let exit_median = median(&mut to_exit);
    rows.push(Row::compared(
        &format!(
            "SIGKILL → replacement Listening, median of {}",
            args.crashes
        ),
        "ms",
        crash_median,
        None,
        false,
    ));
    rows.push(Row::compared(
        "SIGKILL → replacement Listening, max",
        "ms",
        crash_max,
        None,
        false,
    ));
    rows.push(Row::compared(
        "SIGKILL → Exit event (of the above), median",
        "ms",
        exit_median,
        None,
        false,
    ));
    targets.push((
        "crash → replacement listening median ≤ 10 ms",
        crash_median <= 10.0,
    ));

    let mut reloads = reload_durations(args.reload_workers, args.reloads).await?;
    let reload_median = median(&mut reloads);
    rows.push(Row::compared(
        &format!(
            "rolling reload of {} workers, median of {}",
            args.reload_workers, args.reloads
        ),
        "ms",
        reload_median,
        None,
        false,
    ));
    rows.push(Row::compared(
        &format!("rolling reload of {} workers, max", args.reload_workers),
        "ms",
        reloads.last().copied().unwrap_or(f64::NAN),
        None,
        false,
    ));

    let n = args.rss_workers.to_string();
    let node = if args.no_node {
        None
    } else {
        let mut command = Command::new("node");
        command
            .arg(repo_root().join("bench/node/http-cluster.js"))
            .args(["--workers", &n, "--port", "0", "--policy", "rr"])
            .args(["--max-seconds", "120"]);
        match tokio::task::spawn_blocking(move || primary_rss_mb("node", command)).await? {
            Ok(mb) => Some(mb),
            Err(e) => {
                eprintln!("supervision: node primary RSS not measured: {e}");
                None
            }
        }
    };
    for policy in ["shared", "round-robin"] {
        let mut command = Command::new(std::env::current_exe()?);
        command.args([
            "supervised-server",
            "--workers",
            &n,
            "--port",
            "0",
            "--policy",
            policy,
        ]);
        let mb = tokio::task::spawn_blocking(move || {
            primary_rss_mb("procluster-bench supervised-server", command)
        })
        .await??;
        rows.push(Row::compared(
            &format!("primary RSS, supervised-server {policy}, {n} workers"),
            "MB",
            mb,
            node,
            false,
        ));
        if policy == "shared" {
            targets.push(("supervised primary RSS with 16 workers ≤ 8 MB", mb <= 8.0));
        }
    }
    let hello = target_dir().join("examples/hello");
    if hello.exists() {
        let mut command = Command::new(&hello);
        command.args(["--workers", &n, "--port", "0", "--policy", "shared"]);
        let mb =
            tokio::task::spawn_blocking(move || primary_rss_mb("hello example", command)).await??;
        rows.push(Row::compared(
            &format!("primary RSS, hello example shared, {n} workers"),
            "MB",
            mb,
            node,
            false,
        ));
    } else {
        eprintln!(
            "supervision: {} is missing (cargo build --release -p procluster --example hello); skipped",
            hello.display()
        );
    }
    if let Some(mb) = node {
        rows.push(Row::compared(
            &format!("primary RSS, node http-cluster.js rr, {n} workers"),
            "MB",
            mb,
            None,
            false,
        ));
    }

    print_table(&rows, "value", "node");
    for (name, met) in &targets {
        println!("target {}: {name}", if *met { "MET   " } else { "MISSED" });
    }
    let targets_json: Vec<_> = targets
        .iter()
        .map(|(name, met)| serde_json::json!({ "target": name, "met": met }))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "bench": "supervision", "crashes": args.crashes, "reloads": args.reloads,
            "reload_workers": args.reload_workers, "rss_workers": args.rss_workers,
            "rows": to_json(&rows), "targets": targets_json,
        })
    );
    Ok(())
}
