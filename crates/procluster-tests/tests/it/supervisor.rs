//! Supervision with real processes: restarts, the crash-loop breaker,
//! graceful stop, kill timeout, rolling reload, scaling, hang detection and
//! recycling.

use std::time::{Duration, Instant};

use procluster::Signal;
use procluster::primary::{Event, Settings, Stdio};
use procluster::supervisor::{
    self, BackoffConfig, BreakerConfig, CrashCause, HeartbeatConfig, Readiness, RecycleConfig,
    RecycleReason, ReloadError, ReloadFailure, Report, StopReason, SupervisedCluster,
    SupervisionError, SupervisionOptions, SupervisorConfig, WorkerPhase,
};
use procluster_tests::*;

use crate::builder;

/// Settings that keep tests fast: short timeouts, restarts without delay.
fn config(workers: usize) -> SupervisorConfig {
    let mut config = SupervisorConfig::default();
    config.workers = workers;
    config.backoff.initial = Duration::from_millis(10);
    config.backoff.multiplier = 2.0;
    config.backoff.max = Duration::from_millis(100);
    config.backoff.jitter = 0.0;
    config.kill_timeout = Duration::from_secs(5);
    config.ready_timeout = Duration::from_secs(10);
    config
}

/// Supervises test workers in `mode` that say when they are ready.
fn supervise(mode: &str, supervisor: SupervisorConfig) -> SupervisedCluster {
    supervise_with(mode, supervisor, Settings::default())
}

fn supervise_with(
    mode: &str,
    supervisor: SupervisorConfig,
    settings: Settings,
) -> SupervisedCluster {
    let mut settings = settings;
    settings.exec = Some(crate::test_worker().into());
    settings.args = Some(vec![mode.into()]);
    settings.stdio = Stdio::Null;
    let cluster = builder(mode).settings(settings).build().unwrap();
    let mut options = SupervisionOptions::default();
    options.supervisor = supervisor;
    options.readiness = Readiness::Explicit;
    SupervisedCluster::start(cluster, options).unwrap()
}

fn sup(event: &Report) -> Option<&supervisor::Event> {
    match event {
        Report::Supervisor(e) => Some(e),
        Report::Cluster(_) => None,
    }
}

/// Reads events until `count` workers have said hello; returns the hellos.
async fn hellos(supervised: &mut SupervisedCluster, count: usize) -> Vec<Hello> {
    let mut seen = Vec::new();
    while seen.len() < count {
        if let Some(hello) = hello_in(&next_supervised(supervised).await) {
            seen.push(hello);
        }
    }
    seen.sort_by_key(|h| h.index);
    seen
}

/// The hellos among `events`, then more read from the cluster until there
/// are `count`.
async fn hellos_after(
    events: &[Report],
    supervised: &mut SupervisedCluster,
    count: usize,
) -> Vec<Hello> {
    let mut seen: Vec<_> = events.iter().filter_map(hello_in).collect();
    if seen.len() < count {
        seen.extend(hellos(supervised, count - seen.len()).await);
    }
    seen.sort_by_key(|h| h.index);
    seen
}

/// Stops the cluster and checks that it ends well.
async fn stop_ok(supervised: SupervisedCluster) -> Vec<Report> {
    supervised.handle().stop().unwrap();
    let (events, outcome) = finish_supervised(supervised).await;
    let outcome = outcome.expect("a requested stop is not a failure");
    assert_eq!(outcome.reason, StopReason::Requested);
    events
}

