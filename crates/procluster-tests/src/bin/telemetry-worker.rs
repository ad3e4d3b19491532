//! A worker program for the telemetry tests. `telemetry-worker MODE [N]`:
//!
//! - `count N`: registers the counter `app_jobs`, increments it N times,
//!   then says ready and stays until disconnected;
//! - `ready-gen0-only`: says ready in generation 0 only (later generations
//!   never do), and stays;
//! - `log N`: sends N log events (`event I`, field `seq = I`, in a span
//!   `batch{worker}`), flushing every 1000, then sends the message
//!   `LogsDone { dropped }` and stays;
//! - `flood N`: logs N events as fast as it can without flushing, then
//!   flushes and sends `LogsDone { dropped }`.

use procluster::Role;
use procluster::telemetry::WorkerTelemetry;
use procluster::worker::Worker;
use procluster_tests::telemetry::LogsDone;
use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let Ok(Role::Worker(worker)) = procluster::role() else {
        eprintln!("telemetry-worker must be started by a primary");
        std::process::exit(2);
    };
    let telemetry = procluster::telemetry::worker(&worker).expect("telemetry service");
    match mode.as_str() {
        "count" => {
            let jobs = Counter::<u64>::default();
            telemetry
                .registry()
                .register("app_jobs", "Jobs done by the test worker", jobs.clone());
            for _ in 0..n {
                jobs.inc();
            }
            worker.ready().expect("ready");
        }
        "ready-gen0-only" => {
            if procluster_tests::generation() == 0 {
                worker.ready().expect("ready");
            }
        }
        "log" => log(&worker, &telemetry, n, 1000).await,
        "flood" => log(&worker, &telemetry, n, u64::MAX).await,
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    worker.shutdown_signal().await;
    telemetry.flush_logs().await;
}

async fn log(worker: &Worker, telemetry: &WorkerTelemetry, n: u64, flush_every: u64) {
    let subscriber = tracing_subscriber::registry().with(telemetry.log_layer());
    tracing::subscriber::set_global_default(subscriber).expect("global subscriber");
    let span = tracing::info_span!("batch", worker = worker.id().get());
    for seq in 0..n {
        span.in_scope(|| tracing::info!(seq, "event {seq}"));
        if (seq + 1) % flush_every == 0 {
            telemetry.flush_logs().await;
        }
    }
    telemetry.flush_logs().await;
    worker
        .send(&LogsDone {
            dropped: telemetry.dropped_logs(),
        })
        .await
        .expect("send");
}
