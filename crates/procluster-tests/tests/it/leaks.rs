//! Many workers come and go; the primary keeps no descriptor and no zombie
//! of theirs.

use procluster::primary::{Cluster, Event};
use procluster_tests::*;

use crate::builder;

/// Forks `count` workers that exit at once, and reads events until all have
/// exited.
async fn fork_and_reap(cluster: &mut Cluster, count: usize) {
    for _ in 0..count {
        cluster.fork().await.unwrap();
    }
    let mut exited = 0;
    while exited < count {
        if let Event::Exit { status, .. } = next(cluster).await {
            assert_eq!(status.code(), Some(42));
            exited += 1;
        }
    }
}

#[tokio::test]
async fn two_hundred_fork_exit_cycles_leave_no_open_fds_and_no_zombies() {
    let mut cluster = builder("exit42").build().unwrap();
    // The first fork starts things that live as long as the process (the
    // spawner thread, the runtime's child-signal handling).
    fork_and_reap(&mut cluster, 1).await;
    let baseline = open_fds();
    for _ in 0..50 {
        fork_and_reap(&mut cluster, 4).await;
    }
    assert!(cluster.workers().is_empty());
    assert!(cluster.next_event().await.is_none());
    let zombies = zombie_children();
    assert!(zombies.is_empty(), "unreaped workers: {zombies:?}");
    let now = open_fds();
    assert_eq!(now, baseline, "open fds after 200 workers came and went");
}
