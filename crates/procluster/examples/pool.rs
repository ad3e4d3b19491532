//! An HTTP cluster that hands its CPU work to a work pool: the worker that
//! takes `GET /hash?rounds=R&data=TEXT` submits the hashing as a task, which
//! any worker may run, and answers
//! `<hex digest> computed by worker <id> served by worker <id>`.
//!
//! ```sh
//! cargo run --release --example pool -- --workers 4 --port 3000
//! curl 'http://127.0.0.1:3000/hash?rounds=100000&data=hello'
//! ```
//!
//! Two "hosts" sharing one pool through Redis: a request on either port may
//! be computed by a worker of the other.
//!
//! ```sh
//! redis-server --port 6379 &
//! cargo run --release --example pool -- --workers 2 --port 3000 --redis redis://127.0.0.1:6379 &
//! cargo run --release --example pool -- --workers 2 --port 3001 --redis redis://127.0.0.1:6379 &
//! ```
//!
//! The digest: h = the bytes of TEXT, then R times h = SHA-256(h) (the raw
//! 32 bytes after the first round). Options: `--workers N|auto` (default
//! auto), `--host H` (default 127.0.0.1), `--port P` (default 3000; 0 picks
//! a free port), `--redis URL` (a pool shared by several primaries through
//! Redis: `redis://HOST:PORT` or `redis+unix:///path/to/socket`). Prints
//! `listening on http://HOST:PORT` once every worker listens. The workers
//! are supervised: one that dies is replaced and its tasks run elsewhere;
//! SIGHUP reloads them one by one without failing a task; Ctrl-C stops.

use std::collections::HashSet;

use axum::Router;
use axum::http::{StatusCode, Uri};
use axum::routing::get;
use procluster::pool::{HandlerError, Pool, PoolConfig, WorkerPool};
use procluster::primary::{Cluster, Event, Workers};
use procluster::supervisor::{Readiness, Report, SupervisedCluster, SupervisionOptions};
use procluster::{Role, WorkerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The pool's name, the same in the primary and the workers.
const POOL: &str = "hash";
/// The most rounds one request may ask for.
const MAX_ROUNDS: u32 = 10_000_000;

#[derive(Serialize, Deserialize)]
struct HashTask {
    data: String,
    rounds: u32,
}

#[derive(Serialize, Deserialize)]
struct Hashed {
    hex: String,
    computed_by: WorkerId,
}

struct Options {
    workers: Workers,
    host: String,
    port: u16,
    redis: Option<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        workers: Workers::Auto,
        host: "127.0.0.1".into(),
        port: 3000,
        redis: None,
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
            "--redis" => options.redis = Some(value()?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(options)
}

/// h = `data`, then `rounds` times h = SHA-256(h).
fn hash(data: &[u8], rounds: u32) -> [u8; 32] {
    let mut digest: [u8; 32] = Sha256::digest(data).into();
    for _ in 1..rounds {
        digest = Sha256::digest(digest).into();
    }
    digest
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("pool: {message}");
            std::process::exit(2);
        }
    };
    match procluster::role()? {
        Role::Primary => primary(options).await,
        Role::Worker(worker) => {
            let pool: WorkerPool<HashTask, Hashed> = WorkerPool::open(&worker, POOL)?;
            let me = worker.id();
            // This worker runs tasks of the pool (its own and others')...
            let serving = tokio::spawn({
                let pool = pool.clone();
                async move {
                    pool.serve(move |task: HashTask, _cancel| async move {
                        let digest = hash(task.data.as_bytes(), task.rounds);
                        Ok::<_, HandlerError>(Hashed {
                            hex: hex(&digest),
                            computed_by: me,
                        })
                    })
                    .await
                }
            });
            // ...and serves HTTP, handing the hashing to the pool.
            let listener = worker
                .listen_tcp(&format!("{}:{}", options.host, options.port))
                .await?;
            let app = Router::new().route(
                "/hash",
                get(move |uri: Uri| {
                    let pool = pool.clone();
                    async move { hash_request(&pool, me, &uri).await }
                }),
            );
            axum::serve(listener, app)
                .with_graceful_shutdown(worker.shutdown_signal())
                .await?;
            // Runs what the pool still gave this worker, then ends.
            serving.await??;
            Ok(())
        }
    }
}

async fn hash_request(
    pool: &WorkerPool<HashTask, Hashed>,
    me: WorkerId,
    uri: &Uri,
) -> (StatusCode, String) {
    let (mut rounds, mut data) = (Some(1), String::new());
    for (key, value) in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
    {
        match key {
            "rounds" => rounds = value.parse().ok().filter(|r| (1..=MAX_ROUNDS).contains(r)),
            "data" => data = percent_decode(value),
            _ => {}
        }
    }
    let Some(rounds) = rounds else {
        let message = format!("rounds must be a number from 1 to {MAX_ROUNDS}\n");
        return (StatusCode::BAD_REQUEST, message);
    };
    match pool.submit(HashTask { data, rounds }).await {
        Ok(hashed) => (
            StatusCode::OK,
            format!(
                "{} computed by worker {} served by worker {me}\n",
                hashed.hex, hashed.computed_by
            ),
        ),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")),
    }
}

/// `+` and `%XX` of a query string value; a broken escape stays as it is.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex_at = |i: usize| {
            bytes
                .get(i)
                .and_then(|b| (*b as char).to_digit(16))
                .map(|d| d as u8)
        };
        match bytes[at] {
            b'+' => out.push(b' '),
            b'%' => match (hex_at(at + 1), hex_at(at + 2)) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    at += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn primary(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    let pool: Pool<HashTask, Hashed> = match &options.redis {
        Some(url) => Pool::redis(POOL, PoolConfig::default(), url).await?,
        None => Pool::new(POOL, PoolConfig::default()),
    };
    let cluster = Cluster::builder()
        .own_process_group(true)
        .service(pool)
        .build()?;
    let workers = options.workers.resolve();
    let mut supervision = SupervisionOptions::default();
    supervision.supervisor.workers = workers;
    supervision.readiness = Readiness::Listening;
    // Ctrl-C/SIGTERM stop gracefully, SIGHUP reloads, SIGTTIN/SIGTTOU scale.
    supervision.handle_signals = true;
    let mut supervised = SupervisedCluster::start(cluster, supervision)?;
    let mut listening = HashSet::new();
    let mut announced = false;
    while let Some(event) = supervised.next_event().await {
        match event {
            Report::Cluster(Event::Listening { worker, address }) if !announced => {
                listening.insert(worker.id());
                if listening.len() == workers {
                    announced = true;
                    let port = address.rsplit(':').next().unwrap_or("?");
                    println!("listening on http://{}:{port}", options.host);
                }
            }
            Report::Cluster(Event::Error { error, .. }) => eprintln!("{error}"),
            Report::Supervisor(event) => eprintln!("{event:?}"),
            _ => {}
        }
    }
    supervised.wait().await?;
    Ok(())
}