#[tokio::test]
async fn a_killed_worker_is_replaced_in_the_same_slot() {
    let mut supervised = supervise("ready-serve", config(2));
    let handle = supervised.handle();
    let first = hellos(&mut supervised, 2).await;
    assert_eq!(
        first.iter().map(|h| h.index).collect::<Vec<_>>(),
        [Some(0), Some(1)]
    );

    kill_pid(first[1].pid, procluster::Signal::KILL);
    let (attempt, seen) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::RestartScheduled {
            slot: 1, attempt, ..
        }) => Some(*attempt),
        _ => None,
    })
    .await;
    assert_eq!(attempt, 1);
    assert!(
        seen.iter()
            .any(|e| matches!(sup(e), Some(supervisor::Event::WorkerExited {
        worker, slot: Some(1), expected: false, info
    }) if *worker == first[1].id && info.signal() == Some(Signal::KILL)))
    );

    let replacement = hellos(&mut supervised, 1).await[0];
    assert_eq!(
        replacement.index,
        Some(1),
        "the replacement fills the same slot"
    );
    assert_ne!(replacement.id, first[1].id);

    let status = handle.status().await.unwrap();
    let slot1 = status.workers.iter().find(|w| w.index == 1).unwrap();
    assert_eq!(
        (slot1.id, slot1.restarts, slot1.phase),
        (replacement.id, 1, WorkerPhase::Ready)
    );
    let slot0 = status.workers.iter().find(|w| w.index == 0).unwrap();
    assert_eq!((slot0.id, slot0.restarts), (first[0].id, 0));
    stop_ok(supervised).await;
}

#[tokio::test]
async fn a_worker_crashing_at_boot_is_restarted_with_growing_delays_until_the_breaker_trips() {
    let mut supervisor = config(1);
    let mut backoff = BackoffConfig::default();
    backoff.initial = Duration::from_millis(40);
    backoff.multiplier = 2.0;
    backoff.max = Duration::from_millis(200);
    backoff.jitter = 0.0;
    supervisor.backoff = backoff;
    let mut breaker = BreakerConfig::default();
    breaker.max_crashes = 3;
    breaker.window = Duration::from_secs(30);
    breaker.exit_on_trip = true;
    supervisor.breaker = Some(breaker);
    let supervised = supervise("crash-at-boot", supervisor);
    let (events, outcome) = finish_supervised(supervised).await;

    let delays: Vec<_> = events
        .iter()
        .filter_map(|e| match sup(e) {
            Some(supervisor::Event::RestartScheduled { delay, .. }) => Some(*delay),
            _ => None,
        })
        .collect();
    let ms = Duration::from_millis;
    assert_eq!(delays, [ms(40), ms(80), ms(160)]);
    let spawns = events
        .iter()
        .filter(|e| {
            matches!(
                sup(e),
                Some(supervisor::Event::WorkerSpawned { slot: 0, .. })
            )
        })
        .count();
    assert_eq!(spawns, 4, "the first start and three restarts");
    assert!(events.iter().any(|e| matches!(
        sup(e),
        Some(supervisor::Event::BreakerTripped { crashes: 4, .. })
    )));
    assert_eq!(
        outcome,
        Err(SupervisionError::BreakerTripped {
            crashes: 4,
            window: Duration::from_secs(30)
        })
    );
}

#[tokio::test]
async fn restarts_are_spaced_by_the_backoff_delay() {
    let mut supervisor = config(1);
    let mut backoff = BackoffConfig::default();
    backoff.initial = Duration::from_millis(100);
    backoff.multiplier = 2.0;
    backoff.max = Duration::from_millis(200);
    backoff.jitter = 0.0;
    supervisor.backoff = backoff;
    let mut breaker = BreakerConfig::default();
    breaker.max_crashes = 2;
    breaker.window = Duration::from_secs(30);
    breaker.exit_on_trip = true;
    supervisor.breaker = Some(breaker);
    let mut supervised = supervise("crash-at-boot", supervisor);
    let mut exits = Vec::new();
    let mut spawns = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE, supervised.next_event())
        .await
        .unwrap()
    {
        match sup(&event) {
            Some(supervisor::Event::WorkerExited { .. }) => exits.push(Instant::now()),
            Some(supervisor::Event::WorkerSpawned { .. }) => spawns.push(Instant::now()),
            _ => {}
        }
    }
    assert!(supervised.wait().await.is_err());
    assert_eq!((exits.len(), spawns.len()), (3, 3));
    // Restart n happens at least its delay after crash n.
    assert!(
        spawns[1] - exits[0] >= Duration::from_millis(95),
        "{:?}",
        spawns[1] - exits[0]
    );
    assert!(
        spawns[2] - exits[1] >= Duration::from_millis(195),
        "{:?}",
        spawns[2] - exits[1]
    );
}

