//! A primary in a process of its own sharing the test pool through Redis,
//! for the tests that kill a whole host.
//!
//! ```text
//! pool-primary WORKER_PROGRAM REDIS_URL WORKERS RECLAIM_MS
//! ```
//!
//! Opens the test pool on Redis (2 tasks per worker, 50 attempts, tasks
//! taken over after RECLAIM_MS), starts WORKERS workers running
//! `WORKER_PROGRAM pool`, prints `ready` once they are online, then runs
//! until killed.

use std::time::Duration;

use procluster::pool::{Pool, PoolConfig};
use procluster::primary::{Cluster, Event};
use procluster_tests::{PoolAnswer, PoolTask, TEST_POOL};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [program, url, count, reclaim_ms] = args.as_slice() else {
        eprintln!("usage: pool-primary WORKER_PROGRAM REDIS_URL WORKERS RECLAIM_MS");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("WORKERS is a number");
    let reclaim_ms: u64 = reclaim_ms.parse().expect("RECLAIM_MS is a number");
    let mut config = PoolConfig::default();
    config.concurrency = 2;
    config.max_attempts = 50;
    config.reclaim_after = Duration::from_millis(reclaim_ms);
    let pool: Pool<PoolTask, PoolAnswer> = Pool::redis(TEST_POOL, config, url)
        .await
        .expect("the test pool on Redis");
    let mut cluster = Cluster::builder()
        .exec(program)
        .args(["pool"])
        .workers(count)
        .service(pool)
        .build()
        .expect("build");
    cluster.start().await.expect("start workers");
    let mut online = 0;
    while online < count {
        match cluster.next_event().await.expect("an event") {
            Event::Online(_) => online += 1,
            Event::Exit { worker, status, .. } => {
                panic!("worker {} ended early: {status}", worker.id())
            }
            _ => {}
        }
    }
    println!("ready");
    while cluster.next_event().await.is_some() {}
}
