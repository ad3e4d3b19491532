//! The benchmark harness. `cargo run --release -p procluster-bench -- ipc`
//! measures procluster's channel and Node's cluster IPC in the same run and
//! prints a table, then one JSON object.

mod bus;
mod http;
mod ipc;
mod pool;
mod reliability;
mod report;
mod scale;
mod sticky;
mod supervision;
mod telemetry;

use clap::{Parser, Subcommand};
use procluster::Role;

#[derive(Parser)]
#[command(about = "procluster benchmarks, side by side with Node's cluster module")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Channel throughput, round trip and fork→online latency.
    Ipc(ipc::IpcArgs),
    /// The cluster bus and store: broadcast throughput and latency, store
    /// increments, beside Node's relay through the primary and raw Redis.
    Bus(bus::BusArgs),
    /// The hello example under wrk for each policy, beside the ideal and Node.
    Http(http::HttpArgs),
    /// The ideal server of the HTTP bench (used by `http`).
    #[command(hide = true)]
    IdealServer {
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Reliability checks under load: chaos, reloads, graceful stop, primary
    /// kill, crash cycles; exits non-zero if a check fails.
    ///
    /// Every scenario runs on loopback under a Rust Connection: close load:
    /// chaos (a random worker SIGKILLed every 100 ms for 20 s,
    /// reuseport and round-robin; every failed request must be a connection
    /// a killed worker held), 10 rolling reloads with zero failures, graceful
    /// stop with no response cut, SIGKILL of the primary leaves no worker,
    /// 1000 crash/restart cycles with flat fds/RSS and no zombies. Prints a
    /// table and one JSON line; exits non-zero if a check fails.
    Reliability(reliability::ReliabilityArgs),
    /// Work pools: tiny and CPU tasks, latency beside the channel's round
    /// trip, large payloads beside memcpy; the articles' Node broker,
    /// piscina and Python's multiprocessing.Pool in the same run.
    Pool(pool::PoolArgs),
    /// Supervision figures: SIGKILL → replacement listening (no backoff),
    /// rolling reload of 4 workers, primary RSS with 16 workers beside Node's.
    Supervision(supervision::SupervisionArgs),
    /// One primary with 1024 workers under a soft open-file limit of 1024,
    /// for the library (the hello example) and the command: time to ready,
    /// idle CPU, RSS, descriptors, `status` latency, stop time.
    Scale(scale::ScaleArgs),
    /// A supervised HTTP cluster of bench workers, like the hello example but
    /// with --backoff-ms, --no-breaker and --delay-ms (used by `reliability`
    /// and `supervision`).
    #[command(hide = true)]
    SupervisedServer(supervision::ServerArgs),
    /// Sticky sessions: sticky:ip (the kernel's path and the primary's) and
    /// sticky:cookie under keep-alive and Connection: close, beside
    /// round-robin, reuseport, the ideal and Node's @socket.io/sticky, with
    /// clients from 1000 loopback addresses with their own cookies.
    Sticky(sticky::StickyArgs),
    /// Telemetry: a scrape of 64 workers × 100 series beside prom-client's
    /// AggregatorRegistry, log events forwarded per second, a worker's
    /// tracing call.
    Telemetry(telemetry::TelemetryArgs),
}

/// By default the bench runs as procluster recommends for one worker per
/// core: primary and workers on Tokio's single-threaded runtime.
/// `PROCLUSTER_BENCH_RUNTIME=multi-thread` puts both sides (workers inherit
/// the variable) on the multi-threaded one, `multi-thread-workers` only the
/// workers.
const RUNTIME_ENV: &str = "PROCLUSTER_BENCH_RUNTIME";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Single-threaded primary and workers unless told otherwise, as the
    // README recommends for one worker per core.
    let single = match std::env::var(RUNTIME_ENV).as_deref() {
        Ok("multi-thread") => false,
        Ok("multi-thread-workers") => !procluster::is_worker_process(),
        _ => true,
    };
    let mut runtime = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all().build()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    if let Role::Worker(worker) = procluster::role()? {
        if pool::is_pool_worker() {
            pool::worker_main(worker).await?;
        } else if supervision::is_http_worker() {
            supervision::http_worker_main(worker).await?;
        } else if telemetry::is_bench_worker() {
            telemetry::worker_main(worker).await;
        } else if bus::is_bus_worker() {
            bus::worker_main(worker).await;
        } else {
            ipc::worker_main(worker).await;
        }
        return Ok(());
    }
    match Args::parse().bench {
        Bench::Ipc(args) => ipc::run(args).await,
        Bench::Bus(args) => bus::run(args).await,
        Bench::Http(args) => Ok(tokio::task::spawn_blocking(move || http::run(args)).await??),
        Bench::IdealServer { port } => http::ideal_server_main(port).await,
        Bench::Pool(args) => pool::run(args).await,
        Bench::Reliability(args) => {
            Ok(tokio::task::spawn_blocking(move || reliability::run(args)).await??)
        }
        Bench::Supervision(args) => supervision::run(args)
            .await
            .map_err(|e| e as Box<dyn std::error::Error>),
        Bench::SupervisedServer(args) => supervision::server_main(args).await,
        Bench::Scale(args) => tokio::task::spawn_blocking(move || scale::run(args))
            .await?
            .map_err(|e| e as Box<dyn std::error::Error>),
        Bench::Telemetry(args) => telemetry::run(args).await,
        Bench::Sticky(args) => Ok(tokio::task::spawn_blocking(move || sticky::run(args)).await??),
    }
}
