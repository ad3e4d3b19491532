//! The supervisor state machine.

use std::collections::VecDeque;
use std::time::Instant;

use super::backoff::{CrashWindow, JitterSource, SplitMix64, request_limit, restart_delay};
use super::config::{HeartbeatConfig, SupervisorConfig};
use super::state::{
    Current, PendingRecycle, Phase, Purpose, ReadyWorker, Retiring, Rollout, Slot, Stopping,
    Successor, SuccessorState, Worker,
};
use super::types::{
    Command, CrashCause, Event, Generation, Outcome, RecycleReason, RejectReason, ReloadFailure,
    SpawnId, StopReason,
};
use crate::{ExitStatus, WorkerId};

/// Where a worker or a spawn ticket is tracked.
enum Place {
    Current(usize),
    Successor(usize),
    /// Index into `retiring` (workers) or `orphans` (spawns).
    Detached(usize),
}

/// Sans-IO supervisor of N worker processes.
///
/// Feed it inputs (`start`, `spawned`, `ready`, `exited`, `tick`, ...) with
/// the current time, then drain [`poll_command`](Self::poll_command) and
/// [`poll_event`](Self::poll_event), and call [`tick`](Self::tick) no later
/// than [`next_deadline`](Self::next_deadline).
///
/// Semantics worth knowing:
/// * Workers the supervisor retired (disconnect, scale down, reload,
///   recycle, stop) exit *expectedly*: no restart, no breaker count.
/// * Every other exit, spawn failure, ready timeout or hang is a failure: it
///   counts for the breaker, and a failed slot worker is respawned after the
///   slot's backoff delay.
/// * `reload()` during a rollout is queued (several requests coalesce into
///   one); the queued rollout starts when the current one finishes *or fails*.
/// * New slots (start, scale up) run the last fully rolled out generation;
///   restarts reuse their slot's generation. A failed rollout leaves the slots
///   it already moved on the new generation.
/// * While the breaker is tripped nothing is spawned automatically; `reload`
///   is rejected and scaled-up slots stay empty until
///   [`reset_breaker`](Self::reset_breaker).
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use procluster::{ExitStatus, WorkerId};
/// use procluster::supervisor::{Command, Event, Supervisor, SupervisorConfig};
///
/// let mut config = SupervisorConfig::default();
/// config.workers = 2;
/// let mut sup = Supervisor::with_jitter(config, || 0.0);
/// let t0 = Instant::now();
/// sup.start(t0);
///
/// // A trivial shell: every spawn succeeds and is ready at once.
/// let mut next_id = 0;
/// while let Some(cmd) = sup.poll_command() {
///     if let Command::Spawn { spawn, .. } = cmd {
///         next_id += 1;
///         sup.spawned(spawn, WorkerId::new(next_id), t0);
///         sup.ready(WorkerId::new(next_id), t0);
///     }
/// }
///
/// // Worker 1 (slot 0) crashes a minute later: a restart is scheduled.
/// let t1 = t0 + Duration::from_secs(60);
/// sup.exited(WorkerId::new(1), ExitStatus::exited(1), t1);
/// let restart = std::iter::from_fn(|| sup.poll_event())
///     .find(|e| matches!(e, Event::RestartScheduled { .. }));
/// assert_eq!(
///     restart,
///     Some(Event::RestartScheduled { slot: 0, attempt: 1, delay: Duration::from_millis(100) })
/// );
///
/// // The shell sleeps until the deadline and ticks: slot 0 is respawned.
/// let at = sup.next_deadline().unwrap();
/// sup.tick(at);
/// assert!(matches!(sup.poll_command(), Some(Command::Spawn { slot: 0, .. })));
/// ```
pub struct Supervisor {
    config: SupervisorConfig,
    jitter: Box<dyn JitterSource>,
    phase: Phase,
    slots: Vec<Slot>,
    /// Workers asked to go (their exit is expected).
    retiring: Vec<Retiring>,
    /// Spawns whose result is no longer wanted; retired when they arrive.
    orphans: Vec<SpawnId>,
    crashes: CrashWindow,
    tripped: bool,
    rollout: Option<Rollout>,
    /// Latest generation handed out by `reload()`.
    latest_generation: Generation,
    /// Generation for brand-new slots: the last fully rolled out one.
    stable_generation: Generation,
    next_spawn: u64,
    commands: VecDeque<Command>,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("phase", &self.phase)
            .field("slots", &self.slots)
            .field("retiring", &self.retiring)
            .field("tripped", &self.tripped)
            .field("rollout", &self.rollout)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Construction, outputs and queries.
// ---------------------------------------------------------------------------
impl Supervisor {
    /// Supervisor using a [`SplitMix64`] seeded with `config.jitter_seed`.
    /// The config is [`normalized`](SupervisorConfig::normalized).
    pub fn new(config: SupervisorConfig) -> Self {
        let seed = config.jitter_seed;
        Self::with_jitter(config, SplitMix64::new(seed))
    }

