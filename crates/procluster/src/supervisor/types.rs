//! Identifiers, commands and events exchanged with the IO shell.

use std::time::Duration;

use crate::{ExitStatus, Signal, WorkerId};

/// Identifies one [`Command::Spawn`]; the shell echoes it back in
/// [`Supervisor::spawned`](super::Supervisor::spawned) or
/// [`Supervisor::spawn_failed`](super::Supervisor::spawn_failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpawnId(pub u64);

/// Code generation of a worker: 0 at start, +1 per requested reload. The shell
/// decides what a generation means (binary, config, environment, ...).
pub type Generation = u64;

/// An action the shell must perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start a worker for `slot` running `generation`; answer with
    /// `spawned(spawn, ..)` or `spawn_failed(spawn, ..)`.
    Spawn {
        /// Ticket to echo back.
        spawn: SpawnId,
        /// Slot the worker will occupy (stable across restarts).
        slot: usize,
        /// Code generation to run.
        generation: Generation,
    },
    /// Ask the worker to finish its work and exit (Node's `worker.disconnect()`).
    Disconnect {
        /// Target worker.
        worker: WorkerId,
    },
    /// Deliver `signal` to the worker.
    Signal {
        /// Target worker.
        worker: WorkerId,
        /// Signal to deliver.
        signal: Signal,
    },
    /// SIGKILL the worker (or the platform equivalent).
    Kill {
        /// Target worker.
        worker: WorkerId,
    },
}

/// Why a worker failed unexpectedly. Every failure counts for the breaker,
/// except [`CrashCause::NoResources`] and [`CrashCause::TaskFault`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrashCause {
    /// The process exited on its own (or was killed by someone else).
    Exited {
        /// Exit status.
        info: ExitStatus,
        /// The worker had not reported ready yet.
        before_ready: bool,
    },
    /// The shell could not start the process.
    SpawnFailed(String),
    /// The shell could not start the process for lack of resources (too
    /// many open files or processes, no memory). Not the workers' fault:
    /// never counted for the breaker.
    NoResources(String),
    /// The worker did not become ready within `ready_timeout` and was
    /// stopped.
    ReadyTimeout,
    /// The worker stopped sending heartbeats and was killed.
    Hang,
    /// The process ended while it ran a task that a service of the cluster
    /// (a work pool) holds responsible: the task had already ended another
    /// worker, so the fault is the input's, not the worker's. The slot is
    /// restarted as after any failure, but the crash-loop breaker does not
    /// count it: one poison task must not stop the whole cluster.
    TaskFault {
        /// Exit status.
        info: ExitStatus,
        /// What the service says about the task.
        task: String,
    },
}

/// A short phrase for the failure, to follow "the worker", e.g. "exited
/// with code 1 before it was ready".
impl std::fmt::Display for CrashCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited { info, before_ready } => {
                match (info.code(), info.signal()) {
                    (Some(127), _) => write!(f, "exited with code 127 (program not found?)")?,
                    (Some(126), _) => write!(f, "exited with code 126 (program not executable?)")?,
                    (Some(code), _) => write!(f, "exited with code {code}")?,
                    (None, Some(signal)) => write!(f, "was killed by {signal}")?,
                    (None, None) => write!(f, "ended")?,
                }
                if *before_ready {
                    write!(f, " before it was ready")?;
                }
                Ok(())
            }
            Self::SpawnFailed(why) => write!(f, "could not be started: {why}"),
            Self::NoResources(why) => {
                write!(f, "could not be started for lack of resources: {why}")
            }
            Self::ReadyTimeout => write!(f, "was not ready within the ready timeout"),
            Self::Hang => write!(f, "stopped sending heartbeats"),
            Self::TaskFault { info, task } => {
                write!(f, "ended ({info}) while running {task}")
            }
        }
    }
}

