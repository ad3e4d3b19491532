//! The primary process: starts workers, talks to them, reports their
//! lifecycle.
//!
//! ```no_run
//! use procluster::primary::{Cluster, Event};
//!
//! # async fn run() -> procluster::Result<()> {
//! let mut cluster = Cluster::builder().workers(2).build()?;
//! cluster.start().await?;
//! while let Some(event) = cluster.next_event().await {
//!     match event {
//!         Event::Online(worker) => println!("worker {} is online", worker.id()),
//!         Event::Exit { worker, status, .. } => println!("worker {} ended: {status}", worker.id()),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

mod output;
mod service;
mod settings;
mod spawn;
mod worker_handle;
mod worker_task;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Semaphore, mpsc, watch};

pub use output::{MAX_LINE, OutputHook, OutputLine, Stream};
pub use service::{Service, ServiceContext};
pub use settings::{
    ChildFd, DEFAULT_SHUTDOWN_GRACE, ForkHook, ForkOptions, Program, Settings, Stdio, Workers,
};
pub use worker_handle::{WorkerHandle, WorkerState};

use crate::listeners::registry::{Registry, RegistryConfig};
use crate::message::Message;
use crate::protocol::{Format, Policy};
use crate::sync::lock;
use crate::{Error, ExitStatus, Result, WorkerId, env_keys};

/// Something that happened to a worker, in Node's order for each worker:
/// `Fork`, `Online`, (`Listening`, `Message`...), `Disconnect`, `Exit`.
/// Every worker gets exactly one `Fork`, one `Disconnect` and one `Exit`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Fork(WorkerHandle),
    /// The worker's runtime is up and its channel works.
    Online(WorkerHandle),
    /// The worker listens on a shared address (the address actually bound).
    Listening {
        /// The worker.
        worker: WorkerHandle,
        /// What it listens on, e.g. `tcp://127.0.0.1:43121`.
        address: String,
    },
    /// The worker said it is ready (see `Worker::ready`).
    Ready(WorkerHandle),
    /// A message from the worker, attributed by the channel it came on.
    Message {
        /// The sender.
        worker: WorkerHandle,
        /// The message.
        message: Message,
    },
    /// The worker no longer takes part in the cluster: it disconnected, or
    /// its channel closed.
    Disconnect(WorkerHandle),
    /// The worker process ended and was reaped.
    Exit {
        /// The worker.
        worker: WorkerHandle,
        /// How it ended.
        status: ExitStatus,
        /// Whether it exited after a disconnect rather than by accident.
        exited_after_disconnect: bool,
    },
    /// A worker misbehaved (garbage on its channel, a frame over the limit);
    /// it has been disconnected and killed, the rest of the cluster goes on.
    Error {
        /// The worker.
        worker: WorkerHandle,
        /// What happened, naming the worker.
        error: String,
    },
}

impl Event {
    /// The worker the event is about.
    pub fn worker(&self) -> &WorkerHandle {
        match self {
            Self::Fork(w) | Self::Online(w) | Self::Ready(w) | Self::Disconnect(w) => w,
            Self::Listening { worker, .. }
            | Self::Message { worker, .. }
            | Self::Exit { worker, .. }
            | Self::Error { worker, .. } => worker,
        }
    }
}

/// The smallest message limit allowed: the channel's own control messages
/// (listen replies with their addresses, batches of connections) must fit.
const MIN_MAX_FRAME: usize = 4096;

/// Builds a [`Cluster`] (Node's `setupPrimary`).
#[derive(Default)]
pub struct ClusterBuilder {
    settings: Settings,
    services: Vec<Arc<dyn Service>>,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("settings", &self.settings)
            .field(
                "services",
                &self.services.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ClusterBuilder {
    /// How many workers `start()` forks: a number, or [`Workers::Auto`].
    pub fn workers(mut self, workers: impl Into<Workers>) -> Self {
        self.settings.workers = workers.into();
        self
    }

    /// The program workers run (default: the current executable).
    pub fn exec(mut self, program: impl Into<PathBuf>) -> Self {
        self.settings.exec = Some(program.into());
        self
    }

    /// Arguments for the worker program.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.settings.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Adds an environment variable for every worker.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.settings.env.push((key.into(), value.into()));
        self
    }

    /// Working directory of workers.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.settings.cwd = Some(dir.into());
        self
    }