    /// Supervisor drawing jitter from `jitter` (e.g. `|| 0.5` in tests).
    pub fn with_jitter(config: SupervisorConfig, jitter: impl JitterSource + 'static) -> Self {
        Self {
            config: config.normalized(),
            jitter: Box::new(jitter),
            phase: Phase::Idle,
            slots: Vec::new(),
            retiring: Vec::new(),
            orphans: Vec::new(),
            crashes: CrashWindow::default(),
            tripped: false,
            rollout: None,
            latest_generation: 0,
            stable_generation: 0,
            next_spawn: 0,
            commands: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Next command for the shell to execute, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Next event, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Earliest instant at which [`tick`](Self::tick) has work to do. `None`
    /// when only external inputs can change anything.
    pub fn next_deadline(&self) -> Option<Instant> {
        let slots = self.slots.iter().filter_map(|s| s.deadline(&self.config));
        let retiring = self.retiring.iter().filter_map(|r| r.kill_at);
        slots.chain(retiring).min()
    }

    /// True once stopped (by `stop()` or by the breaker) and every worker exited.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished(_))
    }

    /// The result once finished.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Finished(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// True while the crash-loop breaker is tripped.
    pub fn is_breaker_tripped(&self) -> bool {
        self.tripped
    }

    /// True while a rolling reload is in progress.
    pub fn is_reloading(&self) -> bool {
        self.rollout.is_some()
    }

    /// Number of slots (the target worker count).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The worker currently serving (or starting in) `slot`, if any.
    pub fn slot_worker(&self, slot: usize) -> Option<WorkerId> {
        self.slots.get(slot)?.current.worker().map(|w| w.id)
    }

    /// Latest generation requested by `reload()` (0 before any reload).
    pub fn generation(&self) -> Generation {
        self.latest_generation
    }
}

// ---------------------------------------------------------------------------
// Inputs.
// ---------------------------------------------------------------------------
impl Supervisor {
    /// Creates the configured slots and spawns their workers. No-op unless idle.
    pub fn start(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        self.phase = Phase::Running;
        for _ in 0..self.config.workers {
            self.add_slot();
        }
        self.emit(Event::Started {
            workers: self.config.workers,
        });
        self.settle(now);
    }

    /// The shell started the process requested by `spawn`.
    pub fn spawned(&mut self, spawn: SpawnId, worker: WorkerId, now: Instant) {
        match self.find_spawn(spawn) {
            Some(Place::Detached(i)) => {
                self.orphans.swap_remove(i);
                self.retire(worker, now);
            }
            Some(Place::Current(s)) => {
                self.slots[s].short = 0;
                let w = self.new_worker(worker, self.slots[s].generation, now);
                self.emit_spawned(s, &w);
                let deadline = now + self.config.ready_timeout;
                self.slots[s].current = Current::Starting {
                    worker: w,
                    deadline,
                };
            }
            Some(Place::Successor(s)) => self.successor_spawned(s, worker, now),
            // Not ours (protocol error): do not let it run unsupervised.
            None => self.command(Command::Kill { worker }),
        }
        self.settle(now);
    }

    /// The shell could not start the process requested by `spawn`. Counts
    /// as a failure of the slot.
    pub fn spawn_failed(&mut self, spawn: SpawnId, reason: impl Into<String>, now: Instant) {
        let cause = CrashCause::SpawnFailed(reason.into());
        match self.find_spawn(spawn) {
            Some(Place::Detached(i)) => {
                self.orphans.swap_remove(i);
            }
            Some(Place::Current(s)) => self.current_failed(s, cause, now),
            Some(Place::Successor(s)) => {
                if let Some(succ) = self.slots[s].successor.take() {
                    self.successor_failed(s, succ.purpose, cause, now);
                }
            }
            None => {}
        }
        self.settle(now);
    }

    /// The shell could not start the process requested by `spawn` for lack
    /// of resources (`EMFILE`, `ENFILE`, `EAGAIN`, `ENOMEM`: too many open
    /// files or processes, no memory). That says nothing about the workers,
    /// so it is not counted for the crash-loop breaker: a slot's spawn is
    /// retried after a backoff of its own
    /// ([`Event::SpawnDeferred`]); a reload's or recycle's replacement gives
    /// up as if it had failed, leaving the old worker serving, again without
    /// counting for the breaker.
    pub fn spawn_deferred(&mut self, spawn: SpawnId, reason: impl Into<String>, now: Instant) {
        let reason = reason.into();
        match self.find_spawn(spawn) {
            Some(Place::Detached(i)) => {
                self.orphans.swap_remove(i);
            }
            Some(Place::Current(s)) => self.defer_current(s, reason, now),
            Some(Place::Successor(s)) => {
                if let Some(succ) = self.slots[s].successor.take() {
                    let cause = CrashCause::NoResources(reason);
                    match succ.purpose {
                        Purpose::Reload => {
                            self.fail_rollout(ReloadFailure::Worker { slot: s, cause }, now);
                        }
                        Purpose::Recycle(why) => self.recycle_failed(s, why, cause, now),
                    }
                }
            }
            None => {}
        }
        self.settle(now);
    }

