//! The pool in the primary: the queue, the tasks it owns until their result
//! arrives (acks late), dispatch by credit, timeouts, retries, and the
//! answers to workers that submit tasks.
//!
//! Every change happens under one lock, and the frames it implies are
//! queued on the workers' channels before the lock is released, so a
//! worker always sees a task's `Run` before its `Cancel`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use tokio::sync::{Notify, Semaphore};

use super::config::PoolConfig;
use super::error::{Attempt, AttemptFailure, PoolError};
use super::payload::Payload;
use super::sink::{Outcome, Sink};
use super::stats::PoolStats;
use super::wire::{self, ToPrimary, ToWorker};
use crate::message::ServiceFrame;
use crate::primary::{ServiceContext, WorkerHandle};
use crate::{ChannelError, Error, ExitStatus, Format, Signal, WorkerId};

/// The most submissions one worker may have waiting in the primary at once;
/// a worker's side never sends more, and the primary refuses more.
pub const MAX_WORKER_SUBMISSIONS: usize = 4096;

/// A submission to an upstream on its way: the task's id there, or why it
/// was refused (with the sink back).
pub(super) type Submitting<'a> =
    Pin<Box<dyn Future<Output = Result<u64, (PoolError, Sink)>> + Send + 'a>>;

/// Where a pool's tasks are queued when it is shared beyond this primary
/// (Redis): submissions go there, and tasks read from there run on this
/// primary's workers as tasks of the pool with an [`Sink::Upstream`] sink.
pub(super) trait Upstream: Send + Sync {
    /// Queues a task whose outcome goes to `sink`; as [`Core::submit`].
    fn submit(&self, payload: Payload, wait: bool, sink: Sink) -> Submitting<'_>;
    /// The submitter of `id` stopped waiting.
    fn cancel(&self, id: u64);
    /// A task read from upstream under `handle` ended here with `outcome`.
    /// Called under the pool's lock: it must not call back into the pool.
    fn finished(&self, handle: u64, outcome: Outcome);
    /// Fills in the counters the upstream keeps.
    fn add_stats(&self, stats: &mut PoolStats);
}

/// The primary's side of one pool.
pub(super) struct Core {
    pub(super) name: String,
    config: PoolConfig,
    context: OnceLock<ServiceContext>,
    state: Mutex<State>,
    /// Places in the queue.
    room: Semaphore,
    /// Wakes the timer when a deadline earlier than all others appears.
    timer: Arc<Notify>,
    timer_started: AtomicBool,
    me: Weak<Core>,
    upstream: OnceLock<Arc<dyn Upstream>>,
    /// Told when the workers' free capacity may have changed (with an
    /// upstream only).
    pub(super) changed: Notify,
}

#[derive(Default)]
struct State {
    next_task: u64,
    /// Tasks waiting for a worker, first out at the front.
    queue: VecDeque<u64>,
    /// How many of those must run alone.
    suspects_queued: usize,
    /// Every task the pool owns: queued, or running until its result.
    tasks: HashMap<u64, Task>,
    /// Workers whose side said it takes tasks.
    members: BTreeMap<WorkerId, Member>,
    /// When running tasks time out.
    deadlines: BTreeSet<(Instant, u64)>,
    /// The worker that got the last task, for round-robin among equals.
    cursor: Option<WorkerId>,
    /// The worker kept free of new tasks until it is idle, for a task that
    /// must run alone.
    reserved: Option<WorkerId>,
    /// Tasks workers submitted, by worker and the worker's number.
    submissions: HashMap<WorkerId, HashMap<u64, Submission>>,
    stats: PoolStats,
}

struct Task {
    payload: Payload,
    /// `None` once the submitter stopped waiting.
    sink: Option<Sink>,
    /// Failed attempts that count towards `max_attempts`.
    attempts: Vec<Attempt>,
    run: Option<Run>,
    submitted: Instant,
    /// It was running on a worker that died: it runs alone from now on (so
    /// a death can be laid at its door), and the next death it is alone
    /// with is blamed on it.
    suspect: bool,
    /// Still holds its place in the queue (given back when first sent).
    holds_place: bool,
    /// How many times it was sent to a worker (numbers each attempt).
    sent: u32,
    /// For a task a worker submitted: where its answer goes.
    origin: Option<(WorkerId, u64)>,
}

