//! Work pool benchmarks: tiny tasks (throughput, submit→result latency
//! beside the channel's own round trip), CPU tasks (speedup against the
//! ideal), and large payloads (beside one `memcpy`), with the articles' Node
//! broker, piscina and Python's `multiprocessing.Pool` in the same run; and
//! the pool on Redis beside BullMQ on the same `redis-server`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use procluster::pool::{HandlerError, Order, Pool, PoolConfig, SharedBytes, WorkerPool};
use procluster::primary::{Cluster, Event};
use procluster::worker::Worker;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::report::{Row, print_table, to_json};

/// Set in the bench's pool workers.
const POOL_WORKER_ENV: &str = "PROCLUSTER_BENCH_POOL";
const POOL: &str = "bench";

#[derive(clap::Args)]
pub struct PoolArgs {
    /// Tiny tasks in the throughput run.
    #[arg(long, default_value_t = 300_000)]
    tasks: u64,
    /// Tiny tasks submitted one at a time for the latency run.
    #[arg(long, default_value_t = 20_000)]
    rounds: usize,
    /// CPU tasks (about 1 ms of SHA-256 each).
    #[arg(long, default_value_t = 2_000)]
    cpu_tasks: u64,
    /// SHA-256 rounds of one CPU task (about 1 ms).
    #[arg(long, default_value_t = 3_000)]
    cpu_rounds: u32,
    /// Payload size for the large round trip, MiB.
    #[arg(long, default_value_t = 16)]
    payload_mib: usize,
    /// Workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Tasks one worker runs at once in the throughput run.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Skip Node, piscina and Python.
    #[arg(long)]
    no_others: bool,
    /// Tiny tasks in the Redis throughput run (the pool on Redis and
    /// BullMQ).
    #[arg(long, default_value_t = 20_000)]
    redis_tasks: u64,
    /// Tiny tasks submitted one at a time for the Redis latency run.
    #[arg(long, default_value_t = 2_000)]
    redis_rounds: usize,
    /// Skip the Redis rows (the pool on Redis and BullMQ).
    #[arg(long)]
    no_redis: bool,
    /// Skip the runs on the channel (for the Redis rows alone).
    #[arg(long)]
    redis_only: bool,
}

