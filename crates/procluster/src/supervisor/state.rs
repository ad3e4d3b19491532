//! Internal state of the supervisor: one enum per slot position.

use std::time::Instant;

use super::config::SupervisorConfig;
use super::types::{CrashCause, Generation, Outcome, RecycleReason, SpawnId, StopReason};
use crate::WorkerId;

/// A live worker process as the supervisor knows it.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) id: WorkerId,
    pub(super) generation: Generation,
    pub(super) spawned_at: Instant,
    /// Jittered `max_requests` for this worker.
    pub(super) request_limit: Option<u64>,
}

/// The worker that serves a slot, or why there is none.
#[derive(Debug)]
pub(super) enum Current {
    /// Waiting for the restart delay.
    Backoff { until: Instant },
    /// Spawn command issued, waiting for `spawned`/`spawn_failed`.
    Spawning { spawn: SpawnId },
    /// Process exists, not ready yet.
    Starting { worker: Worker, deadline: Instant },
    /// Serving.
    Ready(ReadyWorker),
    /// Missed heartbeats, diagnostic signal sent, SIGKILL due at `kill_at`.
    Hung { worker: Worker, kill_at: Instant },
    /// Asked to stop (a ready timeout), or SIGKILL sent (`kill_at` is
    /// `None`); its exit will count as `cause`.
    Killing {
        worker: Worker,
        cause: CrashCause,
        /// SIGKILL due at, while the worker has its chance to stop.
        kill_at: Option<Instant>,
    },
    /// Breaker tripped: nothing runs and nothing is restarted.
    Halted,
}

impl Current {
    pub(super) fn worker(&self) -> Option<&Worker> {
        match self {
            Current::Starting { worker, .. }
            | Current::Hung { worker, .. }
            | Current::Killing { worker, .. } => Some(worker),
            Current::Ready(r) => Some(&r.worker),
            Current::Backoff { .. } | Current::Spawning { .. } | Current::Halted => None,
        }
    }

    /// Counts against the surge budget (a process exists or is being made).
    fn occupied(&self) -> bool {
        matches!(self, Current::Spawning { .. }) || self.worker().is_some()
    }

    fn deadline(&self, cfg: &SupervisorConfig, attempt: u32) -> Option<Instant> {
        match self {
            Current::Backoff { until } => Some(*until),
            Current::Starting { deadline, .. } => Some(*deadline),
            Current::Hung { kill_at, .. } => Some(*kill_at),
            Current::Killing { kill_at, .. } => *kill_at,
            Current::Ready(r) => r.deadline(cfg, attempt),
            Current::Spawning { .. } | Current::Halted => None,
        }
    }
}

/// A serving worker plus what is being watched about it.
#[derive(Debug)]
pub(super) struct ReadyWorker {
    pub(super) worker: Worker,
    /// When it became ready (stable uptime is measured from here).
    pub(super) since: Instant,
    pub(super) last_beat: Instant,
    pub(super) recycle: Option<PendingRecycle>,
}

impl ReadyWorker {
    pub(super) fn new(worker: Worker, now: Instant) -> Self {
        Self {
            worker,
            since: now,
            last_beat: now,
            recycle: None,
        }
    }

    fn deadline(&self, cfg: &SupervisorConfig, attempt: u32) -> Option<Instant> {
        let hang = cfg.heartbeat.map(|h| self.last_beat + h.timeout);
        let stable = (attempt > 0).then(|| self.since + cfg.stable_uptime);
        let recycle = match &self.recycle {
            Some(p) => p.retry_at,
            None => cfg.recycle.max_age.map(|a| self.worker.spawned_at + a),
        };
        [hang, stable, recycle].into_iter().flatten().min()
    }
}

/// A recycle wanted for the current worker.
#[derive(Debug)]
pub(super) struct PendingRecycle {
    pub(super) reason: RecycleReason,
    /// After a failed replacement: not before this instant. `None` = now.
    pub(super) retry_at: Option<Instant>,
}

