//! The IO shell: runs a [`Supervisor`] against a real [`Cluster`].
//!
//! One task owns the cluster and the state machine. It feeds the machine
//! what it observes (exits, readiness, heartbeats, request counts, memory),
//! executes the machine's commands (fork, disconnect, signal, kill), ticks it
//! at its deadlines, and forwards both the cluster's and the supervisor's
//! events to the application in the order they happened.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::control::{
    ClusterStatus, ReloadError, Request, SupervisorHandle, WorkerPhase, WorkerStatus,
};
use super::signals::{SignalAction, Signals};
use super::types::{Command, Event, Generation, Outcome};
use super::{Supervisor, SupervisorConfig};
use crate::WorkerId;
use crate::primary::{self, Cluster, ForkOptions, WorkerHandle};

/// The environment variable that tells a supervised worker its generation
/// (`0` at start, `+1` per reload).
pub const GENERATION_ENV: &str = "PROCLUSTER_GENERATION";

/// What makes a supervised worker count as ready: until then it is not
/// watched for hangs, and during a reload the old worker of its slot keeps
/// serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// Its first `Listening` event: it listens on a shared port.
    #[default]
    Listening,
    /// Its `Ready` event: it called
    /// [`Worker::ready`](crate::worker::Worker::ready).
    Explicit,
    /// Its `Online` event: its runtime is up. For workers that neither
    /// listen through the cluster nor say when they are ready.
    Online,
    /// Only [`SupervisorHandle::mark_ready`]: the application decides (for
    /// example after a health check of a foreign program).
    Manual,
}

/// How a [`SupervisedCluster`] supervises.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SupervisionOptions {
    /// The state machine's settings, the number of workers included.
    pub supervisor: SupervisorConfig,
    /// What makes a worker ready.
    pub readiness: Readiness,
    /// How often heartbeats, request counts and memory are looked at (only
    /// when hang detection or a recycling limit needs them).
    pub sample_interval: Duration,
    /// Let the supervisor own the process's signals: SIGTERM and SIGINT stop
    /// gracefully (a second one stops at once), SIGHUP reloads, SIGTTIN and
    /// SIGTTOU add and remove a worker.
    pub handle_signals: bool,
}

impl Default for SupervisionOptions {
    fn default() -> Self {
        Self {
            supervisor: SupervisorConfig::default(),
            readiness: Readiness::default(),
            sample_interval: Duration::from_millis(100),
            handle_signals: false,
        }
    }
}

/// What a [`SupervisedCluster`] reports: the cluster's own events and the
/// supervisor's, in one stream.
#[derive(Debug)]
pub enum Report {
    /// Something happened to a worker process (`Fork`, `Online`, `Exit`...).
    Cluster(primary::Event),
    /// The supervisor decided or noticed something (a restart, a reload
    /// step, a hang...). Its worker ids are the cluster's worker ids.
    Supervisor(Event),
}

/// Why a [`SupervisedCluster`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The cluster already has workers, which the supervisor would not know.
    #[error(
        "the cluster already has {0} worker(s); hand the supervisor a cluster that has not started, it forks the workers itself"
    )]
    WorkersAlreadyRunning(usize),
    /// Hang detection is on, but workers do not send heartbeats.
    #[error(
        "hang detection is on but the cluster's heartbeat_interval is not set: workers would send no heartbeat and all be killed as hung; set Settings::heartbeat_interval"
    )]
    HeartbeatsOff,
    /// The hang timeout does not leave room for a single heartbeat.
    #[error(
        "the hang timeout ({timeout:?}) must be longer than the heartbeat interval ({interval:?})"
    )]
    HangTimeoutTooShort {
        /// The configured hang timeout.
        timeout: Duration,
        /// The cluster's heartbeat interval.
        interval: Duration,
    },
    /// A signal handler could not be installed.
    #[error("cannot handle {signal}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// There is no Tokio runtime to run the supervisor on.
    #[error("SupervisedCluster::start must be called inside a Tokio runtime")]
    NoRuntime,
}

