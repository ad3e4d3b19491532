//! The cluster's store with real workers: atomic increments, CAS under
//! contention, TTL, watch, worker restarts, limits, snapshots. Each check is
//! a generic function run against each backend.

use std::time::Duration;

use procluster::WorkerId;
use procluster::primary::{Cluster, WorkerHandle};
use procluster::store::{ChangeKind, Limits, Store, StoreConfig, StoreError};
use procluster_tests::redis::RedisServer;
use procluster_tests::store::{Seen, StoreCommand, StoreReply};
use procluster_tests::*;

use crate::builder;

/// Which backend a check runs against, where their behaviour differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Local,
    Redis,
}

/// A cluster of `store`-mode test workers around a store.
pub(crate) struct StoreCluster {
    pub(crate) cluster: Cluster,
    pub(crate) workers: Vec<WorkerHandle>,
    pub(crate) store: Store,
}

impl StoreCluster {
    pub(crate) async fn start(store: Store, workers: usize) -> Self {
        let mut cluster = builder("store")
            .workers(workers)
            .service(store.service())
            .build()
            .unwrap();
        let handles = cluster.start().await.unwrap();
        online(&mut cluster, workers).await;
        Self {
            cluster,
            workers: handles,
            store,
        }
    }

    pub(crate) async fn tell(&self, worker: usize, command: StoreCommand) {
        self.workers[worker].send(&command).await.unwrap();
    }

    /// The next report of any worker, progress reports passed over.
    pub(crate) async fn report(&mut self) -> (WorkerId, StoreReply) {
        loop {
            let (worker, message) = message(&mut self.cluster).await;
            match message.decode().expect("a store report") {
                StoreReply::Progress(_) => continue,
                report => return (worker.id(), report),
            }
        }
    }

    /// Asks one worker and returns its report.
    pub(crate) async fn ask(&mut self, worker: usize, command: StoreCommand) -> StoreReply {
        self.tell(worker, command).await;
        self.report().await.1
    }
}

/// 4 workers × 10 000 increments of one key, 64 in flight each: exactly
/// 40 000.
pub(crate) async fn increments_from_every_worker_all_count(store: Store, _: Backend) {
    let mut c = StoreCluster::start(store, 4).await;
    for i in 0..4 {
        c.tell(
            i,
            StoreCommand::Incr {
                key: "hits".into(),
                times: 10_000,
                in_flight: 64,
            },
        )
        .await;
    }
    for _ in 0..4 {
        let (worker, report) = c.report().await;
        assert!(
            matches!(report, StoreReply::Incremented(10_000)),
            "worker {worker}: {report:?}"
        );
    }
    assert_eq!(c.store.get::<i64>("hits").await.unwrap(), Some(40_000));
}

/// Compare-and-swap loops from 4 workers on one key lose no update.
pub(crate) async fn compare_and_swap_under_contention_loses_nothing(store: Store, _: Backend) {
    let mut c = StoreCluster::start(store, 4).await;
    for i in 0..4 {
        c.tell(
            i,
            StoreCommand::CasIncr {
                key: "cas".into(),
                times: 300,
            },
        )
        .await;
    }
    for _ in 0..4 {
        let (worker, report) = c.report().await;
        assert!(
            matches!(report, StoreReply::Swapped { .. }),
            "worker {worker}: {report:?}"
        );
    }
    assert_eq!(c.store.get::<i64>("cas").await.unwrap(), Some(1200));
    // A swap against a stale value fails and changes nothing.
    assert!(
        !c.store
            .compare_and_swap("cas", Some(&7), Some(&8))
            .await
            .unwrap()
    );
    assert!(
        c.store
            .compare_and_swap("cas", Some(&1200), None::<&i64>)
            .await
            .unwrap()
    );
    assert_eq!(c.store.get::<i64>("cas").await.unwrap(), None);
}