/// Why a slot has a second (new-first) worker.
#[derive(Debug)]
pub(super) enum Purpose {
    Reload,
    Recycle(RecycleReason),
}

/// Replacement started before the current worker is retired.
#[derive(Debug)]
pub(super) struct Successor {
    pub(super) purpose: Purpose,
    pub(super) generation: Generation,
    pub(super) state: SuccessorState,
}

#[derive(Debug)]
pub(super) enum SuccessorState {
    Pending { spawn: SpawnId },
    Starting { worker: Worker, deadline: Instant },
}

impl SuccessorState {
    pub(super) fn worker(&self) -> Option<&Worker> {
        match self {
            SuccessorState::Starting { worker, .. } => Some(worker),
            SuccessorState::Pending { .. } => None,
        }
    }

    /// The same process, now as the slot's current worker.
    pub(super) fn into_current(self) -> Current {
        match self {
            SuccessorState::Pending { spawn } => Current::Spawning { spawn },
            SuccessorState::Starting { worker, deadline } => Current::Starting { worker, deadline },
        }
    }
}

/// One of the N positions of the cluster.
#[derive(Debug)]
pub(super) struct Slot {
    /// Generation the slot runs; restarts reuse it.
    pub(super) generation: Generation,
    /// Consecutive failures (drives the backoff).
    pub(super) attempt: u32,
    /// Consecutive spawns refused for lack of resources (drives their own
    /// backoff; not failures of the workers).
    pub(super) short: u32,
    pub(super) current: Current,
    pub(super) successor: Option<Successor>,
}

impl Slot {
    pub(super) fn new(generation: Generation, current: Current) -> Self {
        Self {
            generation,
            attempt: 0,
            short: 0,
            current,
            successor: None,
        }
    }

    pub(super) fn alive(&self) -> usize {
        usize::from(self.current.occupied()) + usize::from(self.successor.is_some())
    }

    pub(super) fn deadline(&self, cfg: &SupervisorConfig) -> Option<Instant> {
        let successor = match &self.successor {
            Some(Successor {
                state: SuccessorState::Starting { deadline, .. },
                ..
            }) => Some(*deadline),
            _ => None,
        };
        self.current
            .deadline(cfg, self.attempt)
            .into_iter()
            .chain(successor)
            .min()
    }

    /// Ready and without a successor: may receive one.
    pub(super) fn can_take_successor(&self) -> bool {
        self.successor.is_none() && matches!(self.current, Current::Ready(_))
    }

    /// A recycle that may start now, unless a rollout to `rollout` will
    /// replace this slot anyway.
    pub(super) fn due_recycle(&self, rollout: Option<Generation>) -> Option<RecycleReason> {
        if self.successor.is_some() || rollout.is_some_and(|g| self.generation < g) {
            return None;
        }
        match &self.current {
            Current::Ready(ReadyWorker {
                recycle: Some(p), ..
            }) if p.retry_at.is_none() => Some(p.reason),
            _ => None,
        }
    }
}

/// A worker asked to go; its exit is expected.
#[derive(Debug)]
pub(super) struct Retiring {
    pub(super) worker: WorkerId,
    /// SIGKILL due at; `None` once sent.
    pub(super) kill_at: Option<Instant>,
}

/// A rolling reload in progress.
#[derive(Debug)]
pub(super) struct Rollout {
    pub(super) generation: Generation,
    /// Another reload was requested meanwhile.
    pub(super) queued: bool,
}

#[derive(Debug)]
pub(super) struct Stopping {
    pub(super) reason: StopReason,
    /// Second stop(): kill instead of disconnect.
    pub(super) forced: bool,
    /// Some worker had to be SIGKILLed.
    pub(super) killed: bool,
}

#[derive(Debug)]
pub(super) enum Phase {
    Idle,
    Running,
    Stopping(Stopping),
    Finished(Outcome),
}
