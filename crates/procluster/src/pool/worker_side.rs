//! The pool in a worker: runs the tasks the primary sends to the handler,
//! and sends the primary the tasks this worker submits.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore, watch};

use super::cancel::CancelToken;
use super::config::DEFAULT_MEMFD_THRESHOLD;
use super::dispatch::MAX_WORKER_SUBMISSIONS;
use super::error::{HandlerError, PoolError};
use super::payload::Payload;
use super::sink::Sink;
use super::wire::{self, ToPrimary, ToWorker};
use crate::worker::{ServicePort, Worker};
use crate::{ChannelError, Error, Format};

/// A handler on bytes: the task in, the result out (encoded with the
/// memory-file threshold given), both in the cluster's format.
pub(super) type Handler = Arc<
    dyn Fn(
            Bytes,
            CancelToken,
            Option<usize>,
        ) -> Pin<Box<dyn Future<Output = Result<Payload, HandlerError>> + Send>>
        + Send
        + Sync,
>;

/// `memfd_threshold` when the primary says "none".
const NO_THRESHOLD: usize = usize::MAX;

/// One worker's side of one pool, shared by every handle on it.
pub(super) struct Side {
    name: String,
    port: ServicePort,
    worker: Worker,
    state: Mutex<SideState>,
    /// Submissions this worker may still send.
    window: Semaphore,
    /// Wakes `serve` when the last running task ends.
    idle: Notify,
    handler: OnceLock<Handler>,
    reading: AtomicBool,
    /// The pool's memory-file threshold ([`NO_THRESHOLD`]: none).
    memfd_threshold: AtomicUsize,
}

#[derive(Default)]
struct SideState {
    next_submission: u64,
    /// This worker's submissions waiting for their answer.
    pending: HashMap<u64, Sink>,
    /// Tasks running here, with the sender of their cancellation.
    running: HashMap<u64, watch::Sender<bool>>,
    /// The port is closed: the primary is gone.
    closed: bool,
}

impl Side {
    pub(super) fn new(name: &str, port: ServicePort, worker: Worker) -> Self {
        Self {
            name: name.to_string(),
            port,
            worker,
            state: Mutex::default(),
            window: Semaphore::new(MAX_WORKER_SUBMISSIONS),
            idle: Notify::new(),
            handler: OnceLock::new(),
            reading: AtomicBool::new(false),
            memfd_threshold: AtomicUsize::new(DEFAULT_MEMFD_THRESHOLD),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SideState> {
        crate::sync::lock(&self.state)
    }

    pub(super) fn format(&self) -> Format {
        self.port.format()
    }

    /// From how many bytes a payload goes in a memory file.
    pub(super) fn memfd_threshold(&self) -> Option<usize> {
        Some(self.memfd_threshold.load(Ordering::Relaxed)).filter(|t| *t != NO_THRESHOLD)
    }

    /// Starts reading the primary's frames, once.
    pub(super) fn start(self: &Arc<Self>) {
        if !self.reading.swap(true, Ordering::AcqRel) {
            tokio::spawn(read(self.clone()));
        }
    }

    /// Runs tasks with `handler` until this worker leaves the cluster and
    /// its running tasks are done.
    pub(super) async fn serve(self: &Arc<Self>, handler: Handler) -> Result<(), PoolError> {
        if self.handler.set(handler).is_err() {
            return Err(PoolError::Closed(format!(
                "this worker already serves pool {:?}",
                self.name
            )));
        }
        let ready = wire::encode(&ToPrimary::Ready, &[]);
        self.port
            .send(self.format(), &ready, Vec::new())
            .await
            .map_err(|e| PoolError::Closed(e.to_string()))?;
        self.worker.shutdown_signal().await;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.lock().running.is_empty() {
                return Ok(());
            }
            idle.await;
        }
    }

    /// Sends a task to the primary; its outcome will go to `sink`.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent unless the future completes.
    pub(super) async fn submit(
        self: &Arc<Self>,
        payload: Payload,
        wait: bool,
        sink: Sink,
    ) -> Result<u64, (PoolError, Sink)> {
        let place = if wait {
            self.window.acquire().await.ok()
        } else {
            self.window.try_acquire().ok()
        };
        let Some(place) = place else {
            return Err((PoolError::TooManySubmissions(MAX_WORKER_SUBMISSIONS), sink));
        };
        let id = {
            let mut state = self.lock();
            if state.closed {
                return Err((
                    PoolError::Closed("this worker is cut off from its primary".into()),
                    sink,
                ));
            }
            state.next_submission += 1;
            let id = state.next_submission;
            state.pending.insert(id, sink);
            id
        };
        place.forget();
        let sent = payload
            .for_frame()
            .map_err(|e| e.to_string())
            .and_then(|(bytes, fds)| {
                let frame = wire::encode(
                    &ToPrimary::Submit {
                        submission: id,
                        wait,
                    },
                    bytes,
                );
                self.send(frame, fds).map_err(|e| e.to_string())
            });
        if let Err(error) = sent {
            let sink = self.lock().pending.remove(&id);
            self.window.add_permits(1);
            if let Some(sink) = sink {
                return Err((PoolError::Closed(error), sink));
            }
        }
        Ok(id)
    }

    /// This worker no longer waits for its submission `id`.
    pub(super) fn cancel(self: &Arc<Self>, id: u64) {
        if self.lock().pending.remove(&id).is_some() {
            self.window.add_permits(1);
            let withdraw = wire::encode(&ToPrimary::Withdraw { submission: id }, &[]);
            let _ = self.send(withdraw, Vec::new());
        }
    }

    /// Queues a frame for the primary without waiting (a full channel gets
    /// it from a task of its own).
    fn send(self: &Arc<Self>, frame: Vec<u8>, fds: Vec<OwnedFd>) -> Result<(), Error> {
        let copies = fds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<Result<Vec<_>, _>>();
        match self.port.try_send(self.format(), &frame, fds) {
            Err(Error::Channel(ChannelError::Full)) => {
                let fds =
                    copies.map_err(|e| Error::io("cannot duplicate a payload's descriptor", e))?;
                let side = self.clone();
                tokio::spawn(async move {
                    let _ = side.port.send(side.format(), &frame, fds).await;
                });
                Ok(())
            }
            other => other,
        }
    }

    /// Runs attempt `attempt` of task `task` in a task of its own.
    fn run(self: &Arc<Self>, task: u64, attempt: u32, payload: Payload) {
        let handler = match self.handler.get() {
            Some(handler) if self.worker.is_connected() => handler.clone(),
            _ => {
                // Leaving the cluster (or not serving): the task goes back.
                let refused = wire::encode(&ToPrimary::Refused { task, attempt }, &[]);
                let _ = self.send(refused, Vec::new());
                return;
            }
        };
        let threshold = self.memfd_threshold();
        let (cancel, token) = CancelToken::new();
        self.lock().running.insert(task, cancel);
        let guard = Running {
            side: self.clone(),
            task,
            attempt,
            reported: false,
        };
        tokio::spawn(async move {
            let mut guard = guard;
            let outcome = match payload.bytes() {
                Ok(bytes) => handler(bytes, token, threshold).await,
                Err(error) => Err(HandlerError::new(format!(
                    "cannot read the task's memory file: {error}"
                ))),
            };
            guard.report(outcome).await;
        });
    }

    fn cancel_running(&self, task: u64) {
        if let Some(cancel) = self.lock().running.get(&task) {
            cancel.send_replace(true);
        }
    }

    fn answered(&self, submission: u64, outcome: Result<(), PoolError>, payload: Payload) {
        let Some(sink) = self.lock().pending.remove(&submission) else {
            return; // withdrawn meanwhile
        };
        self.window.add_permits(1);
        let _ = sink.deliver(outcome.map(|()| payload));
    }

    /// The primary is gone: every submission fails, nothing more is sent.
    fn closed(&self) {
        let pending: Vec<Sink> = {
            let mut state = self.lock();
            state.closed = true;
            state.pending.drain().map(|(_, sink)| sink).collect()
        };
        for sink in pending {
            let _ = sink.deliver(Err(PoolError::Closed(
                "this worker is cut off from its primary".into(),
            )));
        }
        self.idle.notify_waiters();
    }
}

/// A task running here: reports its end to the primary exactly once, even
/// if the handler panics (then as a handler error).
struct Running {
    side: Arc<Side>,
    task: u64,
    attempt: u32,
    reported: bool,
}

impl Running {
    async fn report(&mut self, outcome: Result<Payload, HandlerError>) {
        self.reported = true;
        let (frame, fds) = self.frame(outcome);
        let side = &self.side;
        // Sent before the task stops counting as running, so a worker
        // that leaves once idle has sent every result.
        let _ = side.port.send(side.format(), &frame, fds).await;
        side.finished(self.task);
    }