/// Why a supervised cluster's run ended badly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisionError {
    /// Workers failed too often; the breaker stopped the whole cluster.
    #[error(
        "crash loop: {crashes} worker failures within {window:?} tripped the breaker, so the cluster was stopped; look at why the workers fail"
    )]
    BreakerTripped {
        /// Failures counted in the window.
        crashes: usize,
        /// The breaker's window.
        window: Duration,
    },
    /// The supervising task panicked.
    #[error("the supervising task panicked: {0}")]
    Panicked(String),
}

/// A [`Cluster`] kept healthy by a [`Supervisor`]: workers are started per
/// slot, restarted with backoff when they fail, recycled, reloaded new-first
/// and stopped gracefully.
///
/// The supervision runs in a task of its own; read what happens with
/// [`next_event`](Self::next_event) and steer it with a
/// [`SupervisorHandle`]. Events queue while they are not read (user messages
/// up to the cluster's message budget, after which the supervisor stops
/// reading the cluster until they are). Dropping the supervised cluster stops
/// supervising: its workers exit when their channels close.
///
/// # Examples
/// ```no_run
/// use procluster::primary::Cluster;
/// use procluster::supervisor::{Readiness, SupervisedCluster, SupervisionOptions};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = Cluster::builder().build()?;
/// let mut options = SupervisionOptions::default();
/// options.supervisor.workers = 4;
/// options.readiness = Readiness::Listening;
/// options.handle_signals = true;
/// let mut supervised = SupervisedCluster::start(cluster, options)?;
/// while let Some(event) = supervised.next_event().await {
///     println!("{event:?}");
/// }
/// let outcome = supervised.wait().await?;
/// println!("stopped; every worker exited in time: {}", outcome.in_time);
/// # Ok(()) }
/// ```
pub struct SupervisedCluster {
    events: mpsc::UnboundedReceiver<Report>,
    backlog: Arc<Backlog>,
    handle: SupervisorHandle,
    task: Option<JoinHandle<Result<Outcome, SupervisionError>>>,
}

impl std::fmt::Debug for SupervisedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisedCluster")
            .field(
                "finished",
                &self.task.as_ref().is_none_or(|t| t.is_finished()),
            )
            .finish_non_exhaustive()
    }
}

impl SupervisedCluster {
    /// Starts supervising `cluster`, which must not have started workers:
    /// the supervisor forks `options.supervisor.workers` of them, one per
    /// slot (`ForkOptions::index`), each with [`GENERATION_ENV`] set.
    ///
    /// # Errors
    /// See [`StartError`]: a cluster with workers, hang detection without
    /// heartbeats, a signal handler that cannot be installed, no runtime.
    pub fn start(cluster: Cluster, options: SupervisionOptions) -> Result<Self, StartError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StartError::NoRuntime);
        }
        let running = cluster.workers().len();
        if running > 0 {
            return Err(StartError::WorkersAlreadyRunning(running));
        }
        if let Some(hang) = options.supervisor.heartbeat {
            let interval = cluster
                .settings()
                .heartbeat_interval
                .ok_or(StartError::HeartbeatsOff)?;
            if hang.timeout <= interval {
                return Err(StartError::HangTimeoutTooShort {
                    timeout: hang.timeout,
                    interval,
                });
            }
        }
        // A restarted or reloaded worker takes over its slot's listeners:
        // keep them open (connections wait in the queue) while a slot is
        // between workers. They are closed once the supervisor finishes.
        cluster.keep_listeners(true);
        let signals = match options.handle_signals {
            true => Some(Signals::install()?),
            false => None,
        };
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::new(cluster.settings().message_budget));
        let driver = Driver {
            sup: Supervisor::new(options.supervisor.clone()),
            cluster,
            cluster_live: false,
            options,
            workers: BTreeMap::new(),
            restarts: Vec::new(),
            pending_reload: None,
            reload_waiters: Vec::new(),
            breaker: None,
            out: events_tx,
            backlog: backlog.clone(),
            requests,
            signals,
            drain_until: None,
            last_memory_sample: None,
        };
        let task = tokio::spawn(driver.run());
        Ok(Self {
            events,
            backlog,
            handle: SupervisorHandle {
                requests: requests_tx,
            },
            task: Some(task),
        })
    }

    /// A handle to reload, scale, stop or inspect the cluster.
    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    /// The next event; `None` once the supervisor has finished (every worker
    /// exited after a stop) and every event has been read.
    ///
    /// # Cancel safety
    /// Cancel safe: no event is lost if the future is dropped.
    pub async fn next_event(&mut self) -> Option<Report> {
        let event = self.events.recv().await?;
        if let Report::Cluster(primary::Event::Message { message, .. }) = &event {
            self.backlog.release(message.payload().len());
        }
        Some(event)
    }

    /// Waits until the supervisor has finished, passing over the events not
    /// read yet.
    ///
    /// # Errors
    /// [`SupervisionError::BreakerTripped`] when the crash-loop breaker
    /// stopped the cluster (with [`BreakerConfig::exit_on_trip`](super::BreakerConfig)).
    pub async fn wait(mut self) -> Result<Outcome, SupervisionError> {
        while self.next_event().await.is_some() {}
        let Some(task) = self.task.take() else {
            return Err(SupervisionError::Panicked("already waited for".into()));
        };
        match task.await {
            Ok(result) => result,
            Err(e) => Err(SupervisionError::Panicked(e.to_string())),
        }
    }
}