struct Run {
    worker: WorkerId,
    attempt: u32,
    deadline: Option<Instant>,
}

struct Member {
    handle: WorkerHandle,
    /// False once it disconnected or is being recycled.
    accepting: bool,
    running: Vec<u64>,
    /// It runs a suspect task: nothing else goes there.
    alone: bool,
    /// The pool killed it because this task timed out.
    recycled_for: Option<u64>,
}

enum Submission {
    /// Waiting for room in the queue.
    Waiting(tokio::task::AbortHandle),
    Queued(u64),
    /// Submitted upstream under this id.
    Upstream(u64),
}

impl Core {
    pub(super) fn new(name: String, config: PoolConfig) -> Arc<Self> {
        let config = config.normalized();
        Arc::new_cyclic(|me| Self {
            name,
            room: Semaphore::new(config.queue),
            config,
            context: OnceLock::new(),
            state: Mutex::new(State::default()),
            timer: Arc::new(Notify::new()),
            timer_started: AtomicBool::new(false),
            me: me.clone(),
            upstream: OnceLock::new(),
            changed: Notify::new(),
        })
    }

    pub(super) fn set_upstream(&self, upstream: Arc<dyn Upstream>) {
        let _ = self.upstream.set(upstream);
    }

    pub(super) fn upstream(&self) -> Option<Arc<dyn Upstream>> {
        self.upstream.get().cloned()
    }

    pub(super) fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// How many more tasks the workers could start now: free places of
    /// the members taking tasks, less the tasks already waiting here.
    pub(super) fn free_capacity(&self) -> usize {
        let state = self.lock();
        let limit = self.config.concurrency as usize;
        let free: usize = state
            .members
            .values()
            .filter(|m| m.accepting && !m.alone)
            .map(|m| limit.saturating_sub(m.running.len()))
            .sum();
        free.saturating_sub(state.queue.len())
    }

    /// Queues a task read from upstream under `handle`, with the attempts
    /// it already had elsewhere; returns its id here.
    pub(super) fn insert_upstream(
        &self,
        payload: Payload,
        handle: u64,
        attempts: Vec<Attempt>,
    ) -> u64 {
        let mut state = self.lock();
        state.next_task += 1;
        let id = state.next_task;
        // A task whose last attempt ended its worker runs alone, as here.
        let suspect = attempts.last().is_some_and(|a| {
            matches!(
                a.failure,
                AttemptFailure::WorkerEnded { .. } | AttemptFailure::TimedOut(_)
            )
        });
        state.tasks.insert(
            id,
            Task {
                payload,
                sink: Some(Sink::Upstream(handle)),
                attempts,
                run: None,
                submitted: Instant::now(),
                suspect,
                holds_place: false,
                sent: 0,
                origin: None,
            },
        );
        if suspect {
            state.suspects_queued += 1;
        }
        state.queue.push_back(id);
        self.dispatch(&mut state);
        id
    }

    /// When no worker takes tasks, the tasks from upstream waiting here,
    /// taken out of the pool (handle and attempts) to be given back.
    pub(super) fn take_stranded(&self) -> Vec<(u64, Vec<Attempt>)> {
        let mut state = self.lock();
        if state.queue.is_empty() || state.members.values().any(|m| m.accepting) {
            return Vec::new();
        }
        let mut stranded = Vec::new();
        for id in std::mem::take(&mut state.queue) {
            let upstream = matches!(
                state.tasks.get(&id).and_then(|t| t.sink.as_ref()),
                Some(Sink::Upstream(_))
            );
            if !upstream {
                state.queue.push_back(id);
                continue;
            }
            let Some(task) = state.tasks.remove(&id) else {
                continue;
            };
            if task.suspect {
                state.suspects_queued = state.suspects_queued.saturating_sub(1);
            }
            if let Some(Sink::Upstream(handle)) = task.sink {
                stranded.push((handle, task.attempts));
            }
        }
        stranded
    }

