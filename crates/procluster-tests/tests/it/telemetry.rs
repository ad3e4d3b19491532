//! Telemetry: the cluster's metrics endpoint read by a real Prometheus
//! text-format parser, the health probes, and workers' logs gathered
//! through the primary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use procluster::primary::{Cluster, Event, Stdio};
use procluster::supervisor::{self, Readiness, Report, SupervisedCluster, SupervisionOptions};
use procluster::telemetry::{Aggregation, LogOutput, LogRecord, Telemetry};
use procluster::{Signal, WorkerId};
use procluster_tests::telemetry::{LogsDone, http_get};
use procluster_tests::*;

fn telemetry_worker() -> &'static str {
    env!("CARGO_BIN_EXE_telemetry-worker")
}

fn cluster_with(telemetry: &Telemetry, args: &[&str]) -> Cluster {
    Cluster::builder()
        .exec(telemetry_worker())
        .args(args.iter().copied())
        .stdio(Stdio::Null)
        .service(telemetry.clone())
        .build()
        .unwrap()
}

fn supervised_with(
    telemetry: &Telemetry,
    args: &[&str],
    workers: usize,
    ready_timeout: Duration,
) -> SupervisedCluster {
    let mut options = SupervisionOptions::default();
    options.supervisor.workers = workers;
    options.supervisor.backoff.initial = Duration::from_millis(10);
    options.supervisor.backoff.multiplier = 2.0;
    options.supervisor.backoff.max = Duration::from_millis(100);
    options.supervisor.backoff.jitter = 0.0;
    options.supervisor.ready_timeout = ready_timeout;
    options.supervisor.kill_timeout = Duration::from_secs(5);
    options.readiness = Readiness::Explicit;
    SupervisedCluster::start(cluster_with(telemetry, args), options).unwrap()
}

async fn endpoint(telemetry: &Telemetry) -> SocketAddr {
    telemetry.start().await.expect("metrics endpoint")
}

/// Reads reports, feeding them to the telemetry, until `pick` accepts one.
async fn observe_until<T>(
    supervised: &mut SupervisedCluster,
    telemetry: &Telemetry,
    mut pick: impl FnMut(&Report) -> Option<T>,
) -> T {
    loop {
        let report = next_supervised(supervised).await;
        telemetry.observe(&report);
        if let Some(found) = pick(&report) {
            return found;
        }
    }
}

async fn ready_workers(
    supervised: &mut SupervisedCluster,
    telemetry: &Telemetry,
    count: usize,
) -> Vec<WorkerId> {
    let mut ready = Vec::new();
    while ready.len() < count {
        let worker = observe_until(supervised, telemetry, |r| match r {
            Report::Supervisor(supervisor::Event::WorkerReady { worker, .. }) => Some(*worker),
            _ => None,
        })
        .await;
        ready.push(worker);
    }
    ready
}

async fn stop(supervised: SupervisedCluster, telemetry: &Telemetry) {
    supervised.handle().stop().unwrap();
    let (seen, outcome) = finish_supervised(supervised).await;
    for report in &seen {
        telemetry.observe(report);
    }
    outcome.unwrap();
}

/// Scrapes and parses the Prometheus text with a real parser.
async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let answer = http_get(addr, "/metrics", None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.content_type.starts_with("text/plain; version=0.0.4"));
    let lines = answer.body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the scrape parses as Prometheus text")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test]
