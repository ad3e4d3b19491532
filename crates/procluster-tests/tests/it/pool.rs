//! Work pools with real worker processes: results come back, no task is
//! lost when workers die or hang, poison tasks fail alone, the queue is
//! bounded, cancellation reaches queued and running tasks, reloads fail
//! nothing, and workers submit too.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use procluster::pool::{Attempt, AttemptFailure, Order, Pool, PoolConfig, PoolError};
use procluster::primary::Cluster;
use procluster::supervisor::{
    BreakerConfig, CrashCause, Readiness, Report, SupervisedCluster, SupervisionOptions,
};
use procluster::{ExitStatus, Signal};
use procluster_tests::*;

use crate::builder;

type TestPool = Pool<PoolTask, PoolAnswer>;

fn pool(config: PoolConfig) -> TestPool {
    Pool::new(TEST_POOL, config)
}

/// A plain cluster of `workers` test workers serving `pool`.
async fn cluster(pool: &TestPool, workers: usize) -> Cluster {
    let mut cluster = builder("pool")
        .service(pool.clone())
        .workers(workers)
        .build()
        .unwrap();
    cluster.start().await.unwrap();
    cluster
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Supervision that restarts at once and never gives up, unless told.
fn supervision(workers: usize, breaker: Option<BreakerConfig>) -> SupervisionOptions {
    let mut options = SupervisionOptions::default();
    options.supervisor.workers = workers;
    options.supervisor.backoff.initial = Duration::from_millis(5);
    options.supervisor.backoff.multiplier = 1.0;
    options.supervisor.backoff.max = Duration::from_millis(5);
    options.supervisor.backoff.jitter = 0.0;
    options.supervisor.breaker = breaker;
    options.readiness = Readiness::Explicit;
    options
}

/// Reads a supervised cluster's reports in a task of its own until it
/// ends, keeping them.
fn collect_reports(mut supervised: SupervisedCluster) -> tokio::task::JoinHandle<Vec<Report>> {
    tokio::spawn(async move {
        let mut reports = Vec::new();
        while let Some(report) = supervised.next_event().await {
            reports.push(report);
        }
        reports
    })
}

#[tokio::test]
async fn tasks_submitted_in_the_primary_come_back_one_by_one_and_in_batches() {
    let pool = pool(PoolConfig {
        concurrency: 2,
        ..PoolConfig::default()
    });
    let _cluster = cluster(&pool, 2).await;
    let answer = within("a result", pool.submit(PoolTask::Echo(7)))
        .await
        .unwrap();
    assert_eq!(answer.n, 7);
    let answer = within("a result", pool.try_submit(PoolTask::Echo(8)))
        .await
        .unwrap();
    assert_eq!(answer.n, 8);

    let tasks = (0..100).map(|n| PoolTask::Work { n, millis: 2 });
    let mut batch = pool.submit_all(tasks, Order::Submitted);
    let mut in_order = Vec::new();
    let mut workers = BTreeSet::new();
    while let Some(result) = within("a batch result", batch.next()).await {
        let answer = result.unwrap();
        in_order.push(answer.n);
        workers.insert(answer.worker);
    }
    assert_eq!(in_order, (0..100).collect::<Vec<_>>());
    assert_eq!(workers.len(), 2, "both workers took tasks");

    // As completed: a slow first task comes last.
    let tasks = [
        PoolTask::Work { n: 0, millis: 300 },
        PoolTask::Echo(1),
        PoolTask::Echo(2),
    ];
    let mut batch = pool.submit_all(tasks, Order::Completed);
    let mut seen = Vec::new();
    while let Some(result) = within("a batch result", batch.next()).await {
        seen.push(result.unwrap().n);
    }
    assert_eq!(seen.last(), Some(&0), "{seen:?}");

    let stats = pool.stats();
    assert_eq!(stats.done, 105);
    assert_eq!((stats.queued, stats.running, stats.failed), (0, 0, 0));
    assert_eq!(stats.latency.count, 105);
}

#[tokio::test]
async fn handler_errors_come_back_at_once_unless_retryable() {
    let pool = pool(PoolConfig {
        max_attempts: 3,
        ..PoolConfig::default()
    });
    let _cluster = cluster(&pool, 2).await;
    let error = within(
        "a handler error",
        pool.submit(PoolTask::Fail { retryable: false }),
    )
    .await
    .unwrap_err();
    assert_eq!(error, PoolError::Handler("asked to fail".into()));
    let error = within(
        "a retried error",
        pool.submit(PoolTask::Fail { retryable: true }),
    )
    .await
    .unwrap_err();
    let PoolError::Failed(attempts) = &error else {
        panic!("{error}")
    };
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|a| a.failure == AttemptFailure::Handler("asked to fail".into())),
        "{error}"
    );
    assert!(error.to_string().contains("after 3 attempts"), "{error}");
    assert_eq!((pool.stats().failed, pool.stats().retried), (2, 2));
}