#[tokio::test]
async fn stop_disconnects_every_worker_and_ends_ok() {
    let mut supervised = supervise("ready-serve", config(3));
    let handle = supervised.handle();
    let workers = hellos(&mut supervised, 3).await;
    handle.stop().unwrap();
    let (events, outcome) = finish_supervised(supervised).await;
    let outcome = outcome.unwrap();
    assert_eq!(outcome.reason, StopReason::Requested);
    assert!(outcome.in_time, "no worker needed SIGKILL");
    for hello in &workers {
        let exit = events.iter().find_map(|e| match e {
            Report::Cluster(Event::Exit {
                worker,
                status,
                exited_after_disconnect,
            }) if worker.id() == hello.id => Some((*status, *exited_after_disconnect)),
            _ => None,
        });
        let (status, after_disconnect) = exit.expect("every worker exits");
        assert!(status.success() && after_disconnect, "{status}");
        assert!(!alive(hello.pid));
    }
    assert!(matches!(
        events.last().and_then(sup),
        Some(supervisor::Event::StopFinished { .. })
    ));
    assert!(
        handle.stop().is_err(),
        "a finished supervisor takes no requests"
    );
}

#[tokio::test]
async fn a_worker_ignoring_disconnect_is_killed_after_the_kill_timeout() {
    let mut supervisor = config(1);
    supervisor.kill_timeout = Duration::from_millis(300);
    let mut supervised = supervise("ready-never-exit", supervisor);
    let hello = hellos(&mut supervised, 1).await[0];
    let asked = Instant::now();
    supervised.handle().stop().unwrap();
    let (events, outcome) = finish_supervised(supervised).await;
    assert!(asked.elapsed() >= Duration::from_millis(300));
    let outcome = outcome.unwrap();
    assert!(!outcome.in_time, "the worker had to be killed");
    assert!(events.iter().any(|e| matches!(sup(e),
        Some(supervisor::Event::KillTimeout { worker }) if *worker == hello.id)));
    let killed = events.iter().any(|e| {
        matches!(e,
        Report::Cluster(Event::Exit { status, .. }) if status.signal() == Some(Signal::KILL))
    });
    assert!(killed, "SIGKILL ended the worker");
}

#[tokio::test]
async fn a_rolling_reload_starts_each_new_worker_before_retiring_the_old_one() {
    let mut supervised = supervise("ready-serve", config(2));
    let handle = supervised.handle();
    let old = hellos(&mut supervised, 2).await;
    let reload = tokio::spawn({
        let handle = handle.clone();
        async move { handle.reload().await }
    });
    // Until the rollout finished and both old workers have exited.
    let (mut finished, mut old_exits) = (false, 0);
    let (_, events) = until_supervised(&mut supervised, |e| {
        match e {
            Report::Supervisor(supervisor::Event::ReloadFinished { generation: 1 }) => {
                finished = true
            }
            Report::Cluster(Event::Exit { worker, .. })
                if old.iter().any(|h| h.id == worker.id()) =>
            {
                old_exits += 1
            }
            _ => {}
        }
        (finished && old_exits == 2).then_some(())
    })
    .await;
    tokio::time::timeout(DEADLINE, reload)
        .await
        .unwrap()
        .unwrap()
        .expect("reload succeeds");

    let position =
        |pred: &dyn Fn(&Report) -> bool| events.iter().position(pred).expect("event present");
    let new_workers = hellos_after(&events, &mut supervised, 2).await;
    for slot in 0..2 {
        let new = new_workers[slot];
        assert_eq!(new.index, Some(slot));
        assert_eq!(new.generation, 1);
        let new_ready = position(&|e| {
            matches!(sup(e),
            Some(supervisor::Event::WorkerReady { worker, generation: 1, .. }) if *worker == new.id)
        });
        let old_id = old[slot].id;
        let old_disconnected = position(&|e| {
            matches!(e,
            Report::Cluster(Event::Disconnect(w)) if w.id() == old_id)
        });
        assert!(
            new_ready < old_disconnected,
            "slot {slot}: the old worker went before the new one was ready"
        );
        assert!(events.iter().any(|e| matches!(sup(e),
            Some(supervisor::Event::SlotReloaded { slot: s, old, new: n, generation: 1 })
                if *s == slot && *old == old_id && *n == new.id)));
    }
    let status = handle.status().await.unwrap();
    assert_eq!(status.generation, 1);
    assert!(
        status
            .workers
            .iter()
            .filter(|w| w.phase == WorkerPhase::Ready)
            .all(|w| w.generation == 1)
    );
    stop_ok(supervised).await;
}

