//! Telemetry benchmarks:
//!
//! a. one scrape of a cluster of 64 workers with 100 application series
//!    each (p50, p99), beside prom-client's `AggregatorRegistry` on Node's
//!    cluster module with the same series, in the same run;
//! b. log events forwarded per second from 2 workers through the primary,
//!    with the primary's CPU;
//! c. what one `tracing` call costs a worker (p50, p99) while the channel
//!    is not full.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use procluster::primary::{Cluster, Event, Stdio};
use procluster::telemetry::{LogOutput, LogRecord, ProcessTable, Telemetry};
use procluster::worker::Worker;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;

use crate::report::{Row, print_table, to_json};

#[derive(clap::Args)]
pub struct TelemetryArgs {
    /// Workers in the scrape run.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Application series per worker.
    #[arg(long, default_value_t = 100)]
    series: usize,
    /// Timed scrapes.
    #[arg(long, default_value_t = 50)]
    scrapes: usize,
    /// Log events per worker in the forwarding run (2 workers).
    #[arg(long, default_value_t = 1_000_000)]
    log_events: u64,
    /// Timed `tracing` calls in the call-cost run.
    #[arg(long, default_value_t = 200_000)]
    calls: u64,
    /// Skip the Node side.
    #[arg(long)]
    no_node: bool,
}

/// Set in the bench's workers: what they do.
const ROLE_ENV: &str = "PROCLUSTER_BENCH_TELEMETRY";

pub fn is_bench_worker() -> bool {
    std::env::var_os(ROLE_ENV).is_some()
}

/// What a bench worker reports back.
#[derive(Debug, Serialize, Deserialize)]
enum Done {
    /// Series registered.
    Registered,
    /// Log events sent, and dropped for a full buffer.
    Logged { sent: u64, dropped: u64 },
    /// Nanoseconds each timed call took, at the 50th and 99th percentile.
    CallCost { p50_ns: f64, p99_ns: f64 },
}

pub async fn worker_main(worker: Worker) {
    let role = std::env::var(ROLE_ENV).unwrap_or_default();
    let number = |name: &str| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let telemetry = procluster::telemetry::worker(&worker).expect("telemetry service");
    let done = match role.as_str() {
        "series" => {
            let mut registry = telemetry.registry();
            for s in 0..number("BENCH_SERIES") {
                let counter = Counter::<u64>::default();
                counter.inc();
                registry.register(
                    format!("app_series_{s}"),
                    format!("Series {s} of the bench"),
                    counter,
                );
            }
            Done::Registered
        }
        "log" => {
            install(&telemetry);
            let events = number("BENCH_EVENTS");
            for seq in 0..events {
                tracing::info!(seq, path = "/index.html", "request served");
                if seq % 256 == 255 {
                    // As a server would between requests: other tasks run
                    // (the flusher among them).
                    tokio::task::yield_now().await;
                }
            }
            telemetry.flush_logs().await;
            Done::Logged {
                sent: events - telemetry.dropped_logs(),
                dropped: telemetry.dropped_logs(),
            }
        }
        "calls" => {
            install(&telemetry);
            let calls = number("BENCH_CALLS");
            let mut samples = Vec::with_capacity(calls as usize);
            for seq in 0..calls {
                let start = Instant::now();
                tracing::info!(seq, path = "/index.html", "request served");
                samples.push(start.elapsed());
                if seq % 1000 == 999 {
                    // Keep the buffer from filling: the cost asked for is
                    // the call's while the channel takes what it is given.
                    telemetry.flush_logs().await;
                }
            }
            telemetry.flush_logs().await;
            samples.sort();
            let pick = |q: f64| {
                samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
                    .as_nanos() as f64
            };
            Done::CallCost {
                p50_ns: pick(0.5),
                p99_ns: pick(0.99),
            }
        }
        other => panic!("unknown bench worker role {other}"),
    };
    worker.send(&done).await.expect("report");
    worker.shutdown_signal().await;
}

fn install(telemetry: &procluster::telemetry::WorkerTelemetry) {
    let subscriber = tracing_subscriber::registry().with(telemetry.log_layer());
    tracing::subscriber::set_global_default(subscriber).expect("a global subscriber");
}

/// A cluster of `workers` bench workers in `role`, with `env`, and the
/// telemetry service; returns once every worker reported `Done`.
async fn cluster(
    telemetry: &Telemetry,
    workers: usize,
    role: &str,
    env: &[(&str, String)],
) -> (Cluster, Vec<Done>) {
    let mut builder = Cluster::builder()
        .workers(workers)
        .stdio(Stdio::Inherit)
        .env(ROLE_ENV, role)
        .service(telemetry.clone());
    for (key, value) in env {
        builder = builder.env(*key, value);
    }
    let mut cluster = builder.build().expect("cluster");
    cluster.start().await.expect("start");
    let mut done = Vec::new();
    while done.len() < workers {
        match cluster.next_event().await.expect("event") {
            Event::Message { message, .. } => done.push(message.decode().expect("done")),
            Event::Exit { status, .. } => panic!("a bench worker exited: {status}"),
            _ => {}
        }
    }
    (cluster, done)
}

async fn stop(cluster: &mut Cluster) {
    cluster.disconnect().await;
    while cluster.next_event().await.is_some() {}
}

fn percentile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    let at = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[at].as_secs_f64() * 1000.0
}