    /// Where workers' output goes.
    pub fn stdio(mut self, stdio: Stdio) -> Self {
        self.settings.stdio = stdio;
        self
    }

    /// Encoding of user messages (JSON by default).
    pub fn format(mut self, format: Format) -> Self {
        self.settings.format = format;
        self
    }

    /// Largest message accepted on a channel, in bytes (default 128 MiB, at
    /// least 4096).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.settings.max_frame = bytes;
        self
    }

    /// Latency mode for the channels: after each read, both ends keep
    /// polling their socket for `window` (say 50 µs) before they let their
    /// event loop sleep, so a reply that comes back within the window is
    /// picked up without a wake-up. Round trips get shorter; the price is the
    /// CPU spent polling, up to `window` after every message on every
    /// channel. Off by default; worth it for request/response traffic between
    /// primary and workers that must be quick, not for bulk transfers.
    ///
    /// ```no_run
    /// # fn f() -> Result<(), procluster::Error> {
    /// let cluster = procluster::primary::Cluster::builder()
    ///     .busy_poll(std::time::Duration::from_micros(50))
    ///     .build()?;
    /// # drop(cluster); Ok(()) }
    /// ```
    pub fn busy_poll(mut self, window: std::time::Duration) -> Self {
        self.settings.busy_poll = window;
        self
    }

    /// Run the primary's thread under Linux's `SCHED_BATCH` policy (the
    /// thread that calls [`ClusterBuilder::build`]: with Tokio's
    /// current-thread runtime, recommended for a primary, the one thread
    /// that runs all its work). The primary keeps its share of the CPU but
    /// does not preempt a busy worker each time a connection arrives: on a
    /// machine whose cores are all busy it wakes less often and hands out
    /// connections in larger batches. Worth it with the round-robin policy
    /// under heavy `Connection: close` traffic (more requests per second,
    /// a longer tail of connection latency; BENCHMARKS.md has both);
    /// nothing changes for workers, which keep the normal policy. Off by
    /// default; a warning is logged where the policy does not exist.
    pub fn batch_scheduling(mut self, on: bool) -> Self {
        self.settings.batch_scheduling = on;
        self
    }

    /// How TCP connections reach workers. `PROCLUSTER_SCHED_POLICY`
    /// (`shared`, `round-robin`, `reuseport`) overrides it.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// The limits of the sticky policy: how long a restarting slot's keys
    /// wait for its next worker, how long and how far the primary reads a
    /// connection's request head for its key, how many connections may
    /// wait for their key at once (see [`StickyOptions`](crate::sticky::StickyOptions)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use procluster::primary::Cluster;
    /// use procluster::sticky::{KeyName, StickyKey, StickyOptions};
    /// use procluster::Policy;
    ///
    /// let mut sticky = StickyOptions::default();
    /// sticky.wait = Duration::from_secs(5);
    /// let builder = Cluster::builder()
    ///     .policy(Policy::Sticky(StickyKey::Cookie(KeyName::new("sid").unwrap())))
    ///     .sticky_options(sticky);
    /// # drop(builder);
    /// ```
    pub fn sticky_options(mut self, options: crate::sticky::StickyOptions) -> Self {
        self.settings.sticky = options;
        self
    }

    /// What kind of program workers run: a procluster program (default) or
    /// a foreign one without a channel (see [`Program::Foreign`]).
    pub fn program(mut self, program: Program) -> Self {
        self.settings.program = program;
        self
    }

    /// Adds a descriptor every worker finds open at number `target`.
    pub fn fd(mut self, fd: impl Into<Arc<std::os::fd::OwnedFd>>, target: i32) -> Self {
        self.settings.fds.push(ChildFd::new(fd, target));
        self
    }

    /// Start each worker in its own process group.
    pub fn own_process_group(mut self, yes: bool) -> Self {
        self.settings.own_process_group = yes;
        self
    }

    /// Replaces all settings at once.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Adds a service to the cluster (a work pool, the bus, the store...):
    /// it lives in the primary and its workers reach it by name.
    pub fn service(mut self, service: impl Service) -> Self {
        self.services.push(Arc::new(service));
        self
    }

    /// Checks the settings and builds the cluster; no worker starts yet.
    ///
    /// The first cluster of a process raises the process's soft open-file
    /// limit (`RLIMIT_NOFILE`) to its hard limit: a primary holds a few
    /// descriptors per worker, and the soft limit of a login shell (often
    /// 1024) would stop a few hundred workers. Workers get back the limit
    /// the process started with.
    ///
    /// # Errors
    /// [`Error::Settings`] for a bad setting (a working directory that does
    /// not exist, a message limit under 4096 bytes, an unknown policy in the
    /// environment, a descriptor placed below 3 or on the channel's fd).
    pub fn build(mut self) -> Result<Cluster, Error> {
        let settings = &mut self.settings;
        if let Some(cwd) = &settings.cwd {
            if !cwd.is_dir() {
                return Err(Error::Settings(format!(
                    "working directory {} is not a directory",
                    cwd.display()
                )));
            }
        }
        if settings.max_frame < MIN_MAX_FRAME || settings.max_frame > u32::MAX as usize {
            return Err(Error::Settings(format!(
                "max message size must be between {MIN_MAX_FRAME} and {} bytes, not {}",
                u32::MAX,
                settings.max_frame
            )));
        }
        check_fds(settings, &settings.fds)?;
        check_services(&self.services)?;
        if let Some(policy) = policy_from_env()? {
            settings.policy = policy;
        }
        if settings.batch_scheduling {
            if let Err(error) = crate::sys::set_batch_scheduling() {
                tracing::warn!(%error, "cannot switch the primary to batch scheduling");
                // Nothing to undo in the workers either.
                settings.batch_scheduling = false;
            }
        }
        spawn::raise_open_files_limit();
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = settings.message_budget.clamp(1, Semaphore::MAX_PERMITS);
        let (live_tx, _) = watch::channel(0);
        let listeners = Registry::new(RegistryConfig {
            policy: settings.policy,
            max_frame: settings.max_frame,
            inherited_fds: crate::listeners::activation::ListenFds::from_env().range(),
            sticky: settings.sticky,
        });
        let inner = Arc::new(Inner {
            settings: self.settings,
            next_id: AtomicU32::new(1),
            workers: Mutex::new(BTreeMap::new()),
            events: tx,
            budget: Arc::new(Semaphore::new(budget)),
            budget_total: budget,
            live: live_tx,
            listeners,
            services: self.services,
        });
        for (index, service) in inner.services.iter().enumerate() {
            // `check_services` keeps the index within a u16.
            let index = u16::try_from(index).unwrap_or(u16::MAX);
            service.attach(service::ServiceContext::new(index, &inner));
        }
        Ok(Cluster {
            inner,
            events: rx,
            pending: VecDeque::new(),
            released: 0,
        })
    }
}