/// Why a worker is being recycled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecycleReason {
    /// An RSS sample exceeded `max_rss`.
    Memory {
        /// Reported resident set size in bytes.
        rss: u64,
        /// Configured limit.
        limit: u64,
    },
    /// The worker served its (jittered) request limit.
    Requests {
        /// Reported request count.
        count: u64,
        /// This worker's limit.
        limit: u64,
    },
    /// The worker reached `max_age`.
    MaxAge {
        /// Age of the worker when the limit was noticed.
        age: Duration,
    },
}

/// Why a rolling reload failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadFailure {
    /// A new-generation worker failed before becoming ready.
    Worker {
        /// Slot being moved.
        slot: usize,
        /// What happened to the new worker.
        cause: CrashCause,
    },
    /// The crash-loop breaker tripped during the rollout.
    BreakerTripped,
    /// The supervisor was stopped during the rollout.
    Stopped,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The supervisor is not running (not started, stopping or finished).
    NotRunning,
    /// The crash-loop breaker is tripped; reset it first.
    BreakerTripped,
}

/// Why the supervisor stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// [`Supervisor::stop`](super::Supervisor::stop) was called.
    Requested,
    /// The crash-loop breaker tripped with `exit_on_trip` set.
    BreakerTripped,
}

/// Final result once the supervisor is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Why it stopped.
    pub reason: StopReason,
    /// Every worker exited without the supervisor having to SIGKILL it
    /// (neither a `kill_timeout` expiry nor a second `stop()`).
    pub in_time: bool,
}

impl Outcome {
    /// True when the cluster should be reported as failed.
    pub fn is_failure(&self) -> bool {
        self.reason == StopReason::BreakerTripped
    }
}