/// A task of the bench pool.
#[derive(Serialize, Deserialize, Debug)]
pub enum Task {
    Echo(u64),
    /// `rounds` of SHA-256 over 32 bytes derived from `seed`.
    Hash {
        seed: u64,
        rounds: u32,
    },
    Bytes(#[serde(with = "bytes_as_bytes")] Vec<u8>),
    Shared(SharedBytes),
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Answer {
    Echo(u64),
    Hash([u8; 32]),
    Bytes(#[serde(with = "bytes_as_bytes")] Vec<u8>),
    Shared(SharedBytes),
}

/// Bytes as one byte string (compact in the binary format).
mod bytes_as_bytes {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Visit)
    }
}

pub fn is_pool_worker() -> bool {
    std::env::var_os(POOL_WORKER_ENV).is_some()
}

/// `rounds` of SHA-256, each over the previous digest.
pub fn hash_rounds(seed: u64, rounds: u32) -> [u8; 32] {
    let mut digest: [u8; 32] = Sha256::digest(seed.to_le_bytes()).into();
    for _ in 1..rounds {
        digest = Sha256::digest(digest).into();
    }
    digest
}

pub async fn worker_main(worker: Worker) -> Result<(), Box<dyn std::error::Error>> {
    // User messages come back as they are: the channel's own round trip.
    let echo = worker.clone();
    tokio::spawn(async move {
        while let Some(message) = echo.recv().await {
            let n: u64 = message.decode().expect("a number");
            echo.send(&n).await.expect("echo");
        }
    });
    let pool: WorkerPool<Task, Answer> = WorkerPool::open(&worker, POOL)?;
    pool.serve(|task, _cancel| async move {
        Ok::<_, HandlerError>(match task {
            Task::Echo(n) => Answer::Echo(n),
            Task::Hash { seed, rounds } => Answer::Hash(hash_rounds(seed, rounds)),
            Task::Bytes(bytes) => Answer::Bytes(bytes),
            Task::Shared(bytes) => Answer::Shared(bytes),
        })
    })
    .await?;
    Ok(())
}

async fn cluster(workers: usize, config: PoolConfig) -> (Cluster, Pool<Task, Answer>) {
    start(Pool::new(POOL, config), workers).await
}

async fn start(pool: Pool<Task, Answer>, workers: usize) -> (Cluster, Pool<Task, Answer>) {
    let mut cluster = Cluster::builder()
        .workers(workers)
        .format(procluster::Format::Binary)
        .env(POOL_WORKER_ENV, "1")
        .service(pool.clone())
        .build()
        .expect("cluster");
    cluster.start().await.expect("start");
    // Warm up: every worker has taken tasks.
    let mut warm = pool.submit_all((0..1000).map(Task::Echo), Order::Completed);
    while let Some(result) = warm.next().await {
        result.expect("warm-up task");
    }
    (cluster, pool)
}

async fn stop(mut cluster: Cluster) {
    for worker in cluster.workers() {
        worker.disconnect();
    }
    while cluster.next_event().await.is_some() {}
}

async fn tiny_throughput(args: &PoolArgs) -> f64 {
    let mut config = PoolConfig::default();
    config.concurrency = args.concurrency;
    config.queue = 4096;
    let (cluster, pool) = cluster(args.workers, config).await;
    let start = Instant::now();
    let mut batch = pool.submit_all((0..args.tasks).map(Task::Echo), Order::Completed);
    let mut count = 0;
    while let Some(result) = batch.next().await {
        result.expect("tiny task");
        count += 1;
    }
    assert_eq!(count, args.tasks);
    let rate = args.tasks as f64 / start.elapsed().as_secs_f64();
    stop(cluster).await;
    rate
}

/// Submit→result of one task at a time, p50 and p99 in µs.
async fn tiny_latency(args: &PoolArgs) -> (f64, f64) {
    let (cluster, pool) = cluster(1, PoolConfig::default()).await;
    let mut samples = Vec::with_capacity(args.rounds);
    for n in 0..args.rounds as u64 {
        let start = Instant::now();
        pool.submit(Task::Echo(n)).await.expect("task");
        samples.push(start.elapsed());
    }
    stop(cluster).await;
    (quantile(&mut samples, 0.5), quantile(&mut samples, 0.99))
}

/// The channel's own round trip in the same conditions: a user message to
/// the worker and back, p50 in µs.
async fn channel_round_trip(rounds: usize) -> f64 {
    let pool: Pool<Task, Answer> = Pool::new(POOL, PoolConfig::default());
    let mut cluster = Cluster::builder()
        .workers(0)
        .format(procluster::Format::Binary)
        .env(POOL_WORKER_ENV, "1")
        .service(pool)
        .build()
        .expect("cluster");
    let worker = cluster.fork().await.expect("fork");
    loop {
        if let Event::Online(_) = cluster.next_event().await.expect("event") {
            break;
        }
    }
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..(rounds + 1000) as u64 {
        let start = Instant::now();
        worker.send(&n).await.expect("send");
        loop {
            if let Event::Message { .. } = cluster.next_event().await.expect("event") {
                break;
            }
        }
        if n >= 1000 {
            samples.push(start.elapsed());
        }
    }
    worker.disconnect();
    while cluster.next_event().await.is_some() {}
    quantile(&mut samples, 0.5)
}

/// CPU tasks on the pool against the same work done serially here, as a
/// fraction of the ideal speedup (the number of workers).
async fn cpu(args: &PoolArgs) -> (f64, f64, f64) {
    let serial = Instant::now();
    for seed in 0..args.cpu_tasks / 4 {
        std::hint::black_box(hash_rounds(seed, args.cpu_rounds));
    }
    let per_task = serial.elapsed().as_secs_f64() / (args.cpu_tasks / 4) as f64;
    let (cluster, pool) = cluster(args.workers, PoolConfig::default()).await;
    let start = Instant::now();
    let rounds = args.cpu_rounds;
    let tasks = (0..args.cpu_tasks).map(move |seed| Task::Hash { seed, rounds });
    let mut batch = pool.submit_all(tasks, Order::Completed);
    while let Some(result) = batch.next().await {
        result.expect("cpu task");
    }
    let took = start.elapsed().as_secs_f64();
    stop(cluster).await;
    let speedup = per_task * args.cpu_tasks as f64 / took;
    (
        per_task * 1000.0,
        args.cpu_tasks as f64 / took,
        speedup / args.workers as f64,
    )
}

/// One large task and its result (the same bytes back), median of 5, ms:
/// by sealed memory file as `Vec<u8>` (copied out of the mapping) and as
/// `SharedBytes` (a view of it), and through the socket; and one memcpy of
/// the same size, median of 5, ms.
async fn payload(args: &PoolArgs) -> [f64; 4] {
    let size = args.payload_mib << 20;
    let source = vec![7u8; size];
    let mut target = vec![0u8; size];
    let mut copies = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        target.copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&target);
        copies.push(start.elapsed());
    }
    let memfd = Some(procluster::pool::DEFAULT_MEMFD_THRESHOLD);
    let mut medians = Vec::new();
    for (threshold, shared) in [(memfd, false), (memfd, true), (None, false)] {
        let mut config = PoolConfig::default();
        config.memfd_threshold = threshold;
        let (cluster, pool) = cluster(1, config).await;
        let mut trips = Vec::new();
        for _ in 0..5 {
            let task = match shared {
                true => Task::Shared(SharedBytes::from(source.clone())),
                false => Task::Bytes(source.clone()),
            };
            let start = Instant::now();
            let answer = pool.submit(task).await.expect("large task");
            trips.push(start.elapsed());
            let len = match answer {
                Answer::Bytes(b) => b.len(),
                Answer::Shared(b) => b.len(),
                _ => 0,
            };
            assert_eq!(len, size);
        }
        stop(cluster).await;
        medians.push(quantile(&mut trips, 0.5) / 1000.0);
    }
    [
        medians[0],
        medians[1],
        medians[2],
        quantile(&mut copies, 0.5) / 1000.0,
    ]
}