/// p50 and p99 of a scrape, in ms, and the scrape's size.
async fn scrape(args: &TelemetryArgs) -> (f64, f64, usize) {
    let telemetry = Telemetry::builder().build();
    let env = [("BENCH_SERIES", args.series.to_string())];
    let (mut cluster, _) = cluster(&telemetry, args.workers, "series", &env).await;
    for _ in 0..5 {
        telemetry.render(false).await;
    }
    let mut samples = Vec::with_capacity(args.scrapes);
    let mut text = String::new();
    for _ in 0..args.scrapes {
        let start = Instant::now();
        text = telemetry.render(false).await;
        samples.push(start.elapsed());
    }
    let expected = format!("\napp_series_0_total {}\n", args.workers);
    assert!(text.contains(&expected), "every worker's series is summed");
    stop(&mut cluster).await;
    (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
        text.len(),
    )
}

/// CPU seconds this process has used.
fn own_cpu_seconds() -> f64 {
    ProcessTable::read()
        .tree_usage(std::process::id())
        .map_or(0.0, |u| u.cpu_seconds)
}

/// Events per second received by the primary from 2 workers, the
/// primary's CPU (% of one core) meanwhile, and events dropped.
async fn forward(args: &TelemetryArgs) -> (f64, f64, u64) {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let telemetry = Telemetry::builder()
        .logs(LogOutput::Callback(Arc::new(move |record: &LogRecord| {
            std::hint::black_box(record);
            counter.fetch_add(1, Ordering::Relaxed);
        })))
        .build();
    let env = [("BENCH_EVENTS", args.log_events.to_string())];
    let cpu_before = own_cpu_seconds();
    let start = Instant::now();
    let (mut cluster, done) = cluster(&telemetry, 2, "log", &env).await;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (own_cpu_seconds() - cpu_before) / elapsed * 100.0;
    let dropped = done
        .iter()
        .map(|d| match d {
            Done::Logged { dropped, .. } => *dropped,
            _ => 0,
        })
        .sum();
    let got = received.load(Ordering::Relaxed);
    stop(&mut cluster).await;
    (got as f64 / elapsed, cpu, dropped)
}

async fn call_cost(args: &TelemetryArgs) -> (f64, f64) {
    let telemetry = Telemetry::builder().logs(LogOutput::Discard).build();
    let env = [("BENCH_CALLS", args.calls.to_string())];
    let (mut cluster, done) = cluster(&telemetry, 1, "calls", &env).await;
    stop(&mut cluster).await;
    match done.first() {
        Some(Done::CallCost { p50_ns, p99_ns }) => (*p50_ns, *p99_ns),
        other => panic!("unexpected {other:?}"),
    }
}

/// Installs prom-client where the bench keeps its Node packages (under
/// `target/`, never committed) and returns that `node_modules`.
fn prom_client() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-node");
    let modules = dir.join("node_modules");
    if modules.join("prom-client").is_dir() {
        return Some(modules);
    }
    std::fs::create_dir_all(&dir).ok()?;
    let status = Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .arg("prom-client@15")
        .status();
    match status {
        Ok(s) if s.success() => Some(modules),
        other => {
            eprintln!("cannot install prom-client ({other:?}); Node column left empty");
            None
        }
    }
}

fn run_node(args: &TelemetryArgs) -> Option<serde_json::Value> {
    if args.no_node {
        return None;
    }
    let modules = prom_client()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/node/telemetry.js");
    let output = Command::new("node")
        .arg(script)
        .args(["--workers", &args.workers.to_string()])
        .args(["--series", &args.series.to_string()])
        .args(["--scrapes", &args.scrapes.to_string()])
        .env("NODE_PATH", modules)
        .output();
    match output {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str(text.lines().last().unwrap_or("")).ok()
        }
        Ok(out) => {
            eprintln!(
                "node bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("cannot run node ({e}); Node column left empty");
            None
        }
    }
}

pub async fn run(args: TelemetryArgs) -> Result<(), Box<dyn std::error::Error>> {
    let node = run_node(&args);
    let field = |key: &str| node.as_ref()?.get(key)?.as_f64();
    let (p50, p99, bytes) = scrape(&args).await;
    let (rate, cpu, dropped) = forward(&args).await;
    let (call_p50, call_p99) = call_cost(&args).await;
    let scrape_label = |q: &str| {
        format!(
            "scrape {} workers × {} series {q}",
            args.workers, args.series
        )
    };
    let rows = vec![
        Row::compared(&scrape_label("p50"), "ms", p50, field("p50_ms"), false),
        Row::compared(&scrape_label("p99"), "ms", p99, field("p99_ms"), false),
        Row::plain("log events forwarded from 2 workers", "events/s", rate),
        Row::plain("primary CPU while forwarding", "% of a core", cpu),
        Row::plain("log events dropped (full buffer)", "events", dropped as f64),
        Row::plain("worker tracing call p50", "ns", call_p50),
        Row::plain("worker tracing call p99", "ns", call_p99),
    ];
    print_table(&rows, "procluster", "node");
    let json = serde_json::json!({
        "bench": "telemetry", "workers": args.workers, "series": args.series,
        "scrapes": args.scrapes, "scrape_bytes": bytes, "log_events_per_worker": args.log_events,
        "rows": to_json(&rows), "node_raw": node,
    });
    println!("{json}");
    Ok(())
}