    /// The answer to a worker's submission came from upstream.
    pub(super) fn upstream_answered(&self, worker: WorkerId, submission: u64, outcome: Outcome) {
        let waited = remove_submission(&mut self.lock(), worker, submission).is_some();
        if waited {
            self.answer(worker, submission, outcome);
        }
    }

    /// A worker's submission was queued upstream (or refused).
    fn upstream_submitted(
        &self,
        worker: WorkerId,
        submission: u64,
        submitted: Result<u64, (PoolError, Sink)>,
    ) {
        match submitted {
            Ok(id) => {
                let mut state = self.lock();
                let entry = state
                    .submissions
                    .get_mut(&worker)
                    .and_then(|s| s.get_mut(&submission));
                match entry {
                    Some(entry) if matches!(entry, Submission::Waiting(_)) => {
                        *entry = Submission::Upstream(id);
                    }
                    // Withdrawn meanwhile, or already answered.
                    _ => {
                        drop(state);
                        if let Some(upstream) = self.upstream.get() {
                            upstream.cancel(id);
                        }
                    }
                }
            }
            Err((error, _)) => {
                let waited = remove_submission(&mut self.lock(), worker, submission).is_some();
                if waited {
                    self.answer(worker, submission, Err(error));
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    pub(super) fn attach(&self, context: ServiceContext) {
        if self.context.set(context).is_err() {
            tracing::warn!(pool = %self.name, "a pool belongs to one cluster; the second is ignored");
        }
    }

    pub(super) fn memfd_threshold(&self) -> Option<usize> {
        self.config.memfd_threshold
    }

    /// The cluster's format, once the pool belongs to one.
    pub(super) fn format(&self) -> Result<Format, PoolError> {
        self.context
            .get()
            .and_then(ServiceContext::format)
            .ok_or_else(|| {
                PoolError::Closed(format!(
                    "pool {:?} belongs to no running cluster (add it with ClusterBuilder::service)",
                    self.name
                ))
            })
    }

    /// Queues a task whose outcome goes to `sink`, waiting for room when
    /// `wait`; returns its id, or the error and the sink back.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is queued unless the future completes.
    pub(super) async fn submit(
        &self,
        payload: Payload,
        wait: bool,
        sink: Sink,
    ) -> Result<u64, (PoolError, Sink)> {
        let place = if wait {
            self.room.acquire().await.ok()
        } else {
            self.room.try_acquire().ok()
        };
        let Some(place) = place else {
            let mut state = self.lock();
            state.stats.refused_full += 1;
            return Err((PoolError::Full(state.queue.len()), sink));
        };
        place.forget();
        Ok(self.insert(payload, sink, None))
    }

    fn insert(&self, payload: Payload, sink: Sink, origin: Option<(WorkerId, u64)>) -> u64 {
        let mut state = self.lock();
        state.next_task += 1;
        let id = state.next_task;
        state.tasks.insert(
            id,
            Task {
                payload,
                sink: Some(sink),
                attempts: Vec::new(),
                run: None,
                submitted: Instant::now(),
                suspect: false,
                holds_place: true,
                sent: 0,
                origin,
            },
        );
        if let Some((worker, submission)) = origin {
            state
                .submissions
                .entry(worker)
                .or_default()
                .insert(submission, Submission::Queued(id));
        }
        state.queue.push_back(id);
        state.stats.submitted += 1;
        self.dispatch(&mut state);
        id
    }

    /// The submitter of task `id` stopped waiting: a queued task is removed,
    /// a running one is told to stop.
    pub(super) fn cancel(&self, id: u64) {
        let mut state = self.lock();
        self.cancel_locked(&mut state, id);
    }

    fn cancel_locked(&self, state: &mut State, id: u64) {
        let Some(task) = state.tasks.get_mut(&id) else {
            return;
        };
        if task.sink.take().is_none() {
            return;
        }
        state.stats.cancelled += 1;
        match &task.run {
            None => {
                let suspect = task.suspect;
                let holds_place = task.holds_place;
                if let Some(at) = state.queue.iter().position(|t| *t == id) {
                    state.queue.remove(at);
                }
                if suspect {
                    state.suspects_queued = state.suspects_queued.saturating_sub(1);
                }
                if holds_place {
                    self.room.add_permits(1);
                }
                self.forget(state, id);
            }
            Some(run) => {
                let worker = run.worker;
                let frame = wire::encode(&ToWorker::Cancel { task: id }, &[]);
                if let Some(member) = state.members.get(&worker) {
                    // A frame this small always fits.
                    let _ = self.send(&member.handle, frame, Vec::new());
                }
            }
        }
    }

    /// Removes a task that has no submitter any more.
    fn forget(&self, state: &mut State, id: u64) {
        if let Some(task) = state.tasks.remove(&id) {
            if let Some((worker, submission)) = task.origin {
                remove_submission(state, worker, submission);
            }
        }
    }

    pub(super) fn stats(&self) -> PoolStats {
        let mut stats = {
            let state = self.lock();
            let mut stats = state.stats.clone();
            stats.queued = state.queue.len();
            stats.running = state.members.values().map(|m| m.running.len()).sum();
            stats.workers = state.members.values().filter(|m| m.accepting).count();
            stats
        };
        if let Some(upstream) = self.upstream.get() {
            upstream.add_stats(&mut stats);
        }
        stats
    }

    /// A frame from the pool's side in worker `from`.
    pub(super) fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
        let (envelope, payload) = match wire::decode::<ToPrimary>(frame.body) {
            Ok((envelope, rest)) => (envelope, Payload::received(rest, frame.fds)),
            Err(error) => {
                tracing::warn!(pool = %self.name, worker = %from.id(), %error, "dropped a pool frame that does not decode");
                return;
            }
        };
        let mut state = self.lock();
        match envelope {
            ToPrimary::Ready => {
                let settings = ToWorker::Settings {
                    memfd_threshold: self.config.memfd_threshold.map(|t| t as u64),
                };
                let _ = self.send(from, wire::encode(&settings, &[]), Vec::new());
                let accepting = from.is_connected();
                state.members.entry(from.id()).or_insert_with(|| Member {
                    handle: from.clone(),
                    accepting,
                    running: Vec::new(),
                    alone: false,
                    recycled_for: None,
                });
            }
            ToPrimary::Done {
                task,
                attempt,
                outcome,
            } => self.done(&mut state, from.id(), task, attempt, outcome, payload),
            ToPrimary::Refused { task, attempt } => {
                if let Some(member) = state.members.get_mut(&from.id()) {
                    member.accepting = false;
                }
                if self.end_run(&mut state, from.id(), task, attempt) {
                    state.stats.requeued += 1;
                    self.requeue(&mut state, task);
                }
            }
            ToPrimary::Submit { submission, wait } => {
                drop(state);
                return self.worker_submits(from, submission, wait, payload);
            }
            ToPrimary::Withdraw { submission } => {
                match remove_submission(&mut state, from.id(), submission) {
                    Some(Submission::Waiting(abort)) => abort.abort(),
                    Some(Submission::Queued(id)) => self.cancel_locked(&mut state, id),
                    Some(Submission::Upstream(id)) => {
                        if let Some(upstream) = self.upstream.get() {
                            upstream.cancel(id);
                        }
                    }
                    None => {}
                }
            }
        }
        self.dispatch(&mut state);
    }

    /// The worker's side says attempt `attempt` of `id` ended.
    fn done(
        &self,
        state: &mut State,
        worker: WorkerId,
        id: u64,
        attempt: u32,
        outcome: Result<(), super::HandlerError>,
        payload: Payload,
    ) {
        if !self.end_run(state, worker, id, attempt) {
            return; // an attempt the pool gave up on (timed out, cancelled)
        }
        let Some(task) = state.tasks.get_mut(&id) else {
            return;
        };
        if task.sink.is_none() {
            self.forget(state, id);
            return;
        }
        match outcome {
            Ok(()) => {
                let took = task.submitted.elapsed();
                state.stats.done += 1;
                state.stats.latency.record(took);
                self.finish(state, id, Ok(payload));
            }
            Err(error) if !error.is_retryable() => {
                state.stats.failed += 1;
                self.finish(state, id, Err(PoolError::Handler(error.message().into())));
            }
            Err(error) => {
                let failure = AttemptFailure::Handler(error.message().into());
                self.failed_attempt(state, id, worker, failure);
            }
        }
    }

    /// Ends the attempt `attempt` of `id` on `worker`, if it is the one
    /// running; false for a stale attempt.
    fn end_run(&self, state: &mut State, worker: WorkerId, id: u64, attempt: u32) -> bool {
        let Some(task) = state.tasks.get_mut(&id) else {
            return false;
        };
        let current =
            matches!(&task.run, Some(run) if run.worker == worker && run.attempt == attempt);
        if !current {
            return false;
        }
        if let Some(run) = task.run.take() {
            if let Some(at) = run.deadline {
                state.deadlines.remove(&(at, id));
            }
        }
        if let Some(member) = state.members.get_mut(&worker) {
            member.running.retain(|t| *t != id);
            if member.running.is_empty() {
                member.alone = false;
            }
        }
        true
    }

    /// Counts a failed attempt: the task runs again (first in the queue),
    /// or fails with every attempt's reason.
    fn failed_attempt(
        &self,
        state: &mut State,
        id: u64,
        worker: WorkerId,
        failure: AttemptFailure,
    ) {
        let Some(task) = state.tasks.get_mut(&id) else {
            return;
        };
        task.attempts.push(Attempt { worker, failure });
        if task.attempts.len() >= self.config.max_attempts as usize {
            let attempts = std::mem::take(&mut task.attempts);
            state.stats.failed += 1;
            self.finish(state, id, Err(PoolError::Failed(attempts)));
        } else {
            state.stats.retried += 1;
            self.requeue(state, id);
        }
    }

    fn requeue(&self, state: &mut State, id: u64) {
        let Some(task) = state.tasks.get(&id) else {
            return;
        };
        if task.sink.is_none() {
            self.forget(state, id);
            return;
        }
        if task.suspect {
            state.suspects_queued += 1;
        }
        state.queue.push_front(id);
    }

    /// Hands the task's outcome to whoever waits for it.
    fn finish(&self, state: &mut State, id: u64, outcome: Outcome) {
        let Some(task) = state.tasks.remove(&id) else {
            return;
        };
        if let Some((worker, submission)) = task.origin {
            remove_submission(state, worker, submission);
        }
        let Some(sink) = task.sink else { return };
        if let Sink::Upstream(handle) = sink {
            if let Some(upstream) = self.upstream.get() {
                upstream.finished(handle, outcome);
            }
            return;
        }
        if let Some((worker, submission, outcome)) = sink.deliver(outcome) {
            self.answer(worker, submission, outcome);
        }
    }

    /// Sends a worker the outcome of its submission.
    fn answer(&self, worker: WorkerId, submission: u64, outcome: Outcome) {
        let Some(handle) = self.context.get().and_then(|c| c.worker(worker)) else {
            return;
        };
        let (outcome, payload) = match outcome {
            Ok(payload) => (Ok(()), payload),
            Err(error) => (Err(error), Payload::default()),
        };
        let sent = payload
            .for_frame()
            .map_err(|e| e.to_string())
            .and_then(|(bytes, fds)| {
                let frame = wire::encode(
                    &ToWorker::Answer {
                        submission,
                        outcome,
                    },
                    bytes,
                );
                self.send(&handle, frame, fds).map_err(|e| e.to_string())
            });
        if let Err(error) = sent {
            let refused = ToWorker::Answer {
                submission,
                outcome: Err(PoolError::Codec(error)),
            };
            let _ = self.send(&handle, wire::encode(&refused, &[]), Vec::new());
        }
    }

    /// A task from a worker: queued at once when there is room; otherwise
    /// refused (`try_submit`) or waiting for room in a task of its own.
    fn worker_submits(&self, from: &WorkerHandle, submission: u64, wait: bool, payload: Payload) {
        let worker = from.id();
        let sink = Sink::Worker { worker, submission };
        let waiting = {
            let mut state = self.lock();
            let waiting = state.submissions.get(&worker).map_or(0, HashMap::len);
            if waiting >= MAX_WORKER_SUBMISSIONS {
                state.stats.refused_worker_limit += 1;
            }
            waiting
        };
        if waiting >= MAX_WORKER_SUBMISSIONS {
            self.answer(
                worker,
                submission,
                Err(PoolError::TooManySubmissions(waiting)),
            );
            return;
        }
        if let Some(upstream) = self.upstream() {
            let Some(core) = self.me.upgrade() else {
                return;
            };
            let mut state = self.lock();
            let waiter = tokio::spawn(async move {
                let submitted = upstream.submit(payload, wait, sink).await;
                core.upstream_submitted(worker, submission, submitted);
            });
            state
                .submissions
                .entry(worker)
                .or_default()
                .insert(submission, Submission::Waiting(waiter.abort_handle()));
            return;
        }
        if let Ok(place) = self.room.try_acquire() {
            place.forget();
            self.insert(payload, sink, Some((worker, submission)));
            return;
        }
        if !wait {
            let queued = {
                let mut state = self.lock();
                state.stats.refused_full += 1;
                state.queue.len()
            };
            self.answer(worker, submission, Err(PoolError::Full(queued)));
            return;
        }
        let Some(core) = self.me.upgrade() else {
            return;
        };
        let mut state = self.lock();
        let waiter = tokio::spawn(async move {
            if let Ok(place) = core.room.acquire().await {
                place.forget();
                core.insert(payload, sink, Some((worker, submission)));
            }
        });
        state
            .submissions
            .entry(worker)
            .or_default()
            .insert(submission, Submission::Waiting(waiter.abort_handle()));
    }

    /// A worker left. `None`: it disconnected (it finishes what it runs and
    /// gets nothing new). `Some`: it exited; what it was running runs again
    /// elsewhere, or fails.
    pub(super) fn on_worker_gone(&self, worker: &WorkerHandle, exit: Option<ExitStatus>) {
        let mut state = self.lock();
        let Some(status) = exit else {
            if let Some(member) = state.members.get_mut(&worker.id()) {
                member.accepting = false;
            }
            self.dispatch(&mut state);
            return;
        };
        if let Some(submissions) = state.submissions.remove(&worker.id()) {
            for (_, submission) in submissions {
                match submission {
                    Submission::Waiting(abort) => abort.abort(),
                    Submission::Queued(id) => {
                        if let Some(task) = state.tasks.get_mut(&id) {
                            task.origin = None;
                        }
                        self.cancel_locked(&mut state, id);
                    }
                    Submission::Upstream(id) => {
                        if let Some(upstream) = self.upstream.get() {
                            upstream.cancel(id);
                        }
                    }
                }
            }
        }
        if let Some(member) = state.members.remove(&worker.id()) {
            let blame = self.lost_worker(&mut state, member, status);
            if let (Some(blame), Some(context)) = (blame, self.context.get()) {
                context.blame_exit(worker, blame);
            }
        }
        self.dispatch(&mut state);
    }

    /// Deals with the tasks a dead worker ran; returns the task to blame for
    /// its death, if one is.
    fn lost_worker(&self, state: &mut State, member: Member, status: ExitStatus) -> Option<String> {
        let worker = member.handle.id();
        let mut blame = member
            .recycled_for
            .map(|id| format!("task {id} of pool {:?}, which timed out", self.name));
        let alone = member.running.len() == 1;
        for id in member.running {
            let Some(task) = state.tasks.get_mut(&id) else {
                continue;
            };
            if let Some(run) = task.run.take() {
                if let Some(at) = run.deadline {
                    state.deadlines.remove(&(at, id));
                }
            }
            if task.sink.is_none() {
                self.forget(state, id);
                continue;
            }
            if member.recycled_for.is_some() {
                // Not its fault: the pool killed the worker for another task.
                state.stats.requeued += 1;
                self.requeue(state, id);
                continue;
            }
            if task.suspect && alone {
                blame = Some(format!(
                    "task {id} of pool {:?}, which had already ended another worker",
                    self.name
                ));
            }
            task.suspect = true;
            self.failed_attempt(state, id, worker, AttemptFailure::ended(status));
        }
        blame
    }

    /// Ends the attempts past their deadline: each task runs again elsewhere
    /// (or fails), and its worker, presumed hung, is killed.
    fn expire(&self, now: Instant) {
        let mut guard = self.lock();
        let state = &mut *guard;
        while let Some(&(at, id)) = state.deadlines.first() {
            if at > now {
                break;
            }
            state.deadlines.pop_first();
            let Some(run) = state.tasks.get(&id).and_then(|t| t.run.as_ref()) else {
                continue;
            };
            let (worker, attempt) = (run.worker, run.attempt);
            let recycling = state
                .members
                .get(&worker)
                .is_some_and(|m| m.recycled_for.is_some());
            if recycling {
                // Its worker is being killed for another task: it runs
                // again, without counting, once the worker is gone.
                continue;
            }
            self.end_run(state, worker, id, attempt);
            if let Some(member) = state.members.get_mut(&worker) {
                member.accepting = false;
                if member.recycled_for.is_none() {
                    member.recycled_for = Some(id);
                    state.stats.recycled += 1;
                    tracing::warn!(pool = %self.name, %worker, task = id, "a task timed out: its worker is recycled");
                    if let Err(error) = member.handle.kill(Signal::KILL) {
                        tracing::warn!(pool = %self.name, %worker, %error, "cannot kill a hung worker");
                    }
                }
            }
            let Some(task) = state.tasks.get_mut(&id) else {
                continue;
            };
            if task.sink.is_none() {
                self.forget(state, id);
                continue;
            }
            task.suspect = true;
            let timeout = self.config.timeout.unwrap_or_default();
            self.failed_attempt(state, id, worker, AttemptFailure::TimedOut(timeout));
        }
        self.dispatch(state);
    }

    /// Sends queued tasks to workers with free capacity.
    fn dispatch(&self, state: &mut State) {
        if self.upstream.get().is_some() {
            // The upstream reader reads as capacity allows.
            self.changed.notify_one();
        }
        if state.suspects_queued == 0 {
            // No task waits to run alone: no worker needs keeping free.
            state.reserved = None;
        }
        let mut at = 0;
        while at < state.queue.len() {
            let id = state.queue[at];
            let suspect = state.tasks.get(&id).is_some_and(|t| t.suspect);
            let alone = suspect && self.config.concurrency > 1;
            let target = if alone {
                state.idle_member()
            } else {
                state.free_member(self.config.concurrency)
            };
            match target {
                Some(worker) => {
                    state.queue.remove(at);
                    if suspect {
                        state.suspects_queued = state.suspects_queued.saturating_sub(1);
                    }
                    self.start(state, id, worker, alone);
                }
                None if alone => {
                    state.reserve_member();
                    at += 1;
                }
                // Only a task that runs alone can still find a place.
                None if self.config.concurrency > 1 && state.suspects_queued > 0 => at += 1,
                None => break,
            }
        }
    }

    /// Sends task `id` to `worker`.
    fn start(&self, state: &mut State, id: u64, worker: WorkerId, alone: bool) {
        let deadline = self.config.timeout.map(|after| Instant::now() + after);
        let (Some(task), Some(member)) = (state.tasks.get_mut(&id), state.members.get_mut(&worker))
        else {
            return;
        };
        if std::mem::take(&mut task.holds_place) {
            self.room.add_permits(1);
        }
        task.sent += 1;
        let attempt = task.sent;
        task.run = Some(Run {
            worker,
            attempt,
            deadline,
        });
        member.running.push(id);
        member.alone = alone;
        if state.reserved == Some(worker) {
            state.reserved = None;
        }
        let framed = task.payload.for_frame().map(|(bytes, fds)| {
            (
                wire::encode(&ToWorker::Run { task: id, attempt }, bytes),
                fds,
            )
        });
        let handle = member.handle.clone();
        state.cursor = Some(worker);
        if let Some(at) = deadline {
            let earliest = state.deadlines.first().is_none_or(|(first, _)| at < *first);
            state.deadlines.insert((at, id));
            if earliest {
                self.wake_timer();
            }
        }
        let sent = framed
            .map_err(|e| e.to_string())
            .and_then(|(frame, fds)| self.send(&handle, frame, fds).map_err(|e| e.to_string()));
        if let Err(error) = sent {
            // Too large for the channel (or out of descriptors): it cannot run.
            self.end_run(state, worker, id, attempt);
            state.stats.failed += 1;
            self.finish(state, id, Err(PoolError::Codec(error)));
        }
    }

    /// Queues a frame on a worker's channel without waiting: a full channel
    /// gets it from a task of its own. Fails only for a frame over the
    /// channel's limit; a worker that is gone is dealt with when it exits.
    fn send(&self, worker: &WorkerHandle, frame: Vec<u8>, fds: Vec<OwnedFd>) -> Result<(), Error> {
        let Some(context) = self.context.get() else {
            return Ok(());
        };
        let format = context.format().unwrap_or(Format::Binary);
        // Kept for the slow path: a refused frame gives its descriptors back
        // only by being dropped.
        let copies = fds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<Result<Vec<_>, _>>();
        match context.try_send(worker, format, &frame, fds) {
            Ok(()) => Ok(()),
            Err(Error::Channel(ChannelError::Full)) => {
                let (context, worker) = (context.clone(), worker.clone());
                let fds =
                    copies.map_err(|e| Error::io("cannot duplicate a payload's descriptor", e))?;
                tokio::spawn(async move {
                    let _ = context.send(&worker, format, &frame, fds).await;
                });
                Ok(())
            }
            Err(error @ Error::Channel(ChannelError::TooLarge { .. })) => Err(error),
            Err(_) => Ok(()),
        }
    }

    fn wake_timer(&self) {
        if !self.timer_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run_timer(self.me.clone(), self.timer.clone()));
        }
        self.timer.notify_one();
    }
}

fn remove_submission(state: &mut State, worker: WorkerId, submission: u64) -> Option<Submission> {
    let submissions = state.submissions.get_mut(&worker)?;
    let removed = submissions.remove(&submission);
    if submissions.is_empty() {
        state.submissions.remove(&worker);
    }
    removed
}

impl State {
    /// The member with the most free capacity (round-robin among equals).
    fn free_member(&self, concurrency: u32) -> Option<WorkerId> {
        use std::ops::Bound::{Excluded, Unbounded};
        let limit = concurrency as usize;
        let after = self.cursor.unwrap_or(WorkerId::new(0));
        let mut best: Option<(usize, WorkerId)> = None;
        let later = self.members.range((Excluded(after), Unbounded));
        for (id, m) in later.chain(self.members.range(..=after)) {
            let usable =
                m.accepting && !m.alone && self.reserved != Some(*id) && m.running.len() < limit;
            if usable && best.is_none_or(|(n, _)| m.running.len() < n) {
                best = Some((m.running.len(), *id));
                if m.running.is_empty() {
                    break;
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// A member running nothing, for a task that must run alone.
    fn idle_member(&self) -> Option<WorkerId> {
        self.members
            .iter()
            .filter(|(_, m)| m.accepting && m.running.is_empty())
            .min_by_key(|(id, _)| self.reserved != Some(**id))
            .map(|(id, _)| *id)
    }

    /// Keeps the least busy member free of new tasks until it is idle, so a
    /// task that must run alone gets a worker even under load.
    fn reserve_member(&mut self) {
        let kept = self
            .reserved
            .and_then(|id| self.members.get(&id))
            .is_some_and(|m| m.accepting);
        if kept {
            return;
        }
        self.reserved = self
            .members
            .iter()
            .filter(|(_, m)| m.accepting && !m.alone)
            .min_by_key(|(_, m)| m.running.len())
            .map(|(id, _)| *id);
    }
}

/// Expires attempts at their deadlines while the pool exists.
async fn run_timer(core: Weak<Core>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(core) = core.upgrade() else { return };
            let now = Instant::now();
            core.expire(now);
            core.lock().deadlines.first().map(|(at, _)| *at)
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
