//! `procluster run`: bind the listeners, start the supervised cluster of
//! exec-shimmed workers, answer the control socket, and report.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use procluster::listeners::saturation::QUEUE_POLL;
use procluster::listeners::slots::SlotSockets;
use procluster::primary::{
    ChildFd, Cluster, Event, ForkHook, ForkOptions, Program, Settings, Stdio, WorkerHandle,
};
use procluster::supervisor::{
    self, BreakerConfig, HeartbeatConfig, Readiness as SupervisorReadiness, Report,
    SupervisedCluster, SupervisionError, SupervisionOptions, SupervisorConfig, SupervisorHandle,
    WorkerPhase,
};
use procluster::{Policy, WorkerId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::args::RunArgs;
use crate::config::RunConfig;
use crate::control::server::{Call, ControlSocket};
use crate::control::{Request, Response};
use crate::listen_spec::{self, BindOptions, Endpoint, ListenSpec, Sockets};
use crate::readiness::{self, Readiness, ReadyMode, Signals};
use crate::shim::{self, ShimArgs};
use crate::systemd::{self, Notifier};

/// Why `run` could not start, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    ProgramNotFound(String),
    #[error("{0}")]
    ProgramNotExecutable(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Start(String),
}

impl RunError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_) | Self::Usage(_) => ExitCode::from(2),
            Self::ProgramNotFound(_) => ExitCode::from(127),
            Self::ProgramNotExecutable(_) => ExitCode::from(126),
            Self::Io(_) | Self::Start(_) => ExitCode::FAILURE,
        }
    }
}

pub async fn run(args: RunArgs) -> ExitCode {
    let config = match RunConfig::resolve(args) {
        Ok(config) => config,
        Err(error) => return fail(RunError::from(error)),
    };
    crate::logs::init(config.log_format);
    let code = match Primary::start(config).await {
        Ok(primary) => primary.serve().await,
        Err(error) => fail(error),
    };
    // What is still queued, unless nobody reads it.
    crate::logs::flush(Duration::from_secs(2));
    code
}

fn fail(error: RunError) -> ExitCode {
    crate::logs::say(&error.to_string());
    crate::logs::flush(Duration::from_secs(1));
    error.exit_code()
}

/// A listener as bound: one socket for every worker, or (reuseport) one
/// per worker slot, kept across the slot's restarts.
#[derive(Debug, Clone)]
struct Listener {
    name: String,
    address: String,
    sockets: ListenerSockets,
}

#[derive(Debug, Clone)]
enum ListenerSockets {
    Shared(Arc<OwnedFd>),
    PerSlot(Arc<Mutex<SlotSockets>>),
}

impl Listener {
    fn shared(name: String, socket: OwnedFd) -> Self {
        Self {
            name,
            address: procluster::listeners::describe_socket(&socket),
            sockets: ListenerSockets::Shared(Arc::new(socket)),
        }
    }
}

/// What `status` reports besides the supervisor's view, and what the log
/// explains with.
#[derive(Debug)]
struct StaticInfo {
    name: String,
    policy: Policy,
    ready: ReadyMode,
    ready_timeout: Duration,
    kill_timeout: Duration,
    stop_signal: procluster::Signal,
    command: Vec<String>,
    control: PathBuf,
    listeners: Vec<(String, String)>,
    /// CPU use per worker, between `status` calls.
    cpu: Mutex<procluster::telemetry::CpuMeter>,
}

/// Per-worker readiness waiting for the worker's `Fork` event.
#[derive(Debug)]
struct Pending {
    signals: Signals,
    cleanup: Option<PathBuf>,
}

type PendingMap = Arc<Mutex<HashMap<WorkerId, Pending>>>;

struct Primary {
    supervised: SupervisedCluster,
    handle: SupervisorHandle,
    control: ControlSocket,
    calls: mpsc::UnboundedReceiver<Call>,
    info: Arc<StaticInfo>,
    pending: PendingMap,
    notifier: Notifier,
    initial_workers: usize,
    listeners: Vec<Listener>,
    /// Kept for the primary's life: the notify sockets' directory.
    notify_dir: Option<PathBuf>,
    /// Removed when the primary ends.
    _pidfile: Option<Pidfile>,
    /// The metrics endpoint's service, with --metrics.
    telemetry: Option<procluster::telemetry::Telemetry>,
}

