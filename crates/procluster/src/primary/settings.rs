//! What the primary needs to know to start workers (Node's `setupPrimary`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::{DEFAULT_MAX_FRAME_LEN, Format, Policy};

/// Where a worker's standard output and error go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// Share the primary's (Node's default).
    #[default]
    Inherit,
    /// Capture them and print each whole line from the primary, prefixed with
    /// `[worker ID] ` (Node's `silent`, made readable).
    Prefixed,
    /// Discard them.
    Null,
}

/// How many workers [`crate::primary::Cluster::start`] forks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One per CPU available to this process (cgroup and affinity aware).
    #[default]
    Auto,
    /// Exactly this many.
    Count(usize),
}

impl Workers {
    /// The number this resolves to on this machine.
    pub fn resolve(self) -> usize {
        match self {
            Self::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Self::Count(n) => n,
        }
    }
}

/// Settings for every worker of a cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Program to execute; `None` runs the current executable again.
    pub exec: Option<PathBuf>,
    /// Arguments for the program; `None` passes the primary's own arguments
    /// (as Node's `cluster` passes `process.argv`).
    pub args: Option<Vec<OsString>>,
    /// Extra environment for every worker.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; `None` keeps the primary's.
    pub cwd: Option<PathBuf>,
    /// Standard output and error of workers.
    pub stdio: Stdio,
    /// Encoding of user messages.
    pub format: Format,
    /// Largest frame accepted on a channel, in bytes.
    pub max_frame: usize,
    /// Bytes of user messages from workers the primary queues before it stops
    /// reading from them (backpressure).
    pub message_budget: usize,
    /// Start each worker in a process group of its own, so a terminal's
    /// Ctrl-C reaches the primary only.
    pub own_process_group: bool,
    /// How many workers `start()` forks.
    pub workers: Workers,
    /// How TCP connections reach workers.
    pub policy: Policy,
    /// How often workers send heartbeats (`None`: never).
    pub heartbeat_interval: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            exec: None,
            args: None,
            env: Vec::new(),
            cwd: None,
            stdio: Stdio::Inherit,
            format: Format::Json,
            max_frame: DEFAULT_MAX_FRAME_LEN,
            message_budget: 64 * 1024 * 1024,
            own_process_group: false,
            workers: Workers::Auto,
            policy: Policy::Shared,
            heartbeat_interval: None,
        }
    }
}

/// Per-fork options (Node's `cluster.fork(env)`).
#[derive(Debug, Clone, Default)]
pub struct ForkOptions {
    /// Environment added for this worker only, after the cluster's.
    pub env: Vec<(OsString, OsString)>,
    /// The slot the worker fills (its index); `None` for none.
    pub index: Option<usize>,
}

impl ForkOptions {
    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}