#[tokio::test]
async fn a_reload_whose_new_worker_is_never_ready_fails_and_the_old_workers_keep_serving() {
    let mut supervisor = config(2);
    supervisor.ready_timeout = Duration::from_secs(1);
    let mut supervised = supervise("ready-gen0-only", supervisor);
    let handle = supervised.handle();
    let old = hellos(&mut supervised, 2).await;
    let reload = tokio::spawn({
        let handle = handle.clone();
        async move { handle.reload().await }
    });
    let (failure, _) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::ReloadFailed { failure, .. }) => Some(failure.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        failure,
        ReloadFailure::Worker {
            slot: 0,
            cause: CrashCause::ReadyTimeout
        }
    );
    let result = tokio::time::timeout(DEADLINE, reload)
        .await
        .unwrap()
        .unwrap();
    match result {
        Err(ReloadError::Failed {
            generation: 1,
            failure: f,
        }) => assert_eq!(f, failure),
        other => panic!("expected a failed reload, got {other:?}"),
    }
    let status = handle.status().await.unwrap();
    let serving: Vec<_> = status
        .workers
        .iter()
        .filter(|w| w.phase == WorkerPhase::Ready)
        .map(|w| (w.id, w.generation))
        .collect();
    assert_eq!(serving, [(old[0].id, 0), (old[1].id, 0)]);
    assert!(old.iter().all(|h| alive(h.pid)));
    assert!(!status.reloading);
    stop_ok(supervised).await;
}

#[tokio::test]
async fn scaling_up_starts_new_slots_and_scaling_down_retires_the_highest() {
    let mut supervised = supervise("ready-serve", config(1));
    let handle = supervised.handle();
    let first = hellos(&mut supervised, 1).await;
    handle.scale_to(3).unwrap();
    let added = hellos(&mut supervised, 2).await;
    assert_eq!(
        added.iter().map(|h| h.index).collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );
    assert_eq!(handle.status().await.unwrap().workers.len(), 3);

    handle.scale_to(1).unwrap();
    let mut exited = Vec::new();
    while exited.len() < 2 {
        if let Some(supervisor::Event::WorkerExited {
            worker, expected, ..
        }) = sup(&next_supervised(&mut supervised).await)
        {
            assert!(expected, "a scaled-down worker exits as expected");
            exited.push(*worker);
        }
    }
    exited.sort();
    assert_eq!(exited, [added[0].id, added[1].id]);
    let status = handle.status().await.unwrap();
    assert_eq!(status.target_workers, 1);
    assert_eq!(
        status.workers.iter().map(|w| w.id).collect::<Vec<_>>(),
        [first[0].id]
    );
    stop_ok(supervised).await;
}