impl Primary {
    async fn start(config: RunConfig) -> Result<Self, RunError> {
        if let Some(dir) = &config.chdir {
            if !dir.is_dir() {
                return Err(RunError::Usage(format!(
                    "--chdir {}: not a directory",
                    dir.display()
                )));
            }
        }
        resolve_program(&config.command[0], config.chdir.as_deref())?;
        if config.max_requests.is_some()
            && !matches!(config.ready, ReadyMode::Notify | ReadyMode::NodeIpc)
        {
            return Err(RunError::Usage(
                "--max-requests needs the program to report its count: with --ready notify it \
                 sends X_PROCLUSTER_REQUESTS=TOTAL to NOTIFY_SOCKET, with --ready node-ipc \
                 process.send({procluster: {requests: TOTAL}})"
                    .into(),
            ));
        }
        let identity = crate::users::resolve(config.user.as_deref(), config.group.as_deref())
            .map_err(RunError::Usage)?;
        if config.watchdog.is_some() && config.ready != ReadyMode::Notify {
            return Err(RunError::Usage(
                "--watchdog needs --ready notify (workers ping with WATCHDOG=1)".into(),
            ));
        }
        let listeners = open_listeners(
            &config.listen,
            config.policy,
            config.backlog,
            config.sticky_wait,
        )?;
        if listeners.is_empty() {
            tracing::warn!(
                "no listener: give -l HOST:PORT (or run under systemd socket activation); \
                 the workers get no socket"
            );
        }
        let control_path = config
            .control
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&config.name));
        let mut control = ControlSocket::bind(&control_path)?;
        let pidfile = match &config.pidfile {
            Some(path) => Some(Pidfile::write(path)?),
            None => None,
        };

        let notify_dir = match config.ready {
            ReadyMode::Notify => {
                // Not beside the control socket: workers that run as another
                // user must reach their notify sockets.
                let dir =
                    std::env::temp_dir().join(format!("procluster-notify-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                crate::control::server::private_dir(&dir)?;
                if let Some(uid) = identity.uid {
                    let owner = Some(rustix::process::Uid::from_raw(uid));
                    let group = identity.gid.map(rustix::process::Gid::from_raw);
                    rustix::fs::chown(&dir, owner, group).map_err(std::io::Error::from)?;
                }
                Some(dir)
            }
            _ => None,
        };
        let readiness = Readiness {
            mode: config.ready,
            notify_dir: notify_dir.clone().unwrap_or_default(),
            owner: identity.uid.map(|uid| (uid, identity.gid)),
        };
        let pending: PendingMap = Arc::default();
        let recent = Arc::new(crate::recent::Recent::default());
        let workers = config.workers.resolve();

        let shim = ShimArgs {
            listen_fds: listeners.len(),
            listen_fdnames: listeners
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(":"),
            uid: identity.uid,
            gid: identity.gid,
            command: config.command.iter().map(Into::into).collect(),
        };
        let exe = std::env::current_exe().map_err(|e| {
            RunError::Start(format!("cannot find procluster's own executable: {e}"))
        })?;
        let mut settings = Settings::default();
        settings.exec = Some(exe);
        settings.args = Some(shim.to_args());
        settings.stdio = Stdio::Callback(crate::recent::tap(
            recent.clone(),
            crate::logs::output_hook(config.log_format),
        ));
        settings.own_process_group = true;
        settings.env = config
            .env
            .iter()
            .map(|(key, value)| (key.into(), value.into()))
            .collect();
        settings.cwd = config.chdir.clone();
        settings.workers = procluster::primary::Workers::Count(workers);
        settings.program = Program::Foreign {
            stop_signal: config.stop_signal.0,
        };
        settings.fds = listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.sockets {
                ListenerSockets::Shared(socket) => Some(ChildFd::new(socket.clone(), 3 + i as i32)),
                ListenerSockets::PerSlot(_) => None,
            })
            .collect();
        settings.heartbeat_interval = config.watchdog.map(|w| w / 2);
        settings.on_fork = Some(fork_hook(
            listeners.clone(),
            readiness,
            pending.clone(),
            config.watchdog,
        ));
        let telemetry = config.metrics.as_ref().map(|addr| {
            listeners
                .iter()
                .fold(procluster::telemetry::Telemetry::builder(), |b, l| {
                    // The queue of a shared socket; per-slot sockets come
                    // and go with their slots, and are read at each scrape.
                    match &l.sockets {
                        ListenerSockets::Shared(socket) => {
                            b.watch_socket(l.name.clone(), &**socket)
                        }
                        ListenerSockets::PerSlot(slots) => {
                            let slots = slots.clone();
                            b.watch_slot_sockets(l.name.clone(), move || {
                                slots.lock().map(|s| s.inodes()).unwrap_or_default()
                            })
                        }
                    }
                })
                .metrics_addr(addr.clone())
                .build()
        });
        let mut cluster = Cluster::builder().settings(settings);
        if let Some(telemetry) = &telemetry {
            cluster = cluster.service(telemetry.clone());
        }
        let cluster = cluster
            .build()
            .map_err(|e| RunError::Start(e.to_string()))?;
        let mut supervisor = SupervisorConfig::default();
        supervisor.workers = workers;
        supervisor.kill_timeout = config.kill_timeout;
        supervisor.ready_timeout = config.ready_timeout;
        let mut breaker = BreakerConfig::default();
        breaker.max_crashes = config.max_crashes;
        breaker.window = config.crash_window;
        breaker.exit_on_trip = true;
        supervisor.breaker = Some(breaker);
        supervisor.heartbeat = config.watchdog.map(|timeout| {
            let mut heartbeat = HeartbeatConfig::default();
            heartbeat.timeout = timeout;
            heartbeat
        });
        supervisor.recycle.max_rss = config.max_memory;
        supervisor.recycle.max_requests = config.max_requests;
        supervisor.recycle.max_requests_jitter = config.max_requests_jitter;
        supervisor.recycle.max_age = config.max_age;
        let mut options = SupervisionOptions::default();
        options.supervisor = supervisor;
        options.readiness = match config.ready {
            ReadyMode::None => SupervisorReadiness::Online,
            _ => SupervisorReadiness::Explicit,
        };
        options.handle_signals = true;
        let supervised = SupervisedCluster::start(cluster, options)
            .map_err(|e| RunError::Start(e.to_string()))?;
        let handle = supervised.handle();
        if let Some(telemetry) = &telemetry {
            let endpoint = telemetry
                .start()
                .await
                .map_err(|e| RunError::Start(e.to_string()))?;
            tracing::info!(address = %format!("http://{endpoint}/metrics"), "metrics");
        }
        let (calls_tx, calls) = mpsc::unbounded_channel();
        control.keep_logs(recent);
        control.serve(calls_tx);
        let info = Arc::new(StaticInfo {
            name: config.name.clone(),
            policy: config.policy,
            ready: config.ready,
            ready_timeout: config.ready_timeout,
            kill_timeout: config.kill_timeout,
            stop_signal: config.stop_signal.0,
            command: config.command.clone(),
            control: control.path().to_path_buf(),
            listeners: listeners
                .iter()
                .map(|l| (l.name.clone(), l.address.clone()))
                .collect(),
            cpu: Mutex::default(),
        });
        for listener in &listeners {
            tracing::info!(name = %listener.name, address = %listener.address, "listening");
        }
        tracing::info!(
            workers,
            program = %config.command.join(" "),
            control = %control.path().display(),
            stop_signal = %config.stop_signal.0,
            "starting"
        );
        Ok(Self {
            supervised,
            handle,
            control,
            calls,
            info,
            pending,
            notifier: Notifier::from_env(),
            initial_workers: workers,
            listeners,
            notify_dir,
            _pidfile: pidfile,
            telemetry,
        })
    }

    /// Runs until the supervisor has finished; the exit status says how.
    async fn serve(mut self) -> ExitCode {
        let mut watchers: HashMap<WorkerId, (JoinHandle<()>, Option<PathBuf>)> = HashMap::new();
        let mut ready_slots = BTreeSet::new();
        let mut told_ready = false;
        let mut last_failure: Option<String> = None;
        let watch_queues = self
            .listeners
            .iter()
            .any(|l| matches!(l.sockets, ListenerSockets::PerSlot(_)));
        let mut next_look = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next_look), if watch_queues => {
                    let now = std::time::Instant::now();
                    let mut slots = 0;
                    self.per_slot(|sockets| {
                        sockets.watch_queues(now);
                        slots += sockets.len();
                    });
                    next_look = tokio::time::Instant::now() + queue_poll(slots);
                }
                event = self.supervised.next_event() => {
                    let Some(event) = event else { break };
                    if let Some(telemetry) = &self.telemetry {
                        telemetry.observe(&event);
                    }
                    match event {
                        Report::Cluster(event) => {
                            self.on_cluster_event(event, &mut watchers, &mut last_failure);
                        }
                        Report::Supervisor(event) => {
                            if let supervisor::Event::WorkerReady { slot, worker, .. } = event {
                                self.per_slot(|slots| slots.worker_ready(slot, worker));
                                ready_slots.insert(slot);
                                if !told_ready && ready_slots.len() >= self.initial_workers {
                                    told_ready = true;
                                    tracing::info!(workers = ready_slots.len(), "all workers ready");
                                    self.notifier.notify("READY=1");
                                }
                            }
                            if let supervisor::Event::WorkerFailed { cause, slot } = &event {
                                last_failure = Some(format!("the worker of slot {slot} {cause}"));
                            }
                            self.on_supervisor_event(&event);
                        }
                    }
                }
                Some((request, reply)) = self.calls.recv() => {
                    let handle = self.handle.clone();
                    let info = self.info.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(answer(request, handle, info).await);
                    });
                }
            }
        }
        for (_, (task, cleanup)) in watchers.drain() {
            task.abort();
            remove(cleanup);
        }
        let result = self.supervised.wait().await;
        drop(self.control);
        if let Some(dir) = &self.notify_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        match result {
            Ok(outcome) if outcome.in_time => {
                tracing::info!("stopped: every worker exited in time");
                ExitCode::SUCCESS
            }
            Ok(_) => {
                tracing::warn!("stopped: some workers did not exit in time and were killed");
                ExitCode::FAILURE
            }
            Err(SupervisionError::BreakerTripped { crashes, window }) => {
                let why = last_failure.unwrap_or_else(|| "workers keep failing".into());
                crate::logs::say(&format!(
                    "crash loop: {crashes} worker failures within {window:?}, so the cluster was stopped; last: {why}"
                ));
                ExitCode::FAILURE
            }
            Err(error) => {
                crate::logs::say(&error.to_string());
                ExitCode::FAILURE
            }
        }
    }

    fn on_cluster_event(
        &mut self,
        event: Event,
        watchers: &mut HashMap<WorkerId, (JoinHandle<()>, Option<PathBuf>)>,
        last_failure: &mut Option<String>,
    ) {
        match event {
            Event::Fork(worker) => {
                tracing::info!(
                    worker = %worker.id(),
                    index = worker.index(),
                    pid = worker.pid(),
                    "worker started"
                );

                let pending = lock(&self.pending).remove(&worker.id());
                if let Some(pending) = pending {
                    let task = tokio::spawn(watch(worker.clone(), pending.signals));
                    watchers.insert(worker.id(), (task, pending.cleanup));
                }
            }
            Event::Exit {
                worker,
                status,
                exited_after_disconnect,
            } => {
                if let Some((task, cleanup)) = watchers.remove(&worker.id()) {
                    task.abort();
                    remove(cleanup);
                }
                if let Some(slot) = worker.index() {
                    // New connections avoid the slot until its next worker
                    // is ready.
                    self.per_slot(|slots| slots.worker_exited(slot, worker.id()));
                    // A removed slot's socket closes now that its worker has
                    // gone, once what waited in its queue is taken.
                    self.per_slot(|slots| {
                        let to = slots.local_addr();
                        for socket in slots.take_retired() {
                            hand_over_queue(socket, to, slots.is_stream());
                        }
                    });
                }
                if exited_after_disconnect {
                    tracing::info!(worker = %worker.id(), pid = worker.pid(), %status, "worker stopped");
                } else {
                    tracing::warn!(worker = %worker.id(), pid = worker.pid(), %status, "worker exited unexpectedly");
                    *last_failure = Some(format!("worker {} {status}", worker.id()));
                }
            }
            Event::Error { error, .. } => tracing::error!("{error}"),
            _ => {}
        }
    }

    /// Applies `change` to every listener's per-slot sockets.
    fn per_slot(&self, mut change: impl FnMut(&mut SlotSockets)) {
        for listener in &self.listeners {
            if let ListenerSockets::PerSlot(slots) = &listener.sockets {
                change(&mut lock(slots));
            }
        }
    }

    /// Logs what the supervisor did in its own words (its `Display`), with
    /// what it means for a program run by the command where that helps,
    /// and tells systemd.
    fn on_supervisor_event(&self, event: &supervisor::Event) {
        use supervisor::Event as E;
        match event {
            E::Scaled { from, to } => {
                if to < from {
                    // A removed slot's socket gets no new connection; it
                    // closes once its worker has exited (see `Event::Exit`).
                    self.per_slot(|slots| slots.retire_from(*to));
                }
                tracing::info!(from, to, "{event}");
            }
            E::RestartScheduled { slot, attempt, .. } => tracing::info!(slot, attempt, "{event}"),
            // Loud the first time and then less and less often: a slot that
            // waits for descriptors retries for as long as it takes.
            E::SpawnDeferred { slot, attempt, .. } => {
                // Out of descriptors: a slot that never had a worker gives
                // its socket back until it gets one (binding again then).
                self.per_slot(|slots| slots.release_unused(*slot));
                if attempt.is_power_of_two() {
                    tracing::warn!(slot, attempt, "{event}");
                }
            }
            E::ReadyTimeout { slot, worker } => {
                tracing::warn!(
                    slot,
                    worker = %worker,
                    "worker {worker} (slot {slot}): {}; stopping it with {}, SIGKILL after {:?} (--kill-timeout)",
                    self.info.expected_readiness(),
                    self.info.stop_signal,
                    self.info.kill_timeout,
                );
            }
            E::HangDetected { slot, worker, .. } => {
                tracing::warn!(
                    slot,
                    worker = %worker,
                    "worker {worker} (slot {slot}) stopped sending WATCHDOG=1; killing it"
                );
            }
            E::BreakerTripped { .. } | E::StopForced => tracing::error!("{event}"),
            E::ReloadStarted { generation } => {
                tracing::info!(generation, "{event}");
                self.notifier
                    .notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
            }
            E::ReloadFinished { generation } => {
                tracing::info!(generation, "{event}");
                self.notifier.notify("READY=1");
            }
            E::ReloadFailed { generation, .. } => {
                tracing::error!(generation, "{event}");
                self.notifier.notify("READY=1");
            }
            E::SlotReloaded { slot, .. }
            | E::RecycleStarted { slot, .. }
            | E::Recycled { slot, .. } => tracing::info!(slot, "{event}"),
            E::RecycleFailed { slot, .. } => tracing::warn!(slot, "{event}"),
            E::KillTimeout { worker } => tracing::warn!(worker = %worker, "{event}"),
            E::StopStarted { .. } => {
                tracing::info!("{event}");
                self.notifier.notify("STOPPING=1");
            }
            _ => tracing::debug!("{event}"),
        }
    }
}

