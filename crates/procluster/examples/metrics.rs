//! An observed HTTP cluster: every worker counts the requests it serves in
//! its own registry and logs each one with `tracing`; the primary serves
//! one Prometheus endpoint for the whole cluster (the workers' counters
//! summed, with the cluster's own metrics), the health probes, and prints
//! the workers' log events with their id, slot and pid.
//!
//! ```sh
//! cargo run --release --example metrics -- --workers 2 --port 3000 --metrics-port 9100
//! curl http://127.0.0.1:3000/ && curl http://127.0.0.1:9100/metrics
//! ```
//!
//! Options: `--workers N` (default 2), `--port P` (default 3000),
//! `--metrics-port P` (default 9100; 0 picks a free port for either).
//! Prints `metrics on http://HOST:PORT/metrics`, then `listening on
//! http://HOST:PORT` once every worker listens. Ctrl-C or SIGTERM stops.

use axum::Router;
use axum::routing::get;
use procluster::Role;
use procluster::primary::{Cluster, Event};
use procluster::supervisor::{Report, SupervisedCluster, SupervisionOptions};
use procluster::telemetry::{LogOutput, Telemetry};
use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::layer::SubscriberExt;

fn option(name: &str, default: u16) -> u16 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|at| args.get(at + 1))
        .map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("metrics: {name} expects a number, got {v:?}");
                std::process::exit(2);
            })
        })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = option("--port", 3000);
    match procluster::role()? {
        Role::Primary => primary().await,
        Role::Worker(worker) => {
            let telemetry = procluster::telemetry::worker(&worker)?;
            let requests = Counter::<u64>::default();
            telemetry
                .registry()
                .register("http_requests", "Requests served", requests.clone());
            let subscriber = tracing_subscriber::registry().with(telemetry.log_layer());
            tracing::subscriber::set_global_default(subscriber)?;
            let listener = worker.listen_tcp(&format!("127.0.0.1:{port}")).await?;
            let id = worker.id();
            let app = Router::new().route(
                "/",
                get(move || {
                    requests.inc();
                    tracing::info!(path = "/", "served");
                    async move { format!("hello from worker {id}\n") }
                }),
            );
            axum::serve(listener, app)
                .with_graceful_shutdown(worker.shutdown_signal())
                .await?;
            telemetry.flush_logs().await;
            Ok(())
        }
    }
}

async fn primary() -> Result<(), Box<dyn std::error::Error>> {
    let workers = usize::from(option("--workers", 2).max(1));
    let telemetry = Telemetry::builder()
        .metrics_addr(format!("127.0.0.1:{}", option("--metrics-port", 9100)))
        .logs(LogOutput::Text)
        .build();
    let cluster = Cluster::builder().service(telemetry.clone()).build()?;
    let mut options = SupervisionOptions::default();
    options.supervisor.workers = workers;
    options.handle_signals = true;
    let mut supervised = SupervisedCluster::start(cluster, options)?;
    let endpoint = telemetry.start().await?;
    println!("metrics on http://{endpoint}/metrics");
    let mut listening = 0;
    while let Some(report) = supervised.next_event().await {
        telemetry.observe(&report);
        if let Report::Cluster(Event::Listening { address, .. }) = &report {
            listening += 1;
            if listening == workers {
                println!(
                    "listening on http://{}",
                    address.trim_start_matches("tcp://")
                );
            }
        }
    }
    supervised.wait().await?;
    Ok(())
}
