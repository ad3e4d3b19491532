//! `procluster run`: bind the listeners, start the supervised cluster of
//! exec-shimmed workers, answer the control socket, and report.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use procluster::WorkerId;
use procluster::primary::{
    ChildFd, Cluster, Event, ForkHook, ForkOptions, Program, Settings, Stdio, WorkerHandle,
};
use procluster::supervisor::{
    self, BreakerConfig, CrashCause, HeartbeatConfig, Readiness as SupervisorReadiness, Report,
    SupervisedCluster, SupervisionError, SupervisionOptions, SupervisorConfig, SupervisorHandle,
    WorkerPhase,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::args::{PolicyArg, RunArgs};
use crate::config::RunConfig;
use crate::control::server::{Call, ControlSocket};
use crate::control::{Request, Response};
use crate::listen_spec::{self, BindOptions, Endpoint, ListenSpec};
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
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Start(String),
}

impl RunError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_) | Self::Usage(_) => ExitCode::from(2),
            Self::ProgramNotFound(_) => ExitCode::from(127),
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
    match Primary::start(config).await {
        Ok(primary) => primary.serve().await,
        Err(error) => fail(error),
    }
}

fn fail(error: RunError) -> ExitCode {
    eprintln!("procluster: {error}");
    error.exit_code()
}

/// A shared socket as bound.
#[derive(Debug, Clone)]
struct Listener {
    name: String,
    address: String,
    socket: Arc<OwnedFd>,
    /// Whether reuseport gives each slot a socket of its own.
    per_slot: bool,
}