impl StaticInfo {
    /// What a worker that missed --ready-timeout failed to do, and what to
    /// try.
    fn expected_readiness(&self) -> String {
        let within = format!("within {:?}", self.ready_timeout);
        match self.ready {
            ReadyMode::Notify => format!(
                "no READY=1 on NOTIFY_SOCKET {within}: does the program speak sd_notify? \
                 try --ready delay:2s or none"
            ),
            ReadyMode::NodeIpc => format!(
                "no process.send('ready') on the Node IPC channel {within}: does the program \
                 send it? try --ready delay:2s or none"
            ),
            ReadyMode::Delay(delay) => format!(
                "not ready {within}: --ready delay:{delay:?} is longer than --ready-timeout"
            ),
            ReadyMode::None => format!("not ready {within}"),
        }
    }
}

/// `--pidfile`: the primary's pid, written whole (a temporary file renamed
/// into place) and removed when the primary ends.
#[derive(Debug)]
struct Pidfile(PathBuf);

impl Pidfile {
    fn write(path: &Path) -> Result<Self, RunError> {
        let fail = |e: std::io::Error| {
            RunError::Start(format!("cannot write the pid file {}: {e}", path.display()))
        };
        let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&temporary, format!("{}\n", std::process::id())).map_err(fail)?;
        std::fs::rename(&temporary, path).map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            fail(e)
        })?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Only ours: another primary may have taken the name since.
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Closes the socket of a removed slot whose worker has exited, without
/// resetting what waits in its queue: the primary, now its only holder,
/// accepts every queued connection and relays each to the listener's
/// address, where the kernel picks a slot that has a worker (the program
/// sees those few connections come from the primary's address). A UDP
/// socket just closes.
fn hand_over_queue(socket: Arc<OwnedFd>, to: std::net::SocketAddr, stream: bool) {
    if !stream {
        return;
    }
    let queue = match socket.try_clone() {
        Ok(fd) => std::net::TcpListener::from(fd),
        Err(error) => {
            tracing::warn!(%error, "cannot take a removed slot's queue");
            return;
        }
    };
    drop(socket);
    let mut waiting = Vec::new();
    if queue.set_nonblocking(true).is_ok() {
        while let Ok((connection, _)) = queue.accept() {
            waiting.push(connection);
        }
    }
    drop(queue);
    if !waiting.is_empty() {
        tracing::info!(
            connections = waiting.len(),
            "a removed slot's queued connections go to the other workers"
        );
    }
    for connection in waiting {
        tokio::spawn(async move {
            let relay = async {
                connection.set_nonblocking(true)?;
                let mut client = tokio::net::TcpStream::from_std(connection)?;
                let mut server = tokio::net::TcpStream::connect(to).await?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await
            };
            if let Err(error) = relay.await {
                tracing::debug!(%error, "relay of a removed slot's connection ended");
            }
        });
    }
}