#[tokio::test]
async fn every_task_completes_exactly_once_while_a_worker_is_killed_every_100_ms() {
    let pool = pool(PoolConfig {
        concurrency: 2,
        max_attempts: 50,
        ..PoolConfig::default()
    });
    let cluster = builder("pool").service(pool.clone()).build().unwrap();
    let supervised = SupervisedCluster::start(cluster, supervision(4, None)).unwrap();
    let handle = supervised.handle();
    let reports = collect_reports(supervised);

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (handle, done) = (handle.clone(), done.clone());
        tokio::spawn(async move {
            let mut kills = 0u32;
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                ticks.tick().await;
                let Ok(status) = handle.status().await else {
                    break;
                };
                let pids: Vec<u32> = status.workers.iter().map(|w| w.pid).collect();
                let target = pids.get(kills as usize % pids.len().max(1));
                if let Some(&pid) = target.filter(|pid| alive(**pid)) {
                    kill_pid(pid, Signal::KILL);
                    kills += 1;
                }
            }
            kills
        })
    };

    const TASKS: u64 = 10_000;
    let tasks = (0..TASKS).map(|n| PoolTask::Work { n, millis: 1 });
    let mut batch = pool.submit_all(tasks, Order::Completed);
    let mut seen = BTreeSet::new();
    let mut duplicates = Vec::new();
    while let Some(result) = within("the chaos batch", batch.next()).await {
        let n = result.expect("no task fails").n;
        if !seen.insert(n) {
            duplicates.push(n);
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(duplicates.is_empty(), "results seen twice: {duplicates:?}");
    assert_eq!(seen.len() as u64, TASKS, "every task came back");
    let stats = pool.stats();
    assert_eq!(stats.done, TASKS);
    assert!(kills >= 5, "only {kills} workers were killed");
    assert!(
        stats.retried > 0,
        "no task was running on a killed worker: {stats:?}"
    );
    handle.stop().unwrap();
    within("the supervisor to finish", reports).await.unwrap();
}

#[tokio::test]
async fn a_hung_task_times_out_its_worker_is_recycled_and_another_worker_runs_it() {
    let pool = pool(PoolConfig {
        timeout: Some(Duration::from_secs(1)),
        ..PoolConfig::default()
    });
    let mut cluster = builder("pool").service(pool.clone()).build().unwrap();
    let first = cluster.fork().await.unwrap();
    let task = PoolTask::HangOn {
        n: 1,
        on: first.id(),
    };
    let submitted = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(task).await }
    });
    eventually("the first worker runs the task", || {
        pool.stats().running == 1
    })
    .await;
    let second = cluster.fork().await.unwrap();
    let answer = within("the task", submitted).await.unwrap().unwrap();
    assert_eq!(answer.worker, second.id(), "another worker ran it");
    let (exited, _) = exit_of(&mut cluster, first.id()).await;
    assert_eq!(exited.status, ExitStatus::signaled(Signal::KILL));
    let stats = pool.stats();
    assert_eq!((stats.recycled, stats.retried, stats.done), (1, 1, 1));
}

