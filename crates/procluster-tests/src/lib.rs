//! Shared pieces of the integration tests: the messages the test worker
//! understands, and helpers to wait for events with generous deadlines.

use std::time::Duration;

use procluster::primary::{Cluster, ClusterBuilder, Event};
use serde::{Deserialize, Serialize};

/// Long enough for a loaded 2-core machine; tests wait for events, never
/// sleep for them.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A cluster builder running `program` (the test worker) in `mode`.
pub fn builder_for(program: &str, mode: &str) -> ClusterBuilder {
    Cluster::builder().exec(program).args([mode]).workers(1)
}

/// The next event, failing the test after [`DEADLINE`].
pub async fn next(cluster: &mut Cluster) -> Event {
    tokio::time::timeout(DEADLINE, cluster.next_event())
        .await
        .expect("timed out waiting for a cluster event")
        .expect("the cluster ended before the expected event")
}

/// Reads events until `pick` accepts one, returning what it returned and
/// every event passed on the way.
pub async fn until<T>(cluster: &mut Cluster, mut pick: impl FnMut(&Event) -> Option<T>) -> (T, Vec<Event>) {
    let mut seen = Vec::new();
    loop {
        let event = next(cluster).await;
        if let Some(found) = pick(&event) {
            seen.push(event);
            return (found, seen);
        }
        seen.push(event);
    }
}

/// A short name for an event, to compare sequences.
pub fn name(event: &Event) -> &'static str {
    match event {
        Event::Fork(_) => "fork",
        Event::Online(_) => "online",
        Event::Listening { .. } => "listening",
        Event::Ready(_) => "ready",
        Event::Message { .. } => "message",
        Event::Disconnect(_) => "disconnect",
        Event::Exit { .. } => "exit",
        Event::Error { .. } => "error",
    }
}

/// Number of open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until `check` holds, polling every few milliseconds, up to
/// [`DEADLINE`]. For conditions the OS offers no event for (a process
/// disappearing).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the primary can ask of a worker in `serve` mode.
#[derive(Debug, Serialize, Deserialize)]
pub enum Command {
    /// Reply with the same text.
    Echo(String),
    /// Reply with the same bytes (large message test).
    EchoBytes(Vec<u8>),
    /// Reply with the number of bytes received.
    CountBytes(Vec<u8>),
    /// Send `n` numbered messages as fast as possible.
    Flood(u64),
    /// Relay text to another worker.
    RelayTo(u32, String),
    /// Read the fds that came with the message and report how many.
    CountFds,
    /// Send back the fd that came with the message, twice in one message.
    ReturnFd,
    /// Disconnect itself.
    Disconnect,
    /// Exit with this code.
    Exit(i32),
    /// Report this process's environment and working directory.
    Describe,
    /// Start a child and report whether it sees worker variables.
    ChildEnv,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Echo(String),
    EchoBytes(Vec<u8>),
    Count(usize),
    Seq(u64),
    Relayed { from: Option<u32>, text: String },
    Described { env: Vec<(String, String)>, cwd: String, id: u32, index: Option<usize> },
    ChildEnv(String),
    Fds(usize),
}