/// What `status` reports besides the supervisor's view.
#[derive(Debug)]
struct StaticInfo {
    name: String,
    policy: PolicyArg,
    ready: ReadyMode,
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

/// With reuseport: each slot's own sockets, by (slot, listener), kept across
/// the slot's restarts so its queue waits for the next worker.
type SlotSockets = Arc<Mutex<HashMap<(usize, usize), Arc<OwnedFd>>>>;

struct Primary {
    supervised: SupervisedCluster,
    handle: SupervisorHandle,
    control: ControlSocket,
    calls: mpsc::UnboundedReceiver<Call>,
    info: Arc<StaticInfo>,
    pending: PendingMap,
    notifier: Notifier,
    initial_workers: usize,
    slot_sockets: SlotSockets,
    /// Kept for the primary's life: the notify sockets' directory.
    notify_dir: Option<PathBuf>,
    /// The metrics endpoint's service, with --metrics.
    telemetry: Option<procluster::telemetry::Telemetry>,
}

impl Primary {
    async fn start(config: RunConfig) -> Result<Self, RunError> {
        resolve_program(&config.command[0])?;
        let identity = crate::users::resolve(config.user.as_deref(), config.group.as_deref())
            .map_err(RunError::Usage)?;
        if config.watchdog.is_some() && config.ready != ReadyMode::Notify {
            return Err(RunError::Usage(
                "--watchdog needs --ready notify (workers ping with WATCHDOG=1)".into(),
            ));
        }
        let listeners = open_listeners(&config.listen, config.policy)?;
        let control_path = config
            .control
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&config.name));
        let mut control = ControlSocket::bind(&control_path)?;

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
        let slot_sockets: SlotSockets = Arc::default();
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
        let settings = Settings {
            exec: Some(exe),
            args: Some(shim.to_args()),
            stdio: Stdio::Callback(crate::recent::tap(
                recent.clone(),
                crate::logs::output_hook(config.log_format),
            )),
            own_process_group: true,
            workers: procluster::primary::Workers::Count(workers),
            program: Program::Foreign {
                stop_signal: config.stop_signal.0,
            },
            fds: listeners
                .iter()
                .enumerate()
                .map(|(i, l)| ChildFd::new(l.socket.clone(), 3 + i as i32))
                .collect(),
            heartbeat_interval: config.watchdog.map(|w| w / 2),
            on_fork: Some(fork_hook(
                listeners.clone(),
                slot_sockets.clone(),
                readiness,
                pending.clone(),
                config.watchdog,
            )),
            ..Settings::default()
        };
        let telemetry = config.metrics.as_ref().map(|addr| {
            listeners
                .iter()
                .fold(procluster::telemetry::Telemetry::builder(), |b, l| {
                    b.watch_socket(l.name.clone(), &*l.socket)
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
        let options = SupervisionOptions {
            supervisor: SupervisorConfig {
                workers,
                kill_timeout: config.kill_timeout,
                ready_timeout: config.ready_timeout,
                breaker: Some(BreakerConfig {
                    max_crashes: config.max_crashes,
                    window: config.crash_window,
                    exit_on_trip: true,
                }),
                heartbeat: config.watchdog.map(|timeout| HeartbeatConfig {
                    timeout,
                    ..HeartbeatConfig::default()
                }),
                ..SupervisorConfig::default()
            },
            readiness: match config.ready {
                ReadyMode::None => SupervisorReadiness::Online,
                _ => SupervisorReadiness::Explicit,
            },
            handle_signals: true,
            ..SupervisionOptions::default()
        };
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
            slot_sockets,
            notify_dir,
            telemetry,
        })
    }

    /// Runs until the supervisor has finished; the exit status says how.
    async fn serve(mut self) -> ExitCode {
        let mut watchers: HashMap<WorkerId, (JoinHandle<()>, Option<PathBuf>)> = HashMap::new();
        let mut ready_slots = BTreeSet::new();
        let mut told_ready = false;
        let mut last_failure: Option<String> = None;
        loop {
            tokio::select! {
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
                            if let supervisor::Event::WorkerReady { slot, .. } = event {
                                ready_slots.insert(slot);
                                if !told_ready && ready_slots.len() >= self.initial_workers {
                                    told_ready = true;
                                    tracing::info!(workers = ready_slots.len(), "all workers ready");
                                    self.notifier.notify("READY=1");
                                }
                            }
                            if let supervisor::Event::WorkerFailed { cause, slot } = &event {
                                last_failure = Some(format!("the worker of slot {slot} {}", describe_cause(cause)));
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
                eprintln!(
                    "procluster: crash loop: {crashes} worker failures within {window:?}, so the cluster was stopped; last: {why}"
                );
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("procluster: {error}");
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
                let pending = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&worker.id());
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

    fn on_supervisor_event(&self, event: &supervisor::Event) {
        match event {
            supervisor::Event::Scaled { from, to } if to < from => {
                // A removed slot's sockets close with its last worker, so the
                // kernel stops routing connections to a queue nobody reads.
                let mut sockets = self.slot_sockets.lock().unwrap_or_else(|e| e.into_inner());
                sockets.retain(|(slot, _), _| slot < to);
            }
            supervisor::Event::RestartScheduled {
                slot,
                attempt,
                delay,
            } => {
                tracing::info!(
                    slot,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    "restart scheduled"
                );
            }
            supervisor::Event::ReadyTimeout { slot, worker } => {
                tracing::warn!(
                    slot,
                    worker = %worker,
                    "worker was not ready in time; killing it"
                );
            }
            supervisor::Event::HangDetected { slot, worker, .. } => {
                tracing::warn!(
                    slot,
                    worker = %worker,
                    "worker stopped sending WATCHDOG=1; killing it"
                );
            }
            supervisor::Event::BreakerTripped { crashes, window } => {
                tracing::error!(
                    crashes,
                    window_s = window.as_secs_f64(),
                    "crash loop: stopping the cluster"
                );
            }
            supervisor::Event::ReloadStarted { generation } => {
                tracing::info!(generation, "reload started");
                self.notifier
                    .notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
            }
            supervisor::Event::SlotReloaded { slot, old, new, .. } => {
                tracing::info!(slot, old = %old, new = %new, "slot reloaded");
            }
            supervisor::Event::ReloadFinished { generation } => {
                tracing::info!(generation, "reload finished");
                self.notifier.notify("READY=1");
            }
            supervisor::Event::ReloadFailed {
                generation,
                failure,
            } => {
                tracing::error!(
                    generation,
                    ?failure,
                    "reload failed; the old workers keep serving"
                );
                self.notifier.notify("READY=1");
            }
            supervisor::Event::Scaled { from, to } => tracing::info!(from, to, "scaled"),
            supervisor::Event::KillTimeout { worker } => {
                tracing::warn!(worker = %worker, "worker did not stop in time; killed");
            }
            supervisor::Event::StopStarted { reason } => {
                tracing::info!(?reason, "stopping");
                self.notifier.notify("STOPPING=1");
            }
            supervisor::Event::StopForced => tracing::warn!("stopping now: killing every worker"),
            _ => tracing::debug!(?event, "supervisor"),
        }
    }
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

/// The library's phrase for a failure, with what it means for a program run
/// by the command.
fn describe_cause(cause: &CrashCause) -> String {
    match cause {
        CrashCause::ReadyTimeout => "was not ready within --ready-timeout".into(),
        CrashCause::Hang => "stopped sending WATCHDOG=1".into(),
        other => other.to_string(),
    }
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
    slot_sockets: SlotSockets,
    readiness: Readiness,
    pending: PendingMap,
    watchdog: Option<Duration>,
) -> ForkHook {
    ForkHook::new(move |id, options: &mut ForkOptions| {
        let slot = options.index.unwrap_or(0);
        for (i, listener) in listeners.iter().enumerate() {
            if !listener.per_slot || slot == 0 {
                continue;
            }
            let mut sockets = slot_sockets.lock().unwrap_or_else(|e| e.into_inner());
            let socket = match sockets.get(&(slot, i)) {
                Some(socket) => socket.clone(),
                None => {
                    let first = listen_spec::Bound {
                        name: listener.name.clone(),
                        address: listener.address.clone(),
                        socket: listener.socket.try_clone()?,
                    };
                    let socket = Arc::new(listen_spec::bind_again(&first)?);
                    sockets.insert((slot, i), socket.clone());
                    socket
                }
            };
            options.fds.push(ChildFd::new(socket, 3 + i as i32));
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
        pending.lock().unwrap_or_else(|e| e.into_inner()).insert(
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
fn open_listeners(specs: &[ListenSpec], policy: PolicyArg) -> Result<Vec<Listener>, RunError> {
    let mut inherited = systemd::listen_fds();
    let reuse_port = policy == PolicyArg::Reuseport;
    if specs.is_empty() {
        return Ok(inherited
            .into_iter()
            .enumerate()
            .map(|(i, s)| Listener {
                name: s.name.unwrap_or_else(|| format!("listen{i}")),
                address: procluster::listeners::describe_socket(&s.socket),
                socket: Arc::new(s.socket),
                per_slot: false,
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
            let socket = inherited.remove(at).socket;
            listeners.push(Listener {
                name,
                address: procluster::listeners::describe_socket(&socket),
                socket: Arc::new(socket),
                per_slot: false,
            });
            continue;
        }
        let per_slot = reuse_port && spec.is_inet();
        let bound = listen_spec::bind(
            spec,
            i,
            BindOptions {
                reuse_port: per_slot,
            },
        )?;
        listeners.push(Listener {
            name: bound.name,
            address: bound.address,
            socket: Arc::new(bound.socket),
            per_slot,
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

/// Fails early, with exit status 127, for a program that cannot be found.
fn resolve_program(program: &str) -> Result<PathBuf, RunError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        if !path.exists() {
            return Err(RunError::ProgramNotFound(format!(
                "program {program} does not exist"
            )));
        }
        if !executable(&path) {
            return Err(RunError::ProgramNotFound(format!(
                "program {program} is not executable"
            )));
        }
        return Ok(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| {
            RunError::ProgramNotFound(format!(
                "program {program} not found on PATH ({})",
                path_var.to_string_lossy()
            ))
        })
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
    serde_json::json!({
        "pid": std::process::id(),
        "name": info.name,
        "policy": info.policy.name(),
        "ready": info.ready.name(),
        "command": info.command,
        "control": info.control.display().to_string(),
        "desired": status.target_workers,
        "generation": status.generation,
        "reloading": status.reloading,
        "breaker_tripped": status.breaker_tripped,
        "listeners": listeners,
        "workers": workers,
    })
}