    /// The worker is ready to serve (what "ready" means is the shell's call).
    pub fn ready(&mut self, worker: WorkerId, now: Instant) {
        match self.find_worker(worker) {
            Some(Place::Current(s)) => self.current_ready(s, now),
            Some(Place::Successor(s)) => self.successor_ready(s, now),
            _ => {}
        }
        self.settle(now);
    }

    /// The worker process ended.
    pub fn exited(&mut self, worker: WorkerId, info: ExitStatus, now: Instant) {
        self.exit_of(worker, info, None, now);
    }

    /// The worker process ended while running `task`, which a service holds
    /// responsible (see [`CrashCause::TaskFault`]): the slot restarts as
    /// after [`exited`](Self::exited), but the breaker does not count it.
    pub fn exited_by_task(
        &mut self,
        worker: WorkerId,
        info: ExitStatus,
        task: String,
        now: Instant,
    ) {
        self.exit_of(worker, info, Some(task), now);
    }

    fn exit_of(&mut self, worker: WorkerId, info: ExitStatus, task: Option<String>, now: Instant) {
        match self.find_worker(worker) {
            Some(Place::Detached(i)) => {
                self.retiring.swap_remove(i);
                self.emit_exit(worker, None, info);
            }
            Some(Place::Current(s)) => {
                self.emit_exit(worker, Some(s), info);
                let cause = match (&self.slots[s].current, task) {
                    (Current::Ready(_), Some(task)) => CrashCause::TaskFault { info, task },
                    (Current::Starting { .. }, _) => CrashCause::Exited {
                        info,
                        before_ready: true,
                    },
                    (Current::Hung { .. }, _) => CrashCause::Hang,
                    (Current::Killing { cause, .. }, _) => cause.clone(),
                    _ => CrashCause::Exited {
                        info,
                        before_ready: false,
                    },
                };
                self.current_failed(s, cause, now);
            }
            Some(Place::Successor(s)) => {
                self.emit_exit(worker, Some(s), info);
                if let Some(succ) = self.slots[s].successor.take() {
                    let cause = CrashCause::Exited {
                        info,
                        before_ready: true,
                    };
                    self.successor_failed(s, succ.purpose, cause, now);
                }
            }
            None => {}
        }
        self.settle(now);
    }

    /// The worker is alive. Only ready workers are watched for hangs.
    pub fn heartbeat(&mut self, worker: WorkerId, now: Instant) {
        if let Some(r) = self.ready_worker_mut(worker) {
            r.last_beat = now;
        }
    }

    /// Resident set size sample of the worker, in bytes.
    pub fn rss(&mut self, worker: WorkerId, bytes: u64, now: Instant) {
        if let Some(limit) = self.config.recycle.max_rss.filter(|&l| bytes > l) {
            self.want_recycle(worker, RecycleReason::Memory { rss: bytes, limit });
        }
        self.settle(now);
    }

    /// Total number of requests the worker has served so far.
    pub fn requests(&mut self, worker: WorkerId, total: u64, now: Instant) {
        let limit = self
            .ready_worker_mut(worker)
            .and_then(|r| r.worker.request_limit)
            .filter(|&l| total >= l);
        if let Some(limit) = limit {
            let reason = RecycleReason::Requests {
                count: total,
                limit,
            };
            self.want_recycle(worker, reason);
        }
        self.settle(now);
    }

    /// Starts a rolling reload to a new generation (or queues one behind the
    /// rollout in progress).
    pub fn reload(&mut self, now: Instant) {
        let reject = if !matches!(self.phase, Phase::Running) {
            Some(RejectReason::NotRunning)
        } else if self.tripped {
            Some(RejectReason::BreakerTripped)
        } else {
            None
        };
        if let Some(reason) = reject {
            return self.emit(Event::ReloadRejected { reason });
        }
        match &mut self.rollout {
            Some(r) => {
                r.queued = true;
                let behind = r.generation;
                self.emit(Event::ReloadQueued { behind });
            }
            None => self.start_rollout(now),
        }
        self.settle(now);
    }

    /// Changes the number of slots: new slots are spawned at once, the
    /// highest slots are retired gracefully. Before `start()` it only sets
    /// the initial count; while stopping it is ignored.
    pub fn scale_to(&mut self, workers: usize, now: Instant) {
        match self.phase {
            Phase::Idle => self.config.workers = workers,
            Phase::Running => self.rescale(workers, now),
            Phase::Stopping(_) | Phase::Finished(_) => {}
        }
    }