async fn an_app_counter_of_three_workers_sums_in_one_scrape_that_a_real_parser_reads() {
    let telemetry = Telemetry::builder().metrics_addr("127.0.0.1:0").build();
    let mut supervised = supervised_with(&telemetry, &["count", "1000"], 3, DEADLINE);
    let addr = endpoint(&telemetry).await;
    ready_workers(&mut supervised, &telemetry, 3).await;
    let scrape = scrape(addr).await;
    assert_eq!(value(&scrape, "app_jobs_total", &[]), Some(3000.0));
    assert_eq!(
        value(&scrape, "procluster_workers", &[("state", "online")]),
        Some(3.0)
    );
    assert_eq!(value(&scrape, "procluster_workers_ready", &[]), Some(3.0));
    for slot in ["0", "1", "2"] {
        let rss = value(
            &scrape,
            "procluster_worker_resident_memory_bytes",
            &[("slot", slot)],
        )
        .expect("memory of every slot");
        assert!(rss > 100_000.0, "{rss}");
        let fds = value(&scrape, "procluster_worker_open_fds", &[("slot", slot)]).unwrap();
        assert!(fds >= 3.0, "{fds}");
        let frames = value(
            &scrape,
            "procluster_channel_frames_total",
            &[("slot", slot), ("direction", "from_worker")],
        )
        .unwrap();
        assert!(frames >= 2.0, "online, hello, ready, metrics: {frames}");
    }
    // OpenMetrics on request, ending as it must.
    let om = http_get(
        addr,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    )
    .await;
    assert!(om.content_type.starts_with("application/openmetrics-text"));
    assert!(om.body.contains("# TYPE app_jobs counter\n"));
    assert!(om.body.ends_with("# EOF\n"));
    stop(supervised, &telemetry).await;
}