#[tokio::test]
async fn a_worker_that_stops_sending_heartbeats_gets_a_diagnostic_signal_then_is_killed_and_replaced()
 {
    let mut supervisor = config(1);
    let mut heartbeat = HeartbeatConfig::default();
    heartbeat.timeout = Duration::from_millis(400);
    heartbeat.signal = Signal::USR2;
    heartbeat.grace = Duration::from_millis(200);
    supervisor.heartbeat = Some(heartbeat);
    supervisor.kill_timeout = Duration::from_millis(200);
    let mut settings = Settings::default();
    settings.heartbeat_interval = Some(Duration::from_millis(50));
    let mut supervised = supervise_with("ready-then-hang", supervisor, settings);
    let hung = hellos(&mut supervised, 1).await[0];
    let (_, events) = until_supervised(&mut supervised, |e| {
        matches!(
            sup(e),
            Some(supervisor::Event::WorkerSpawned { slot: 0, .. })
        )
        .then_some(())
    })
    .await;
    let position =
        |pred: &dyn Fn(&Report) -> bool| events.iter().position(pred).expect("event present");
    let detected = position(&|e| {
        matches!(sup(e),
        Some(supervisor::Event::HangDetected { slot: 0, worker, signal: Signal::USR2 }) if *worker == hung.id)
    });
    let killed = position(&|e| {
        matches!(e,
        Report::Cluster(Event::Exit { worker, status, .. })
            if worker.id() == hung.id && status.signal() == Some(Signal::KILL))
    });
    let failed = position(&|e| {
        matches!(
            sup(e),
            Some(supervisor::Event::WorkerFailed {
                slot: 0,
                cause: CrashCause::Hang
            })
        )
    });
    assert!(detected < killed && killed < failed);
    let replacement = hellos(&mut supervised, 1).await[0];
    assert_eq!(replacement.index, Some(0));
    // The replacement hangs too: stop twice to kill it at once.
    let handle = supervised.handle();
    handle.stop().unwrap();
    handle.stop().unwrap();
    let (_, outcome) = finish_supervised(supervised).await;
    assert!(outcome.is_ok());
}

#[tokio::test]
async fn a_worker_is_recycled_after_its_request_limit_new_worker_first() {
    let mut supervisor = config(1);
    let mut recycle = RecycleConfig::default();
    recycle.max_requests = Some(50);
    supervisor.recycle = recycle;
    let mut supervised = supervise("first-worker-serves-100", supervisor);
    let first = hellos(&mut supervised, 1).await[0];
    assert_eq!(first.id, 1);
    let ((old, new, reason), events) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::Recycled {
            old, new, reason, ..
        }) => Some((*old, *new, *reason)),
        _ => None,
    })
    .await;
    assert_eq!(
        reason,
        RecycleReason::Requests {
            count: 100,
            limit: 50
        }
    );
    assert_eq!(old, first.id);
    let new_hello = hellos_after(&events, &mut supervised, 1).await[0];
    assert_eq!((new_hello.id, new_hello.index), (new, Some(0)));
    let (expected, _) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::WorkerExited {
            worker, expected, ..
        }) if *worker == old => Some(*expected),
        _ => None,
    })
    .await;
    assert!(expected);
    stop_ok(supervised).await;
}

#[tokio::test]
async fn a_worker_is_recycled_when_it_reaches_its_maximum_age() {
    let mut supervisor = config(1);
    let mut recycle = RecycleConfig::default();
    recycle.max_age = Some(Duration::from_millis(300));
    supervisor.recycle = recycle;
    let mut supervised = supervise("ready-serve", supervisor);
    let first = hellos(&mut supervised, 1).await[0];
    let ((old, reason), _) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::Recycled { old, reason, .. }) => Some((*old, *reason)),
        _ => None,
    })
    .await;
    assert_eq!(old, first.id);
    match reason {
        RecycleReason::MaxAge { age } => assert!(age >= Duration::from_millis(300)),
        other => panic!("unexpected reason {other:?}"),
    }
    stop_ok(supervised).await;
}

/// Sends `signal` to this test process (nextest runs each test in a process
/// of its own).
fn signal_self(signal: procluster::Signal) {
    kill_pid(std::process::id(), signal);
}

