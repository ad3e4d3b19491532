//! What can go wrong with a task, and why each attempt at it failed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ExitStatus, Signal, WorkerId};

/// Why a task did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// [`try_submit`](super::Pool::try_submit) found the queue full; nothing
    /// was queued. Try again later, or `submit`, which waits for room.
    #[error(
        "the pool's queue is full ({0} tasks wait); nothing was queued: try later, or use submit, which waits for room"
    )]
    Full(usize),
    /// The handler returned an error not marked retryable; it ran once.
    #[error("the handler failed: {0}")]
    Handler(String),
    /// Every attempt failed (the worker died, the task timed out, or a
    /// retryable handler error), `max_attempts` times.
    #[error("{}", describe_attempts(.0))]
    Failed(Vec<Attempt>),
    /// The task or its result could not be encoded or decoded as its type.
    #[error("{0}")]
    Codec(String),
    /// The pool cannot take tasks: it was never added to a cluster, its
    /// worker is cut off from the primary, or the cluster is gone.
    #[error("the pool cannot take tasks: {0}")]
    Closed(String),
    /// A worker has as many submissions waiting as it may
    /// ([`MAX_WORKER_SUBMISSIONS`](super::MAX_WORKER_SUBMISSIONS)).
    #[error("this worker already has {0} submissions waiting, the most it may have")]
    TooManySubmissions(usize),
    /// A pool on Redis: the task was taken over this many times from
    /// primaries that stopped answering while they held it, more than
    /// [`PoolConfig::max_reclaims`](super::PoolConfig::max_reclaims) allows;
    /// it may be what ends them.
    #[error(
        "the task was taken over {0} times from primaries that stopped answering while they held it \
         (more than max_reclaims allows); it may be what ends them"
    )]
    TooManyReclaims(u32),
    /// A pool on Redis: the Redis server refused or could not be reached.
    #[error("the pool's Redis backend failed: {0}")]
    Backend(String),
}

fn describe_attempts(attempts: &[Attempt]) -> String {
    let mut text = format!(
        "the task failed after {} attempt{}:",
        attempts.len(),
        if attempts.len() == 1 { "" } else { "s" }
    );
    for (n, attempt) in attempts.iter().enumerate() {
        text.push_str(&format!(" ({}) {attempt};", n + 1));
    }
    text.pop();
    text
}

/// One failed attempt at a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The worker that ran it.
    pub worker: WorkerId,
    /// What went wrong there.
    pub failure: AttemptFailure,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} {}", self.worker, self.failure)
    }
}

/// What ended one attempt at a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AttemptFailure {
    /// The worker ended while it ran the task: an exit code or a signal.
    WorkerEnded {
        /// Its exit code, if it exited by itself.
        code: Option<i32>,
        /// The number of the signal that ended it, if one did.
        signal: Option<i32>,
    },
    /// The task ran longer than the pool's timeout; its worker was recycled
    /// (SIGKILL).
    TimedOut(Duration),
    /// The handler returned an error marked retryable.
    Handler(String),
}

impl AttemptFailure {
    pub(super) fn ended(status: ExitStatus) -> Self {
        Self::WorkerEnded {
            code: status.code(),
            signal: status.signal().map(Signal::number),
        }
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WorkerEnded {
                code: Some(code), ..
            } => write!(f, "exited with code {code}"),
            Self::WorkerEnded {
                signal: Some(n), ..
            } => match Signal::from_number(*n) {
                Some(signal) => write!(f, "was killed by {signal}"),
                None => write!(f, "was killed by signal {n}"),
            },
            Self::WorkerEnded { .. } => write!(f, "ended"),
            Self::TimedOut(after) => write!(f, "timed out after {after:?} and was recycled"),
            Self::Handler(message) => write!(f, "handler failed: {message}"),
        }
    }
}

/// What a handler returns when it cannot produce a result. Not retried
/// unless made with [`HandlerError::retryable`].
///
/// ```
/// use procluster::pool::HandlerError;
/// let error = HandlerError::new("no such image");
/// assert!(!error.is_retryable());
/// let error = HandlerError::retryable("the database is busy");
/// assert!(error.is_retryable());
/// assert_eq!(error.to_string(), "the database is busy");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    retryable: bool,
}

impl HandlerError {
    /// An error returned to the submitter as is.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: false,
        }
    }

    /// An error worth another attempt (on any worker), up to the pool's
    /// `max_attempts`.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: true,
        }
    }

    /// Whether the task is tried again.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_task_says_why_for_each_attempt() {
        let error = PoolError::Failed(vec![
            Attempt {
                worker: WorkerId::new(2),
                failure: AttemptFailure::ended(ExitStatus::signaled(Signal::KILL)),
            },
            Attempt {
                worker: WorkerId::new(3),
                failure: AttemptFailure::TimedOut(Duration::from_secs(1)),
            },
            Attempt {
                worker: WorkerId::new(4),
                failure: AttemptFailure::ended(ExitStatus::exited(3)),
            },
        ]);
        assert_eq!(
            error.to_string(),
            "the task failed after 3 attempts: (1) worker 2 was killed by SIGKILL; \
             (2) worker 3 timed out after 1s and was recycled; (3) worker 4 exited with code 3"
        );
    }
}