    /// First call: disconnect every worker, SIGKILL those still alive after
    /// `kill_timeout`. Second call: SIGKILL everything now.
    pub fn stop(&mut self, now: Instant) {
        match &self.phase {
            Phase::Idle => self.finish(StopReason::Requested, true),
            Phase::Running => self.begin_stop(StopReason::Requested, now),
            Phase::Stopping(st) if !st.forced => self.force_stop(),
            Phase::Stopping(_) | Phase::Finished(_) => {}
        }
        self.settle(now);
    }

    /// Re-arms a tripped breaker: halted slots are spawned again with a
    /// fresh backoff.
    pub fn reset_breaker(&mut self, now: Instant) {
        if !self.tripped || !matches!(self.phase, Phase::Running) {
            return;
        }
        self.tripped = false;
        self.crashes.clear();
        self.emit(Event::BreakerReset);
        for s in 0..self.slots.len() {
            if matches!(self.slots[s].current, Current::Halted) {
                self.slots[s].attempt = 0;
                self.spawn_current(s);
            }
        }
        self.settle(now);
    }

    /// Handles every deadline that has passed at `now`.
    pub fn tick(&mut self, now: Instant) {
        let mut s = 0;
        // The breaker may stop the cluster (and drop every slot) mid-loop.
        while s < self.slots.len() {
            self.tick_current(s, now);
            if s < self.slots.len() {
                self.tick_successor(s, now);
            }
            s += 1;
        }
        self.tick_retiring(now);
        self.settle(now);
    }
}

// ---------------------------------------------------------------------------
// Lookup and small helpers.
// ---------------------------------------------------------------------------
impl Supervisor {
    fn emit(&mut self, event: Event) {
        self.events.push_back(event);
    }

    fn command(&mut self, command: Command) {
        self.commands.push_back(command);
    }

    fn emit_exit(&mut self, worker: WorkerId, slot: Option<usize>, info: ExitStatus) {
        let expected = slot.is_none();
        self.emit(Event::WorkerExited {
            worker,
            slot,
            info,
            expected,
        });
    }

    fn emit_spawned(&mut self, slot: usize, w: &Worker) {
        self.emit(Event::WorkerSpawned {
            slot,
            worker: w.id,
            generation: w.generation,
        });
    }

    fn find_worker(&self, id: WorkerId) -> Option<Place> {
        if let Some(i) = self.retiring.iter().position(|r| r.worker == id) {
            return Some(Place::Detached(i));
        }
        let is = |w: Option<&Worker>| w.is_some_and(|w| w.id == id);
        self.slots.iter().enumerate().find_map(|(s, slot)| {
            if is(slot.current.worker()) {
                Some(Place::Current(s))
            } else if is(slot.successor.as_ref().and_then(|x| x.state.worker())) {
                Some(Place::Successor(s))
            } else {
                None
            }
        })
    }

    fn find_spawn(&self, spawn: SpawnId) -> Option<Place> {
        if let Some(i) = self.orphans.iter().position(|&o| o == spawn) {
            return Some(Place::Detached(i));
        }
        self.slots.iter().enumerate().find_map(|(s, slot)| {
            let succ = slot.successor.as_ref().map(|x| &x.state);
            match (&slot.current, succ) {
                (Current::Spawning { spawn: id }, _) if *id == spawn => Some(Place::Current(s)),
                (_, Some(SuccessorState::Pending { spawn: id })) if *id == spawn => {
                    Some(Place::Successor(s))
                }
                _ => None,
            }
        })
    }

    fn ready_worker_mut(&mut self, id: WorkerId) -> Option<&mut ReadyWorker> {
        self.slots
            .iter_mut()
            .find_map(|slot| match &mut slot.current {
                Current::Ready(r) if r.worker.id == id => Some(r),
                _ => None,
            })
    }

    fn take_current(&mut self, s: usize) -> Current {
        std::mem::replace(&mut self.slots[s].current, Current::Halted)
    }

    fn can_spawn(&self) -> bool {
        matches!(self.phase, Phase::Running) && !self.tripped
    }

    fn alive_count(&self) -> usize {
        let in_slots: usize = self.slots.iter().map(Slot::alive).sum();
        in_slots + self.retiring.len() + self.orphans.len()
    }

    fn issue_spawn(&mut self, slot: usize, generation: Generation) -> SpawnId {
        let spawn = SpawnId(self.next_spawn);
        self.next_spawn += 1;
        self.command(Command::Spawn {
            spawn,
            slot,
            generation,
        });
        spawn
    }

    fn new_worker(&mut self, id: WorkerId, generation: Generation, now: Instant) -> Worker {
        let rc = self.config.recycle;
        let request_limit = rc
            .max_requests
            .map(|max| request_limit(max, rc.max_requests_jitter, self.jitter.unit()));
        Worker {
            id,
            generation,
            spawned_at: now,
            request_limit,
        }
    }