#[tokio::test]
async fn owned_signals_scale_reload_and_stop() {
    let mut settings = Settings::default();
    settings.exec = Some(crate::test_worker().into());
    settings.args = Some(vec!["ready-serve".into()]);
    settings.stdio = Stdio::Null;
    let cluster = builder("ready-serve").settings(settings).build().unwrap();
    let mut options = SupervisionOptions::default();
    options.supervisor = config(1);
    options.readiness = Readiness::Explicit;
    options.handle_signals = true;
    let mut supervised = SupervisedCluster::start(cluster, options).unwrap();
    hellos(&mut supervised, 1).await;

    signal_self(procluster::Signal::TTIN);
    let (scaled, _) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::Scaled { from, to }) => Some((*from, *to)),
        _ => None,
    })
    .await;
    assert_eq!(scaled, (1, 2));
    hellos(&mut supervised, 1).await;

    signal_self(procluster::Signal::TTOU);
    let (scaled, _) = until_supervised(&mut supervised, |e| match sup(e) {
        Some(supervisor::Event::Scaled { from, to }) => Some((*from, *to)),
        _ => None,
    })
    .await;
    assert_eq!(scaled, (2, 1));

    signal_self(procluster::Signal::HUP);
    until_supervised(&mut supervised, |e| {
        matches!(
            sup(e),
            Some(supervisor::Event::ReloadFinished { generation: 1 })
        )
        .then_some(())
    })
    .await;

    signal_self(procluster::Signal::TERM);
    let (events, outcome) = finish_supervised(supervised).await;
    assert!(events.iter().any(|e| matches!(
        sup(e),
        Some(supervisor::Event::StopStarted {
            reason: StopReason::Requested
        })
    )));
    assert_eq!(outcome.unwrap().reason, StopReason::Requested);
}

#[tokio::test]
async fn with_listening_readiness_a_worker_is_ready_once_it_listens() {
    let mut settings = Settings::default();
    settings.exec = Some(crate::test_worker().into());
    settings.args = Some(vec!["listen-then-serve".into()]);
    settings.stdio = Stdio::Null;
    let cluster = builder("listen-then-serve")
        .settings(settings)
        .build()
        .unwrap();
    let mut options = SupervisionOptions::default();
    options.supervisor = config(2);
    options.readiness = Readiness::Listening;
    let mut supervised = SupervisedCluster::start(cluster, options).unwrap();
    let mut listening = Vec::new();
    let mut ready = Vec::new();
    while ready.len() < 2 {
        match next_supervised(&mut supervised).await {
            Report::Cluster(Event::Listening { worker, .. }) => listening.push(worker.id()),
            Report::Supervisor(supervisor::Event::WorkerReady { worker, .. }) => {
                assert!(listening.contains(&worker), "ready only after listening");
                ready.push(worker);
            }
            _ => {}
        }
    }
    stop_ok(supervised).await;
}