#[tokio::test]
async fn tasks_beside_a_hung_one_run_again_without_losing_an_attempt() {
    let pool = pool(PoolConfig {
        concurrency: 4,
        max_attempts: 1,
        timeout: Some(Duration::from_secs(2)),
        ..PoolConfig::default()
    });
    let mut cluster = builder("pool").service(pool.clone()).build().unwrap();
    let first = cluster.fork().await.unwrap();
    let hung = tokio::spawn({
        let pool = pool.clone();
        let task = PoolTask::HangOn {
            n: 0,
            on: first.id(),
        };
        async move { pool.submit(task).await }
    });
    eventually("the hung task runs", || pool.stats().running == 1).await;
    // Three slow tasks share the hung worker; they are still running when
    // the pool recycles it.
    let slow: Vec<_> = (1..=3)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.submit(PoolTask::Work { n, millis: 60_000 }).await })
        })
        .collect();
    eventually("all four run", || pool.stats().running == 4).await;
    let error = within("the hung task", hung).await.unwrap().unwrap_err();
    let PoolError::Failed(attempts) = &error else {
        panic!("{error}")
    };
    assert!(
        matches!(
            attempts[..],
            [Attempt {
                failure: AttemptFailure::TimedOut(_),
                ..
            }]
        ),
        "{error}"
    );
    // Their worker is gone: they wait for another, having lost no attempt.
    eventually("the three wait again", || pool.stats().queued == 3).await;
    assert_eq!(pool.stats().requeued, 3);
    for task in slow {
        task.abort();
    }
    let (exited, _) = exit_of(&mut cluster, first.id()).await;
    assert_eq!(exited.status, ExitStatus::signaled(Signal::KILL));
}

#[tokio::test]
async fn a_poison_task_fails_after_its_attempts_and_does_not_trip_the_breaker() {
    let pool = pool(PoolConfig {
        max_attempts: 3,
        ..PoolConfig::default()
    });
    let cluster = builder("pool").service(pool.clone()).build().unwrap();
    // Two crashes of workers' own would be tolerated, a third not: the
    // poison tasks below end six workers.
    let mut breaker = BreakerConfig::default();
    breaker.max_crashes = 2;
    breaker.window = Duration::from_secs(600);
    breaker.exit_on_trip = false;
    let supervised = SupervisedCluster::start(cluster, supervision(3, Some(breaker))).unwrap();
    let handle = supervised.handle();
    let reports = collect_reports(supervised);

    let poison = |pool: &TestPool| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.submit(PoolTask::Poison).await })
    };
    let (first, second) = (poison(&pool), poison(&pool));
    let mut batch = pool.submit_all((0..30).map(PoolTask::Echo), Order::Completed);
    let mut answered = 0;
    while let Some(result) = within("the healthy tasks", batch.next()).await {
        result.expect("a healthy task is not affected");
        answered += 1;
    }
    assert_eq!(answered, 30);
    for poisoned in [first, second] {
        let error = within("a poison task", poisoned)
            .await
            .unwrap()
            .unwrap_err();
        let PoolError::Failed(attempts) = &error else {
            panic!("{error}")
        };
        assert_eq!(attempts.len(), 3, "{error}");
        assert!(
            error.to_string().contains("was killed by SIGKILL"),
            "{error}"
        );
    }
    let status = handle.status().await.unwrap();
    assert!(!status.breaker_tripped, "the breaker tripped");
    // The cluster still serves.
    assert_eq!(
        within("a task after", pool.submit(PoolTask::Echo(99)))
            .await
            .unwrap()
            .n,
        99
    );
    handle.stop().unwrap();
    let reports = within("the supervisor to finish", reports).await.unwrap();
    let blamed = reports
        .iter()
        .filter(|r| {
            matches!(
                r,
                Report::Supervisor(procluster::supervisor::Event::WorkerFailed {
                    cause: CrashCause::TaskFault { .. },
                    ..
                })
            )
        })
        .count();
    assert_eq!(blamed, 4, "each poison task's second and third kill");
}

