//! What the primary needs to know to start workers (Node's `setupPrimary`).

use std::ffi::OsString;
use std::fmt;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::output::OutputHook;
use crate::protocol::{DEFAULT_MAX_FRAME_LEN, Format, Policy};
use crate::{Signal, WorkerId};

/// The default [`Settings::shutdown_grace`]: enough for a client that just
/// connected to send its request, so that a server's graceful shutdown
/// answers it instead of closing it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

/// Where a worker's standard output and error go.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Stdio {
    /// Share the primary's (Node's default).
    #[default]
    Inherit,
    /// Capture them and print each whole line from the primary, prefixed with
    /// `[worker ID] ` (Node's `silent`, made readable).
    Prefixed,
    /// Discard them.
    Null,
    /// Capture them and hand each line to a callback, with the worker it
    /// came from (see [`OutputLine`](crate::primary::OutputLine)). Lines are
    /// split as for `Prefixed`: whole lines, overlong ones in
    /// [`MAX_LINE`](crate::primary::MAX_LINE) pieces, and the unterminated
    /// tail once the stream ends. The callback runs on the runtime's threads:
    /// keep it short and non-blocking (writing a line to stdout is fine).
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use procluster::primary::{OutputLine, Stdio};
    /// let stdio = Stdio::Callback(Arc::new(|line: OutputLine<'_>| {
    ///     eprintln!("{} {}: {}", line.worker, line.stream, String::from_utf8_lossy(line.line));
    /// }));
    /// # let _ = stdio;
    /// ```
    Callback(OutputHook),
}

impl fmt::Debug for Stdio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inherit => f.write_str("Inherit"),
            Self::Prefixed => f.write_str("Prefixed"),
            Self::Null => f.write_str("Null"),
            Self::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

impl PartialEq for Stdio {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Callback(a), Self::Callback(b)) => Arc::ptr_eq(a, b),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

/// What kind of program the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Program {
    /// A program built on this library: it finds its channel at
    /// [`CHANNEL_FD`](crate::CHANNEL_FD), reports `Online` itself and is
    /// disconnected with a control message.
    #[default]
    Procluster,
    /// Any other program (Python, Node, Go, a shell script...). It gets no
    /// channel and no internal environment except `PROCLUSTER_WORKER_ID` and
    /// `PROCLUSTER_WORKER_INDEX` (and `PROCLUSTER_STICKY_TOKEN`, its
    /// [sticky token](crate::sticky::token)), so every fd number from 3 up is free for
    /// [`Settings::fds`] and [`ForkOptions::fds`]. It is reported `Online`
    /// right after it is spawned, messages to it fail with
    /// [`Error::NotConnected`](crate::Error::NotConnected), and
    /// [`WorkerHandle::disconnect`](crate::primary::WorkerHandle::disconnect)
    /// sends it `stop_signal`; its `Disconnect` event comes when it exits.
    Foreign {
        /// The signal that asks it to finish its work and exit (SIGTERM for
        /// most programs; SIGQUIT for nginx, SIGINT for some).
        stop_signal: Signal,
    },
}

impl Program {
    /// A foreign program stopped with SIGTERM.
    pub fn foreign() -> Self {
        Self::Foreign {
            stop_signal: Signal::TERM,
        }
    }

    /// Whether this is [`Program::Foreign`].
    pub fn is_foreign(&self) -> bool {
        matches!(self, Self::Foreign { .. })
    }
}

/// A descriptor the worker finds open at a given number, as an inherited
/// (not close-on-exec) fd. The primary keeps its own copy; each worker gets a
/// duplicate, so the same socket can go to every worker (systemd-style socket
/// activation: listeners at 3, 4, ...).
#[derive(Debug, Clone)]
pub struct ChildFd {
    /// The descriptor, shared by clones of the settings.
    pub fd: Arc<OwnedFd>,
    /// Its number in the worker.
    pub target: RawFd,
}

impl ChildFd {
    /// `fd` at number `target` in the worker.
    pub fn new(fd: impl Into<Arc<OwnedFd>>, target: RawFd) -> Self {
        Self {
            fd: fd.into(),
            target,
        }
    }
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
#[non_exhaustive]
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
    /// The limits of [`Policy::Sticky`].
    pub sticky: crate::sticky::StickyOptions,
    /// How often workers send heartbeats (`None`: never).
    pub heartbeat_interval: Option<Duration>,
    /// How long a disconnecting worker keeps serving connections it already
    /// accepted before its shutdown signal fires (its listeners close at
    /// once). Default [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// How long a channel keeps polling its socket after a read before it
    /// waits on the event loop (zero: never; see `ClusterBuilder::busy_poll`).
    pub busy_poll: Duration,
    /// Put the thread that builds the cluster under `SCHED_BATCH` (Linux);
    /// false after `build` if the switch failed.
    pub batch_scheduling: bool,
    /// A procluster program (the default) or a foreign one.
    pub program: Program,
    /// Descriptors every worker finds at given numbers (for example shared
    /// listeners at 3, 4, ... for a foreign program). With
    /// [`Program::Procluster`] no target may be
    /// [`CHANNEL_FD`](crate::CHANNEL_FD).
    pub fds: Vec<ChildFd>,
    /// Called for every worker about to be forked, however it is forked
    /// (`start`, `fork`, a supervisor's restart), to add what is specific to
    /// that worker.
    pub on_fork: Option<ForkHook>,
}

/// A function that adjusts each fork: it gets the new worker's id and its
/// [`ForkOptions`] (with its slot index) and may add environment and
/// descriptors, for example a per-worker notification socket. An error
/// fails that fork.
///
/// # Examples
/// ```
/// use procluster::primary::{ForkHook, Settings};
/// let mut settings = Settings::default();
/// settings.on_fork = Some(ForkHook::new(|id, options| {
///     options.env.push(("MY_WORKER_TAG".into(), format!("w{id}").into()));
///     Ok(())
/// }));
/// # let _ = settings;
/// ```
#[derive(Clone)]
pub struct ForkHook(pub Arc<ForkHookFn>);

/// The function inside a [`ForkHook`].
pub type ForkHookFn = dyn Fn(WorkerId, &mut ForkOptions) -> std::io::Result<()> + Send + Sync;

impl ForkHook {
    /// Wraps `hook`.
    pub fn new(
        hook: impl Fn(WorkerId, &mut ForkOptions) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(hook))
    }
}

impl fmt::Debug for ForkHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ForkHook(..)")
    }
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
            policy: Policy::platform_default(),
            sticky: crate::sticky::StickyOptions::default(),
            heartbeat_interval: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            busy_poll: Duration::ZERO,
            batch_scheduling: false,
            program: Program::Procluster,
            fds: Vec::new(),
            on_fork: None,
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
    /// Descriptors for this worker only, after the cluster's
    /// [`Settings::fds`] (a per-worker notification socket, a pipe...). A
    /// target here replaces one of the same number there.
    pub fds: Vec<ChildFd>,
}

impl ForkOptions {
    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds one descriptor at number `target` in this worker.
    pub fn fd(mut self, fd: impl Into<Arc<OwnedFd>>, target: RawFd) -> Self {
        self.fds.push(ChildFd::new(fd, target));
        self
    }
}
