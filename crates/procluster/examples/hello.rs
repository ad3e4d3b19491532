//! An HTTP cluster: every worker serves `hello from worker <id> (pid <pid>)`
//! on one shared port.
//!
//! ```sh
//! cargo run --release --example hello -- --workers 4 --port 3000 --policy round-robin
//! ```
//!
//! Options (all optional): `--workers N|auto` (default auto), `--host H`
//! (default 127.0.0.1), `--port P` (default 3000; 0 picks a free port),
//! `--policy shared|round-robin|reuseport|sticky:KEY` (KEY: `ip`, `ip/24/64`,
//! `cookie=NAME`, `header=NAME`, `query=NAME`), `--sticky-in-primary` (under
//! `sticky:ip`, the primary routes each connection instead of the kernel),
//! `--normal-scheduling` (keep the
//! primary off `SCHED_BATCH`, see `ClusterBuilder::batch_scheduling`). Prints `listening on
//! http://HOST:PORT` once every worker listens. The workers are supervised: a
//! worker that dies is replaced, SIGHUP reloads them one by one without
//! dropping a request, and Ctrl-C or SIGTERM stops them gracefully. What the
//! supervisor does is printed on stderr as sentences (`supervisor::Event`'s
//! `Display`). A port that is in use is said once, and the example exits 1
//! instead of restarting workers that cannot listen.

use std::collections::HashSet;

use axum::Router;
use axum::routing::get;
use procluster::primary::{Cluster, Event, Workers};
use procluster::supervisor::{Report, SupervisedCluster, SupervisionOptions};
use procluster::{Policy, Role};

struct Options {
    workers: Workers,
    host: String,
    port: u16,
    policy: Option<Policy>,
    batch_scheduling: bool,
    sticky_in_primary: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        workers: Workers::Auto,
        host: "127.0.0.1".into(),
        port: 3000,
        policy: None,
        batch_scheduling: true,
        sticky_in_primary: false,
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
            "--normal-scheduling" => options.batch_scheduling = false,
            "--sticky-in-primary" => options.sticky_in_primary = true,
            "--port" | "-p" => {
                let v = value()?;
                options.port = v
                    .parse()
                    .map_err(|_| format!("--port: expected 0-65535, got {v:?}"))?;
            }
            "--policy" => {
                let v = value()?;
                options.policy = Some(v.parse().map_err(|e| format!("--policy: {e}"))?);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(options)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One worker per core is the parallelism, as in Node: each process runs
    // Tokio's single-threaded runtime, which spares the cross-thread
    // wake-ups a multi-threaded one would pay in every worker. The primary
    // only passes things around.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
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
            let address = format!("{}:{}", options.host, options.port);
            let listener = match worker.listen_tcp(&address).await {
                Ok(listener) => listener,
                Err(error) => {
                    // Restarting would not free the port: tell the primary,
                    // which stops the cluster, and wait for the stop.
                    let _ = worker.send(&ListenFailed(error.to_string())).await;
                    worker.shutdown_signal().await;
                    return Ok(());
                }
            };
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
    // The primary hands connections out (round-robin) in bigger batches when
    // it does not preempt busy workers each time one arrives.
    let mut builder = Cluster::builder()
        .own_process_group(true)
        .batch_scheduling(options.batch_scheduling);
    if let Some(policy) = options.policy {
        builder = builder.policy(policy);
    }
    if options.sticky_in_primary {
        let mut sticky = procluster::sticky::StickyOptions::default();
        sticky.kernel_routing = false;
        builder = builder.sticky_options(sticky);
    }
    let cluster = builder.build()?;
    let workers = options.workers.resolve();
    let mut supervision = SupervisionOptions::default();
    supervision.supervisor.workers = workers;
    // Ctrl-C/SIGTERM stop gracefully, SIGHUP reloads, SIGTTIN/SIGTTOU scale.
    supervision.handle_signals = true;
    let mut supervised = SupervisedCluster::start(cluster, supervision)?;
    let handle = supervised.handle();
    let mut listening = HashSet::new();
    let mut announced = false;
    let mut failed = false;
    while let Some(event) = supervised.next_event().await {
        match event {
            Report::Cluster(Event::Listening { worker, address }) if !announced => {
                listening.insert(worker.id());
                if listening.len() == workers {
                    announced = true;
                    let port = address.rsplit(':').next().unwrap_or("?");
                    say(
                        &mut std::io::stdout(),
                        &format!("listening on http://{}:{port}", options.host),
                    );
                }
            }
            Report::Cluster(Event::Message { message, .. }) => {
                // The first worker that cannot listen stops the cluster;
                // the others would only repeat it.
                if let Ok(ListenFailed(why)) = message.decode() {
                    if !failed {
                        failed = true;
                        say(&mut std::io::stderr(), &format!("hello: {why}"));
                        let _ = handle.stop();
                    }
                }
            }
            Report::Cluster(Event::Error { error, .. }) => say(&mut std::io::stderr(), &error),
            Report::Supervisor(event) if !failed => say(&mut std::io::stderr(), &event.to_string()),
            _ => {}
        }
    }
    supervised.wait().await?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// A worker's report that it could not listen (the port is taken, say).
#[derive(serde::Serialize, serde::Deserialize)]
struct ListenFailed(String);

/// One line; a closed or broken stream is no reason to stop serving.
fn say(stream: &mut impl std::io::Write, line: &str) {
    let _ = writeln!(stream, "{line}");
}
