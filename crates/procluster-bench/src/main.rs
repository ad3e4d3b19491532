//! The benchmark harness. `cargo run --release -p procluster-bench -- ipc`
//! measures procluster's channel and Node's cluster IPC in the same run and
//! prints a table, then one JSON object.

mod http;
mod ipc;
mod report;

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
    /// The hello example under wrk for each policy, beside the ideal and Node.
    Http(http::HttpArgs),
    /// The ideal server of the HTTP bench (used by `http`).
    #[command(hide = true)]
    IdealServer {
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Role::Worker(worker) = procluster::role()? {
        ipc::worker_main(worker).await;
        return Ok(());
    }
    match Args::parse().bench {
        Bench::Ipc(args) => ipc::run(args).await,
        Bench::Http(args) => Ok(tokio::task::spawn_blocking(move || http::run(args)).await??),
        Bench::IdealServer { port } => http::ideal_server_main(port).await,
    }
}
