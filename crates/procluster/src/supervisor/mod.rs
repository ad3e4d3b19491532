//! Supervision: keeping a cluster's workers healthy.
//!
//! Two layers: decisions apart from the IO that carries them out.
//!
//! * [`Supervisor`], a sans-IO state machine. It makes every decision (when
//!   to spawn, restart, reload, recycle, signal or kill a worker) but
//!   performs no IO itself: an IO shell feeds it observations (`spawned`,
//!   `ready`, `exited`, `heartbeat`, ...) and the current time, then drains
//!   [`Command`]s to execute and [`Event`]s to log.
//!   [`Supervisor::next_deadline`] tells the shell when to call
//!   [`Supervisor::tick`] next. Time is never read from a clock there: every
//!   input carries an [`std::time::Instant`] supplied by the caller, and
//!   randomness (restart jitter, per-worker request limits) comes from an
//!   injected [`JitterSource`], so the machine is deterministic under test.
//! * [`SupervisedCluster`], the IO shell that runs the machine against a real
//!   [`Cluster`](crate::primary::Cluster): it forks one worker per slot,
//!   restarts failed workers with backoff, trips a crash-loop breaker,
//!   detects hangs from heartbeats, recycles workers (requests, memory, age),
//!   rolls reloads out new-first, stops gracefully, and reports the
//!   cluster's and the supervisor's events in one stream. A cloneable
//!   [`SupervisorHandle`] reloads (and waits for the result), scales, stops
//!   and reports a [`ClusterStatus`].

mod backoff;
mod config;
mod control;
mod machine;
mod memory;
mod shell;
mod signals;
mod state;
mod types;

#[cfg(test)]
mod tests;

pub use backoff::{JitterSource, SplitMix64};
pub use config::{BackoffConfig, BreakerConfig, HeartbeatConfig, RecycleConfig, SupervisorConfig};
pub use control::{
    ClusterStatus, ReloadError, SupervisorGone, SupervisorHandle, WorkerPhase, WorkerStatus,
};
pub use machine::Supervisor;
pub use shell::{
    GENERATION_ENV, Readiness, Report, StartError, SupervisedCluster, SupervisionError,
    SupervisionOptions,
};
pub use types::{
    Command, CrashCause, Event, Generation, Outcome, RecycleReason, RejectReason, ReloadFailure,
    SpawnId, StopReason,
};