/// How long between two looks at the per-slot queues: every
/// [`QUEUE_POLL`] for up to 64 sockets, proportionally less often beyond
/// (a look is one `getsockopt` per socket; 1024 slots are looked at every
/// 160 ms, which keeps an idle primary under 1% of a core).
fn queue_poll(sockets: usize) -> Duration {
    QUEUE_POLL * u32::try_from(sockets.div_ceil(64).max(1)).unwrap_or(u32::MAX)
}

fn remove(path: Option<PathBuf>) {
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

fn monotonic_usec() -> u128 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u128 * 1_000_000 + now.tv_nsec as u128 / 1_000
}

/// Passes what a worker says about itself to the cluster.
async fn watch(worker: WorkerHandle, mut signals: Signals) {
    while let Some(signal) = signals.recv().await {
        match signal {
            readiness::Signal::Ready => {
                tracing::debug!(worker = %worker.id(), "worker says it is ready");
                worker.report_ready();
            }
            readiness::Signal::Watchdog => worker.report_heartbeat(),
            readiness::Signal::Requests(total) => worker.report_requests(total),
            readiness::Signal::Stopping => {
                tracing::info!(worker = %worker.id(), "worker says it is stopping");
            }
            readiness::Signal::Status(status) => {
                tracing::info!(worker = %worker.id(), %status, "worker status");
            }
            readiness::Signal::Message(message) => {
                tracing::info!(worker = %worker.id(), %message, "message from worker");
            }
        }
    }
}