impl Drop for SupervisedCluster {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Bytes of user messages forwarded but not read by the application yet.
#[derive(Debug)]
struct Backlog {
    bytes: AtomicUsize,
    limit: usize,
    drained: Notify,
}

impl Backlog {
    fn new(limit: usize) -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            limit: limit.max(1),
            drained: Notify::new(),
        }
    }

    fn charge(len: usize) -> usize {
        len.max(1)
    }

    fn add(&self, len: usize) {
        self.bytes.fetch_add(Self::charge(len), Ordering::AcqRel);
    }

    fn release(&self, len: usize) {
        self.bytes.fetch_sub(Self::charge(len), Ordering::AcqRel);
        self.drained.notify_one();
    }

    fn is_full(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= self.limit
    }
}

/// What the shell knows about one of its workers.
struct Tracked {
    handle: WorkerHandle,
    slot: usize,
    generation: Generation,
    phase: WorkerPhase,
    started_at: SystemTime,
    /// Last heartbeat fed to the machine.
    last_beat: Option<Instant>,
}

/// The supervising task's state.
struct Driver {
    sup: Supervisor,
    cluster: Cluster,
    /// False once `next_event` said no worker is alive, until the next fork.
    cluster_live: bool,
    options: SupervisionOptions,
    workers: BTreeMap<WorkerId, Tracked>,
    /// Restarts after a failure, per slot.
    restarts: Vec<u32>,
    /// A `reload()` request waiting to learn whether it started or queued.
    pending_reload: Option<oneshot::Sender<Result<(), ReloadError>>>,
    /// Reload requests and the generation whose rollout answers them.
    reload_waiters: Vec<(Generation, oneshot::Sender<Result<(), ReloadError>>)>,
    /// The breaker's last trip.
    breaker: Option<(usize, Duration)>,
    out: mpsc::UnboundedSender<Report>,
    backlog: Arc<Backlog>,
    requests: mpsc::UnboundedReceiver<Request>,
    signals: Option<Signals>,
    /// A stop began: until this deadline, the connections that were queued
    /// on the listeners are handed to the workers before they are told to
    /// leave.
    drain_until: Option<tokio::time::Instant>,
    /// When memory was last measured.
    last_memory_sample: Option<Instant>,
}

/// Longest a graceful stop waits for the workers to take the connections
/// queued when it began, before it disconnects them.
const STOP_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How often workers' memory is measured (a walk of `/proc`) when a
/// memory limit is set.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

