//! Where a task's outcome goes: a waiting submitter, a batch, or a worker
//! that submitted it over its channel.

use tokio::sync::{mpsc, oneshot};

use super::error::PoolError;
use super::payload::Payload;
use crate::WorkerId;

/// A task's result in the cluster's format, or why there is none.
pub(super) type Outcome = Result<Payload, PoolError>;

/// One result of a batch: its index in the batch, and the outcome.
pub(super) enum BatchItem {
    Result(usize, Outcome),
    /// The batch's feeder submitted this many tasks and stopped.
    End(usize),
}

pub(super) enum Sink {
    One(oneshot::Sender<Outcome>),
    Batch {
        to: mpsc::UnboundedSender<BatchItem>,
        index: usize,
    },
    /// Answered over the channel of worker `worker` (in the primary).
    Worker {
        worker: WorkerId,
        submission: u64,
    },
    /// A task read from the pool's upstream (Redis): its outcome goes back
    /// there, under this handle.
    Upstream(u64),
}

impl Sink {
    /// Delivers the outcome to a local waiter; a worker's answer is the
    /// caller's to send, and comes back.
    pub(super) fn deliver(self, outcome: Outcome) -> Option<(WorkerId, u64, Outcome)> {
        match self {
            Sink::One(to) => {
                let _ = to.send(outcome);
                None
            }
            Sink::Batch { to, index } => {
                let _ = to.send(BatchItem::Result(index, outcome));
                None
            }
            Sink::Worker { worker, submission } => Some((worker, submission, outcome)),
            // The pool hands these to its upstream before delivering.
            Sink::Upstream(_) => None,
        }
    }
}
