//! Bus and store benchmarks, with 2 workers:
//!
//! a. broadcast throughput: worker 1 publishes N small messages on a topic
//!    both workers subscribe to; the time until both have all N;
//! b. broadcast latency, one way: worker 1 publishes one message at a time
//!    with a timestamp and waits for its own copy before the next; worker 2
//!    records how long each took to reach it;
//! c. store increments: one at a time from one worker (p50, p99 of the
//!    round trip), and from 2 workers with many in flight (operations/s).
//!
//! Beside them, in the same run: Node's cluster relaying through the primary
//! (`bench/node/bus.js`, the same two bus measurements), and a Redis server
//! on a Unix socket: raw `INCR` and `PUBLISH`→`SUBSCRIBE` through the
//! `redis` crate, and procluster's Redis backends doing a, b and c.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use procluster::Format;
use procluster::bus::{Bus, Limits};
use procluster::primary::{Cluster, Event, WorkerHandle};
use procluster::store::Store;
use procluster::worker::Worker;
use serde::{Deserialize, Serialize};

use crate::report::{Row, print_table, to_json};

/// Marks a bench worker of this module.
const WORKER_ENV: &str = "PROCLUSTER_BENCH_BUS";

#[derive(clap::Args)]
pub struct BusArgs {
    /// Messages in the broadcast throughput run.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Timed messages in the latency run, and timed increments one at a time.
    #[arg(long, default_value_t = 10_000)]
    pings: u64,
    /// Increments per worker in the throughput run.
    #[arg(long, default_value_t = 200_000)]
    increments: u64,
    /// Increments in flight per worker in the throughput run.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Skip the Node side.
    #[arg(long)]
    no_node: bool,
    /// Skip the Redis side.
    #[arg(long)]
    no_redis: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum Cmd {
    /// Subscribe to "b" and report `Ready`, then `Received` after `n`.
    Collect(u64),
    /// Publish `n` messages on "b".
    Flood(u64),
    /// Subscribe to "lat", report `Ready`, and measure `n` arrivals.
    Measure(u64),
    /// Publish `n` timestamped messages on "lat", one at a time.
    Pace(u64),
    /// `n` increments of "k", `in_flight` at a time.
    Incr { n: u64, in_flight: usize },
}

#[derive(Debug, Serialize, Deserialize)]
enum Done {
    Ready,
    Received,
    Paced,
    Latency { p50_us: f64, p99_us: f64 },
    Incremented { p50_us: f64, p99_us: f64 },
}

pub fn is_bus_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

#[derive(Serialize, Deserialize)]
struct Stamp {
    at_us: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let pick =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (pick(0.50), pick(0.99))
}

pub async fn worker_main(worker: Worker) {
    let bus = Bus::open(&worker).await.expect("bus");
    let store = Store::open(&worker).await.expect("store");
    while let Some(message) = worker.recv().await {
        let cmd: Cmd = message.decode().expect("bench command");
        let (worker, bus, store) = (worker.clone(), bus.clone(), store.clone());
        tokio::spawn(async move {
            let done = obey(&worker, &bus, &store, cmd).await;
            worker.send(&done).await.expect("report");
        });
    }
}

async fn obey(worker: &Worker, bus: &Bus, store: &Store, cmd: Cmd) -> Done {
    let capacity = |n: u64| Limits::default().capacity(u32::try_from(n).unwrap_or(u32::MAX));
    match cmd {
        Cmd::Collect(n) => {
            let mut sub = bus.subscribe_with("b", capacity(n)).await.expect("sub");
            worker.send(&Done::Ready).await.expect("ready");
            for _ in 0..n {
                sub.next().await.expect("message");
            }
            assert_eq!(sub.dropped(), 0);
            Done::Received
        }
        Cmd::Flood(n) => {
            for i in 0..n {
                bus.publish("b", &i).await.expect("publish");
            }
            Done::Paced
        }
        Cmd::Measure(n) => {
            let mut sub = bus.subscribe_with("lat", capacity(n)).await.expect("sub");
            worker.send(&Done::Ready).await.expect("ready");
            let mut samples = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let stamp: Stamp = sub.next().await.expect("message").decode().expect("stamp");
                samples.push(now_us().saturating_sub(stamp.at_us) as f64);
            }
            let (p50_us, p99_us) = percentiles(samples);
            Done::Latency { p50_us, p99_us }
        }
        Cmd::Pace(n) => {
            let mut own = bus.subscribe_with("lat", capacity(n)).await.expect("sub");
            for _ in 0..n {
                bus.publish("lat", &Stamp { at_us: now_us() })
                    .await
                    .expect("pub");
                own.next().await.expect("own copy");
            }
            Done::Paced
        }
        Cmd::Incr { n, in_flight } => {
            use futures_util::StreamExt;
            let samples: Vec<f64> = futures_util::stream::iter(0..n)
                .map(|_| async {
                    let start = Instant::now();
                    store.incr("k", 1).await.expect("incr");
                    start.elapsed().as_secs_f64() * 1e6
                })
                .buffer_unordered(in_flight.max(1))
                .collect()
                .await;
            let (p50_us, p99_us) = percentiles(samples);
            Done::Incremented { p50_us, p99_us }
        }
    }
}

