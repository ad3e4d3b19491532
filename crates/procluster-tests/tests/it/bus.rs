//! The cluster bus with real workers: every subscriber gets every message
//! in order per publisher, slow subscribers hurt nobody, a killed worker
//! costs the others nothing, request/reply. Each check is a generic function
//! run against each backend.

use std::collections::BTreeMap;
use std::time::Duration;

use procluster::WorkerId;
use procluster::bus::{Bus, BusError, Limits, RedisOptions, Sender};
use procluster::primary::{Cluster, WorkerHandle};
use procluster_tests::bus::{BusCommand, BusReply, Collected, Echoed, Numbered, label};
use procluster_tests::redis::RedisServer;
use procluster_tests::*;

use crate::builder;

/// A cluster of `bus`-mode test workers around a bus.
pub(crate) struct BusCluster {
    pub(crate) cluster: Cluster,
    pub(crate) workers: Vec<WorkerHandle>,
    pub(crate) bus: Bus,
}

impl BusCluster {
    pub(crate) async fn start(bus: Bus, workers: usize) -> Self {
        let mut cluster = builder("bus")
            .workers(workers)
            .service(bus.service())
            .build()
            .unwrap();
        let handles = cluster.start().await.unwrap();
        online(&mut cluster, workers).await;
        Self {
            cluster,
            workers: handles,
            bus,
        }
    }

    pub(crate) async fn tell(&self, worker: usize, command: BusCommand) {
        self.workers[worker].send(&command).await.unwrap();
    }

    /// The next report of any worker (progress reports passed over: each
    /// keeps the deadline from running out while work goes on).
    pub(crate) async fn report(&mut self) -> (WorkerId, BusReply) {
        loop {
            let (worker, message) = message(&mut self.cluster).await;
            match message.decode().expect("a bus report") {
                BusReply::Progress(_) => continue,
                report => return (worker.id(), report),
            }
        }
    }

    /// The next `n` reports, by worker.
    pub(crate) async fn reports(&mut self, n: usize) -> Vec<(WorkerId, BusReply)> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.report().await);
        }
        out
    }

    /// Waits until `n` workers say their subscription is in place.
    pub(crate) async fn subscribed(&mut self, n: usize) {
        for (worker, report) in self.reports(n).await {
            match report {
                BusReply::Subscribed(Ok(())) | BusReply::Responding => {}
                other => panic!("worker {worker}: {other:?}"),
            }
        }
    }

    pub(crate) fn id(&self, worker: usize) -> WorkerId {
        self.workers[worker].id()
    }
}

fn collect(pattern: &str, expect: u64) -> BusCommand {
    BusCommand::Collect {
        pattern: pattern.into(),
        capacity: u32::try_from(expect).unwrap(),
        expect,
    }
}

fn publish(topic: &str, count: u64) -> BusCommand {
    BusCommand::Publish {
        topic: topic.into(),
        count,
        padding: 0,
    }
}

/// How collectors name worker `id` of `host`.
fn worker_label(id: WorkerId, host: Option<&str>) -> String {
    label(Sender::Worker(id), host)
}

/// What each publisher should have delivered to a subscriber.
fn everything_from(publishers: &[String], each: u64) -> Collected {
    Collected {
        total: each * publishers.len() as u64,
        per_sender: publishers.iter().map(|p| (p.clone(), each)).collect(),
        out_of_order: 0,
        ended_early: false,
    }
}

/// Reads `expect` messages from a subscription of the primary and sums
/// them up as a worker's `Collected`.
async fn collect_here(sub: &mut procluster::bus::Subscription, expect: u64) -> Collected {
    let mut seen = Collected::default();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    while seen.total < expect {
        let message = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .expect("timed out waiting for a bus message")
            .expect("the subscription ended");
        let numbered: Numbered = message.decode().unwrap();
        let sender = label(message.sender(), message.host());
        let expected = last.get(&sender).map_or(0, |s| s + 1);
        if numbered.seq != expected {
            seen.out_of_order += 1;
        }
        last.insert(sender.clone(), numbered.seq);
        seen.total += 1;
        *seen.per_sender.entry(sender).or_default() += 1;
    }
    seen
}

/// 4 workers each publish 10 000 messages; each worker (through an exact
/// topic, `*` or `>`) and the primary get all 40 000, each publisher's in
/// order, attributed to the worker that published them.
pub(crate) async fn every_subscriber_gets_every_message_in_order(bus: Bus, host: Option<&str>) {
    const EACH: u64 = 10_000;
    let mut c = BusCluster::start(bus, 4).await;
    let mut here = c
        .bus
        .subscribe_with("load.x", Limits::default().capacity(40_000))
        .await
        .unwrap();
    for (i, pattern) in ["load.x", "load.*", "load.>", ">"].iter().enumerate() {
        c.tell(i, collect(pattern, 4 * EACH)).await;
    }
    c.subscribed(4).await;
    for i in 0..4 {
        c.tell(i, publish("load.x", EACH)).await;
    }
    let publishers: Vec<String> = (0..4).map(|i| worker_label(c.id(i), host)).collect();
    let mut collected = 0;
    for (worker, report) in c.reports(8).await {
        match report {
            BusReply::Published(n) => assert_eq!(n, EACH),
            BusReply::Collected(seen) => {
                assert_eq!(seen, everything_from(&publishers, EACH), "worker {worker}");
                collected += 1;
            }
            other => panic!("worker {worker}: {other:?}"),
        }
    }
    assert_eq!(collected, 4);
    assert_eq!(
        collect_here(&mut here, 4 * EACH).await,
        everything_from(&publishers, EACH),
        "the primary's subscription"
    );
}

