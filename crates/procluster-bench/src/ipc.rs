//! Channel benchmarks: the same three measurements as `bench/node/ipc.js`.
//!
//! a. one-way throughput worker → primary of small messages `{n: i}`, every
//!    message decoded and checked for order by the primary;
//! b. ping-pong round trip primary → worker → primary, p50 and p99;
//! c. fork → online latency, median of sequential forks.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use procluster::primary::{Cluster, Event, WorkerHandle};
use procluster::worker::Worker;
use procluster::{Format, Role};
use serde::{Deserialize, Serialize};

use crate::report::{Row, print_table, to_json};

#[derive(clap::Args)]
pub struct IpcArgs {
    /// Messages in the throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Timed round trips.
    #[arg(long, default_value_t = 20_000)]
    pingpongs: usize,
    /// Sequential forks timed.
    #[arg(long, default_value_t = 20)]
    forks: usize,
    /// Skip the Node side.
    #[arg(long)]
    no_node: bool,
    /// Busy-poll window (µs) for the extra round-trip rows measured with
    /// `ClusterBuilder::busy_poll`; 0 skips them.
    #[arg(long, default_value_t = 50)]
    busy_poll_us: u64,
}

/// Everything a bench primary and worker say to each other. One type, so
/// the compact binary format (which carries no field names) cannot confuse
/// one message for another.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Bench {
    /// Primary → worker: send this many ticks as fast as the channel takes them.
    Flood(u64),
    /// Both ways: one small message; the worker echoes it.
    Tick { n: u64 },
}

pub async fn worker_main(worker: Worker) {
    while let Some(message) = worker.recv().await {
        match message.decode::<Bench>().expect("bench message") {
            Bench::Flood(count) => {
                for n in 0..count {
                    worker.send(&Bench::Tick { n }).await.expect("send");
                }
            }
            tick @ Bench::Tick { .. } => worker.send(&tick).await.expect("echo"),
        }
    }
}

async fn cluster(format: Format) -> Cluster {
    cluster_with(format, Duration::ZERO).await
}

async fn cluster_with(format: Format, busy_poll: Duration) -> Cluster {
    Cluster::builder()
        .workers(0)
        .format(format)
        .busy_poll(busy_poll)
        .build()
        .expect("cluster")
}

async fn online(cluster: &mut Cluster) -> WorkerHandle {
    let worker = cluster.fork().await.expect("fork");
    loop {
        match cluster.next_event().await.expect("event") {
            Event::Online(w) if w == worker => return worker,
            Event::Exit { .. } => panic!("bench worker exited before online"),
            _ => {}
        }
    }
}

async fn stop(cluster: &mut Cluster, worker: &WorkerHandle) {
    worker.disconnect();
    while cluster.next_event().await.is_some() {}
}

async fn throughput(format: Format, messages: u64) -> f64 {
    let mut cluster = cluster(format).await;
    let worker = online(&mut cluster).await;
    let start = Instant::now();
    worker.send(&Bench::Flood(messages)).await.expect("send");
    let mut expected = 0;
    while expected < messages {
        if let Event::Message { message, .. } = cluster.next_event().await.expect("event") {
            let tick: Bench = message.decode().expect("tick");
            assert_eq!(tick, Bench::Tick { n: expected }, "messages out of order");
            expected += 1;
        }
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    stop(&mut cluster, &worker).await;
    rate
}

async fn pingpong(format: Format, rounds: usize, busy_poll: Duration) -> (f64, f64) {
    let mut cluster = cluster_with(format, busy_poll).await;
    let worker = online(&mut cluster).await;
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..(1000 + rounds) as u64 {
        let start = Instant::now();
        worker.send(&Bench::Tick { n }).await.expect("send");
        loop {
            if let Event::Message { message, .. } = cluster.next_event().await.expect("event") {
                assert_eq!(message.decode::<Bench>().expect("tick"), Bench::Tick { n });
                break;
            }
        }
        if n >= 1000 {
            samples.push(start.elapsed());
        }
    }
    stop(&mut cluster, &worker).await;
    samples.sort();
    let pick =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (micros(pick(0.50)), micros(pick(0.99)))
}

async fn fork_online(forks: usize) -> f64 {
    let mut cluster = cluster(Format::Binary).await;
    let mut samples = Vec::with_capacity(forks);
    for _ in 0..forks {
        let start = Instant::now();
        let worker = online(&mut cluster).await;
        samples.push(start.elapsed());
        stop(&mut cluster, &worker).await;
    }
    samples.sort();
    let mid = samples.len() / 2;
    let median = if samples.len() % 2 == 0 {
        (samples[mid - 1] + samples[mid]) / 2
    } else {
        samples[mid]
    };
    median.as_secs_f64() * 1000.0
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn node_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/node/ipc.js")
}

fn run_node(args: &IpcArgs, serialization: &str) -> Option<serde_json::Value> {
    if args.no_node {
        return None;
    }
    let output = Command::new("node")
        .arg(node_script())
        .args(["--serialization", serialization])
        .args([
            "--pingpongs",
            &args.pingpongs.to_string(),
            "--forks",
            &args.forks.to_string(),
        ])
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
            eprintln!("cannot run node ({e}); Node columns left empty");
            None
        }
    }
}

