//! The application's side of a running [`SupervisedCluster`](super::SupervisedCluster):
//! a cloneable handle that asks for reloads, scaling, a stop, or a status
//! snapshot, and the errors those requests can end with.

use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::types::{Generation, RejectReason, ReloadFailure};
use crate::WorkerId;

/// A request from a [`SupervisorHandle`] to the supervising task.
#[derive(Debug)]
pub(super) enum Request {
    Reload(oneshot::Sender<Result<(), ReloadError>>),
    ScaleTo(usize),
    Stop,
    ResetBreaker,
    MarkReady(WorkerId),
    Status(oneshot::Sender<ClusterStatus>),
}

/// Controls a running [`SupervisedCluster`](super::SupervisedCluster) from
/// anywhere (another task, a control socket, a signal handler). Cheap to
/// clone; every clone talks to the same supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    pub(super) requests: mpsc::UnboundedSender<Request>,
}

impl SupervisorHandle {
    /// Starts a rolling reload and waits for its end: every slot gets a new
    /// worker of the next generation, started before the old one is
    /// disconnected. A reload asked for while another one is rolling out is
    /// queued behind it (several such requests share one rollout).
    ///
    /// # Errors
    /// [`ReloadError::Failed`] when a new worker crashed or was not ready in
    /// time (the slots not yet moved keep their old, still serving, worker),
    /// [`ReloadError::Rejected`] when the supervisor is stopping or its
    /// crash-loop breaker is tripped, [`ReloadError::Dropped`] when a queued
    /// reload could not start, and [`ReloadError::Gone`] when the supervisor
    /// has already finished.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the reload; it only stops waiting.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Reload(tx))
            .map_err(|_| ReloadError::Gone)?;
        rx.await.unwrap_or(Err(ReloadError::Gone))
    }

    /// Changes the number of workers: new slots start at once, the highest
    /// slots are disconnected gracefully. Returns without waiting.
    ///
    /// # Errors
    /// [`SupervisorGone`] once the supervisor has finished.
    pub fn scale_to(&self, workers: usize) -> Result<(), SupervisorGone> {
        self.send(Request::ScaleTo(workers))
    }

    /// Stops the cluster. The first call disconnects every worker and
    /// SIGKILLs those still running after the kill timeout; a second call
    /// SIGKILLs every remaining worker at once. Returns without waiting; the
    /// supervised cluster's run ends when the last worker has exited.
    ///
    /// # Errors
    /// [`SupervisorGone`] once the supervisor has finished.
    pub fn stop(&self) -> Result<(), SupervisorGone> {
        self.send(Request::Stop)
    }

    /// Re-arms a tripped crash-loop breaker (when it was configured not to
    /// stop the cluster): empty slots are started again with a fresh backoff.
    ///
    /// # Errors
    /// [`SupervisorGone`] once the supervisor has finished.
    pub fn reset_breaker(&self) -> Result<(), SupervisorGone> {
        self.send(Request::ResetBreaker)
    }

    /// Declares worker `id` ready, whatever the configured
    /// [`Readiness`](super::Readiness): for readiness the application checks
    /// itself (a health probe, a foreign program's own signal). Ignored for
    /// a worker that is already ready or not supervised.
    ///
    /// # Errors
    /// [`SupervisorGone`] once the supervisor has finished.
    pub fn mark_ready(&self, id: WorkerId) -> Result<(), SupervisorGone> {
        self.send(Request::MarkReady(id))
    }

    /// A snapshot of the workers and of the supervisor's state.
    ///
    /// # Errors
    /// [`SupervisorGone`] once the supervisor has finished.
    pub async fn status(&self) -> Result<ClusterStatus, SupervisorGone> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Status(tx))?;
        rx.await.map_err(|_| SupervisorGone)
    }

    fn send(&self, request: Request) -> Result<(), SupervisorGone> {
        self.requests.send(request).map_err(|_| SupervisorGone)
    }
}

/// The supervisor has finished (its cluster stopped); it takes no more
/// requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the supervisor has finished and takes no more requests")]
pub struct SupervisorGone;

/// Why a [`SupervisorHandle::reload`] did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The rollout stopped; slots not yet moved still run their old worker.
    #[error("reload to generation {generation} failed: {}", describe_failure(.failure))]
    Failed {
        /// The generation that was being rolled out.
        generation: Generation,
        /// Why it stopped.
        failure: ReloadFailure,
    },
    /// The supervisor refused to start a rollout.
    #[error("reload refused: {}", describe_reject(*.0))]
    Rejected(RejectReason),
    /// The reload was queued behind another rollout and could not start
    /// after it (the breaker tripped or the cluster began stopping).
    #[error(
        "the queued reload was dropped: the cluster stopped or its crash-loop breaker tripped before it could start"
    )]
    Dropped,
    /// The supervisor finished before the reload did.
    #[error("the supervisor finished before the reload completed")]
    Gone,
}

fn describe_reject(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::NotRunning => "the cluster is not running (stopping or stopped)",
        RejectReason::BreakerTripped => {
            "the crash-loop breaker is tripped; reset it or fix the crashing workers first"
        }
    }
}

fn describe_failure(failure: &ReloadFailure) -> String {
    match failure {
        ReloadFailure::Worker { slot, cause } => {
            format!("the new worker for slot {slot} {}", cause)
        }
        ReloadFailure::BreakerTripped => "the crash-loop breaker tripped".into(),
        ReloadFailure::Stopped => "the cluster was stopped".into(),
    }
}

/// Where a supervised worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerPhase {
    /// Started, not ready yet.
    Starting,
    /// Ready and serving.
    Ready,
    /// Asked to go (disconnected, signalled or killed); exiting.
    Stopping,
}

/// One worker in a [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// The worker's id in the cluster.
    pub id: WorkerId,
    /// The slot it fills.
    pub index: usize,
    /// Its process id.
    pub pid: u32,
    /// Its generation (0 at start, +1 per reload).
    pub generation: Generation,
    /// Where it is in its life.
    pub phase: WorkerPhase,
    /// How many times its slot was restarted after a failure.
    pub restarts: u32,
    /// When it was started.
    pub started_at: SystemTime,
}

impl WorkerStatus {
    /// How long it has been running.
    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed().unwrap_or_default()
    }
}

/// A snapshot of a supervised cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The workers alive, by id.
    pub workers: Vec<WorkerStatus>,
    /// The target number of workers (slots).
    pub target_workers: usize,
    /// The latest generation asked for by a reload.
    pub generation: Generation,
    /// A rolling reload is in progress.
    pub reloading: bool,
    /// The crash-loop breaker is tripped: nothing is restarted.
    pub breaker_tripped: bool,
}