/// A subscriber that never reads holds at most its queue in the primary;
/// the publisher and another subscriber go on at full speed and lose
/// nothing. Under the disconnect policy, the deaf subscription is ended.
pub(crate) async fn a_subscriber_that_never_reads_hurts_nobody(bus: Bus, host: Option<&str>) {
    const COUNT: u64 = 20_000;
    let mut c = BusCluster::start(bus, 4).await;
    for (worker, disconnect) in [(0, false), (1, true)] {
        c.tell(
            worker,
            BusCommand::Deaf {
                pattern: "flood".into(),
                capacity: 100,
                disconnect,
            },
        )
        .await;
    }
    c.tell(2, collect("flood", COUNT)).await;
    c.subscribed(3).await;
    c.tell(
        3,
        BusCommand::Publish {
            topic: "flood".into(),
            count: COUNT,
            padding: 100,
        },
    )
    .await;
    for (worker, report) in c.reports(2).await {
        match report {
            BusReply::Published(n) => assert_eq!(n, COUNT),
            BusReply::Collected(seen) => {
                assert_eq!(seen, everything_from(&[worker_label(c.id(3), host)], COUNT))
            }
            other => panic!("worker {worker}: {other:?}"),
        }
    }
    if let Some(stats) = c.bus.stats() {
        // The deaf subscription's queue is full and stays at its bound.
        assert!(stats.queued <= 100, "{stats:?}");
        assert!(
            stats.dropped >= COUNT - 100 - 1024,
            "the deaf subscriber's overflow is counted: {stats:?}"
        );
        assert_eq!(stats.overflowed, 1, "{stats:?}");
    }
}

/// A subscriber killed while messages flow: the other subscribers get
/// everything.
pub(crate) async fn a_worker_killed_mid_stream_costs_the_others_nothing(
    bus: Bus,
    host: Option<&str>,
) {
    const EACH: u64 = 10_000;
    let mut c = BusCluster::start(bus, 5).await;
    for i in 0..3 {
        c.tell(i, collect("chaos.>", 2 * EACH)).await;
    }
    c.subscribed(3).await;
    c.tell(3, publish("chaos.a", EACH)).await;
    c.tell(4, publish("chaos.b", EACH)).await;
    let victim = c.workers[2].clone();
    victim.kill(procluster::Signal::KILL).unwrap();
    let publishers = [worker_label(c.id(3), host), worker_label(c.id(4), host)];
    let mut seen = 0;
    while seen < 4 {
        let (worker, report) = c.report().await;
        match report {
            BusReply::Published(n) => assert_eq!(n, EACH),
            BusReply::Collected(got) => {
                assert_ne!(worker, victim.id());
                assert_eq!(got, everything_from(&publishers, EACH), "worker {worker}");
            }
            other => panic!("worker {worker}: {other:?}"),
        }
        seen += 1;
    }
}

/// Requests reach a responder and come back with its answer and name; no
/// responder is an error at once; a silent responder is a timeout; the
/// primary asks and answers too.
pub(crate) async fn request_reply(bus: Bus, host: Option<&str>) {
    let mut c = BusCluster::start(bus, 3).await;
    c.tell(
        0,
        BusCommand::Respond {
            topic: "echo".into(),
        },
    )
    .await;
    c.tell(
        2,
        BusCommand::Deaf {
            pattern: "silent".into(),
            capacity: 10,
            disconnect: false,
        },
    )
    .await;
    let mut primary_side = c.bus.subscribe("primary.echo").await.unwrap();
    tokio::spawn(async move {
        while let Some(request) = primary_side.next().await {
            let asked: Echoed = request.decode().unwrap();
            let text = format!("{} from the primary", asked.text);
            request.respond(&Echoed { text }).await.unwrap();
        }
    });
    c.subscribed(2).await;
    let responder = c.id(0);

    let ask = |topic: &str, timeout_ms| BusCommand::Request {
        topic: topic.into(),
        text: "hi".into(),
        timeout_ms,
    };
    c.tell(1, ask("echo", 30_000)).await;
    let (_, answer) = c.report().await;
    let BusReply::Requested(Ok((text, sender))) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(text, format!("hi from worker {responder}"));
    assert_eq!(sender, worker_label(responder, host));

    c.tell(1, ask("primary.echo", 30_000)).await;
    let (_, answer) = c.report().await;
    let BusReply::Requested(Ok((text, sender))) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(text, "hi from the primary");
    assert_eq!(sender, label(Sender::Primary, host));

    // Nobody subscribes: an error at once, long before the timeout.
    c.tell(1, ask("nobody.home", 600_000)).await;
    let (_, answer) = c.report().await;
    let BusReply::Requested(Err(error)) = answer else {
        panic!("{answer:?}")
    };
    assert!(error.contains("no responder"), "{error}");

    // Someone subscribes but never answers: a timeout.
    c.tell(1, ask("silent", 200)).await;
    let (_, answer) = c.report().await;
    let BusReply::Requested(Err(error)) = answer else {
        panic!("{answer:?}")
    };
    assert!(
        error.contains("no reply") && error.contains("200ms"),
        "{error}"
    );

    // The primary asks a worker.
    let answer = c
        .bus
        .request_timeout("echo", &Echoed { text: "yo".into() }, DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        label(answer.sender(), answer.host()),
        worker_label(responder, host)
    );
    assert_eq!(
        answer.decode::<Echoed>().unwrap().text,
        format!("yo from worker {responder}")
    );
    let error = c
        .bus
        .request_timeout("nobody.home", &(), Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(matches!(error, BusError::NoResponders { .. }), "{error}");
}

/// Runs checks against each backend: the local bus, and Redis.
macro_rules! on_each_backend {
    ($($check:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(procluster::bus::Bus::local(), None).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test]
                async fn $check() {
                    let server = super::RedisServer::start();
                    let bus = super::redis_bus(&server, "a").await;
                    super::$check(bus, Some("a")).await;
                }
            )*
        }
    };
}