/// A key set with a time to live disappears; on the local store, watches
/// hear it expire (Redis expires keys itself and tells nobody).
pub(crate) async fn keys_expire_after_their_ttl(store: Store, backend: Backend) {
    let mut c = StoreCluster::start(store, 1).await;
    let mut watch = c.store.watch("session").await.unwrap();
    let set = StoreCommand::Set {
        key: "session".into(),
        value: 42,
        ttl_ms: Some(300),
    };
    assert!(matches!(c.ask(0, set).await, StoreReply::Done(Ok(()))));
    let first = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("no change seen")
        .expect("the watch ended");
    assert_eq!((first.key(), first.kind()), ("session", ChangeKind::Set));
    match backend {
        Backend::Local => {
            let expired = tokio::time::timeout(DEADLINE, watch.next())
                .await
                .expect("the key did not expire in time")
                .expect("the watch ended");
            assert_eq!(expired.kind(), ChangeKind::Expired);
        }
        Backend::Redis => {
            // Nothing to wait on: look until the key is gone.
            let start = std::time::Instant::now();
            while c.store.get::<i64>("session").await.unwrap().is_some() {
                assert!(start.elapsed() < DEADLINE, "the key did not expire in time");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let get = StoreCommand::Get {
        key: "session".into(),
    };
    assert!(matches!(c.ask(0, get).await, StoreReply::Value(Ok(None))));
    // get_or_insert keeps the first value.
    for value in [1, 2] {
        let goi = StoreCommand::GetOrInsert {
            key: "first".into(),
            value,
        };
        assert!(matches!(
            c.ask(0, goi).await,
            StoreReply::Value(Ok(Some(1)))
        ));
    }
}

/// A watch in a worker and one in the primary see every change of their
/// prefix, in the order the changes happened.
pub(crate) async fn watch_sees_every_change_in_order(store: Store, _: Backend) {
    const EACH: u64 = 1000;
    let mut c = StoreCluster::start(store, 3).await;
    let mut here = c
        .store
        .watch_prefix_with("w.", Limits::default().capacity(10_000))
        .await
        .unwrap();
    c.tell(
        0,
        StoreCommand::Watch {
            prefix: "w.".into(),
            expect: 2 * EACH as usize,
        },
    )
    .await;
    assert!(matches!(c.report().await.1, StoreReply::Watching));
    c.tell(
        1,
        StoreCommand::Incr {
            key: "w.a".into(),
            times: EACH,
            in_flight: 1,
        },
    )
    .await;
    c.tell(
        2,
        StoreCommand::CasIncr {
            key: "w.b".into(),
            times: EACH,
        },
    )
    .await;
    // A key outside the prefix is not seen.
    c.store.set("x.other", &1).await.unwrap();
    let mut from_worker = None;
    for _ in 0..3 {
        if let (_, StoreReply::Changes(seen)) = c.report().await {
            from_worker = Some(seen);
        }
    }
    let mut seen_here = Vec::new();
    while seen_here.len() < 2 * EACH as usize {
        let change = tokio::time::timeout(DEADLINE, here.next())
            .await
            .expect("timed out waiting for a change")
            .expect("the watch ended");
        seen_here.push(Seen::of(&change));
    }
    for seen in [seen_here, from_worker.expect("the worker's changes")] {
        assert_eq!(seen.len(), 2 * EACH as usize);
        for key in ["w.a", "w.b"] {
            let values: Vec<i64> = seen
                .iter()
                .filter(|s| s.key == key)
                .map(|s| s.value.unwrap())
                .collect();
            assert_eq!(values, (1..=EACH as i64).collect::<Vec<_>>(), "{key}");
        }
        assert!(
            seen.windows(2).all(|w| w[0].revision < w[1].revision),
            "revisions increase"
        );
    }
}

/// What a worker stored is still there after it is SIGKILLed, for the
/// worker that replaces it.
pub(crate) async fn the_store_outlives_worker_restarts(store: Store, _: Backend) {
    let mut c = StoreCluster::start(store, 1).await;
    let set = StoreCommand::Set {
        key: "kept".into(),
        value: 7,
        ttl_ms: None,
    };
    assert!(matches!(c.ask(0, set).await, StoreReply::Done(Ok(()))));
    let first = c.workers[0].clone();
    first.kill(procluster::Signal::KILL).unwrap();
    exit_of(&mut c.cluster, first.id()).await;
    let second = c.cluster.fork().await.unwrap();
    online(&mut c.cluster, 1).await;
    c.workers[0] = second;
    let get = StoreCommand::Get { key: "kept".into() };
    assert!(matches!(
        c.ask(0, get).await,
        StoreReply::Value(Ok(Some(7)))
    ));
}

/// Runs checks against each backend: the local store, and Redis.
macro_rules! on_each_backend {
    ($($check:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(procluster::store::Store::local(), super::Backend::Local).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test]
                async fn $check() {
                    let server = super::RedisServer::start();
                    let store = procluster::store::Store::redis(&server.url()).await.unwrap();
                    super::$check(store, super::Backend::Redis).await;
                }
            )*
        }
    };
}

on_each_backend!(
    increments_from_every_worker_all_count,
    compare_and_swap_under_contention_loses_nothing,
    keys_expire_after_their_ttl,
    watch_sees_every_change_in_order,
    the_store_outlives_worker_restarts,
);

/// Two primaries ("hosts") share one store through Redis: their workers'
/// increments and swaps all count, and a watch on one host sees the other
/// host's changes.
#[tokio::test]
async fn two_hosts_share_one_store_through_redis() {
    let server = RedisServer::start();
    let mut hosts = [
        StoreCluster::start(Store::redis(&server.url()).await.unwrap(), 2).await,
        StoreCluster::start(Store::redis(&server.url()).await.unwrap(), 2).await,
    ];
    let mut watch = hosts[0].store.watch("shared.name").await.unwrap();
    for host in &hosts {
        for i in 0..2 {
            host.tell(
                i,
                StoreCommand::Incr {
                    key: "hits".into(),
                    times: 10_000,
                    in_flight: 64,
                },
            )
            .await;
            host.tell(
                i,
                StoreCommand::CasIncr {
                    key: "cas".into(),
                    times: 100,
                },
            )
            .await;
        }
    }
    for host in &mut hosts {
        for _ in 0..4 {
            let (worker, report) = host.report().await;
            assert!(
                matches!(
                    report,
                    StoreReply::Incremented(_) | StoreReply::Swapped { .. }
                ),
                "worker {worker}: {report:?}"
            );
        }
    }
    for host in &hosts {
        assert_eq!(host.store.get::<i64>("hits").await.unwrap(), Some(40_000));
        assert_eq!(host.store.get::<i64>("cas").await.unwrap(), Some(400));
    }
    let set = StoreCommand::Set {
        key: "shared.name".into(),
        value: 5,
        ttl_ms: None,
    };
    assert!(matches!(
        hosts[1].ask(0, set).await,
        StoreReply::Done(Ok(()))
    ));
    let change = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("no change seen across hosts")
        .unwrap();
    assert_eq!(
        (change.key(), change.value::<i64>().unwrap()),
        ("shared.name", Some(5))
    );
}

/// In the binary format, integers are varints: Redis increments them
/// through a script, and they read back as integers.
#[tokio::test]
async fn redis_increments_in_the_binary_format() {
    let server = RedisServer::start();
    let store = Store::redis(&server.url()).await.unwrap();
    let mut cluster = builder("store")
        .workers(2)
        .format(procluster::Format::Binary)
        .service(store.service())
        .build()
        .unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 2).await;
    for worker in &workers {
        worker
            .send(&StoreCommand::Incr {
                key: "n".into(),
                times: 1000,
                in_flight: 16,
            })
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let (_, message) = message(&mut cluster).await;
        let report: StoreReply = message.decode().unwrap();
        assert!(
            matches!(report, StoreReply::Incremented(1000)),
            "{report:?}"
        );
    }
    assert_eq!(store.get::<i64>("n").await.unwrap(), Some(2000));
    assert_eq!(store.incr("n", -2001).await.unwrap(), -1);
    store.set("text", &"not a number").await.unwrap();
    let error = store.incr("text", 1).await.unwrap_err();
    assert!(matches!(error, StoreError::NotANumber { .. }), "{error}");
}