impl Driver {
    async fn run(mut self) -> Result<Outcome, SupervisionError> {
        self.sup.start(Instant::now());
        let mut sample =
            tokio::time::interval(self.options.sample_interval.max(Duration::from_millis(1)));
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sampling = self.needs_sampling();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut requests_open = true;
        let outcome = loop {
            self.settle().await;
            if let Some(outcome) = self.sup.outcome() {
                break outcome;
            }
            let deadline = self.sup.next_deadline();
            let backlog_full = self.backlog.is_full();
            let read_cluster = self.cluster_live && !backlog_full;
            tokio::select! {
                event = self.cluster.next_event(), if read_cluster => self.on_cluster_event(event),
                request = self.requests.recv(), if requests_open => match request {
                    Some(request) => self.on_request(request),
                    None => requests_open = false,
                },
                action = Signals::recv(&mut self.signals), if self.signals.is_some() => {
                    self.on_signal(action);
                }
                () = tokio::time::sleep_until(deadline.unwrap_or(far).into()), if deadline.is_some() => {
                    self.sup.tick(Instant::now());
                }
                _ = sample.tick(), if sampling => self.sample(),
                () = self.backlog.drained.notified(), if backlog_full => {}
            }
        };
        self.cluster.close_listeners();
        self.drain_cluster().await;
        self.reload_waiters.clear();
        match (outcome.is_failure(), self.breaker) {
            (true, Some((crashes, window))) => {
                Err(SupervisionError::BreakerTripped { crashes, window })
            }
            (true, None) => Err(SupervisionError::BreakerTripped {
                crashes: 0,
                window: Duration::ZERO,
            }),
            (false, _) => Ok(outcome),
        }
    }

    fn needs_sampling(&self) -> bool {
        let c = &self.options.supervisor;
        c.heartbeat.is_some() || c.recycle.max_requests.is_some() || c.recycle.max_rss.is_some()
    }

    /// Executes the machine's commands and forwards its events until it has
    /// nothing left to say.
    async fn settle(&mut self) {
        loop {
            self.forward_supervisor_events();
            let Some(command) = self.sup.poll_command() else {
                break;
            };
            self.execute(command).await;
        }
    }

    /// Forwards what is left once the last worker has exited.
    async fn drain_cluster(&mut self) {
        if !self.cluster.workers().is_empty() {
            return;
        }
        while let Some(event) = self.cluster.next_event().await {
            self.forward(Report::Cluster(event));
        }
    }

    fn forward(&self, event: Report) {
        let charge = match &event {
            Report::Cluster(primary::Event::Message { message, .. }) => {
                Some(message.payload().len())
            }
            _ => None,
        };
        if let Some(len) = charge {
            self.backlog.add(len);
        }
        // The application may have stopped listening; supervision goes on.
        if self.out.send(event).is_err() {
            if let Some(len) = charge {
                self.backlog.release(len);
            }
        }
    }

