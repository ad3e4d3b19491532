//! The cancellation signal a handler gets with its task.

use tokio::sync::watch;

/// Tells a handler that nobody waits for its task's result any more (the
/// submitter dropped its future, or the whole batch). The handler may stop
/// early; what it returns then is discarded.
///
/// ```no_run
/// # async fn f(cancel: procluster::pool::CancelToken) {
/// tokio::select! {
///     () = cancel.cancelled() => { /* stop early */ }
///     () = tokio::time::sleep(std::time::Duration::from_secs(1)) => { /* the work */ }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CancelToken {
    receiver: watch::Receiver<bool>,
}

impl CancelToken {
    pub(super) fn new() -> (watch::Sender<bool>, Self) {
        let (sender, receiver) = watch::channel(false);
        (sender, Self { receiver })
    }

    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once the task is cancelled (never, if it is not).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn cancelled(&self) {
        let mut receiver = self.receiver.clone();
        if receiver.wait_for(|cancelled| *cancelled).await.is_err() {
            // The worker side is gone without cancelling: never resolve.
            std::future::pending::<()>().await;
        }
    }
}