    fn add_slot(&mut self) {
        let s = self.slots.len();
        let generation = self.stable_generation;
        let current = if self.tripped {
            Current::Halted
        } else {
            Current::Spawning {
                spawn: self.issue_spawn(s, generation),
            }
        };
        self.slots.push(Slot::new(generation, current));
    }

    fn spawn_current(&mut self, s: usize) {
        let spawn = self.issue_spawn(s, self.slots[s].generation);
        self.slots[s].current = Current::Spawning { spawn };
    }

    /// Asks `worker` to exit gracefully (or kills it during a forced stop).
    fn retire(&mut self, worker: WorkerId, now: Instant) {
        if matches!(self.phase, Phase::Stopping(Stopping { forced: true, .. })) {
            self.command(Command::Kill { worker });
            self.retiring.push(Retiring {
                worker,
                kill_at: None,
            });
            return self.note_kill();
        }
        self.command(Command::Disconnect { worker });
        let kill_at = Some(now + self.config.kill_timeout);
        self.retiring.push(Retiring { worker, kill_at });
    }

    /// Moves whatever runs as `current` out of its slot, retiring it.
    fn release_current(&mut self, current: Current, now: Instant) -> Option<WorkerId> {
        let (worker, kill_at) = match current {
            Current::Spawning { spawn } => {
                self.orphans.push(spawn);
                return None;
            }
            Current::Starting { worker, .. } | Current::Ready(ReadyWorker { worker, .. }) => {
                self.retire(worker.id, now);
                return Some(worker.id);
            }
            // Already doomed: keep their pending kill.
            Current::Hung { worker, kill_at } => (worker.id, Some(kill_at)),
            Current::Killing {
                worker, kill_at, ..
            } => (worker.id, kill_at),
            Current::Backoff { .. } | Current::Halted => return None,
        };
        self.retiring.push(Retiring { worker, kill_at });
        Some(worker)
    }

    fn discard_successor(&mut self, state: SuccessorState, now: Instant) {
        match state {
            SuccessorState::Pending { spawn } => self.orphans.push(spawn),
            SuccessorState::Starting { worker, .. } => self.retire(worker.id, now),
        }
    }

    fn release_slot(&mut self, slot: Slot, now: Instant) {
        self.release_current(slot.current, now);
        if let Some(succ) = slot.successor {
            self.discard_successor(succ.state, now);
        }
    }