/// Per-worker additions to each fork: readiness, and with reuseport the
/// slot's own sockets (kept across that slot's restarts).
fn fork_hook(
    listeners: Vec<Listener>,
    readiness: Readiness,
    pending: PendingMap,
    watchdog: Option<Duration>,
) -> ForkHook {
    ForkHook::new(move |id, options: &mut ForkOptions| {
        let slot = options.index.unwrap_or(0);
        for (i, listener) in listeners.iter().enumerate() {
            if let ListenerSockets::PerSlot(slots) = &listener.sockets {
                let socket = lock(slots).get_or_bind(slot)?;
                options.fds.push(ChildFd::new(socket, 3 + i as i32));
            }
        }
        let fd_number = 3 + listeners.len() as i32;
        let (extras, signals) = readiness.prepare(u64::from(id.get()), fd_number)?;
        for (key, value) in extras.env {
            let key = match key.as_str() {
                "NOTIFY_SOCKET" => shim::keys::NOTIFY_SOCKET,
                "NODE_CHANNEL_FD" => shim::keys::NODE_CHANNEL_FD,
                _ => continue,
            };
            options.env.push((key.into(), value.into()));
        }
        if let Some(timeout) = watchdog {
            options.env.push((
                shim::keys::WATCHDOG_USEC.into(),
                timeout.as_micros().to_string().into(),
            ));
        }
        if let Some(fd) = extras.fd {
            options.fds.push(ChildFd::new(fd, fd_number));
        }
        lock(&pending).insert(
            id,
            Pending {
                signals,
                cleanup: extras.cleanup,
            },
        );
        Ok(())
    })
}