/// A cluster of 2 bench workers around a bus and a store.
struct Bench {
    cluster: Cluster,
    workers: Vec<WorkerHandle>,
}

impl Bench {
    async fn start(bus: &Bus, store: &Store) -> Self {
        let mut cluster = Cluster::builder()
            .workers(2)
            .format(Format::Binary)
            .env(WORKER_ENV, "1")
            .service(bus.service())
            .service(store.service())
            .build()
            .expect("cluster");
        let workers = cluster.start().await.expect("start");
        let mut online = 0;
        while online < 2 {
            if let Event::Online(_) = cluster.next_event().await.expect("event") {
                online += 1;
            }
        }
        Self { cluster, workers }
    }

    async fn tell(&self, worker: usize, cmd: Cmd) {
        self.workers[worker].send(&cmd).await.expect("send");
    }

    async fn done(&mut self) -> Done {
        loop {
            match self.cluster.next_event().await.expect("event") {
                Event::Message { message, .. } => return message.decode().expect("done"),
                Event::Exit { worker, status, .. } => {
                    panic!("bench worker {} exited: {status}", worker.id())
                }
                _ => {}
            }
        }
    }

    async fn stop(mut self) {
        for worker in &self.workers {
            worker.disconnect();
        }
        while self.cluster.next_event().await.is_some() {}
    }

