//! A WebSocket chat served by several workers: a message sent to any worker
//! reaches the clients of every worker, through the cluster bus; a hit
//! counter lives in the cluster's shared store. Pointed at Redis, several
//! copies on several hosts make one chat and one counter.
//!
//! ```sh
//! cargo run --release --example chat -- --workers 4 --port 3000
//! cargo run --release --example chat -- --workers 4 --port 3000 --redis redis://127.0.0.1:6379
//! ```
//!
//! - `GET /ws`: a WebSocket; each text message received is sent, as it is,
//!   to every connected client of every worker (the sender included).
//! - `GET /whoami`: `worker <id> (pid <pid>)`.
//! - `POST /hits`: increments the shared counter and answers its new value;
//!   `GET /hits` answers its value.
//!
//! Options (all optional): `--workers N|auto` (default auto), `--host H`
//! (default 127.0.0.1), `--port P` (default 3000; 0 picks a free port),
//! `--policy shared|round-robin|reuseport`, `--redis URL` (the bus and the
//! store on a Redis server instead of the primary). Prints `listening on
//! http://HOST:PORT` once every worker listens. Workers are supervised as in
//! the `hello` example; the store outlives their restarts.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use procluster::bus::Bus;
use procluster::primary::{Cluster, Event, Workers};
use procluster::store::Store;
use procluster::supervisor::{Report, SupervisedCluster, SupervisionOptions};
use procluster::{Policy, Role};
use tokio::sync::broadcast;

/// The bus topic of the chat.
const TOPIC: &str = "chat";

/// Messages a slow WebSocket client may fall behind by before it skips
/// ahead (its worker's broadcast to its clients is bounded).
const CLIENT_BACKLOG: usize = 1024;

struct Options {
    workers: Workers,
    host: String,
    port: u16,
    policy: Option<Policy>,
    redis: Option<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        workers: Workers::Auto,
        host: "127.0.0.1".into(),
        port: 3000,
        policy: None,
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
            "--policy" => {
                let v = value()?;
                options.policy = Some(v.parse().map_err(|e| format!("--policy: {e}"))?);
            }
            "--redis" => options.redis = Some(value()?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(options)
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
            eprintln!("chat: {message}");
            std::process::exit(2);
        }
    };
    match procluster::role()? {
        Role::Primary => primary(options).await,
        Role::Worker(worker) => serve(worker, options).await,
    }
}

/// What every request handler of a worker shares.
struct Shared {
    worker: String,
    bus: Bus,
    store: Store,
    /// The chat's messages, to this worker's clients.
    clients: broadcast::Sender<String>,
}

async fn serve(
    worker: procluster::worker::Worker,
    options: Options,
) -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::open(&worker).await?;
    let store = Store::open(&worker).await?;
    let (clients, _) = broadcast::channel(CLIENT_BACKLOG);
    // One subscription per worker; its messages fan out to the worker's
    // clients.
    let mut chat = bus.subscribe(TOPIC).await?;
    let to_clients = clients.clone();
    tokio::spawn(async move {
        while let Some(message) = chat.next().await {
            if let Ok(text) = message.decode::<String>() {
                // No client connected is not an error.
                let _ = to_clients.send(text);
            }
        }
    });
    let shared = Arc::new(Shared {
        worker: format!("worker {} (pid {})", worker.id(), std::process::id()),
        bus,
        store,
        clients,
    });
    let app = Router::new()
        .route("/ws", get(websocket))
        .route(
            "/whoami",
            get(|State(s): State<Arc<Shared>>| async move { s.worker.clone() }),
        )
        .route("/hits", get(hits).post(hit))
        .with_state(shared);
    let listener = worker
        .listen_tcp(&format!("{}:{}", options.host, options.port))
        .await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(worker.shutdown_signal())
        .await?;
    Ok(())
}

async fn websocket(
    upgrade: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
) -> impl IntoResponse {
    let worker = shared.worker.clone();
    // Listening before the handshake completes: the client hears everything
    // sent after it is connected.
    let heard = shared.clients.subscribe();
    let mut response = upgrade
        .on_upgrade(move |socket| chat(socket, heard, shared))
        .into_response();
    // Which worker serves the connection, for whoever wants to know.
    if let Ok(value) = worker.parse() {
        response.headers_mut().insert("x-procluster-worker", value);
    }
    response
}

/// One client: its text goes to the bus, the chat comes back to it.
async fn chat(mut socket: WebSocket, mut chat: broadcast::Receiver<String>, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Err(error) = shared.bus.publish(TOPIC, text.as_str()).await {
                        eprintln!("chat: cannot publish: {error}");
                        return;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            outgoing = chat.recv() => match outgoing {
                Ok(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                // Too slow: it skips what it missed.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn hit(State(shared): State<Arc<Shared>>) -> Result<String, String> {
    shared
        .store
        .incr("hits", 1)
        .await
        .map(|n| n.to_string())
        .map_err(|e| e.to_string())
}

async fn hits(State(shared): State<Arc<Shared>>) -> Result<String, String> {
    shared
        .store
        .get::<i64>("hits")
        .await
        .map(|n| n.unwrap_or(0).to_string())
        .map_err(|e| e.to_string())
}

async fn primary(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    let (bus, store) = match &options.redis {
        Some(url) => (Bus::redis(url).await?, Store::redis(url).await?),
        None => (Bus::local(), Store::local()),
    };
    let mut builder = Cluster::builder()
        .own_process_group(true)
        .service(bus.service())
        .service(store.service());
    if let Some(policy) = options.policy {
        builder = builder.policy(policy);
    }
    let cluster = builder.build()?;
    let workers = options.workers.resolve();
    let mut supervision = SupervisionOptions::default();
    supervision.supervisor.workers = workers;
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
