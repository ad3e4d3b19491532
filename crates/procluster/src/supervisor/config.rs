//! Configuration of the supervisor.

use std::time::Duration;

use crate::Signal;

/// Restart delay policy: exponential backoff with jitter.
///
/// The delay before restart attempt `n` (1-based) is
/// `min(initial * multiplier^(n-1), max) * (1 - jitter * u)` where `u` in
/// `[0, 1)` comes from the [`JitterSource`](super::JitterSource). `max` is
/// therefore a hard upper bound and jitter only ever shortens a delay.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// Delay before the first restart of a slot.
    pub initial: Duration,
    /// Growth factor per consecutive failure (values below 1 are treated as 1).
    pub multiplier: f64,
    /// Upper bound of the delay.
    pub max: Duration,
    /// Fraction of the delay that may be removed at random, in `[0, 1]`.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(15),
            jitter: 0.2,
        }
    }
}

/// Crash-loop breaker: trips when more than `max_crashes` unexpected failures
/// (cluster-wide, including failures before ready) happen within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Number of failures tolerated within `window`; one more trips.
    pub max_crashes: usize,
    /// Sliding window in which failures are counted.
    pub window: Duration,
    /// When tripped, stop the whole cluster and report it as failed
    /// (`Outcome { reason: StopReason::BreakerTripped, .. }`). Otherwise the
    /// surviving workers keep running and nothing is restarted until
    /// [`Supervisor::reset_breaker`](super::Supervisor::reset_breaker).
    pub exit_on_trip: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_crashes: 10,
            window: Duration::from_secs(60),
            exit_on_trip: false,
        }
    }
}

/// Hang detection: a ready worker silent for `timeout` receives `signal`
/// (meant to produce a diagnostic such as a core dump or stack trace) and is
/// killed `grace` later, then replaced like a crashed worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeartbeatConfig {
    /// Maximum silence after which a ready worker is considered hung.
    pub timeout: Duration,
    /// Diagnostic signal sent to a hung worker.
    pub signal: Signal,
    /// Time between the diagnostic signal and SIGKILL.
    pub grace: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            signal: Signal::ABRT,
            grace: Duration::from_secs(5),
        }
    }
}

/// Recycling limits; each one replaces the worker gracefully, new one first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecycleConfig {
    /// Recycle when the worker's memory exceeds this many bytes: the
    /// resident set of its process and of every process it started, added
    /// up (sampled once a second by a [`SupervisedCluster`](super::SupervisedCluster)).
    pub max_rss: Option<u64>,
    /// Recycle after this many requests (plus the per-worker jitter).
    pub max_requests: Option<u64>,
    /// Each worker's request limit is `max_requests + k`, `k` drawn uniformly
    /// from `0..=max_requests_jitter` when the worker is spawned.
    pub max_requests_jitter: u64,
    /// Recycle a worker this long after it was spawned.
    pub max_age: Option<Duration>,
}

/// Full configuration of a [`Supervisor`](super::Supervisor).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// Number of worker slots (`0..workers`).
    pub workers: usize,
    /// Restart delay policy.
    pub backoff: BackoffConfig,
    /// A slot's backoff attempt counter resets once its worker has been ready
    /// for this long.
    pub stable_uptime: Duration,
    /// Crash-loop breaker; `None` disables it.
    pub breaker: Option<BreakerConfig>,
    /// Time a disconnected worker gets to exit before it is killed.
    pub kill_timeout: Duration,
    /// Time a spawned worker gets to become ready.
    pub ready_timeout: Duration,
    /// Maximum number of workers alive beyond `workers` during reloads and
    /// recycling (at least 1).
    pub max_surge: usize,
    /// Hang detection; `None` disables it.
    pub heartbeat: Option<HeartbeatConfig>,
    /// Recycling limits.
    pub recycle: RecycleConfig,
    /// Seed of the default jitter source used by
    /// [`Supervisor::new`](super::Supervisor::new).
    pub jitter_seed: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            backoff: BackoffConfig::default(),
            stable_uptime: Duration::from_secs(30),
            breaker: Some(BreakerConfig::default()),
            kill_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(30),
            max_surge: 1,
            heartbeat: None,
            recycle: RecycleConfig::default(),
            jitter_seed: 0x5EED,
        }
    }
}

impl SupervisorConfig {
    /// Clamps out-of-range values instead of rejecting them: `max_surge >= 1`,
    /// `multiplier >= 1` (NaN becomes 1), `jitter` in `[0, 1]` (NaN becomes 0).
    pub fn normalized(mut self) -> Self {
        self.max_surge = self.max_surge.max(1);
        let b = &mut self.backoff;
        b.multiplier = if b.multiplier.is_nan() {
            1.0
        } else {
            b.multiplier.max(1.0)
        };
        b.jitter = if b.jitter.is_nan() {
            0.0
        } else {
            b.jitter.clamp(0.0, 1.0)
        };
        self
    }
}
