//! A worker never outlives its primary, however the primary ends. The
//! primary here is a process of its own (the `test-primary` program), so the
//! test can kill it.

use std::time::{Duration, Instant};

use procluster::Signal;
use procluster_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::{test_primary, test_worker};

/// How soon after its primary ends a worker must be gone.
const ORPHAN_BOUND: Duration = Duration::from_secs(1);

pub struct Primary {
    pub child: Child,
    pub stdout: Lines<BufReader<ChildStdout>>,
    /// Worker pids, as the primary printed them once each was online.
    pub workers: Vec<u32>,
    /// Every line printed up to `ready`.
    pub lines: Vec<String>,
}

impl Primary {
    /// Starts `test-primary` with `count` workers in `mode`, and waits until
    /// it says all are online.
    pub async fn start(mode: &str, count: usize, stdio: &str, then: &str) -> Self {
        let mut child = tokio::process::Command::new(test_primary())
            .args([test_worker(), mode, &count.to_string(), stdio, then])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start test-primary");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut workers, mut lines) = (Vec::new(), Vec::new());
        loop {
            let line = tokio::time::timeout(DEADLINE, stdout.next_line())
                .await
                .expect("test-primary is slow to report its workers")
                .unwrap()
                .expect("test-primary ended before its workers were online");
            if let Some(pid) = line.strip_prefix("online ") {
                workers.push(pid.parse().unwrap());
            }
            let ready = line == "ready";
            lines.push(line);
            if ready {
                break;
            }
        }
        assert_eq!(workers.len(), count);
        assert!(workers.iter().all(|&pid| alive(pid)), "the workers run");
        Self {
            child,
            stdout,
            workers,
            lines,
        }
    }

    /// Tells the primary to go on with its `then`.
    pub async fn go_on(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits for the primary to end; returns its status and when it ended.
    pub async fn ended(&mut self) -> (std::process::ExitStatus, Instant) {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the primary ends")
            .unwrap();
        (status, Instant::now())
    }
}

/// Checks every worker is gone within [`ORPHAN_BOUND`] of `since`.
async fn workers_gone_soon(workers: &[u32], since: Instant) {
    eventually("every worker is gone", || {
        workers.iter().all(|&pid| !alive(pid))
    })
    .await;
    let took = since.elapsed();
    assert!(
        took <= ORPHAN_BOUND,
        "the workers outlived their primary by {took:?}"
    );
}

#[tokio::test]
async fn workers_die_within_1s_of_their_primary_being_sigkilled() {
    let mut primary = Primary::start("serve", 3, "null", "wait").await;
    kill_pid(primary.child.id().unwrap(), Signal::KILL);
    let killed = Instant::now();
    workers_gone_soon(&primary.workers, killed).await;
    let (status, _) = primary.ended().await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::KILL.number()));
}

#[tokio::test]
async fn busy_workers_die_within_1s_of_their_primary_being_sigkilled() {
    let primary = Primary::start("busy", 2, "null", "wait").await;
    kill_pid(primary.child.id().unwrap(), Signal::KILL);
    workers_gone_soon(&primary.workers, Instant::now()).await;
}

#[tokio::test]
async fn workers_die_within_1s_of_their_primary_returning_from_main() {
    let mut primary = Primary::start("serve", 3, "null", "return").await;
    primary.go_on().await;
    let (status, ended) = primary.ended().await;
    assert!(status.success(), "{status}");
    workers_gone_soon(&primary.workers, ended).await;
}

#[tokio::test]
async fn workers_die_within_1s_of_their_primary_panicking() {
    let mut primary = Primary::start("serve", 3, "null", "panic").await;
    primary.go_on().await;
    let (status, ended) = primary.ended().await;
    assert_eq!(status.code(), Some(101), "a panic in main");
    workers_gone_soon(&primary.workers, ended).await;
}