/// Something that happened; for logging, metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// `start()` created the initial slots.
    Started {
        /// Number of slots.
        workers: usize,
    },
    /// A worker process exists (answer to a spawn).
    WorkerSpawned {
        /// Its slot.
        slot: usize,
        /// The worker.
        worker: WorkerId,
        /// Its generation.
        generation: Generation,
    },
    /// A worker reported ready.
    WorkerReady {
        /// Its slot.
        slot: usize,
        /// The worker.
        worker: WorkerId,
        /// Its generation.
        generation: Generation,
    },
    /// A worker process ended.
    WorkerExited {
        /// The worker.
        worker: WorkerId,
        /// Its slot, when the exit was unexpected (`None` for retired workers).
        slot: Option<usize>,
        /// Exit status.
        info: ExitStatus,
        /// The supervisor had asked it to go (disconnect, scale down, stop).
        expected: bool,
    },
    /// A worker (or a spawn for a slot) failed; counts for the breaker.
    WorkerFailed {
        /// The slot.
        slot: usize,
        /// What happened.
        cause: CrashCause,
    },
    /// A worker missed `ready_timeout`: it is asked to stop, and killed if
    /// it has not exited after `kill_timeout`.
    ReadyTimeout {
        /// The slot.
        slot: usize,
        /// The worker.
        worker: WorkerId,
    },
    /// A ready worker missed its heartbeats; it got the diagnostic signal and
    /// will be killed after the grace period.
    HangDetected {
        /// The slot.
        slot: usize,
        /// The worker.
        worker: WorkerId,
        /// Diagnostic signal sent.
        signal: Signal,
    },
    /// A slot will be respawned after `delay`.
    RestartScheduled {
        /// The slot.
        slot: usize,
        /// Consecutive failure count of the slot (1-based).
        attempt: u32,
        /// Delay before the spawn.
        delay: Duration,
    },
    /// A slot's worker could not be started for lack of resources (too many
    /// open files or processes, no memory): the spawn is retried after
    /// `retry_in`, and it does not count for the breaker.
    SpawnDeferred {
        /// The slot.
        slot: usize,
        /// What the OS said.
        reason: String,
        /// Consecutive deferrals of the slot (1-based).
        attempt: u32,
        /// Delay before the next try.
        retry_in: Duration,
    },
    /// The slot's worker stayed up for `stable_uptime`; backoff starts over.
    BackoffReset {
        /// The slot.
        slot: usize,
    },
    /// Too many failures: automatic spawning stopped.
    BreakerTripped {
        /// Failures counted in the window.
        crashes: usize,
        /// The window.
        window: Duration,
    },
    /// `reset_breaker()` re-enabled spawning.
    BreakerReset,
    /// A rolling reload to `generation` began.
    ReloadStarted {
        /// Target generation.
        generation: Generation,
    },
    /// A reload was requested during a rollout; it starts when that one ends.
    ReloadQueued {
        /// Generation of the rollout in progress.
        behind: Generation,
    },
    /// A reload request was refused.
    ReloadRejected {
        /// Why.
        reason: RejectReason,
    },
    /// One slot moved to the new generation (the old worker is disconnected).
    SlotReloaded {
        /// The slot.
        slot: usize,
        /// Old worker, now retiring.
        old: WorkerId,
        /// New worker, now serving.
        new: WorkerId,
        /// New generation.
        generation: Generation,
    },
    /// Every slot runs `generation`.
    ReloadFinished {
        /// The generation.
        generation: Generation,
    },
    /// The rollout stopped; slots not yet moved keep their old worker.
    ReloadFailed {
        /// Target generation of the failed rollout.
        generation: Generation,
        /// Why.
        failure: ReloadFailure,
    },
    /// A replacement was spawned for a worker that hit a recycling limit.
    RecycleStarted {
        /// The slot.
        slot: usize,
        /// Worker being recycled.
        worker: WorkerId,
        /// Why.
        reason: RecycleReason,
    },
    /// The replacement is ready; the old worker is disconnected.
    Recycled {
        /// The slot.
        slot: usize,
        /// Old worker, now retiring.
        old: WorkerId,
        /// New worker.
        new: WorkerId,
        /// Why.
        reason: RecycleReason,
    },
    /// The replacement failed; the old worker keeps serving and the recycle
    /// is retried after `retry_in`.
    RecycleFailed {
        /// The slot.
        slot: usize,
        /// Why the recycle was wanted.
        reason: RecycleReason,
        /// What happened to the replacement.
        cause: CrashCause,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// The number of slots changed.
    Scaled {
        /// Previous slot count.
        from: usize,
        /// New slot count.
        to: usize,
    },
    /// A worker asked to stop did not exit within `kill_timeout` and was
    /// killed.
    KillTimeout {
        /// The worker.
        worker: WorkerId,
    },
    /// Graceful stop began.
    StopStarted {
        /// Why.
        reason: StopReason,
    },
    /// A second `stop()`: every remaining worker is killed now.
    StopForced,
    /// Every worker has exited; the supervisor is finished.
    StopFinished {
        /// Result.
        outcome: Outcome,
    },
}