#[tokio::test]
async fn cancelling_removes_a_queued_task_and_signals_a_running_one() {
    let pool = pool(PoolConfig::default());
    let mut cluster = cluster(&pool, 1).await;
    let running = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(PoolTask::WaitForCancel(1)).await }
    });
    eventually("the task runs", || pool.stats().running == 1).await;
    let queued = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(PoolTask::Echo(2)).await }
    });
    eventually("the second task waits", || pool.stats().queued == 1).await;

    queued.abort();
    eventually("the queued task is gone", || pool.stats().queued == 0).await;
    assert_eq!(pool.stats().cancelled, 1);

    running.abort();
    let (_, said) = reply(&mut cluster).await;
    assert!(
        matches!(&said, Reply::Echo(text) if text == "cancelled 1"),
        "{said:?}"
    );
    let answer = within("a task after", pool.submit(PoolTask::Echo(3))).await;
    assert_eq!(answer.unwrap().n, 3);
    let stats = pool.stats();
    assert_eq!(stats.cancelled, 2);
    assert_eq!(stats.done, 1, "the queued task never ran");
}

#[tokio::test]
async fn try_submit_fails_at_once_when_the_queue_is_full_and_submit_waits_for_room() {
    let pool = pool(PoolConfig {
        queue: 1,
        ..PoolConfig::default()
    });
    let _cluster = cluster(&pool, 1).await;
    let running = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(PoolTask::WaitForCancel(1)).await }
    });
    eventually("the task runs", || pool.stats().running == 1).await;
    let queued = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(PoolTask::Echo(2)).await }
    });
    eventually("the queue is full", || pool.stats().queued == 1).await;
    let refused = within("try_submit", pool.try_submit(PoolTask::Echo(3))).await;
    assert_eq!(refused.unwrap_err(), PoolError::Full(1));
    assert_eq!(pool.stats().refused_full, 1);
    // A waiting submit gets its place once the queue moves.
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(PoolTask::Echo(4)).await }
    });
    running.abort();
    assert_eq!(
        within("the queued task", queued).await.unwrap().unwrap().n,
        2
    );
    assert_eq!(
        within("the waiting task", waiting)
            .await
            .unwrap()
            .unwrap()
            .n,
        4
    );
}

#[tokio::test]
async fn a_rolling_reload_under_a_steady_load_fails_no_task() {
    let pool = pool(PoolConfig {
        concurrency: 2,
        max_attempts: 1,
        ..PoolConfig::default()
    });
    let cluster = builder("pool").service(pool.clone()).build().unwrap();
    let supervised = SupervisedCluster::start(cluster, supervision(2, None)).unwrap();
    let handle = supervised.handle();
    let reports = collect_reports(supervised);

    let tasks = (0..600).map(|n| PoolTask::Work { n, millis: 10 });
    let mut batch = pool.submit_all(tasks, Order::Completed);
    let reloads = tokio::spawn({
        let (handle, pool) = (handle.clone(), pool.clone());
        async move {
            eventually("tasks run", || pool.stats().done > 20).await;
            handle.reload().await.expect("first reload");
            handle.reload().await.expect("second reload");
        }
    });
    let mut answered = 0;
    let mut workers = BTreeSet::new();
    while let Some(result) = within("the batch", batch.next()).await {
        let answer = result.expect("no task fails during a reload");
        workers.insert(answer.worker);
        answered += 1;
    }
    within("the reloads", reloads).await.unwrap();
    assert_eq!(answered, 600);
    assert!(workers.len() > 2, "new workers took tasks: {workers:?}");
    let stats = pool.stats();
    assert_eq!((stats.failed, stats.retried), (0, 0), "{stats:?}");
    handle.stop().unwrap();
    within("the supervisor to finish", reports).await.unwrap();
}