#[tokio::test]
async fn a_worker_whose_memory_grows_past_max_rss_is_recycled_new_worker_first() {
    const MIB: u64 = 1 << 20;
    // What an idle test worker holds, so the limit sits 64 MiB above it.
    let mut idle = builder("serve").build().unwrap();
    let probe = idle.fork().await.unwrap();
    until(&mut idle, |e| matches!(e, Event::Online(_)).then_some(())).await;
    let baseline = rss_bytes(probe.pid()).expect("VmRSS of an idle worker");
    probe.disconnect();
    drain(&mut idle).await;
    let limit = baseline + 64 * MIB;

    let mut supervisor = config(1);
    let mut recycle = RecycleConfig::default();
    recycle.max_rss = Some(limit);
    supervisor.recycle = recycle;
    let mode = "first-worker-leaks";
    let mut settings = Settings::default();
    settings.exec = Some(crate::test_worker().into());
    settings.args = Some(vec![mode.into()]);
    settings.stdio = Stdio::Null;
    let cluster = builder(mode).settings(settings).build().unwrap();
    let mut options = SupervisionOptions::default();
    options.supervisor = supervisor;
    options.readiness = Readiness::Explicit;
    options.sample_interval = Duration::from_millis(20);
    let mut supervised = SupervisedCluster::start(cluster, options).unwrap();

    // Until the leaking worker has exited, noting its RSS when recycled.
    let (mut leaker, mut old, mut rss_when_recycled) = (None, None, None);
    let (_, events) = until_supervised(&mut supervised, |e| {
        if let Some(hello) = hello_in(e).filter(|h| h.id == 1) {
            leaker = Some(hello);
        }
        match sup(e) {
            Some(supervisor::Event::Recycled { old: o, .. }) => {
                old = Some(*o);
                rss_when_recycled = leaker.and_then(|h| rss_bytes(h.pid));
                None
            }
            Some(supervisor::Event::WorkerExited { worker, .. }) if Some(*worker) == old => {
                Some(())
            }
            _ => None,
        }
    })
    .await;
    let leaker = leaker.expect("the first worker said hello");
    let old = old.expect("a recycle");
    assert_eq!(old, leaker.id);

    let position =
        |pred: &dyn Fn(&Report) -> bool| events.iter().position(pred).expect("event present");
    let (started, reason) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match sup(e) {
            Some(supervisor::Event::RecycleStarted {
                slot: 0,
                worker,
                reason,
            }) if *worker == old => Some((i, *reason)),
            _ => None,
        })
        .expect("RecycleStarted for the leaking worker");
    let RecycleReason::Memory { rss, limit: l } = reason else {
        panic!("recycled for {reason:?}, not memory");
    };
    assert_eq!(l, limit);
    assert!(rss > limit, "{rss} > {limit}");
    let overshoot = rss - limit;
    // The worker stops growing at 512 MiB: the recycle came before.
    assert!(
        rss < baseline + 512 * MIB,
        "recycled only at {} MiB (limit {} MiB)",
        rss / MIB,
        limit / MIB
    );
    let (recycled, new) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match sup(e) {
            Some(supervisor::Event::Recycled {
                slot: 0,
                old: o,
                new,
                reason: r,
            }) if *o == old && *r == reason => Some((i, *new)),
            _ => None,
        })
        .expect("Recycled with the same reason");
    let spawned = position(&|e| {
        matches!(sup(e),
        Some(supervisor::Event::WorkerSpawned { slot: 0, worker, .. }) if *worker == new)
    });
    let new_ready = position(&|e| {
        matches!(sup(e),
        Some(supervisor::Event::WorkerReady { slot: 0, worker, .. }) if *worker == new)
    });
    let old_disconnected = position(&|e| {
        matches!(e,
        Report::Cluster(Event::Disconnect(w)) if w.id() == leaker.id)
    });
    let (old_exit, status, after_disconnect) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match e {
            Report::Cluster(Event::Exit {
                worker,
                status,
                exited_after_disconnect,
            }) if worker.id() == leaker.id => Some((i, *status, *exited_after_disconnect)),
            _ => None,
        })
        .expect("the leaking worker exits");
    assert!(
        started < spawned
            && spawned < new_ready
            && new_ready < recycled
            && recycled < old_disconnected
            && old_disconnected < old_exit,
        "new worker first: started {started}, spawned {spawned}, ready {new_ready}, \
         recycled {recycled}, disconnected {old_disconnected}, exit {old_exit}"
    );
    assert!(status.success() && after_disconnect, "{status}");
    assert!(matches!(
        events.last().and_then(sup),
        Some(supervisor::Event::WorkerExited { expected: true, .. })
    ));
    eprintln!(
        "baseline {} KiB, limit {} KiB, sample {} KiB (overshoot {} KiB), \
         RSS when recycled {:?} KiB",
        baseline / 1024,
        limit / 1024,
        rss / 1024,
        overshoot / 1024,
        rss_when_recycled.map(|r| r / 1024)
    );

    let replacement = hellos_after(&events, &mut supervised, 2)
        .await
        .into_iter()
        .find(|h| h.id != leaker.id)
        .expect("the replacement said hello");
    assert_eq!((replacement.id, replacement.index), (new, Some(0)));
    assert!(!alive(leaker.pid));
    let events = stop_ok(supervised).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(sup(e), Some(supervisor::Event::RecycleStarted { .. }))),
        "the replacement, which does not leak, is not recycled"
    );
}