/// The sockets to share: passed by systemd (matched by name or address), or
/// bound here.
fn open_listeners(
    specs: &[ListenSpec],
    policy: Policy,
    backlog: Option<u32>,
    sticky_wait: Duration,
) -> Result<Vec<Listener>, RunError> {
    let mut inherited = systemd::listen_fds();
    let by_address = match policy {
        Policy::Sticky(procluster::sticky::StickyKey::Address {
            v4_prefix,
            v6_prefix,
        }) => Some((v4_prefix, v6_prefix)),
        _ => None,
    };
    let reuse_port = policy == Policy::ReusePort || by_address.is_some();
    if specs.is_empty() {
        return Ok(inherited
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                Listener::shared(s.name.unwrap_or_else(|| format!("listen{i}")), s.socket)
            })
            .collect());
    }
    let mut listeners = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let name = spec.name.clone().unwrap_or_else(|| format!("listen{i}"));
        let passed = inherited.iter().position(|s| {
            s.name.as_deref() == spec.name.as_deref() && spec.name.is_some()
                || same_address(&procluster::listeners::describe_socket(&s.socket), spec)
        });
        if let Some(at) = passed {
            if by_address.is_some() {
                return Err(RunError::Usage(format!(
                    "{policy} needs a socket per worker slot, which the command binds itself; listener {name:?} was passed by systemd as one socket (bind it here instead, or use --policy shared)"
                )));
            }
            listeners.push(Listener::shared(name, inherited.remove(at).socket));
            continue;
        }
        let bound = listen_spec::bind(
            spec,
            i,
            BindOptions {
                reuse_port: reuse_port && spec.is_inet(),
                backlog,
            },
        )?;
        listeners.push(Listener {
            name: bound.name,
            address: bound.address,
            sockets: match bound.sockets {
                Sockets::Shared(socket) => ListenerSockets::Shared(Arc::new(socket)),
                Sockets::PerSlot(mut slots) => {
                    if let Some((v4_prefix, v6_prefix)) = by_address {
                        if slots.is_stream() {
                            slots
                                .stick_by_address(v4_prefix, v6_prefix, sticky_wait)
                                .map_err(|e| RunError::Start(format!("{policy}: {e}")))?;
                        }
                    }
                    ListenerSockets::PerSlot(Arc::new(Mutex::new(*slots)))
                }
            },
        });
    }
    Ok(listeners)
}