#[tokio::test]
async fn a_full_store_refuses_with_a_clear_error_and_keeps_what_it_has() {
    let mut config = StoreConfig::default();
    config.max_keys = 1;
    let store = Store::local_with(config).unwrap();
    let mut c = StoreCluster::start(store, 1).await;
    let set = |key: &str| StoreCommand::Set {
        key: key.into(),
        value: 1,
        ttl_ms: None,
    };
    assert!(matches!(c.ask(0, set("a")).await, StoreReply::Done(Ok(()))));
    let StoreReply::Done(Err(error)) = c.ask(0, set("b")).await else {
        panic!("a second key fit")
    };
    assert!(
        error.contains("full") && error.contains("max_keys"),
        "{error}"
    );
    assert_eq!(c.store.get::<i64>("a").await.unwrap(), Some(1));
    assert_eq!(c.store.stats().unwrap().refused, 1);
}

#[tokio::test]
async fn a_snapshot_saved_on_drop_is_loaded_on_start() {
    let dir = TempDir::new("store-snapshot");
    let mut config = StoreConfig::default();
    config.snapshot = Some(dir.0.join("store.snapshot"));
    let store = Store::local_with(config.clone()).unwrap();
    store.set("name", &"alice").await.unwrap();
    store.incr("count", 3).await.unwrap();
    store
        .set_ttl("short", &1, Duration::from_secs(3600))
        .await
        .unwrap();
    drop(store);
    let again = Store::local_with(config.clone()).unwrap();
    assert_eq!(
        again.get::<String>("name").await.unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(again.get::<i64>("count").await.unwrap(), Some(3));
    assert_eq!(again.get::<i64>("short").await.unwrap(), Some(1));
    again.save_snapshot().unwrap();
    std::fs::write(config.snapshot.as_ref().unwrap(), b"garbage").unwrap();
    let error = Store::local_with(config).unwrap_err().to_string();
    assert!(error.contains("not a procluster store snapshot"), "{error}");
}
