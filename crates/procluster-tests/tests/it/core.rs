//! Roles, messages, lifecycle events and stopping.

use std::time::Duration;

use procluster::primary::{Cluster, Event, WorkerHandle, WorkerState};
use procluster::{Signal, WorkerId};
use procluster_tests::*;

use crate::builder;

#[tokio::test]
async fn a_worker_that_exits_with_42_reports_fork_online_disconnect_exit() {
    let mut cluster = builder("exit42").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    assert_eq!(worker.id(), 1);
    let (status, seen) = until(&mut cluster, |e| match e {
        Event::Exit {
            status,
            exited_after_disconnect,
            ..
        } => Some((*status, *exited_after_disconnect)),
        _ => None,
    })
    .await;
    let names: Vec<_> = seen.iter().map(name).collect();
    assert_eq!(names, ["fork", "online", "disconnect", "exit"]);
    assert_eq!(status.0.code(), Some(42));
    assert!(!status.1, "an exit by itself is not after a disconnect");
    assert!(worker.is_dead());
    assert!(!worker.is_connected());
    assert_eq!(worker.state(), WorkerState::Dead);
    assert!(cluster.next_event().await.is_none());
}

#[tokio::test]
async fn messages_go_both_ways_in_order() {
    let mut cluster = builder("serve").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    until(&mut cluster, |e| {
        matches!(e, Event::Online(_)).then_some(())
    })
    .await;
    for i in 0..100 {
        worker.send(&Command::Echo(format!("m{i}"))).await.unwrap();
    }
    for i in 0..100 {
        let (reply, _) = until(&mut cluster, |e| match e {
            Event::Message { message, .. } => Some(message.decode::<Reply>().unwrap()),
            _ => None,
        })
        .await;
        match reply {
            Reply::Echo(text) => assert_eq!(text, format!("m{i}")),
            other => panic!("unexpected {other:?}"),
        }
    }
    worker.disconnect();
    let (after, _) = until(&mut cluster, |e| match e {
        Event::Exit {
            exited_after_disconnect,
            status,
            ..
        } => Some((*exited_after_disconnect, *status)),
        _ => None,
    })
    .await;
    assert!(after.0);
    assert!(after.1.success());
}

/// Forks one worker in `mode` and waits until it is online, checking the
/// events and states on the way.
async fn one_online_worker(mode: &str) -> (Cluster, WorkerHandle) {
    let mut cluster = builder(mode).build().unwrap();
    let worker = cluster.fork().await.unwrap();
    assert_eq!(
        worker.state(),
        WorkerState::Forked,
        "forked, not yet online"
    );
    let seen = online(&mut cluster, 1).await;
    assert_eq!(
        seen.iter().map(name).collect::<Vec<_>>(),
        ["fork", "online"]
    );
    assert_eq!(worker.state(), WorkerState::Online);
    assert!(worker.is_connected());
    assert!(!worker.is_dead());
    assert_eq!(worker.exit_status(), None);
    (cluster, worker)
}

/// Reads the rest of a worker's life: a `Disconnect`, then an `Exit`, and
/// nothing after (exactly one of each).
async fn rest_of_life(cluster: &mut Cluster, worker: &WorkerHandle) -> Exited {
    let event = next(cluster).await;
    assert!(
        matches!(event, Event::Disconnect(ref w) if w == worker),
        "expected a disconnect, got {event:?}"
    );
    assert!(!worker.is_connected(), "not connected once disconnected");
    assert!(worker.state() >= WorkerState::Disconnected);
    let (exited, names) = exit_of(cluster, worker.id()).await;
    assert_eq!(names, ["exit"], "the exit follows the disconnect directly");
    assert!(worker.is_dead());
    assert!(!worker.is_connected());
    assert_eq!(worker.state(), WorkerState::Dead);
    assert_eq!(worker.exit_status(), Some(exited.status));
    assert_eq!(worker.exited_after_disconnect(), exited.after_disconnect);
    let after = tokio::time::timeout(DEADLINE, cluster.next_event())
        .await
        .expect("the cluster ends");
    assert!(after.is_none(), "nothing after the exit, got {after:?}");
    exited
}

#[tokio::test]
async fn a_worker_sigkilled_from_outside_exits_by_signal_9_not_after_disconnect() {
    let (mut cluster, worker) = one_online_worker("serve").await;
    kill_pid(worker.pid(), Signal::KILL);
    let exited = rest_of_life(&mut cluster, &worker).await;
    assert_eq!(exited.status.signal(), Some(Signal::KILL));
    assert_eq!(exited.status.code(), None);
    assert!(
        !exited.after_disconnect,
        "killed from outside is an accident"
    );
}

