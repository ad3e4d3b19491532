//! A primary program for the integration tests that need the primary to be a
//! process of its own: to kill it, to watch it end, or to read what it prints.
//!
//! ```text
//! test-primary WORKER_PROGRAM WORKER_MODE COUNT STDIO THEN
//! ```
//!
//! Starts COUNT workers running `WORKER_PROGRAM WORKER_MODE`, with their
//! output `inherit`ed, `prefixed` or `null`. Prints `online PID` for each
//! worker once it is online, then `ready`. Then, by THEN:
//! - `wait`: waits forever (for the test to kill it);
//! - `until-exit`: returns once every worker has ended by itself;
//! - `return`: at a line on stdin, returns from `main`;
//! - `panic`: at a line on stdin, panics;
//! - `disconnect`: at a line on stdin, disconnects every worker, waits until
//!   all have exited, and returns.

use procluster::primary::{Cluster, Event, Stdio};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [program, mode, count, stdio, then] = args.as_slice() else {
        eprintln!("usage: test-primary WORKER_PROGRAM WORKER_MODE COUNT STDIO THEN");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("COUNT is a number");
    let stdio = match stdio.as_str() {
        "inherit" => Stdio::Inherit,
        "prefixed" => Stdio::Prefixed,
        "null" => Stdio::Null,
        other => panic!("unknown STDIO {other}"),
    };
    let mut cluster = Cluster::builder()
        .exec(program)
        .args([mode])
        .workers(count)
        .stdio(stdio)
        .build()
        .expect("build");
    cluster.start().await.expect("start workers");
    let mut online = 0;
    while online < count {
        match cluster.next_event().await.expect("an event") {
            Event::Online(worker) => {
                println!("online {}", worker.pid());
                online += 1;
            }
            Event::Exit { worker, status, .. } => {
                panic!("worker {} ended early: {status}", worker.id())
            }
            _ => {}
        }
    }
    println!("ready");
    if then == "until-exit" {
        // Until every worker has ended, by itself.
        while cluster.next_event().await.is_some() {}
        return;
    }
    if then == "wait" {
        std::future::pending::<()>().await;
    }
    let mut line = String::new();
    let line =
        tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line).map(|_| line));
    line.await.expect("stdin reader").expect("read stdin");
    match then.as_str() {
        "return" => {}
        "panic" => panic!("the primary panics (on purpose)"),
        "disconnect" => {
            cluster.disconnect().await;
            while cluster.next_event().await.is_some() {}
        }
        other => panic!("unknown THEN {other}"),
    }
}