on_each_backend!(
    every_subscriber_gets_every_message_in_order,
    a_subscriber_that_never_reads_hurts_nobody,
    a_worker_killed_mid_stream_costs_the_others_nothing,
    request_reply,
);

/// A bus on `server`, whose primary calls itself `host`.
async fn redis_bus(server: &RedisServer, host: &str) -> Bus {
    let mut options = RedisOptions::default();
    options.host = Some(host.into());
    Bus::redis_with(&server.url(), options).await.unwrap()
}

/// Two primaries ("hosts") share one Redis: each of their 4 workers gets
/// all 40 000 messages of the 4, in order per publisher, each named with
/// its host; a request from one host is answered on the other.
#[tokio::test]
async fn two_hosts_share_one_bus_through_redis() {
    const EACH: u64 = 10_000;
    let server = RedisServer::start();
    let mut hosts = [
        BusCluster::start(redis_bus(&server, "a").await, 2).await,
        BusCluster::start(redis_bus(&server, "b").await, 2).await,
    ];
    for host in &hosts {
        for i in 0..2 {
            host.tell(i, collect("load.*", 4 * EACH)).await;
        }
    }
    for host in &mut hosts {
        host.subscribed(2).await;
    }
    for host in &hosts {
        for i in 0..2 {
            host.tell(i, publish("load.x", EACH)).await;
        }
    }
    let publishers: Vec<String> = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
        .iter()
        .map(|(name, i)| worker_label(hosts[usize::from(*name == "b")].id(*i), Some(name)))
        .collect();
    for host in &mut hosts {
        for (worker, report) in host.reports(4).await {
            match report {
                BusReply::Published(n) => assert_eq!(n, EACH),
                BusReply::Collected(seen) => {
                    assert_eq!(seen, everything_from(&publishers, EACH), "worker {worker}")
                }
                other => panic!("worker {worker}: {other:?}"),
            }
        }
    }
    // Request/reply across hosts.
    let [a, b] = &mut hosts;
    b.tell(
        0,
        BusCommand::Respond {
            topic: "echo".into(),
        },
    )
    .await;
    b.subscribed(1).await;
    a.tell(
        1,
        BusCommand::Request {
            topic: "echo".into(),
            text: "hi".into(),
            timeout_ms: 30_000,
        },
    )
    .await;
    let (_, answer) = a.report().await;
    let BusReply::Requested(Ok((text, sender))) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(text, format!("hi from worker {}", b.id(0)));
    assert_eq!(sender, worker_label(b.id(0), Some("b")));
}

#[tokio::test]
async fn bad_topics_are_clear_errors() {
    let bus = Bus::local();
    let error = bus.publish("a..b", &1).await.unwrap_err().to_string();
    assert!(error.contains("a..b") && error.contains("empty"), "{error}");
    let error = bus.subscribe("a.>.b").await.unwrap_err().to_string();
    assert!(error.contains("last token"), "{error}");
}

#[tokio::test]
async fn subscriptions_past_the_byte_budget_are_refused_with_a_clear_error() {
    let mut config = procluster::bus::BusConfig::default();
    config.bytes_per_worker = 10 << 20;
    let bus = Bus::local_with(config);
    let four_mib = Limits::default().max_bytes(4 << 20);
    let _a = bus.subscribe_with("a", four_mib).await.unwrap();
    let _b = bus.subscribe_with("b", four_mib).await.unwrap();
    let error = bus
        .subscribe_with("c", four_mib)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("bytes_per_worker"), "{error}");
    drop(_a);
    bus.subscribe_with("c", four_mib).await.unwrap();
    assert_eq!(bus.stats().unwrap().refused, 1);
}