    /// Broadcast throughput, messages/s.
    async fn throughput(&mut self, n: u64) -> f64 {
        self.tell(0, Cmd::Collect(n)).await;
        self.tell(1, Cmd::Collect(n)).await;
        for _ in 0..2 {
            assert!(matches!(self.done().await, Done::Ready));
        }
        let start = Instant::now();
        self.tell(0, Cmd::Flood(n)).await;
        let mut received = 0;
        while received < 2 {
            if let Done::Received = self.done().await {
                received += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    }

    /// One-way broadcast latency, p50 and p99 in µs.
    async fn latency(&mut self, n: u64) -> (f64, f64) {
        self.tell(1, Cmd::Measure(n)).await;
        assert!(matches!(self.done().await, Done::Ready));
        self.tell(0, Cmd::Pace(n)).await;
        let mut result = None;
        let mut paced = false;
        while result.is_none() || !paced {
            match self.done().await {
                Done::Latency { p50_us, p99_us } => result = Some((p50_us, p99_us)),
                Done::Paced => paced = true,
                other => panic!("{other:?}"),
            }
        }
        result.unwrap_or_default()
    }

    /// Increments one at a time from worker 1: p50 and p99 in µs.
    async fn increment_latency(&mut self, n: u64) -> (f64, f64) {
        self.tell(0, Cmd::Incr { n, in_flight: 1 }).await;
        match self.done().await {
            Done::Incremented { p50_us, p99_us } => (p50_us, p99_us),
            other => panic!("{other:?}"),
        }
    }

    /// Increments from both workers, `in_flight` each: operations/s.
    async fn increment_rate(&mut self, n: u64, in_flight: usize) -> f64 {
        let start = Instant::now();
        self.tell(0, Cmd::Incr { n, in_flight }).await;
        self.tell(1, Cmd::Incr { n, in_flight }).await;
        for _ in 0..2 {
            assert!(matches!(self.done().await, Done::Incremented { .. }));
        }
        (2 * n) as f64 / start.elapsed().as_secs_f64()
    }
}

/// The figures of one backend.
#[derive(Default)]
struct Figures {
    broadcast: f64,
    latency: (f64, f64),
    incr: (f64, f64),
    incr_rate: f64,
}

async fn measure(args: &BusArgs, bus: Bus, store: Store) -> Figures {
    let mut bench = Bench::start(&bus, &store).await;
    // Warm-up, untimed.
    bench.throughput(args.messages / 10).await;
    let figures = Figures {
        broadcast: bench.throughput(args.messages).await,
        latency: bench.latency(args.pings).await,
        incr: bench.increment_latency(args.pings).await,
        incr_rate: bench.increment_rate(args.increments, args.in_flight).await,
    };
    bench.stop().await;
    figures
}

/// A redis-server of the bench's own on a Unix socket.
pub(crate) struct RedisServer {
    child: Child,
    dir: PathBuf,
}

impl RedisServer {
    pub(crate) fn start() -> Option<Self> {
        let dir =
            std::env::temp_dir().join(format!("procluster-bench-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(dir.join("redis.sock"))
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) => {
                eprintln!("cannot start redis-server ({error}); Redis rows left out");
                return None;
            }
        };
        let server = Self { child, dir };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(server.socket()).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                eprintln!("redis-server did not come up; Redis rows left out");
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(server)
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    pub(crate) fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Raw `redis` crate figures: INCR one at a time and pipelined, PUBLISH to
/// a subscriber.
struct RawRedis {
    incr: (f64, f64),
    incr_rate: f64,
    broadcast: f64,
    latency: (f64, f64),
}

async fn raw_redis(args: &BusArgs, url: &str) -> redis::RedisResult<RawRedis> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut samples = Vec::new();
    for _ in 0..args.pings {
        let start = Instant::now();
        let _: i64 = redis::cmd("INCR")
            .arg("raw")
            .query_async(&mut connection)
            .await?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let incr = percentiles(samples);
    // Pipelined: batches of `in_flight`, from two connections at once.
    let pipelined = |mut connection: redis::aio::MultiplexedConnection| {
        let (n, batch) = (args.increments, args.in_flight.max(1) as u64);
        async move {
            let mut done = 0;
            while done < n {
                let mut pipe = redis::pipe();
                for _ in 0..batch.min(n - done) {
                    pipe.cmd("INCR").arg("raw").ignore();
                }
                pipe.query_async::<()>(&mut connection).await?;
                done += batch;
            }
            redis::RedisResult::Ok(())
        }
    };
    let other = client.get_multiplexed_async_connection().await?;
    let start = Instant::now();
    let (a, b) = tokio::join!(pipelined(connection.clone()), pipelined(other));
    a?;
    b?;
    let incr_rate = (2 * args.increments) as f64 / start.elapsed().as_secs_f64();

    // PUBLISH → SUBSCRIBE: two subscriber connections, one publisher.
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe("raw.b").await?;
        pubsub.subscribe("raw.lat").await?;
        subscribers.push(pubsub.into_on_message());
    }
    let n = args.messages;
    let start = Instant::now();
    let publisher = async {
        let mut sent = 0;
        while sent < n {
            let mut pipe = redis::pipe();
            for i in sent..(sent + 256).min(n) {
                pipe.cmd("PUBLISH").arg("raw.b").arg(i).ignore();
            }
            pipe.query_async::<()>(&mut connection.clone()).await?;
            sent = (sent + 256).min(n);
        }
        redis::RedisResult::Ok(())
    };
    let (first, second) = subscribers.split_at_mut(1);
    let (published, (), ()) = tokio::join!(
        publisher,
        receive(&mut first[0], n),
        receive(&mut second[0], n)
    );
    published?;
    let broadcast = n as f64 / start.elapsed().as_secs_f64();

    // One way, one at a time: the publisher waits for the message to arrive.
    let mut samples = Vec::new();
    for _ in 0..args.pings {
        let start = Instant::now();
        let _: i64 = redis::cmd("PUBLISH")
            .arg("raw.lat")
            .arg(1)
            .query_async(&mut connection)
            .await?;
        {
            use futures_util::StreamExt;
            subscribers[1].next().await.expect("a message");
        }
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        use futures_util::StreamExt;
        subscribers[0].next().await.expect("a message");
    }
    let latency = percentiles(samples);
    Ok(RawRedis {
        incr,
        incr_rate,
        broadcast,
        latency,
    })
}

async fn receive(stream: &mut redis::aio::PubSubStream, count: u64) {
    use futures_util::StreamExt;
    for _ in 0..count {
        stream.next().await.expect("a message");
    }
}

fn node_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/node/bus.js")
}

fn run_node(args: &BusArgs) -> Option<serde_json::Value> {
    if args.no_node {
        return None;
    }
    let output = Command::new("node")
        .arg(node_script())
        .args(["--messages", &args.messages.to_string()])
        .args(["--pings", &args.pings.to_string()])
        .stderr(Stdio::inherit())
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            serde_json::from_str(stdout.lines().last()?).ok()
        }
        Ok(output) => {
            eprintln!("node bench failed: {}", output.status);
            None
        }
        Err(error) => {
            eprintln!("cannot run node ({error}); Node columns left empty");
            None
        }
    }
}