impl From<usize> for Workers {
    fn from(n: usize) -> Self {
        Self::Count(n)
    }
}

pub(crate) type EventBatch = Vec<Event>;

/// Bytes of read budget given back to readers at once.
const RELEASE_BATCH: usize = 256 * 1024;

/// State shared by the cluster and its per-worker tasks.
pub(crate) struct Inner {
    pub(crate) settings: Settings,
    next_id: AtomicU32,
    workers: Mutex<BTreeMap<WorkerId, WorkerHandle>>,
    pub(crate) events: mpsc::UnboundedSender<EventBatch>,
    /// Bytes of user messages queued for the application; readers wait for
    /// permits, `next_event` gives them back.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) budget_total: usize,
    live: watch::Sender<usize>,
    /// Listeners shared with workers.
    pub(crate) listeners: Arc<Registry>,
    /// The cluster's services, in the order workers learn them.
    pub(crate) services: Vec<Arc<dyn Service>>,
}

impl Inner {
    fn workers(&self) -> MutexGuard<'_, BTreeMap<WorkerId, WorkerHandle>> {
        lock(&self.workers)
    }

    pub(crate) fn emit(&self, event: Event) {
        let _ = self.events.send(vec![event]);
    }

    pub(crate) fn worker(&self, id: WorkerId) -> Option<WorkerHandle> {
        self.workers().get(&id).cloned()
    }

    pub(crate) fn all_workers(&self) -> Vec<WorkerHandle> {
        self.workers().values().cloned().collect()
    }

    fn insert(&self, worker: WorkerHandle) {
        let mut workers = self.workers();
        workers.insert(worker.id(), worker);
        self.live.send_replace(workers.len());
    }

    /// Reports a worker's last event and forgets the worker, atomically with
    /// respect to `next_event`'s check for the end of the cluster.
    pub(crate) fn finish(&self, id: WorkerId, last: Event) {
        let mut workers = self.workers();
        let _ = self.events.send(vec![last]);
        workers.remove(&id);
        self.live.send_replace(workers.len());
    }
}