/// What a person reads in a log: `worker 3 (slot 0) started`, `slot 1:
/// restart in 200ms (attempt 2)`.
///
/// ```
/// use std::time::Duration;
/// use procluster::supervisor::Event;
///
/// let event = Event::RestartScheduled { slot: 1, attempt: 2, delay: Duration::from_millis(200) };
/// assert_eq!(event.to_string(), "slot 1: restart in 200ms (attempt 2)");
/// ```
impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Started { workers } => write!(f, "supervising {workers} worker slot(s)"),
            Self::WorkerSpawned {
                slot,
                worker,
                generation,
            } => write!(
                f,
                "worker {worker} started in slot {slot} (generation {generation})"
            ),
            Self::WorkerReady { slot, worker, .. } => {
                write!(f, "worker {worker} is ready in slot {slot}")
            }
            Self::WorkerExited {
                worker,
                info,
                expected: true,
                ..
            } => write!(f, "worker {worker} stopped: {info}"),
            Self::WorkerExited { worker, info, .. } => {
                write!(f, "worker {worker} exited unexpectedly: {info}")
            }
            Self::WorkerFailed { slot, cause } => write!(f, "the worker of slot {slot} {cause}"),
            Self::ReadyTimeout { slot, worker } => write!(
                f,
                "worker {worker} (slot {slot}) was not ready in time; stopping it"
            ),
            Self::HangDetected {
                slot,
                worker,
                signal,
            } => write!(
                f,
                "worker {worker} (slot {slot}) stopped sending heartbeats; sent {signal}, SIGKILL follows"
            ),
            Self::RestartScheduled {
                slot,
                attempt,
                delay,
            } => write!(f, "slot {slot}: restart in {delay:?} (attempt {attempt})"),
            Self::SpawnDeferred {
                slot,
                reason,
                attempt,
                retry_in,
            } => write!(
                f,
                "slot {slot}: cannot start a worker for lack of resources ({reason}); \
                 trying again in {retry_in:?} (attempt {attempt}), the other workers keep serving"
            ),
            Self::BackoffReset { slot } => write!(f, "slot {slot}: stable again, backoff reset"),
            Self::BreakerTripped { crashes, window } => write!(
                f,
                "crash loop: {crashes} failures within {window:?}; no more restarts"
            ),
            Self::BreakerReset => write!(f, "crash-loop breaker reset; restarting"),
            Self::ReloadStarted { generation } => {
                write!(f, "reload to generation {generation} started")
            }
            Self::ReloadQueued { behind } => {
                write!(f, "reload queued behind generation {behind}")
            }
            Self::ReloadRejected { reason } => write!(f, "reload refused: {reason:?}"),
            Self::SlotReloaded { slot, old, new, .. } => write!(
                f,
                "slot {slot} reloaded: worker {new} replaces worker {old}"
            ),
            Self::ReloadFinished { generation } => {
                write!(
                    f,
                    "reload finished: every slot runs generation {generation}"
                )
            }
            Self::ReloadFailed {
                generation,
                failure,
            } => {
                write!(f, "reload to generation {generation} failed: ")?;
                match failure {
                    ReloadFailure::Worker { slot, cause } => {
                        write!(f, "the new worker of slot {slot} {cause}")?;
                    }
                    ReloadFailure::BreakerTripped => write!(f, "the crash-loop breaker tripped")?,
                    ReloadFailure::Stopped => write!(f, "the cluster is stopping")?,
                }
                write!(f, "; the old workers keep serving")
            }
            Self::RecycleStarted {
                slot,
                worker,
                reason,
            } => write!(f, "recycling worker {worker} (slot {slot}): {reason}"),
            Self::Recycled { slot, old, new, .. } => write!(
                f,
                "slot {slot} recycled: worker {new} replaces worker {old}"
            ),
            Self::RecycleFailed {
                slot,
                cause,
                retry_in,
                ..
            } => write!(
                f,
                "slot {slot}: the replacement {cause}; recycling again in {retry_in:?}"
            ),
            Self::Scaled { from, to } => write!(f, "scaled from {from} to {to} worker(s)"),
            Self::KillTimeout { worker } => {
                write!(f, "worker {worker} did not stop in time; killed")
            }
            Self::StopStarted { reason } => match reason {
                StopReason::Requested => write!(f, "stopping"),
                StopReason::BreakerTripped => write!(f, "stopping: crash loop"),
            },
            Self::StopForced => write!(f, "stopping now: killing every worker"),
            Self::StopFinished { outcome } if outcome.in_time => {
                write!(f, "stopped: every worker exited in time")
            }
            Self::StopFinished { .. } => {
                write!(f, "stopped: some workers had to be killed")
            }
        }
    }
}

/// `memory 612 MiB over 512 MiB`, `1003 requests (limit 1000)`, `age 1h0m0s`.
impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory { rss, limit } => {
                write!(f, "memory {} MiB over {} MiB", rss >> 20, limit >> 20)
            }
            Self::Requests { count, limit } => write!(f, "{count} requests (limit {limit})"),
            Self::MaxAge { age } => write!(f, "age {age:?}"),
        }
    }
}