    fn frame(&self, outcome: Result<Payload, HandlerError>) -> (Vec<u8>, Vec<OwnedFd>) {
        let done = |outcome| ToPrimary::Done {
            task: self.task,
            attempt: self.attempt,
            outcome,
        };
        let result = outcome.and_then(|payload| {
            let (bytes, fds) = payload.for_frame().map_err(|e| {
                HandlerError::new(format!("cannot send the result's memory file: {e}"))
            })?;
            Ok((wire::encode(&done(Ok(())), bytes), fds))
        });
        result.unwrap_or_else(|error| (wire::encode(&done(Err(error)), &[]), Vec::new()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reported {
            let (frame, fds) = self.frame(Err(HandlerError::new(format!(
                "the handler of pool {:?} panicked",
                self.side.name
            ))));
            let _ = self.side.send(frame, fds);
            self.side.finished(self.task);
        }
    }
}

impl Side {
    fn finished(&self, task: u64) {
        let mut state = self.lock();
        state.running.remove(&task);
        if state.running.is_empty() {
            drop(state);
            self.idle.notify_waiters();
        }
    }
}

/// Reads the primary's frames for this pool until the worker is cut off.
async fn read(side: Arc<Side>) {
    while let Some(frame) = side.port.recv().await {
        let (envelope, payload) = match wire::decode::<ToWorker>(frame.body) {
            Ok((envelope, rest)) => (envelope, Payload::received(rest, frame.fds)),
            Err(error) => {
                tracing::warn!(pool = %side.name, %error, "dropped a pool frame that does not decode");
                continue;
            }
        };
        match envelope {
            ToWorker::Run { task, attempt } => side.run(task, attempt, payload),
            ToWorker::Cancel { task } => side.cancel_running(task),
            ToWorker::Settings { memfd_threshold } => {
                let threshold = memfd_threshold
                    .and_then(|t| usize::try_from(t).ok())
                    .unwrap_or(NO_THRESHOLD);
                side.memfd_threshold.store(threshold, Ordering::Relaxed);
            }
            ToWorker::Answer {
                submission,
                outcome,
            } => side.answered(submission, outcome, payload),
        }
    }
    side.closed();
}