    async fn execute(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Spawn {
                spawn,
                slot,
                generation,
            } => {
                let options = ForkOptions {
                    index: Some(slot),
                    ..ForkOptions::default()
                }
                .env(GENERATION_ENV, generation.to_string());
                match self.cluster.fork_with(options).await {
                    Ok(handle) => {
                        self.cluster_live = true;
                        let id = handle.id();
                        self.workers.insert(
                            id,
                            Tracked {
                                handle,
                                slot,
                                generation,
                                phase: WorkerPhase::Starting,
                                started_at: SystemTime::now(),
                                last_beat: None,
                            },
                        );
                        self.sup.spawned(spawn, id, Instant::now());
                    }
                    Err(error) if error.is_resource_shortage() => {
                        // Reported by the machine's `SpawnDeferred` event.
                        tracing::debug!(slot, %error, "cannot start a worker for now");
                        self.sup.spawn_deferred(spawn, error.to_string(), now);
                    }
                    Err(error) => {
                        tracing::warn!(slot, %error, "cannot start a worker");
                        self.sup.spawn_failed(spawn, error.to_string(), now);
                    }
                }
            }
            Command::Disconnect { worker } => {
                self.finish_draining().await;
                if let Some(t) = self.stopping(worker) {
                    t.handle.disconnect();
                }
            }
            Command::Signal { worker, signal } => {
                self.finish_draining().await;
                let Some(t) = self.stopping(worker) else {
                    return;
                };
                if let Err(error) = t.handle.signal(signal) {
                    tracing::warn!(worker = %t.handle.id(), %error, "cannot signal worker");
                }
            }
            Command::Kill { worker } => {
                if let Some(t) = self.stopping(worker) {
                    if let Err(error) = t.handle.signal(crate::Signal::KILL) {
                        tracing::warn!(worker = %t.handle.id(), %error, "cannot kill worker");
                    }
                }
            }
        }
    }

    /// During a stop, waits (once) until the connections queued when it
    /// began are taken, or its deadline.
    async fn finish_draining(&mut self) {
        if let Some(deadline) = self.drain_until.take() {
            let left = self.cluster.listeners_drained(deadline).await;
            if left > 0 {
                tracing::warn!(
                    left,
                    "connections queued at stop were not taken in time; closed"
                );
            }
        }
    }

    /// The worker, now marked as on its way out.
    fn stopping(&mut self, worker: WorkerId) -> Option<&mut Tracked> {
        let t = self.workers.get_mut(&worker)?;
        t.phase = WorkerPhase::Stopping;
        Some(t)
    }

    fn on_cluster_event(&mut self, event: Option<primary::Event>) {
        let Some(event) = event else {
            self.cluster_live = false;
            return;
        };
        let now = Instant::now();
        let id = event.worker().id();
        let readiness = self.options.readiness;
        match &event {
            primary::Event::Online(_) if readiness == Readiness::Online => self.sup.ready(id, now),
            primary::Event::Listening { .. } if readiness == Readiness::Listening => {
                self.sup.ready(id, now);
            }
            primary::Event::Ready(_) if readiness == Readiness::Explicit => {
                self.sup.ready(id, now);
            }
            primary::Event::Exit { status, .. } => {
                self.workers.remove(&id);
                let status = *status;
                let blame = event.worker().exit_blame();
                // The cluster's Exit goes out before what the supervisor makes of it.
                self.forward(Report::Cluster(event));
                match blame {
                    Some(task) => self.sup.exited_by_task(id, status, task, now),
                    None => self.sup.exited(id, status, now),
                }
                return;
            }
            _ => {}
        }
        self.forward(Report::Cluster(event));
    }

    fn on_request(&mut self, request: Request) {
        let now = Instant::now();
        match request {
            Request::Reload(reply) => {
                self.pending_reload = Some(reply);
                self.sup.reload(now);
            }
            Request::ScaleTo(workers) => self.sup.scale_to(workers, now),
            Request::Stop => self.sup.stop(now),
            Request::ResetBreaker => self.sup.reset_breaker(now),
            Request::MarkReady(id) => self.sup.ready(id, now),
            Request::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn on_signal(&mut self, action: SignalAction) {
        let now = Instant::now();
        match action {
            SignalAction::Stop => self.sup.stop(now),
            SignalAction::Reload => self.sup.reload(now),
            SignalAction::AddWorker => self.sup.scale_to(self.sup.slot_count() + 1, now),
            SignalAction::RemoveWorker => {
                let n = self.sup.slot_count();
                if n > 1 {
                    self.sup.scale_to(n - 1, now);
                }
            }
        }
    }

    /// Feeds heartbeats, request counts and memory samples to the machine.
    fn sample(&mut self) {
        let now = Instant::now();
        let config = &self.options.supervisor;
        let (beats, requests, rss) = (
            config.heartbeat.is_some(),
            config.recycle.max_requests.is_some(),
            config.recycle.max_rss.is_some(),
        );
        for (&id, t) in &mut self.workers {
            if beats {
                let beat = t.handle.last_heartbeat();
                if beat.is_some() && beat != t.last_beat {
                    t.last_beat = beat;
                    self.sup.heartbeat(id, beat.unwrap_or(now));
                }
            }
            if requests {
                let total = t.handle.requests();
                if total > 0 {
                    self.sup.requests(id, total, now);
                }
            }
        }
        // Memory changes slowly and costs a walk of /proc: once a second.
        let due = self
            .last_memory_sample
            .is_none_or(|at| now.duration_since(at) >= MEMORY_SAMPLE_INTERVAL);
        if rss && due {
            self.last_memory_sample = Some(now);
            let table = crate::procfs::ProcessTable::read();
            let workers: Vec<(WorkerId, u32)> = self
                .workers
                .iter()
                .map(|(&id, t)| (id, t.handle.pid()))
                .collect();
            for (id, pid) in workers {
                if let Some(bytes) = table.tree_rss_bytes(pid) {
                    self.sup.rss(id, bytes, now);
                }
            }
        }
    }

    fn forward_supervisor_events(&mut self) {
        while let Some(event) = self.sup.poll_event() {
            self.observe(&event);
            self.forward(Report::Supervisor(event));
        }
        // A queued reload that could not start will not run.
        if !self.sup.is_reloading() {
            for (_, waiter) in self.reload_waiters.drain(..) {
                let _ = waiter.send(Err(ReloadError::Dropped));
            }
        }
    }

    /// Keeps the status and the reload waiters up to date.
    fn observe(&mut self, event: &Event) {
        match *event {
            Event::StopStarted { .. } => {
                // Refuse new connections now rather than queue them for
                // workers that are leaving; those already queued are handed
                // to the workers before they are told to leave.
                self.cluster.stop_accepting();
                let within = (self.options.supervisor.kill_timeout / 2).min(STOP_DRAIN_LIMIT);
                self.drain_until = Some(tokio::time::Instant::now() + within);
            }
            Event::WorkerReady { worker, .. } => {
                if let Some(t) = self.workers.get_mut(&worker) {
                    t.phase = WorkerPhase::Ready;
                }
            }
            Event::RestartScheduled { slot, .. } => {
                if self.restarts.len() <= slot {
                    self.restarts.resize(slot + 1, 0);
                }
                self.restarts[slot] += 1;
            }
            Event::Scaled { from, to } => {
                self.restarts.truncate(to);
                for slot in to..from {
                    self.cluster.retire_slot(slot);
                }
            }
            Event::BreakerTripped { crashes, window } => {
                self.breaker = Some((crashes, window));
            }
            Event::ReloadStarted { generation } => {
                if let Some(reply) = self.pending_reload.take() {
                    self.reload_waiters.push((generation, reply));
                }
            }
            Event::ReloadQueued { behind } => {
                if let Some(reply) = self.pending_reload.take() {
                    self.reload_waiters.push((behind + 1, reply));
                }
            }
            Event::ReloadRejected { reason } => {
                if let Some(reply) = self.pending_reload.take() {
                    let _ = reply.send(Err(ReloadError::Rejected(reason)));
                }
            }
            Event::ReloadFinished { generation } => {
                self.answer_reloads(|g| g <= generation, || Ok(()));
            }
            Event::ReloadFailed {
                generation,
                ref failure,
            } => {
                let failure = failure.clone();
                self.answer_reloads(
                    |g| g == generation,
                    || {
                        Err(ReloadError::Failed {
                            generation,
                            failure: failure.clone(),
                        })
                    },
                );
            }
            _ => {}
        }
    }

    fn answer_reloads(
        &mut self,
        answers: impl Fn(Generation) -> bool,
        result: impl Fn() -> Result<(), ReloadError>,
    ) {
        let (done, waiting) = std::mem::take(&mut self.reload_waiters)
            .into_iter()
            .partition(|(g, _)| answers(*g));
        self.reload_waiters = waiting;
        for (_, waiter) in done {
            let _ = waiter.send(result());
        }
    }

    fn status(&self) -> ClusterStatus {
        let workers = self
            .workers
            .iter()
            .map(|(&id, t)| WorkerStatus {
                id,
                index: t.slot,
                pid: t.handle.pid(),
                generation: t.generation,
                phase: t.phase,
                restarts: self.restarts.get(t.slot).copied().unwrap_or(0),
                started_at: t.started_at,
            })
            .collect();
        ClusterStatus {
            workers,
            target_workers: self.sup.slot_count(),
            generation: self.sup.generation(),
            reloading: self.sup.is_reloading(),
            breaker_tripped: self.sup.is_breaker_tripped(),
        }
    }
}