#[tokio::test]
async fn per_worker_aggregation_labels_each_workers_series() {
    let telemetry = Telemetry::builder()
        .metrics_addr("127.0.0.1:0")
        .aggregation(Aggregation::PerWorker)
        .build();
    let mut supervised = supervised_with(&telemetry, &["count", "1000"], 3, DEADLINE);
    let addr = endpoint(&telemetry).await;
    let ids = ready_workers(&mut supervised, &telemetry, 3).await;
    let scrape = scrape(addr).await;
    for id in ids {
        let id = id.to_string();
        assert_eq!(
            value(&scrape, "app_jobs_total", &[("worker", &id)]),
            Some(1000.0)
        );
    }
    stop(supervised, &telemetry).await;
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_adds_one_restart_to_its_slot_with_cause_signal() {
    let telemetry = Telemetry::builder().metrics_addr("127.0.0.1:0").build();
    let mut supervised = supervised_with(&telemetry, &["count", "1"], 2, DEADLINE);
    let addr = endpoint(&telemetry).await;
    ready_workers(&mut supervised, &telemetry, 2).await;
    let before = scrape(addr).await;
    assert_eq!(
        value(
            &before,
            "procluster_worker_restarts_total",
            &[("slot", "0")]
        ),
        None
    );
    let status = supervised.handle().status().await.unwrap();
    let victim = status.workers.iter().find(|w| w.index == 0).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim.pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let victim_id = victim.id;
    observe_until(&mut supervised, &telemetry, |r| match r {
        Report::Supervisor(supervisor::Event::WorkerReady {
            slot: 0, worker, ..
        }) if *worker != victim_id => Some(()),
        _ => None,
    })
    .await;
    let after = scrape(addr).await;
    assert_eq!(
        value(
            &after,
            "procluster_worker_restarts_total",
            &[("slot", "0"), ("cause", "signal")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "procluster_worker_restarts_total", &[("slot", "1")]),
        None
    );
    stop(supervised, &telemetry).await;
}

#[tokio::test]
async fn readyz_flips_while_a_reload_waits_for_a_never_ready_worker_and_healthz_stays_up() {
    let telemetry = Telemetry::builder().metrics_addr("127.0.0.1:0").build();
    let mut supervised =
        supervised_with(&telemetry, &["ready-gen0-only"], 2, Duration::from_secs(2));
    let addr = endpoint(&telemetry).await;
    assert_eq!(http_get(addr, "/readyz", None).await.status, 503);
    ready_workers(&mut supervised, &telemetry, 2).await;
    assert_eq!(http_get(addr, "/readyz", None).await.status, 200);
    // A first worker slower than the ready timeout on a loaded machine
    // counts too: compare with what is there now.
    let timeouts = |scrape: &prometheus_parse::Scrape| {
        value(
            scrape,
            "procluster_worker_restarts_total",
            &[("slot", "0"), ("cause", "ready_timeout")],
        )
        .unwrap_or(0.0)
    };
    let timeouts_before = timeouts(&scrape(addr).await);
    let handle = supervised.handle();
    let reload = tokio::spawn(async move { handle.reload().await });
    observe_until(&mut supervised, &telemetry, |r| {
        matches!(
            r,
            Report::Supervisor(supervisor::Event::ReloadStarted { .. })
        )
        .then_some(())
    })
    .await;
    let during = http_get(addr, "/readyz", None).await;
    assert_eq!(during.status, 503, "{}", during.body);
    assert!(during.body.contains("reload"), "{}", during.body);
    assert_eq!(http_get(addr, "/healthz", None).await.status, 200);
    observe_until(&mut supervised, &telemetry, |r| {
        matches!(
            r,
            Report::Supervisor(supervisor::Event::ReloadFailed { .. })
        )
        .then_some(())
    })
    .await;
    assert!(reload.await.unwrap().is_err());
    let after = http_get(addr, "/readyz", None).await;
    assert_eq!(after.status, 200, "old workers serve: {}", after.body);
    let scrape = scrape(addr).await;
    assert_eq!(
        value(&scrape, "procluster_reloads_total", &[("result", "failed")]),
        Some(1.0)
    );
    assert_eq!(timeouts(&scrape), timeouts_before + 1.0);
    stop(supervised, &telemetry).await;
    assert_eq!(http_get(addr, "/readyz", None).await.status, 503);
    assert_eq!(http_get(addr, "/healthz", None).await.status, 503);
    assert_eq!(http_get(addr, "/nope", None).await.status, 404);
}

/// Log records by worker, as the primary's callback got them.
type Collected = Arc<Mutex<BTreeMap<WorkerId, Vec<LogRecord>>>>;

fn collecting() -> (Collected, LogOutput) {
    let collected: Collected = Arc::default();
    let sink = collected.clone();
    let output = LogOutput::Callback(Arc::new(move |record: &LogRecord| {
        sink.lock()
            .unwrap()
            .entry(record.worker)
            .or_default()
            .push(record.clone());
    }));
    (collected, output)
}

async fn logs_done(cluster: &mut Cluster, count: usize) -> BTreeMap<WorkerId, u64> {
    let mut done = BTreeMap::new();
    while done.len() < count {
        if let Event::Message { worker, message } = next(cluster).await {
            let LogsDone { dropped } = message.decode().unwrap();
            done.insert(worker.id(), dropped);
        }
    }
    done
}

#[tokio::test]
async fn logs_of_four_workers_arrive_whole_and_in_order_with_their_worker() {
    const EVENTS: u64 = 10_000;
    let (collected, output) = collecting();
    let telemetry = Telemetry::builder().logs(output).build();
    let mut cluster = cluster_with(&telemetry, &["log", &EVENTS.to_string()]);
    let mut pids = BTreeMap::new();
    for slot in 0..4 {
        let worker = cluster
            .fork_with(procluster::primary::ForkOptions {
                index: Some(slot),
                ..Default::default()
            })
            .await
            .unwrap();
        pids.insert(worker.id(), (slot, worker.pid()));
    }
    let done = logs_done(&mut cluster, 4).await;
    assert!(done.values().all(|d| *d == 0), "{done:?}");
    let collected = std::mem::take(&mut *collected.lock().unwrap());
    assert_eq!(collected.len(), 4);
    for (worker, records) in collected.iter() {
        let (slot, pid) = pids[worker];
        assert_eq!(records.len() as u64, EVENTS, "worker {worker}");
        for (seq, record) in records.iter().enumerate() {
            assert_eq!(record.message, format!("event {seq}"));
            assert_eq!(record.fields[0].0, "seq");
            assert_eq!(record.fields[0].1.to_string(), seq.to_string());
            assert_eq!((record.slot, record.pid), (Some(slot), pid));
            assert_eq!(record.level, tracing::Level::INFO);
            assert_eq!(record.spans[0].0, "batch");
            assert_eq!(record.spans[0].1[0].1.to_string(), worker.to_string());
        }
    }
    cluster.disconnect().await;
}

#[tokio::test]
async fn a_flooding_worker_drops_what_its_buffer_cannot_hold_and_the_primary_counts_it() {
    const EVENTS: u64 = 200_000;
    let (collected, output) = collecting();
    let telemetry = Telemetry::builder()
        .metrics_addr("127.0.0.1:0")
        .logs(output)
        .build();
    let mut cluster = cluster_with(&telemetry, &["flood", &EVENTS.to_string()]);
    let addr = endpoint(&telemetry).await;
    let worker = cluster.fork().await.unwrap();
    let done = logs_done(&mut cluster, 1).await;
    let dropped = done[&worker.id()];
    assert!(
        dropped > 0,
        "a burst of {EVENTS} events overflows the buffer"
    );
    let received = collected.lock().unwrap()[&worker.id()].len() as u64;
    assert_eq!(received + dropped, EVENTS);
    // What arrived is whole and in order, with gaps only where events were dropped.
    let seqs: Vec<u64> = collected.lock().unwrap()[&worker.id()]
        .iter()
        .map(|r| r.fields[0].1.to_string().parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let scrape = scrape(addr).await;
    let id = worker.id().to_string();
    assert_eq!(
        value(
            &scrape,
            "procluster_log_events_dropped_total",
            &[("worker", &id)]
        ),
        Some(dropped as f64)
    );
    assert_eq!(
        value(&scrape, "procluster_log_events_total", &[("worker", &id)]),
        Some(received as f64)
    );
    worker.kill(Signal::KILL).unwrap();
    while cluster.next_event().await.is_some() {}
}

async fn listening(
    telemetry: &Telemetry,
    mode: &str,
    policy: procluster::Policy,
) -> (Cluster, SocketAddr, SocketAddr) {
    let mut cluster = Cluster::builder()
        .exec(telemetry_worker())
        .args([mode])
        .stdio(Stdio::Null)
        .policy(policy)
        .service(telemetry.clone())
        .build()
        .unwrap();
    let endpoint = endpoint(telemetry).await;
    cluster.fork().await.unwrap();
    let (_, message) = message(&mut cluster).await;
    let address: String = message.decode().unwrap();
    (cluster, endpoint, address.parse().unwrap())
}

#[tokio::test]
async fn round_robin_connections_are_counted_per_worker() {
    let telemetry = Telemetry::builder().metrics_addr("127.0.0.1:0").build();
    let (cluster, endpoint, address) =
        listening(&telemetry, "listen-accept", procluster::Policy::RoundRobin).await;
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        // The worker closes each connection once it has it.
        let mut buf = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
    }
    // The worker's acknowledgements travel on its channel beside the
    // connections' close: wait for the count, up to the deadline.
    let handed = |scrape: &prometheus_parse::Scrape| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "procluster_connections_handed_total")
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let start = std::time::Instant::now();
    let scrape = loop {
        let scrape = scrape(endpoint).await;
        if handed(&scrape) >= 10.0 || start.elapsed() > DEADLINE {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(handed(&scrape), 10.0);
    assert_eq!(
        value(&scrape, "procluster_accept_errors_total", &[]),
        Some(0.0)
    );
    cluster.disconnect().await;
}

#[tokio::test]
async fn connections_nobody_accepts_show_in_the_listen_queue() {
    let telemetry = Telemetry::builder().metrics_addr("127.0.0.1:0").build();
    let (cluster, endpoint, address) =
        listening(&telemetry, "listen-hold", procluster::Policy::Shared).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    let scrape = scrape(endpoint).await;
    let listener = format!("tcp://{address}");
    assert_eq!(
        value(
            &scrape,
            "procluster_listen_queue_depth",
            &[("listener", &listener)]
        ),
        Some(5.0)
    );
    drop(clients);
    cluster.disconnect().await;
}