fn same_address(bound: &str, spec: &ListenSpec) -> bool {
    match &spec.endpoint {
        Endpoint::Tcp(a) => a
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| bound == format!("tcp://{a}")),
        Endpoint::Udp(a) => a
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| bound == format!("udp://{a}")),
        Endpoint::Unix(p) => bound == format!("unix:{}", p.display()),
    }
}

/// Fails early, as a shell does: exit status 127 for a program that cannot
/// be found, 126 for one that exists but cannot be executed. A relative
/// path is looked up in `dir`, the workers' working directory.
fn resolve_program(program: &str, dir: Option<&Path>) -> Result<PathBuf, RunError> {
    use std::os::unix::fs::PermissionsExt;
    let is_file = |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let not_executable = |path: &Path| {
        RunError::ProgramNotExecutable(format!(
            "program {} is not executable (chmod +x it, or run it with its interpreter)",
            path.display()
        ))
    };
    if program.contains('/') {
        let path = match dir {
            Some(dir) => dir.join(program),
            None => PathBuf::from(program),
        };
        if !path.exists() {
            return Err(RunError::ProgramNotFound(format!(
                "program {program} does not exist"
            )));
        }
        if !executable(&path) {
            return Err(not_executable(&path));
        }
        return Ok(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let candidates: Vec<PathBuf> = std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .collect();
    if let Some(found) = candidates.iter().find(|c| executable(c)) {
        return Ok(found.clone());
    }
    if let Some(found) = candidates.iter().find(|c| is_file(c)) {
        return Err(not_executable(found));
    }
    Err(RunError::ProgramNotFound(format!(
        "program {program} not found on PATH ({})",
        path_var.to_string_lossy()
    )))
}

/// Answers one control request.
async fn answer(request: Request, handle: SupervisorHandle, info: Arc<StaticInfo>) -> Response {
    match request {
        Request::Status => match handle.status().await {
            Ok(status) => Response::status(status_json(&status, &info)),
            Err(e) => Response::error(e.to_string()),
        },
        Request::Reload { wait: true } => match handle.reload().await {
            Ok(()) => Response::ok("reload finished: every worker was replaced"),
            Err(error) => Response::error(error.to_string()),
        },
        Request::Reload { wait: false } => {
            tokio::spawn(async move {
                if let Err(error) = handle.reload().await {
                    tracing::error!(%error, "reload");
                }
            });
            Response::ok("reload started")
        }
        Request::Scale { scale } => {
            let current = match handle.status().await {
                Ok(status) => status.target_workers,
                Err(e) => return Response::error(e.to_string()),
            };
            let to = scale.apply(current);
            if to == 0 {
                return Response::error("cannot scale to 0 workers; use `procluster stop` to stop");
            }
            match handle.scale_to(to) {
                Ok(()) => Response::ok(format!("scaling from {current} to {to} workers")),
                Err(e) => Response::error(e.to_string()),
            }
        }
        Request::Stop => match handle.stop() {
            Ok(()) => Response::ok("stopping"),
            Err(e) => Response::error(e.to_string()),
        },
        // The control socket streams logs itself.
        Request::Logs(_) => Response::error("logs are served by the control socket"),
    }
}

fn status_json(
    status: &procluster::supervisor::ClusterStatus,
    info: &StaticInfo,
) -> serde_json::Value {
    let table = procluster::telemetry::ProcessTable::read();
    let mut cpu = info.cpu.lock().unwrap_or_else(|e| e.into_inner());
    let pids: Vec<u32> = status.workers.iter().map(|w| w.pid).collect();
    cpu.retain(&pids);
    let workers: Vec<_> = status
        .workers
        .iter()
        .map(|w| {
            let usage = table.tree_usage(w.pid);
            let cpu_percent = usage.map(|u| cpu.percent(w.pid, u.cpu_seconds, u.uptime));
            serde_json::json!({
                "cpu_percent": cpu_percent.map(|p| (p * 10.0).round() / 10.0),
                "rss_bytes": usage.map(|u| u.rss_bytes),
                "fds": usage.map(|u| u.open_fds),
                "threads": usage.map(|u| u.threads),
                "processes": usage.map(|u| u.processes),
                "id": w.id,
                "index": w.index,
                "pid": w.pid,
                "state": match w.phase {
                    WorkerPhase::Starting => "starting",
                    WorkerPhase::Ready => "ready",
                    WorkerPhase::Stopping => "stopping",
                },
                "restarts": w.restarts,
                "generation": w.generation,
                "started_at": crate::logs::rfc3339(w.started_at),
                "uptime_s": w.uptime().as_secs_f64(),
            })
        })
        .collect();
    let listeners: Vec<_> = info
        .listeners
        .iter()
        .map(|(name, address)| serde_json::json!({"name": name, "address": address}))
        .collect();
    let lost = crate::logs::lost();
    serde_json::json!({
        "pid": std::process::id(),
        "name": info.name,
        "policy": info.policy.to_string(),
        "ready": info.ready.name(),
        "command": info.command,
        "control": info.control.display().to_string(),
        "desired": status.target_workers,
        "generation": status.generation,
        "reloading": status.reloading,
        "breaker_tripped": status.breaker_tripped,
        "listeners": listeners,
        "workers": workers,
        "output_lost": {"stdout": lost.0, "stderr": lost.1},
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