pub async fn run(args: BusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let node = run_node(&args);
    let node_field = |path: &[&str]| {
        let mut value = node.as_ref()?;
        for key in path {
            value = value.get(key)?;
        }
        value.as_f64()
    };
    let local = measure(&args, Bus::local(), Store::local()).await;
    let server = if args.no_redis {
        None
    } else {
        RedisServer::start()
    };
    let mut on_redis = None;
    let mut raw = None;
    if let Some(server) = &server {
        raw = Some(raw_redis(&args, &server.url()).await?);
        let bus = Bus::redis(&server.url()).await?;
        let store = Store::redis(&server.url()).await?;
        on_redis = Some(measure(&args, bus, store).await);
    }
    let raw_field = |pick: fn(&RawRedis) -> f64| raw.as_ref().map(pick);
    let mut rows = vec![
        Row::compared(
            "broadcast 1 → 2 workers, local bus vs Node relay",
            "msg/s",
            local.broadcast,
            node_field(&["throughput", "msgs_per_sec"]),
            true,
        ),
        Row::compared(
            "broadcast latency p50, local bus vs Node relay",
            "µs",
            local.latency.0,
            node_field(&["latency", "p50_us"]),
            false,
        ),
        Row::compared(
            "broadcast latency p99, local bus vs Node relay",
            "µs",
            local.latency.1,
            node_field(&["latency", "p99_us"]),
            false,
        ),
        Row::compared(
            "broadcast 1 → 2 workers, local bus vs raw Redis PUBLISH",
            "msg/s",
            local.broadcast,
            raw_field(|r| r.broadcast),
            true,
        ),
        Row::compared(
            "store incr p50, local vs raw Redis INCR",
            "µs",
            local.incr.0,
            raw_field(|r| r.incr.0),
            false,
        ),
        Row::compared(
            "store incr p99, local vs raw Redis INCR",
            "µs",
            local.incr.1,
            raw_field(|r| r.incr.1),
            false,
        ),
        Row::compared(
            "store incr, 2 workers in flight, local vs Redis pipelined",
            "op/s",
            local.incr_rate,
            raw_field(|r| r.incr_rate),
            true,
        ),
    ];
    if let (Some(redis), Some(raw)) = (&on_redis, &raw) {
        rows.extend([
            Row::compared(
                "broadcast 1 → 2 workers, Redis bus vs raw PUBLISH",
                "msg/s",
                redis.broadcast,
                Some(raw.broadcast),
                true,
            ),
            Row::compared(
                "broadcast latency p50, Redis bus vs raw PUBLISH",
                "µs",
                redis.latency.0,
                Some(raw.latency.0),
                false,
            ),
            Row::compared(
                "store incr p50, Redis store vs raw INCR",
                "µs",
                redis.incr.0,
                Some(raw.incr.0),
                false,
            ),
            Row::compared(
                "store incr, 2 workers in flight, Redis store vs pipelined",
                "op/s",
                redis.incr_rate,
                Some(raw.incr_rate),
                true,
            ),
        ]);
    }
    print_table(&rows, "procluster", "reference");
    println!("{}", to_json(&rows));
    Ok(())
}