/// The pool on Redis: tiny tasks' throughput (`tasks` as one batch on
/// `workers` workers, `concurrency` each) and one-at-a-time submit→result
/// p50 and p99 in µs.
async fn redis_pool(
    args: &PoolArgs,
    url: &str,
) -> Result<(f64, f64, f64), procluster::pool::PoolError> {
    let mut config = PoolConfig::default();
    config.concurrency = args.concurrency;
    config.queue = 4096;
    let pool = Pool::redis(POOL, config, url).await?;
    let (cluster, pool) = start(pool, args.workers).await;
    let begin = Instant::now();
    let mut batch = pool.submit_all((0..args.redis_tasks).map(Task::Echo), Order::Completed);
    while let Some(result) = batch.next().await {
        result?;
    }
    let rate = args.redis_tasks as f64 / begin.elapsed().as_secs_f64();
    let mut samples = Vec::with_capacity(args.redis_rounds);
    for n in 0..args.redis_rounds as u64 {
        let begin = Instant::now();
        pool.submit(Task::Echo(n)).await?;
        samples.push(begin.elapsed());
    }
    stop(cluster).await;
    Ok((
        rate,
        quantile(&mut samples, 0.5),
        quantile(&mut samples, 0.99),
    ))
}

fn quantile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    let at = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[at].as_secs_f64() * 1e6
}

fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench")
}

