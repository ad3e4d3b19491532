//! A pool's settings.

use std::time::Duration;

/// How a pool runs its tasks. Start from `PoolConfig::default()` and set
/// fields (fields may be added in minor releases):
///
/// ```
/// use std::time::Duration;
/// use procluster::pool::PoolConfig;
/// let mut config = PoolConfig::default();
/// config.concurrency = 4;
/// config.timeout = Some(Duration::from_secs(10));
/// assert_eq!(config.max_attempts, 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Attempts at a task whose worker dies or times out (or whose handler
    /// returns a retryable error) before it fails with the reason of each.
    /// At least 1.
    pub max_attempts: u32,
    /// How long one attempt may run. A task past it is tried again
    /// elsewhere and its worker, presumed hung, is recycled with SIGKILL
    /// (its other tasks run again elsewhere, without counting an attempt).
    /// `None`: no limit.
    pub timeout: Option<Duration>,
    /// How many tasks may wait for a worker. When it is full, `submit`
    /// waits for room (backpressure) and `try_submit` fails at once with
    /// [`PoolError::Full`](super::PoolError::Full). Tasks that run again
    /// after a failed attempt go back to the front of the queue even when it
    /// is full (at most the number running). At least 1.
    pub queue: usize,
    /// How many tasks one worker runs at once. At least 1.
    pub concurrency: u32,
    /// Tasks and results from this many encoded bytes up travel in a
    /// sealed memory file (Linux `memfd`) whose descriptor rides with the
    /// frame, instead of through the channel's socket: the receiver maps it
    /// and decodes from its pages, and a worker's task is forwarded by the
    /// primary without being read. `None`: always through the socket.
    /// (Workers learn it from the primary before their first task; a
    /// worker's submissions before that use the default.)
    pub memfd_threshold: Option<usize>,
    /// A pool on Redis ([`Pool::redis`](super::Pool::redis)): how long a task
    /// read by a primary may go without a sign of life from it (each primary
    /// renews its tasks four times in this period) before another primary
    /// takes it over and runs it, presuming the first one dead or stalled.
    /// Ignored by a pool on the channel.
    pub reclaim_after: Duration,
    /// A pool on Redis: how many times a task may be taken over from a
    /// primary that stopped answering before it fails with
    /// [`PoolError::TooManyReclaims`](super::PoolError::TooManyReclaims) (a
    /// task that ends every primary it reaches must not end them all).
    /// Ignored by a pool on the channel.
    pub max_reclaims: u32,
}

/// The default [`PoolConfig::memfd_threshold`]: 256 KiB.
pub const DEFAULT_MEMFD_THRESHOLD: usize = 256 * 1024;

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            timeout: Some(Duration::from_secs(60)),
            queue: 1024,
            concurrency: 1,
            memfd_threshold: Some(DEFAULT_MEMFD_THRESHOLD),
            reclaim_after: Duration::from_secs(30),
            max_reclaims: 3,
        }
    }
}

impl PoolConfig {
    /// The same settings with every number at least 1.
    pub(super) fn normalized(mut self) -> Self {
        self.max_attempts = self.max_attempts.max(1);
        self.queue = self.queue.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self.concurrency = self.concurrency.max(1);
        self.reclaim_after = self.reclaim_after.max(Duration::from_millis(100));
        self
    }
}