#[tokio::test]
async fn a_worker_signalled_by_the_primary_exits_by_that_signal() {
    let (mut cluster, worker) = one_online_worker("serve").await;
    worker.signal(Signal::TERM).unwrap();
    let exited = rest_of_life(&mut cluster, &worker).await;
    assert_eq!(exited.status.signal(), Some(Signal::TERM));
    assert!(!exited.after_disconnect, "signal() does not disconnect");
    worker
        .signal(Signal::TERM)
        .expect("signalling a dead worker is not an error");
}

#[tokio::test]
async fn kill_is_nodes_disconnect_then_signal_so_the_exit_counts_as_after_disconnect() {
    // `busy` spins without looking at its channel: only the signal ends it,
    // and the channel is closed before it is sent.
    let (mut cluster, worker) = one_online_worker("busy").await;
    worker.kill(Signal::TERM).unwrap();
    let exited = rest_of_life(&mut cluster, &worker).await;
    assert_eq!(exited.status.signal(), Some(Signal::TERM));
    assert!(exited.after_disconnect, "as Node's exitedAfterDisconnect");
    assert!(
        worker.send(&"anyone there?").await.is_err(),
        "a killed worker takes no messages"
    );
    worker
        .kill(Signal::TERM)
        .expect("killing a dead worker is not an error");
}

#[tokio::test]
async fn a_worker_that_disconnects_itself_exits_0_after_disconnect() {
    // It disconnects as soon as it is up, so its online and disconnect may
    // arrive together: no state check between them.
    let mut cluster = builder("self-disconnect").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    let (exited, names) = exit_of(&mut cluster, worker.id()).await;
    assert_eq!(names, ["fork", "online", "disconnect", "exit"]);
    assert!(worker.is_dead() && !worker.is_connected());
    assert_eq!(exited.status.code(), Some(0));
    assert!(
        exited.after_disconnect,
        "a worker that disconnected itself exited after a disconnect"
    );
    assert!(worker.exited_after_disconnect());
    assert!(cluster.next_event().await.is_none());
}

#[tokio::test]
async fn a_worker_asked_to_disconnect_by_command_exits_0_after_disconnect() {
    let (mut cluster, worker) = one_online_worker("serve").await;
    worker.send(&Command::Disconnect).await.unwrap();
    let exited = rest_of_life(&mut cluster, &worker).await;
    assert_eq!(exited.status.code(), Some(0));
    assert!(exited.after_disconnect);
}

#[tokio::test]
async fn a_worker_disconnected_by_the_primary_exits_0_after_disconnect() {
    let (mut cluster, worker) = one_online_worker("serve").await;
    worker.disconnect();
    let exited = rest_of_life(&mut cluster, &worker).await;
    assert_eq!(exited.status.code(), Some(0));
    assert!(exited.after_disconnect);
    assert!(
        worker
            .send(&Command::Echo("late".into()))
            .await
            .unwrap_err()
            .is_disconnected()
    );
    worker.disconnect(); // a second disconnect does nothing
}

#[tokio::test]
async fn worker_ids_start_at_1_increase_and_are_never_reused() {
    let mut cluster = builder("serve").build().unwrap();
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(cluster.fork().await.unwrap());
    }
    assert_eq!(first.iter().map(|w| w.id()).collect::<Vec<_>>(), [1, 2, 3]);
    online(&mut cluster, 3).await;
    for worker in &first[1..] {
        worker.send(&Command::Exit(0)).await.unwrap();
    }
    let (exited, _) = until(&mut cluster, |e| match e {
        Event::Exit { worker, .. } if worker.id() == 3 || worker.id() == 2 => Some(worker.id()),
        _ => None,
    })
    .await;
    exit_of(&mut cluster, WorkerId::new(5 - exited.get())).await;
    let later = [cluster.fork().await.unwrap(), cluster.fork().await.unwrap()];
    assert_eq!(
        later.iter().map(|w| w.id()).collect::<Vec<_>>(),
        [4, 5],
        "ids of exited workers are not reused"
    );
    assert_eq!(
        cluster.workers().iter().map(|w| w.id()).collect::<Vec<_>>(),
        [1, 4, 5]
    );
    assert_eq!(cluster.worker(WorkerId::new(4)).as_ref(), Some(&later[0]));
    assert!(
        cluster.worker(WorkerId::new(2)).is_none(),
        "an exited worker is no longer in the cluster"
    );
    online(&mut cluster, 2).await;
    cluster.disconnect().await;
    drain(&mut cluster).await;
    assert_eq!(
        cluster.fork().await.unwrap().id(),
        6,
        "not even once every worker has exited"
    );
}