    /// Runs after every input: starts what capacity allows, finishes what is done.
    fn settle(&mut self, now: Instant) {
        match self.phase {
            Phase::Running => {
                self.start_successors();
                self.check_rollout_done(now);
            }
            Phase::Stopping(_) => self.check_stop_done(),
            Phase::Idle | Phase::Finished(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Worker lifecycle: readiness, failures, restarts, breaker.
// ---------------------------------------------------------------------------
impl Supervisor {
    fn current_ready(&mut self, s: usize, now: Instant) {
        if !matches!(self.slots[s].current, Current::Starting { .. }) {
            return;
        }
        if let Current::Starting { worker, .. } = self.take_current(s) {
            self.emit(Event::WorkerReady {
                slot: s,
                worker: worker.id,
                generation: worker.generation,
            });
            self.slots[s].current = Current::Ready(ReadyWorker::new(worker, now));
        }
    }

    fn current_failed(&mut self, s: usize, cause: CrashCause, now: Instant) {
        let counts = !matches!(cause, CrashCause::TaskFault { .. });
        self.emit(Event::WorkerFailed { slot: s, cause });
        let slot = &mut self.slots[s];
        let promoted = match slot.successor.take() {
            // A replacement is already on its way: it takes over the slot.
            Some(next) => {
                slot.generation = next.generation;
                slot.current = next.state.into_current();
                true
            }
            None => {
                slot.current = Current::Halted;
                false
            }
        };
        if counts {
            self.record_crash(now);
        }
        // The breaker may have tripped or stopped the cluster meanwhile.
        if !promoted && self.can_spawn() {
            self.schedule_restart(s, now);
        }
    }

    fn schedule_restart(&mut self, s: usize, now: Instant) {
        let unit = self.jitter.unit();
        let slot = &mut self.slots[s];
        slot.attempt = slot.attempt.saturating_add(1);
        let attempt = slot.attempt;
        let delay = restart_delay(&self.config.backoff, attempt, unit);
        slot.current = Current::Backoff { until: now + delay };
        self.emit(Event::RestartScheduled {
            slot: s,
            attempt,
            delay,
        });
    }

    fn record_crash(&mut self, now: Instant) {
        let Some(b) = self.config.breaker else { return };
        if self.tripped || !matches!(self.phase, Phase::Running) {
            return;
        }
        let crashes = self.crashes.record(now, b.window);
        if crashes <= b.max_crashes {
            return;
        }
        self.tripped = true;
        self.emit(Event::BreakerTripped {
            crashes,
            window: b.window,
        });
        for slot in &mut self.slots {
            if matches!(slot.current, Current::Backoff { .. }) {
                slot.current = Current::Halted;
            }
        }
        self.fail_rollout(ReloadFailure::BreakerTripped, now);
        if b.exit_on_trip {
            self.begin_stop(StopReason::BreakerTripped, now);
        }
    }

    fn tick_current(&mut self, s: usize, now: Instant) {
        match &self.slots[s].current {
            Current::Backoff { until } if *until <= now => self.spawn_current(s),
            Current::Starting { deadline, .. } if *deadline <= now => self.ready_timed_out(s, now),
            Current::Hung { kill_at, .. } if *kill_at <= now => self.kill_hung(s),
            Current::Killing {
                kill_at: Some(at), ..
            } if *at <= now => self.kill_stopping(s),
            Current::Ready(_) => self.tick_ready(s, now),
            _ => {}
        }
    }

    /// A worker that missed its ready timeout is stopped like any other
    /// (it may be serving already: its requests in flight deserve their
    /// chance), then killed after `kill_timeout`.
    fn ready_timed_out(&mut self, s: usize, now: Instant) {
        if let Current::Starting { worker, .. } = self.take_current(s) {
            self.command(Command::Disconnect { worker: worker.id });
            self.emit(Event::ReadyTimeout {
                slot: s,
                worker: worker.id,
            });
            self.slots[s].current = Current::Killing {
                worker,
                cause: CrashCause::ReadyTimeout,
                kill_at: Some(now + self.config.kill_timeout),
            };
        }
    }

    fn kill_hung(&mut self, s: usize) {
        if let Current::Hung { worker, .. } = self.take_current(s) {
            self.command(Command::Kill { worker: worker.id });
            let cause = CrashCause::Hang;
            self.slots[s].current = Current::Killing {
                worker,
                cause,
                kill_at: None,
            };
        }
    }

    /// A worker asked to stop after a ready timeout did not: SIGKILL.
    fn kill_stopping(&mut self, s: usize) {
        if let Current::Killing {
            worker, kill_at, ..
        } = &mut self.slots[s].current
        {
            *kill_at = None;
            let worker = worker.id;
            self.command(Command::Kill { worker });
            self.emit(Event::KillTimeout { worker });
        }
    }

    /// A spawn refused for lack of resources: try the slot again later.
    fn defer_current(&mut self, s: usize, reason: String, now: Instant) {
        if !self.can_spawn() {
            self.slots[s].current = Current::Halted;
            return;
        }
        let unit = self.jitter.unit();
        let slot = &mut self.slots[s];
        slot.short = slot.short.saturating_add(1);
        let attempt = slot.short;
        let retry_in = restart_delay(&self.config.backoff, attempt, unit);
        slot.current = Current::Backoff {
            until: now + retry_in,
        };
        self.emit(Event::SpawnDeferred {
            slot: s,
            reason,
            attempt,
            retry_in,
        });
    }

    fn tick_ready(&mut self, s: usize, now: Instant) {
        if let Some(hb) = self.config.heartbeat {
            let silent = matches!(&self.slots[s].current,
                Current::Ready(r) if r.last_beat + hb.timeout <= now);
            if silent {
                return self.hang_detected(s, hb, now);
            }
        }
        let stable_uptime = self.config.stable_uptime;
        let max_age = self.config.recycle.max_age;
        let slot = &mut self.slots[s];
        let Current::Ready(r) = &mut slot.current else {
            return;
        };
        let reset = slot.attempt > 0 && r.since + stable_uptime <= now;
        match &mut r.recycle {
            Some(p) if p.retry_at.is_some_and(|t| t <= now) => p.retry_at = None,
            Some(_) => {}
            None => {
                let age = now.saturating_duration_since(r.worker.spawned_at);
                if max_age.is_some_and(|max| age >= max) {
                    let reason = RecycleReason::MaxAge { age };
                    r.recycle = Some(PendingRecycle {
                        reason,
                        retry_at: None,
                    });
                }
            }
        }
        if reset {
            slot.attempt = 0;
            self.emit(Event::BackoffReset { slot: s });
        }
    }

    fn hang_detected(&mut self, s: usize, hb: HeartbeatConfig, now: Instant) {
        if let Current::Ready(r) = self.take_current(s) {
            let worker = r.worker.id;
            let signal = hb.signal;
            self.command(Command::Signal { worker, signal });
            self.emit(Event::HangDetected {
                slot: s,
                worker,
                signal,
            });
            let kill_at = now + hb.grace;
            self.slots[s].current = Current::Hung {
                worker: r.worker,
                kill_at,
            };
        }
    }

    fn tick_retiring(&mut self, now: Instant) {
        let mut killed = false;
        for r in &mut self.retiring {
            if r.kill_at.is_some_and(|t| t <= now) {
                r.kill_at = None;
                self.commands.push_back(Command::Kill { worker: r.worker });
                let event = Event::KillTimeout { worker: r.worker };
                self.events.push_back(event);
                killed = true;
            }
        }
        if killed {
            self.note_kill();
        }
    }
}

// ---------------------------------------------------------------------------
// New-first replacement: reload and recycling.
// ---------------------------------------------------------------------------
impl Supervisor {
    fn want_recycle(&mut self, worker: WorkerId, reason: RecycleReason) {
        if let Some(r) = self.ready_worker_mut(worker) {
            if r.recycle.is_none() {
                r.recycle = Some(PendingRecycle {
                    reason,
                    retry_at: None,
                });
            }
        }
    }

    fn start_rollout(&mut self, now: Instant) {
        self.latest_generation += 1;
        let generation = self.latest_generation;
        self.rollout = Some(Rollout {
            generation,
            queued: false,
        });
        self.emit(Event::ReloadStarted { generation });
        self.start_successors();
        self.check_rollout_done(now);
    }

    /// Spawns successors while the surge budget allows: reload first, then
    /// recycling.
    fn start_successors(&mut self) {
        if !self.can_spawn() {
            return;
        }
        while self.alive_count() < self.slots.len() + self.config.max_surge {
            let Some((s, purpose)) = self.next_successor() else {
                break;
            };
            self.start_successor(s, purpose);
        }
    }

    fn next_successor(&self) -> Option<(usize, Purpose)> {
        let target = self.rollout.as_ref().map(|r| r.generation);
        if let Some(g) = target {
            let moving = |slot: &Slot| slot.can_take_successor() && slot.generation < g;
            if let Some(s) = self.slots.iter().position(moving) {
                return Some((s, Purpose::Reload));
            }
        }
        self.slots.iter().enumerate().find_map(|(s, slot)| {
            let reason = slot.due_recycle(target)?;
            Some((s, Purpose::Recycle(reason)))
        })
    }

    fn start_successor(&mut self, s: usize, purpose: Purpose) {
        let generation = match (&purpose, &self.rollout) {
            (Purpose::Reload, Some(r)) => r.generation,
            _ => self.slots[s].generation,
        };
        if let (Purpose::Recycle(reason), Some(worker)) = (&purpose, self.slot_worker(s)) {
            let reason = *reason;
            self.emit(Event::RecycleStarted {
                slot: s,
                worker,
                reason,
            });
        }
        let spawn = self.issue_spawn(s, generation);
        self.slots[s].successor = Some(Successor {
            purpose,
            generation,
            state: SuccessorState::Pending { spawn },
        });
    }

    fn successor_spawned(&mut self, s: usize, id: WorkerId, now: Instant) {
        let Some(generation) = self.slots[s].successor.as_ref().map(|x| x.generation) else {
            return;
        };
        let worker = self.new_worker(id, generation, now);
        self.emit_spawned(s, &worker);
        let deadline = now + self.config.ready_timeout;
        if let Some(succ) = &mut self.slots[s].successor {
            succ.state = SuccessorState::Starting { worker, deadline };
        }
    }

    /// The successor is ready: it becomes current, the old worker retires.
    fn successor_ready(&mut self, s: usize, now: Instant) {
        let Some(succ) = self.slots[s].successor.take() else {
            return;
        };
        let SuccessorState::Starting { worker, .. } = succ.state else {
            self.slots[s].successor = Some(succ);
            return;
        };
        let (new, generation) = (worker.id, worker.generation);
        self.emit(Event::WorkerReady {
            slot: s,
            worker: new,
            generation,
        });
        self.slots[s].generation = generation;
        let old = std::mem::replace(
            &mut self.slots[s].current,
            Current::Ready(ReadyWorker::new(worker, now)),
        );
        let Some(old) = self.release_current(old, now) else {
            return;
        };
        let event = match succ.purpose {
            Purpose::Reload => Event::SlotReloaded {
                slot: s,
                old,
                new,
                generation,
            },
            Purpose::Recycle(reason) => Event::Recycled {
                slot: s,
                old,
                new,
                reason,
            },
        };
        self.emit(event);
    }

    fn tick_successor(&mut self, s: usize, now: Instant) {
        let due = matches!(&self.slots[s].successor, Some(Successor {
            state: SuccessorState::Starting { deadline, .. }, ..
        }) if *deadline <= now);
        if !due {
            return;
        }
        let Some(succ) = self.slots[s].successor.take() else {
            return;
        };
        if let SuccessorState::Starting { worker, .. } = succ.state {
            let worker = worker.id;
            self.command(Command::Disconnect { worker });
            self.retiring.push(Retiring {
                worker,
                kill_at: Some(now + self.config.kill_timeout),
            });
            self.emit(Event::ReadyTimeout { slot: s, worker });
        }
        self.successor_failed(s, succ.purpose, CrashCause::ReadyTimeout, now);
    }

    /// The successor (already removed from the slot) failed before ready.
    fn successor_failed(&mut self, s: usize, purpose: Purpose, cause: CrashCause, now: Instant) {
        self.emit(Event::WorkerFailed {
            slot: s,
            cause: cause.clone(),
        });
        match purpose {
            Purpose::Reload => self.fail_rollout(ReloadFailure::Worker { slot: s, cause }, now),
            Purpose::Recycle(reason) => self.recycle_failed(s, reason, cause, now),
        }
        self.record_crash(now);
    }

    fn recycle_failed(&mut self, s: usize, reason: RecycleReason, cause: CrashCause, now: Instant) {
        let unit = self.jitter.unit();
        let slot = &mut self.slots[s];
        slot.attempt = slot.attempt.saturating_add(1);
        let retry_in = restart_delay(&self.config.backoff, slot.attempt, unit);
        if let Current::Ready(r) = &mut slot.current {
            r.recycle = Some(PendingRecycle {
                reason,
                retry_at: Some(now + retry_in),
            });
        }
        self.emit(Event::RecycleFailed {
            slot: s,
            reason,
            cause,
            retry_in,
        });
    }

    /// Ends the rollout: in-flight reload successors are discarded, slots not
    /// yet moved keep their old worker, a queued reload starts.
    fn fail_rollout(&mut self, failure: ReloadFailure, now: Instant) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        self.emit(Event::ReloadFailed {
            generation: rollout.generation,
            failure,
        });
        for s in 0..self.slots.len() {
            let slot = &mut self.slots[s];
            if let Some(succ) = slot.successor.take() {
                match succ.purpose {
                    Purpose::Reload => self.discard_successor(succ.state, now),
                    Purpose::Recycle(_) => slot.successor = Some(succ),
                }
            }
        }
        if rollout.queued && self.can_spawn() {
            self.start_rollout(now);
        }
    }

    fn check_rollout_done(&mut self, now: Instant) {
        let Some(r) = &self.rollout else { return };
        let generation = r.generation;
        let moved = |s: &Slot| s.generation >= generation && matches!(s.current, Current::Ready(_));
        if !self.slots.iter().all(moved) {
            return;
        }
        let queued = r.queued;
        self.rollout = None;
        self.stable_generation = generation;
        self.emit(Event::ReloadFinished { generation });
        if queued {
            self.start_rollout(now);
        }
    }
}

// ---------------------------------------------------------------------------
// Scaling and stopping.
// ---------------------------------------------------------------------------
impl Supervisor {
    fn rescale(&mut self, workers: usize, now: Instant) {
        let from = self.slots.len();
        self.config.workers = workers;
        while self.slots.len() < workers {
            self.add_slot();
        }
        while self.slots.len() > workers {
            if let Some(slot) = self.slots.pop() {
                self.release_slot(slot, now);
            }
        }
        self.emit(Event::Scaled { from, to: workers });
        self.settle(now);
    }

    fn begin_stop(&mut self, reason: StopReason, now: Instant) {
        self.emit(Event::StopStarted { reason });
        if let Some(r) = self.rollout.take() {
            self.emit(Event::ReloadFailed {
                generation: r.generation,
                failure: ReloadFailure::Stopped,
            });
        }
        self.phase = Phase::Stopping(Stopping {
            reason,
            forced: false,
            killed: false,
        });
        for slot in std::mem::take(&mut self.slots) {
            self.release_slot(slot, now);
        }
    }

    fn force_stop(&mut self) {
        if let Phase::Stopping(st) = &mut self.phase {
            st.forced = true;
        }
        self.emit(Event::StopForced);
        let mut killed = false;
        for r in &mut self.retiring {
            if r.kill_at.take().is_some() {
                self.commands.push_back(Command::Kill { worker: r.worker });
                killed = true;
            }
        }
        if killed {
            self.note_kill();
        }
    }

    /// A worker had to be SIGKILLed: the stop (if any) was not in time.
    fn note_kill(&mut self) {
        if let Phase::Stopping(st) = &mut self.phase {
            st.killed = true;
        }
    }

    fn check_stop_done(&mut self) {
        let Phase::Stopping(st) = &self.phase else {
            return;
        };
        if self.retiring.is_empty() && self.orphans.is_empty() {
            let (reason, in_time) = (st.reason, !st.killed);
            self.finish(reason, in_time);
        }
    }

    fn finish(&mut self, reason: StopReason, in_time: bool) {
        let outcome = Outcome { reason, in_time };
        self.phase = Phase::Finished(outcome);
        self.emit(Event::StopFinished { outcome });
    }
}