/// Installs an npm package (once) into `target/bench-npm`, which git
/// ignores; returns the `node_modules` directory for `NODE_PATH`.
fn npm_package(spec: &str, name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-npm");
    let modules = dir.join("node_modules");
    if !modules.join(name).exists() {
        let _ = std::fs::create_dir_all(&dir);
        let status = Command::new("npm")
            .args([
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&dir)
            .arg(spec)
            .stdout(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("cannot install {spec} with npm; its rows are left empty");
            return None;
        }
    }
    Some(modules)
}

/// Runs a comparison program that prints one JSON line last.
fn run_json(program: &str, args: &[String]) -> Option<serde_json::Value> {
    run_json_with(program, args, None)
}

fn run_json_with(
    program: &str,
    args: &[String],
    node_path: Option<&std::path::Path>,
) -> Option<serde_json::Value> {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(path) = node_path {
        command.env("NODE_PATH", path);
    }
    let output = command.output();
    match output {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str(text.lines().last().unwrap_or("")).ok()
        }
        Ok(out) => {
            eprintln!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
        Err(error) => {
            eprintln!("cannot run {program} ({error}); its rows are left empty");
            None
        }
    }
}

fn field(value: &Option<serde_json::Value>, key: &str) -> Option<f64> {
    value.as_ref()?.get(key)?.as_f64()
}

/// The Redis rows: the pool on Redis and BullMQ on the same server, in
/// the same run.
async fn redis_rows(args: &PoolArgs) -> (Vec<Row>, serde_json::Value) {
    let Some(server) = crate::bus::RedisServer::start() else {
        return (Vec::new(), serde_json::Value::Null);
    };
    let ours = match redis_pool(args, &server.url()).await {
        Ok(figures) => Some(figures),
        Err(error) => {
            eprintln!("the pool on Redis failed: {error}");
            None
        }
    };
    let bullmq = npm_package("bullmq@5", "bullmq").and_then(|modules| {
        let script = bench_dir()
            .join("node/pool-bullmq.js")
            .display()
            .to_string();
        let args = vec![
            script,
            "--socket".into(),
            server.socket().display().to_string(),
            "--tasks".into(),
            args.redis_tasks.to_string(),
            "--rounds".into(),
            args.redis_rounds.to_string(),
            "--workers".into(),
            args.workers.to_string(),
            "--concurrency".into(),
            args.concurrency.to_string(),
        ];
        run_json_with("node", &args, Some(&modules))
    });
    let Some((rate, p50, p99)) = ours else {
        return (Vec::new(), serde_json::json!({ "bullmq": bullmq }));
    };
    let rows = vec![
        Row::compared(
            "Redis pool: tiny tasks, throughput vs BullMQ",
            "tasks/s",
            rate,
            field(&bullmq, "tiny_per_sec"),
            true,
        ),
        Row::compared(
            "Redis pool: tiny task submit→result p50 vs BullMQ",
            "µs",
            p50,
            field(&bullmq, "p50_us"),
            false,
        ),
        Row::compared(
            "Redis pool: tiny task submit→result p99 vs BullMQ",
            "µs",
            p99,
            field(&bullmq, "p99_us"),
            false,
        ),
    ];
    let json = serde_json::json!({
        "redis_pool_tiny_per_sec": rate, "redis_pool_p50_us": p50, "redis_pool_p99_us": p99,
        "bullmq": bullmq,
    });
    (rows, json)
}

pub async fn run(args: PoolArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (redis_rows, redis_json) = if args.no_redis {
        (Vec::new(), serde_json::Value::Null)
    } else {
        redis_rows(&args).await
    };
    if args.redis_only {
        print_table(&redis_rows, "procluster", "BullMQ");
        let json = serde_json::json!({
            "bench": "pool", "workers": args.workers, "redis": redis_json,
            "rows": to_json(&redis_rows),
        });
        println!("{json}");
        return Ok(());
    }
    let others = !args.no_others;
    let common = vec![
        "--tasks".to_string(),
        args.tasks.min(200_000).to_string(),
        "--rounds".to_string(),
        args.rounds.to_string(),
        "--cpu-tasks".to_string(),
        args.cpu_tasks.to_string(),
        "--cpu-rounds".to_string(),
        args.cpu_rounds.to_string(),
        "--workers".to_string(),
        args.workers.to_string(),
        "--payload-mib".to_string(),
        args.payload_mib.to_string(),
    ];
    let script = |name: &str| bench_dir().join(name).display().to_string();
    let with = |name: &str| {
        let mut all = vec![script(name)];
        all.extend(common.iter().cloned());
        all
    };
    let broker = others
        .then(|| run_json("node", &with("node/pool-broker.js")))
        .flatten();
    let piscina = others
        .then(|| npm_package("piscina@4", "piscina"))
        .flatten()
        .and_then(|modules| run_json_with("node", &with("node/pool-piscina.js"), Some(&modules)));
    let python = others
        .then(|| run_json("python3", &with("python/pool_mp.py")))
        .flatten();

    let tiny = tiny_throughput(&args).await;
    let (p50, p99) = tiny_latency(&args).await;
    let channel = channel_round_trip(args.rounds).await;
    let (per_task_ms, cpu_rate, cpu_ideal) = cpu(&args).await;
    let [large_ms, shared_ms, plain_ms, memcpy_ms] = payload(&args).await;

    let mut rows = vec![
        Row::compared(
            "tiny tasks, throughput",
            "tasks/s",
            tiny,
            field(&broker, "tiny_per_sec"),
            true,
        ),
        Row::compared(
            "tiny tasks, throughput vs piscina",
            "tasks/s",
            tiny,
            field(&piscina, "tiny_per_sec"),
            true,
        ),
        Row::compared(
            "tiny tasks, throughput vs multiprocessing.Pool",
            "tasks/s",
            tiny,
            field(&python, "tiny_per_sec"),
            true,
        ),
        Row::compared(
            "tiny task submit→result p50",
            "µs",
            p50,
            field(&broker, "p50_us"),
            false,
        ),
        Row::compared(
            "tiny task submit→result p99",
            "µs",
            p99,
            field(&broker, "p99_us"),
            false,
        ),
        Row::compared(
            "tiny task p50 vs the channel's round trip p50",
            "µs",
            p50,
            Some(channel),
            false,
        ),
        Row::plain("CPU task alone (SHA-256 rounds)", "ms", per_task_ms),
        Row::compared(
            "CPU tasks, throughput",
            "tasks/s",
            cpu_rate,
            field(&broker, "cpu_per_sec"),
            true,
        ),
        Row::compared(
            "CPU tasks, throughput vs piscina",
            "tasks/s",
            cpu_rate,
            field(&piscina, "cpu_per_sec"),
            true,
        ),
        Row::compared(
            "CPU tasks, throughput vs multiprocessing.Pool",
            "tasks/s",
            cpu_rate,
            field(&python, "cpu_per_sec"),
            true,
        ),
        Row::plain("CPU tasks, fraction of the ideal speedup", "×", cpu_ideal),
        Row::compared(
            &format!("{} MiB task and result round trip", args.payload_mib),
            "ms",
            large_ms,
            field(&broker, "large_ms"),
            false,
        ),
        Row::compared(
            &format!("{} MiB round trip vs one memcpy", args.payload_mib),
            "ms",
            large_ms,
            Some(memcpy_ms),
            false,
        ),
        Row::compared(
            &format!(
                "{} MiB round trip vs the plain path (socket)",
                args.payload_mib
            ),
            "ms",
            large_ms,
            Some(plain_ms),
            false,
        ),
        Row::compared(
            &format!(
                "{} MiB round trip as SharedBytes vs one memcpy",
                args.payload_mib
            ),
            "ms",
            shared_ms,
            Some(memcpy_ms),
            false,
        ),
    ];
    rows.extend(redis_rows);
    rows.retain(|row| row.value.is_finite());
    print_table(&rows, "procluster", "other");
    let json = serde_json::json!({
        "bench": "pool", "workers": args.workers, "tasks": args.tasks,
        "rows": to_json(&rows),
        "node_broker": broker, "piscina": piscina, "python_multiprocessing": python,
        "memcpy_ms": memcpy_ms, "plain_path_ms": plain_ms, "shared_bytes_ms": shared_ms, "channel_round_trip_p50_us": channel,
        "redis": redis_json,
    });
    println!("{json}");
    Ok(())
}