#[tokio::test]
async fn a_worker_submits_tasks_that_run_on_the_workers() {
    let pool = pool(PoolConfig::default());
    let mut cluster = cluster(&pool, 2).await;
    let workers = cluster.workers();
    workers[0]
        .send(&Command::PoolSubmit { count: 50 })
        .await
        .unwrap();
    let (from, said) = reply(&mut cluster).await;
    assert_eq!(from.id(), workers[0].id());
    let Reply::PoolSubmitted(Ok(answers)) = said else {
        panic!("{said:?}")
    };
    let numbers: Vec<u64> = answers.iter().map(|a| a.n).collect();
    assert_eq!(numbers, (0..50).collect::<Vec<_>>());
    let ran_on: BTreeSet<_> = answers.iter().map(|a| a.worker).collect();
    assert_eq!(ran_on.len(), 2, "both workers ran the worker's tasks");
    assert_eq!(pool.stats().done, 50);
}

#[tokio::test]
async fn a_million_submissions_against_a_queue_of_a_thousand_keep_the_primary_flat() {
    let pool = pool(PoolConfig {
        queue: 1000,
        concurrency: 64,
        ..PoolConfig::default()
    });
    // The compact format: a million tasks are mostly encoding in a debug
    // build.
    let mut cluster = builder("pool")
        .service(pool.clone())
        .workers(2)
        .format(procluster::Format::Binary)
        .build()
        .unwrap();
    cluster.start().await.unwrap();
    const TASKS: u64 = 1_000_000;
    let mut batch = pool.submit_all((0..TASKS).map(PoolTask::Echo), Order::Completed);
    let mut answered = 0u64;
    let mut baseline = None;
    let mut peak_queue = 0;
    let own = std::process::id();
    while let Some(result) = within("the million", batch.next()).await {
        result.unwrap();
        answered += 1;
        if answered.is_multiple_of(10_000) {
            peak_queue = peak_queue.max(pool.stats().queued);
            if answered == 100_000 {
                baseline = rss_bytes(own);
            }
        }
    }
    assert_eq!(answered, TASKS);
    assert!(peak_queue <= 1000, "the queue held {peak_queue} tasks");
    let (before, after) = (baseline.unwrap(), rss_bytes(own).unwrap());
    assert!(
        after < before + 16 * 1024 * 1024,
        "the primary grew from {} to {} MiB",
        before >> 20,
        after >> 20
    );
}

#[tokio::test]
async fn a_64_mib_task_and_its_64_mib_result_come_back_whole_by_memory_file_and_by_socket() {
    let data: Vec<u8> = (0..64u32 << 20).map(|n| (n % 251) as u8).collect();
    for threshold in [Some(procluster::pool::DEFAULT_MEMFD_THRESHOLD), None] {
        let pool = pool(PoolConfig {
            memfd_threshold: threshold,
            ..PoolConfig::default()
        });
        let mut cluster = builder("pool")
            .service(pool.clone())
            .format(procluster::Format::Binary)
            .build()
            .unwrap();
        cluster.start().await.unwrap();
        let answer = within(
            "the large task",
            pool.submit(PoolTask::Blob(Blob(data.clone()))),
        )
        .await
        .unwrap_or_else(|e| panic!("threshold {threshold:?}: {e}"));
        assert_eq!(answer.n, 64 << 20);
        assert!(
            answer.blob.as_ref() == Some(&Blob(data.clone())),
            "the bytes came back changed"
        );
        // As a view of the payload (no copy out of the memory file).
        let shared = procluster::pool::SharedBytes::from(data.clone());
        let answer = within("the shared bytes", pool.submit(PoolTask::Shared(shared)))
            .await
            .unwrap();
        assert!(
            answer.shared.as_deref() == Some(&data[..]),
            "the shared bytes came back changed"
        );
        cluster.disconnect().await;
    }
}