#[tokio::test]
async fn kill_stops_a_busy_looping_worker() {
    let (mut cluster, worker) = one_online_worker("busy").await;
    worker.signal(Signal::TERM).unwrap();
    let exited = rest_of_life(&mut cluster, &worker).await;
    assert_eq!(exited.status.signal(), Some(Signal::TERM));
}

#[tokio::test]
async fn cluster_disconnect_returns_once_every_worker_has_exited_after_disconnect() {
    let mut cluster = builder("serve").workers(3).build().unwrap();
    let workers = cluster.start().await.unwrap();
    assert_eq!(
        workers.iter().map(|w| w.index()).collect::<Vec<_>>(),
        [Some(0), Some(1), Some(2)]
    );
    online(&mut cluster, 3).await;
    tokio::time::timeout(DEADLINE, cluster.disconnect())
        .await
        .expect("disconnect completes");
    assert!(
        workers.iter().all(|w| w.is_dead()),
        "disconnect() returned before every worker exited"
    );
    assert!(cluster.workers().is_empty());
    let events = drain(&mut cluster).await;
    for worker in &workers {
        assert_eq!(
            names_of(&events, worker.id()),
            ["disconnect", "exit"],
            "worker {}",
            worker.id()
        );
        let exit = events.iter().find_map(|e| match e {
            Event::Exit {
                worker: w,
                status,
                exited_after_disconnect,
            } if w == worker => Some((*status, *exited_after_disconnect)),
            _ => None,
        });
        let (status, after_disconnect) = exit.unwrap();
        assert!(status.success(), "worker {}: {status}", worker.id());
        assert!(after_disconnect, "worker {}", worker.id());
    }
}

/// Applications run the event loop on a multi-threaded runtime
/// (`#[tokio::main]`), where the worker's task and the reader of events run
/// on different threads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_end_once_the_last_worker_has_exited_on_a_multi_threaded_runtime() {
    let mut cluster = builder("exit42").build().unwrap();
    for round in 0..50 {
        cluster.fork().await.unwrap();
        until(&mut cluster, |e| {
            matches!(e, Event::Exit { .. }).then_some(())
        })
        .await;
        let after = tokio::time::timeout(DEADLINE, cluster.next_event())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: next_event() still waits though no worker is alive")
            });
        assert!(after.is_none(), "round {round}: {after:?}");
    }
}

#[tokio::test]
async fn a_worker_that_never_reads_its_messages_can_still_be_disconnected() {
    let mut cluster = builder("deaf").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    until(&mut cluster, |e| {
        matches!(e, Event::Online(_)).then_some(())
    })
    .await;
    // 80 MiB it will never read: more than its inbox and the primary's window.
    let sender = worker.clone();
    let flood = tokio::spawn(async move {
        let chunk = "x".repeat(1024 * 1024);
        for _ in 0..80 {
            if sender.send(&chunk).await.is_err() {
                return;
            }
        }
    });
    // The primary stops sending at its window, so the disconnect gets through.
    worker.disconnect();
    let (after_disconnect, _) = until(&mut cluster, |e| match e {
        Event::Exit {
            exited_after_disconnect,
            ..
        } => Some(*exited_after_disconnect),
        _ => None,
    })
    .await;
    assert!(after_disconnect);
    tokio::time::timeout(DEADLINE, flood)
        .await
        .expect("the sender gives up once the worker is gone")
        .unwrap();
}

/// One round trip: the worker echoes `text` back.
async fn echo(cluster: &mut Cluster, worker: &WorkerHandle, text: String) {
    worker.send(&Command::Echo(text.clone())).await.unwrap();
    let (reply, _) = until(cluster, |e| match e {
        Event::Message { message, .. } => Some(message.decode::<Reply>().unwrap()),
        _ => None,
    })
    .await;
    assert!(
        matches!(reply, Reply::Echo(ref echoed) if *echoed == text),
        "{reply:?}"
    );
}

#[tokio::test]
async fn busy_polling_channels_answer_quick_round_trips_and_messages_after_a_pause() {
    let mut cluster = builder("serve")
        .busy_poll(Duration::from_micros(200))
        .build()
        .unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    // Round trips inside the window: both readers poll.
    for i in 0..2000 {
        echo(&mut cluster, &worker, format!("r{i}")).await;
    }
    // Idle for longer than the window: both readers wait on their event
    // loops again, and the next message still wakes them.
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        echo(&mut cluster, &worker, format!("after a pause {i}")).await;
    }
    worker.disconnect();
}

#[tokio::test]
async fn thousands_of_quick_round_trips_never_stall() {
    // Each side alternates writes made directly by the sender with writes
    // left to its writer task; every one of them must arrive.
    let mut cluster = builder("serve").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    for i in 0..3000 {
        echo(&mut cluster, &worker, format!("r{i}")).await;
    }
    worker.disconnect();
}