pub async fn run(args: IpcArgs) -> Result<(), Box<dyn std::error::Error>> {
    assert!(matches!(procluster::role()?, Role::Primary));
    let node = run_node(&args, "json");
    let field = |path: &[&str]| {
        let mut v = node.as_ref()?;
        for key in path {
            v = v.get(key)?;
        }
        v.as_f64()
    };
    let json_rate = throughput(Format::Json, args.messages).await;
    let binary_rate = throughput(Format::Binary, args.messages).await;
    let (json_p50, json_p99) = pingpong(Format::Json, args.pingpongs, Duration::ZERO).await;
    let (bin_p50, bin_p99) = pingpong(Format::Binary, args.pingpongs, Duration::ZERO).await;
    let busy_poll = Duration::from_micros(args.busy_poll_us);
    let polled = if busy_poll.is_zero() {
        None
    } else {
        Some((
            pingpong(Format::Json, args.pingpongs, busy_poll).await,
            pingpong(Format::Binary, args.pingpongs, busy_poll).await,
        ))
    };
    let fork_ms = fork_online(args.forks).await;
    let node_rate = field(&["throughput", "msgs_per_sec"]);
    let node_p50 = field(&["pingpong", "p50_us"]);
    let node_p99 = field(&["pingpong", "p99_us"]);
    let mut rows = vec![
        Row::compared(
            "throughput worker→primary, JSON",
            "msg/s",
            json_rate,
            node_rate,
            true,
        ),
        Row::compared(
            "throughput worker→primary, binary",
            "msg/s",
            binary_rate,
            node_rate,
            true,
        ),
        Row::compared("round trip p50, JSON", "µs", json_p50, node_p50, false),
        Row::compared("round trip p99, JSON", "µs", json_p99, node_p99, false),
        Row::compared("round trip p50, binary", "µs", bin_p50, node_p50, false),
        Row::compared("round trip p99, binary", "µs", bin_p99, node_p99, false),
    ];
    if let Some(((jp50, jp99), (bp50, bp99))) = polled {
        let label = |what: &str| format!("round trip {what}, busy_poll {} µs", args.busy_poll_us);
        rows.extend([
            Row::compared(&label("p50, JSON"), "µs", jp50, node_p50, false),
            Row::compared(&label("p99, JSON"), "µs", jp99, node_p99, false),
            Row::compared(&label("p50, binary"), "µs", bp50, node_p50, false),
            Row::compared(&label("p99, binary"), "µs", bp99, node_p99, false),
        ]);
    }
    rows.push(Row::compared(
        "fork→online median",
        "ms",
        fork_ms,
        field(&["fork_online", "median_ms"]),
        false,
    ));
    print_table(&rows, "procluster", "node");
    let runtime = std::env::var("PROCLUSTER_BENCH_RUNTIME")
        .unwrap_or_else(|_| "current-thread (primary and worker)".into());
    println!("(procluster runtimes: {runtime})");
    let json = serde_json::json!({
        "runtime": runtime, "bench": "ipc", "messages": args.messages, "rows": to_json(&rows), "node_raw": node });
    println!("{json}");
    Ok(())
}
