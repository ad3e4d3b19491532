//! An HTTP cluster: every worker serves `hello from worker <id> (pid <pid>)`
//! on one shared port.
//!
//! ```sh
//! cargo run --release --example hello -- --workers 4 --port 3000 --policy round-robin
//! ```
//!
//! Options (all optional): `--workers N|auto` (default auto), `--host H`
//! (default 127.0.0.1), `--port P` (default 3000; 0 picks a free port),
//! `--policy shared|round-robin|reuseport`. Prints `listening on
//! http://HOST:PORT` once every worker listens; Ctrl-C or SIGTERM stops it
//! gracefully.

use std::collections::HashSet;

use axum::Router;
use axum::routing::get;
use procluster::primary::{Cluster, Event, Workers};
use procluster::{Policy, Role};

struct Options {
    workers: Workers,
    host: String,
    port: u16,
    policy: Option<Policy>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        workers: Workers::Auto,
        host: "127.0.0.1".into(),
        port: 3000,
        policy: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--workers" | "-w" => {
                let v = value()?;
                options.workers =
                    match v.as_str() {
                        "auto" => Workers::Auto,
                        n => Workers::Count(n.parse().map_err(|_| {
                            format!("--workers: expected a number or auto, got {n:?}")
                        })?),
                    };
            }
            "--host" => options.host = value()?,
            "--port" | "-p" => {
                let v = value()?;
                options.port = v
                    .parse()
                    .map_err(|_| format!("--port: expected 0-65535, got {v:?}"))?;
            }
            "--policy" => {
                let v = value()?;
                options.policy = Some(Policy::from_name(&v).ok_or_else(|| {
                    format!("--policy: expected shared, round-robin or reuseport, got {v:?}")
                })?);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("hello: {message}");
            std::process::exit(2);
        }
    };
    match procluster::role()? {
        Role::Primary => primary(options).await,
        Role::Worker(worker) => {
            let listener = worker
                .listen_tcp(&format!("{}:{}", options.host, options.port))
                .await?;
            let greeting = format!(
                "hello from worker {} (pid {})",
                worker.id(),
                std::process::id()
            );
            let app = Router::new().fallback(get(move || {
                let greeting = greeting.clone();
                async move { greeting }
            }));
            axum::serve(listener, app)
                .with_graceful_shutdown(worker.shutdown_signal())
                .await?;
            Ok(())
        }
    }
}

async fn primary(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = Cluster::builder()
        .workers(options.workers)
        .own_process_group(true);
    if let Some(policy) = options.policy {
        builder = builder.policy(policy);
    }
    let mut cluster = builder.build()?;
    let started = cluster.start().await?;
    let mut waiting: HashSet<u32> = started.iter().map(|w| w.id()).collect();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stopping = false;
    loop {
        let event = tokio::select! {
            event = cluster.next_event() => event,
            _ = tokio::signal::ctrl_c(), if !stopping => { stopping = true; begin_stop(&cluster); continue }
            _ = terminate.recv(), if !stopping => { stopping = true; begin_stop(&cluster); continue }
        };
        let Some(event) = event else { break };
        match event {
            Event::Listening { worker, address } => {
                if waiting.remove(&worker.id()) && waiting.is_empty() {
                    let port = address.rsplit(':').next().unwrap_or("?");
                    println!("listening on http://{}:{port}", options.host);
                }
            }
            Event::Exit {
                worker,
                status,
                exited_after_disconnect,
            } => {
                if !exited_after_disconnect && !stopping {
                    eprintln!("worker {} died ({status}); starting another", worker.id());
                    let replacement = cluster.fork_with(procluster::primary::ForkOptions {
                        index: worker.index(),
                        ..Default::default()
                    });
                    replacement.await?;
                }
            }
            Event::Error { error, .. } => eprintln!("{error}"),
            _ => {}
        }
    }
    Ok(())
}

fn begin_stop(cluster: &Cluster) {
    eprintln!("stopping: waiting for workers to finish their requests");
    for worker in cluster.workers() {
        worker.disconnect();
    }
}
