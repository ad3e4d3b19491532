//! Roles, messages, lifecycle events and stopping.

use procluster::primary::{Event, WorkerState};
use procluster_tests::*;

use crate::builder;

#[tokio::test]
async fn a_worker_that_exits_with_42_reports_fork_online_disconnect_exit() {
    let mut cluster = builder("exit42").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    assert_eq!(worker.id(), 1);
    let (status, seen) = until(&mut cluster, |e| match e {
        Event::Exit { status, exited_after_disconnect, .. } => Some((*status, *exited_after_disconnect)),
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
    until(&mut cluster, |e| matches!(e, Event::Online(_)).then_some(())).await;
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
        Event::Exit { exited_after_disconnect, status, .. } => Some((*exited_after_disconnect, *status)),
        _ => None,
    })
    .await;
    assert!(after.0);
    assert!(after.1.success());
}