/// A primary and its workers (Node's `cluster` in the primary).
///
/// Events are read with [`Cluster::next_event`]; the cluster keeps working
/// (answering workers, reaping them) whether or not they are read, but user
/// messages wait in a bounded queue until they are.
pub struct Cluster {
    inner: Arc<Inner>,
    events: mpsc::UnboundedReceiver<EventBatch>,
    pending: VecDeque<Event>,
    /// Budget taken back from messages handed out, returned in bulk (each
    /// return takes the semaphore's lock).
    released: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("workers", &self.workers().len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts configuring a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Forks the configured number of workers, with slot indexes 0..N.
    ///
    /// # Errors
    /// The first fork that fails; workers already forked keep running.
    pub async fn start(&mut self) -> Result<Vec<WorkerHandle>, Error> {
        let count = self.inner.settings.workers.resolve();
        let mut started = Vec::with_capacity(count);
        for index in 0..count {
            started.push(
                self.fork_with(ForkOptions {
                    index: Some(index),
                    ..ForkOptions::default()
                })
                .await?,
            );
        }
        Ok(started)
    }

    /// Starts one worker (Node's `cluster.fork()`).
    ///
    /// # Errors
    /// [`Error::Spawn`] when the program cannot be started (missing, not
    /// executable), [`Error::Io`] when the OS refuses a resource.
    pub async fn fork(&self) -> Result<WorkerHandle, Error> {
        self.fork_with(ForkOptions::default()).await
    }

    /// Starts one worker with extra environment (Node's `cluster.fork(env)`),
    /// a slot index, or descriptors of its own.
    ///
    /// # Errors
    /// As [`Cluster::fork`], and [`Error::Settings`] for a descriptor placed
    /// below 3 or on the channel's fd.
    pub async fn fork_with(&self, mut options: ForkOptions) -> Result<WorkerHandle, Error> {
        let id = WorkerId::new(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        if let Some(hook) = &self.inner.settings.on_fork {
            (hook.0)(id, &mut options)
                .map_err(|e| Error::io(format!("cannot prepare worker {id}"), e))?;
        }
        check_fds(&self.inner.settings, &options.fds)?;
        if let Some(index) = options.index {
            self.inner.listeners.expect_slot(index);
        }
        worker_task::fork(&self.inner, id, options).await
    }

    /// The next event; `None` once no worker is alive and every event has
    /// been read.
    ///
    /// # Cancel safety
    /// Cancel safe: no event is lost if the future is dropped.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(self.release(event));
            }
            let received = {
                let workers = self.inner.workers();
                match self.events.try_recv() {
                    Ok(batch) => Some(batch),
                    Err(_) if workers.is_empty() => return None,
                    Err(_) => None,
                }
            };
            match received {
                Some(batch) => self.pending.extend(batch),
                None => {
                    let batch = self.events.recv().await?;
                    self.pending.extend(batch);
                }
            }
        }
    }

    /// Gives a message's bytes back to the read budget as it is handed out.
    fn release(&mut self, mut event: Event) -> Event {
        if let Event::Message { message, .. } = &mut event {
            self.released += std::mem::take(&mut message.charge);
        }
        if self.released >= RELEASE_BATCH || (self.released > 0 && self.pending.is_empty()) {
            self.inner
                .budget
                .add_permits(std::mem::take(&mut self.released));
        }
        event
    }

    /// The workers alive (forked and not yet reaped), by id.
    pub fn workers(&self) -> Vec<WorkerHandle> {
        self.inner.all_workers()
    }

    /// A worker by id, while it is alive.
    pub fn worker(&self, id: WorkerId) -> Option<WorkerHandle> {
        self.inner.worker(id)
    }

    /// Sends a message to every connected worker.
    ///
    /// # Errors
    /// The first failure other than a worker having disconnected meanwhile.
    pub async fn broadcast<T: serde::Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        for worker in self.workers() {
            match worker.send(value).await {
                Err(e) if !e.is_disconnected() => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Disconnects every worker gracefully and waits until all have exited.
    /// Events keep queueing meanwhile; read them afterwards.
    pub async fn disconnect(&self) {
        for worker in self.workers() {
            worker.disconnect();
        }
        self.wait_all_exited().await;
    }

    /// Keeps shared listeners open while no worker holds them, so that
    /// connections wait in the queue for the next worker instead of being
    /// refused (Node closes a listener with its last worker; a supervisor
    /// that restarts workers wants this on). [`Cluster::close_listeners`]
    /// closes them.
    pub fn keep_listeners(&self, keep: bool) {
        self.inner.listeners.set_keep(keep);
    }

    /// Tells the cluster that worker slot `index` is gone for good (it
    /// scaled down): once no worker holds it, the slot's reuseport sockets
    /// are drained to the other workers and closed. Forking a worker for the
    /// slot again brings it back.
    pub fn retire_slot(&self, index: usize) {
        self.inner.listeners.retire_slot(index);
    }

    /// What the primary's listeners have done since the cluster started:
    /// connections it accepted itself, those it took from reuseport slots
    /// without a worker, accept errors.
    pub fn listener_stats(&self) -> crate::listeners::ListenerStats {
        self.inner.listeners.stats()
    }

    /// Closes every shared listener now: new clients are refused, and
    /// connections still waiting in a socket's queue are closed unanswered.
    /// [`Cluster::drain_listeners`] closes without losing them.
    pub fn close_listeners(&self) {
        self.inner.listeners.close_all();
    }

    /// Closes every shared listener without losing a connection that was
    /// already waiting: the queues are accepted, the sockets close (new
    /// clients are refused), and what was queued goes to the connected
    /// workers, which take it with their next `accept()`. Resolves once all
    /// of it is taken, or after `within`; returns how many connections were
    /// left untaken then (and closed). Call it before disconnecting the
    /// workers, as a graceful stop does.
    ///
    /// # Cancel safety
    /// The listeners stop accepting as soon as this is first polled;
    /// dropping the future early leaves them closed with what is still
    /// waiting kept until the workers leave.
    pub async fn drain_listeners(&self, within: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        self.stop_accepting();
        self.listeners_drained(deadline).await
    }

    /// The first half of [`Cluster::drain_listeners`]: the listeners stop
    /// accepting and hand their queues to the workers.
    pub(crate) fn stop_accepting(&self) {
        self.inner.listeners.stop_accepting();
    }

    /// The second half of [`Cluster::drain_listeners`].
    pub(crate) async fn listeners_drained(&self, deadline: tokio::time::Instant) -> usize {
        self.inner.listeners.drained(deadline).await
    }

    /// Waits until no worker is alive.
    pub async fn wait_all_exited(&self) {
        let mut live = self.inner.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }
}

/// A usable copy of a descriptor this process inherited by number, such as
/// the sockets systemd passes to a service (`LISTEN_FDS`, from fd 3). The
/// copy is close-on-exec, and so becomes the original, so neither leaks into
/// workers except where placed on purpose ([`Settings::fds`]). Safe to call
/// for any number: ownership of the original is never taken.
///
/// Returns `None` when `fd` is not open.
pub fn inherited_fd(fd: std::os::fd::RawFd) -> Option<std::os::fd::OwnedFd> {
    crate::sys::duplicate_inherited_fd(fd)
}

/// Descriptors go at 3 and above (0-2 are the standard streams), and not on
/// the channel of a procluster program.
fn check_fds(settings: &Settings, fds: &[ChildFd]) -> Result<(), Error> {
    for fd in fds {
        if fd.target < 3 {
            return Err(Error::Settings(format!(
                "cannot place a descriptor at fd {}: 0, 1 and 2 are the standard streams",
                fd.target
            )));
        }
        if !settings.program.is_foreign() && fd.target == crate::CHANNEL_FD {
            return Err(Error::Settings(format!(
                "cannot place a descriptor at fd {}: a procluster worker's channel is there \
                 (use Program::Foreign for a program without a channel)",
                fd.target
            )));
        }
    }
    Ok(())
}

/// The environment a worker gets from the cluster, beside the
/// application's own: the marker of a procluster worker, or for a foreign
/// program (which has no channel) who it is.
pub(crate) fn worker_env(
    id: WorkerId,
    settings: &Settings,
    options: &ForkOptions,
) -> Vec<(&'static str, String)> {
    if !settings.program.is_foreign() {
        return vec![(crate::WORKER_MARKER, std::process::id().to_string())];
    }
    let mut env = vec![
        (env_keys::WORKER_ID, id.to_string()),
        (
            env_keys::STICKY_TOKEN,
            crate::sticky::token_of(options.index, id),
        ),
    ];
    if let Some(index) = options.index {
        env.push((env_keys::WORKER_INDEX, index.to_string()));
    }
    env
}

/// Services need distinct names, and their index must fit a frame.
fn check_services(services: &[Arc<dyn Service>]) -> Result<()> {
    if services.len() > service::MAX_SERVICES {
        return Err(Error::Settings(format!(
            "{} services: at most {} are possible",
            services.len(),
            service::MAX_SERVICES
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for service in services {
        let name = service.name();
        if !names.insert(name.clone()) {
            return Err(Error::Settings(format!(
                "two services are named {name:?}: give each its own name"
            )));
        }
    }
    Ok(())
}

/// What a new worker learns in its channel's first frame.
pub(crate) fn hello(inner: &Inner, id: WorkerId, options: &ForkOptions) -> crate::handshake::Hello {
    let settings = &inner.settings;
    crate::handshake::Hello {
        id,
        index: options.index.map(|i| i as u64),
        format: settings.format,
        max_frame: settings.max_frame as u64,
        heartbeat: settings.heartbeat_interval,
        shutdown_grace: settings.shutdown_grace,
        busy_poll: settings.busy_poll,
        services: inner.services.iter().map(|s| s.name()).collect(),
    }
}

/// Reads `PROCLUSTER_SCHED_POLICY`, which overrides the configured policy.
fn policy_from_env() -> Result<Option<Policy>> {
    match std::env::var(env_keys::SCHED_POLICY) {
        Err(_) => Ok(None),
        Ok(name) => name
            .parse()
            .map(Some)
            .map_err(|error| Error::Settings(format!("{}: {error}", env_keys::SCHED_POLICY))),
    }
}
