//! Observability of a cluster: one Prometheus endpoint for the whole
//! cluster, health probes, and workers' logs gathered through the primary.
//!
//! In the primary, a [`Telemetry`] is a service of the cluster. Its
//! endpoint (`/metrics`, `/healthz`, `/readyz` on one listener) serves:
//!
//! - the cluster: workers by state, restarts by slot and cause, reloads with
//!   their duration and result, crash-loop breaker trips (fed by
//!   [`Telemetry::observe`] from a supervised cluster's reports);
//! - each worker's whole process tree, from `/proc`: CPU seconds, resident
//!   memory, open descriptors, threads, uptime;
//! - port sharing: connections handed to each worker, accept errors, each
//!   listening socket's queue (`ss -lnt`'s Recv-Q);
//! - the channels: frames and bytes each way, frames refused;
//! - the workers' own metrics: each worker registers counters, gauges and
//!   histograms in its registry ([`worker()`]), and every scrape asks every
//!   worker over its channel, then adds them up or labels them per worker
//!   ([`Aggregation`]).
//!
//! Workers' `tracing` events reach the primary through [`LogLayer`] and are
//! printed there with the worker's id, slot and pid ([`LogOutput`]).
//!
//! ```no_run
//! use procluster::primary::Cluster;
//! use procluster::supervisor::{SupervisedCluster, SupervisionOptions};
//! use procluster::telemetry::{Aggregation, Telemetry};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let telemetry = Telemetry::builder()
//!     .metrics_addr("127.0.0.1:9100")
//!     .aggregation(Aggregation::Sum)
//!     .build();
//! let cluster = Cluster::builder().service(telemetry.clone()).build()?;
//! let mut supervised = SupervisedCluster::start(cluster, SupervisionOptions::default())?;
//! let endpoint = telemetry.start().await?;
//! println!("metrics on http://{endpoint}/metrics");
//! while let Some(report) = supervised.next_event().await {
//!     telemetry.observe(&report);
//! }
//! # Ok(()) }
//! ```

mod exposition;
mod http;
mod logs;
mod metrics;
mod wire;
mod worker;

pub use crate::procfs::{CpuMeter, ProcessTable, TreeUsage, tree_usage};
pub use exposition::Aggregation;
pub use logs::{LogOutput, LogRecord};
pub use wire::FieldValue;
pub use worker::{DEFAULT_LOG_BUFFER, LogLayer, WorkerTelemetry, worker};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::message::ServiceFrame;
use crate::primary::{Event as ClusterEvent, Service, ServiceContext, WorkerHandle};
use crate::supervisor::{Event as SupervisorEvent, Report};
use crate::sync::lock;
use crate::{Error, ExitStatus, Format, WorkerId};
use exposition::{Contribution, Dialect};
use wire::{FromWorker, ToWorker, WireRecord};

/// The name of the telemetry service, in the primary and in workers.
pub const SERVICE_NAME: &str = "procluster.telemetry";

/// How long a scrape waits for workers' metrics by default.
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Configures a [`Telemetry`].
#[derive(Debug, Clone)]
pub struct TelemetryBuilder {
    metrics_addr: Option<String>,
    aggregation: Aggregation,
    min_ready: Option<usize>,
    ready_while_reloading: bool,
    scrape_timeout: Duration,
    logs: LogOutput,
    /// Listening sockets made outside the cluster's listeners: label, inode.
    sockets: Vec<(String, u64)>,
}

impl Default for TelemetryBuilder {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            aggregation: Aggregation::Sum,
            min_ready: None,
            ready_while_reloading: false,
            scrape_timeout: DEFAULT_SCRAPE_TIMEOUT,
            logs: LogOutput::Tracing,
            sockets: Vec::new(),
        }
    }
}

impl TelemetryBuilder {
    /// Where [`Telemetry::start`] serves `/metrics`, `/healthz` and
    /// `/readyz`, e.g. `127.0.0.1:9100` (port 0 picks a free port).
    pub fn metrics_addr(mut self, addr: impl Into<String>) -> Self {
        self.metrics_addr = Some(addr.into());
        self
    }

    /// How the workers' own metrics are merged (summed by default).
    pub fn aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }

    /// `/readyz` answers 200 only while at least `k` workers are ready
    /// (default: as many as the supervisor has slots, or 1 without one).
    pub fn min_ready(mut self, k: usize) -> Self {
        self.min_ready = Some(k);
        self
    }

    /// Whether `/readyz` may answer 200 during a rolling reload (default
    /// `false`: an instance in the middle of a rollout says so, and is ready
    /// again once the rollout finished or failed with the old workers still
    /// serving).
    pub fn ready_while_reloading(mut self, ready: bool) -> Self {
        self.ready_while_reloading = ready;
        self
    }

    /// How long a scrape waits for the workers' metrics (default 2 s); a
    /// worker that has not answered by then is left out of that scrape and
    /// counted in `procluster_app_scrape_failures_total`.
    pub fn scrape_timeout(mut self, timeout: Duration) -> Self {
        self.scrape_timeout = timeout;
        self
    }

    /// Where workers' log events go (default: the primary's own `tracing`
    /// subscriber).
    pub fn logs(mut self, output: LogOutput) -> Self {
        self.logs = output;
        self
    }

    /// Also reports the accept queue of a listening TCP socket the cluster
    /// did not bind itself (one passed to workers as a descriptor, as the
    /// command does), under the label `listener="label"`.
    pub fn watch_socket(
        mut self,
        label: impl Into<String>,
        socket: impl std::os::fd::AsFd,
    ) -> Self {
        if let Ok(stat) = rustix::fs::fstat(socket) {
            self.sockets.push((label.into(), stat.st_ino));
        }
        self
    }

    /// The telemetry service; add it to the cluster with
    /// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service).
    pub fn build(self) -> Telemetry {
        Telemetry {
            shared: Arc::new(Shared {
                metrics: metrics::ClusterMetrics::new(),
                config: self,
                context: OnceLock::new(),
                state: Mutex::new(State::default()),
                scrape_lock: tokio::sync::Mutex::new(()),
                next_scrape: AtomicU64::new(1),
                scrape_failures: AtomicU64::new(0),
                merge_conflicts: AtomicU64::new(0),
                cpu: Mutex::new(CpuMeter::default()),
            }),
        }
    }
}

/// The primary's side of the cluster's telemetry: a service of the cluster
/// (add a clone with `ClusterBuilder::service`) that serves the metrics
/// endpoint and the health probes, and prints workers' logs. Cheap to
/// clone. See the [module docs](self).
#[derive(Clone)]
pub struct Telemetry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    config: TelemetryBuilder,
    context: OnceLock<ServiceContext>,
    metrics: metrics::ClusterMetrics,
    state: Mutex<State>,
    /// One scrape of the workers at a time.
    scrape_lock: tokio::sync::Mutex<()>,
    next_scrape: AtomicU64,
    scrape_failures: AtomicU64,
    merge_conflicts: AtomicU64,
    cpu: Mutex<CpuMeter>,
}

/// What the telemetry learnt from the cluster's events and its workers.
#[derive(Default)]
struct State {
    /// Workers whose telemetry side is open.
    open: BTreeSet<WorkerId>,
    /// Workers ready (by the supervisor's or the worker's word).
    ready: BTreeSet<WorkerId>,
    /// The supervisor's slots, once it said.
    slots: Option<usize>,
    reloading: Option<Instant>,
    stopping: bool,
    finished: bool,
    breaker_tripped: bool,
    /// Per worker: log events received and dropped (as the worker counts).
    logs: BTreeMap<WorkerId, LogCounts>,
    /// The scrape waiting for workers' answers.
    pending: Option<PendingScrape>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LogCounts {
    received: u64,
    dropped: u64,
}

struct PendingScrape {
    id: u64,
    waiting: BTreeSet<WorkerId>,
    /// Each worker's answer, as it came.
    answers: Vec<(WorkerHandle, String)>,
    done: Option<oneshot::Sender<()>>,
}

impl PendingScrape {
    fn answered(&mut self, worker: WorkerId) {
        self.waiting.remove(&worker);
        if self.waiting.is_empty() {
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        }
    }
}

/// What `/healthz` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The primary answers and its cluster is not finished.
    pub alive: bool,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.alive {
            writeln!(f, "ok")
        } else {
            writeln!(f, "the cluster has stopped")
        }
    }
}

/// What `/readyz` says, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Whether the instance should get traffic.
    pub ready: bool,
    /// Workers ready now.
    pub ready_workers: usize,
    /// Workers needed.
    pub wanted: usize,
    /// Why not, when not.
    pub reason: Option<String>,
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            None => writeln!(
                f,
                "ready: {} of {} workers ready",
                self.ready_workers, self.wanted
            ),
            Some(reason) => writeln!(f, "not ready: {reason}"),
        }
    }
}

impl Telemetry {
    /// Starts configuring the telemetry service.
    pub fn builder() -> TelemetryBuilder {
        TelemetryBuilder::default()
    }

    /// Binds the endpoint set with
    /// [`TelemetryBuilder::metrics_addr`] and serves it from a task of its
    /// own; returns the address bound.
    ///
    /// # Errors
    /// [`Error::Settings`] without an address, and the bind's error.
    pub async fn start(&self) -> Result<SocketAddr, Error> {
        let addr = self.shared.config.metrics_addr.clone().ok_or_else(|| {
            Error::Settings("the metrics endpoint needs an address (metrics_addr)".into())
        })?;
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::io(format!("cannot listen for metrics on {addr}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the metrics address", e))?;
        tokio::spawn(http::serve(listener, Arc::downgrade(&self.shared)));
        Ok(bound)
    }

    /// Learns from a supervised cluster's report: pass every report read
    /// from [`SupervisedCluster::next_event`](crate::supervisor::SupervisedCluster::next_event).
    pub fn observe(&self, report: &Report) {
        match report {
            Report::Cluster(event) => self.observe_cluster(event),
            Report::Supervisor(event) => self.observe_supervisor(event),
        }
    }

    /// Learns from a cluster's event, for a cluster without a supervisor
    /// (a worker is ready once it says so with `Worker::ready`).
    pub fn observe_cluster(&self, event: &ClusterEvent) {
        let mut state = self.state();
        match event {
            ClusterEvent::Ready(worker) => {
                state.ready.insert(worker.id());
            }
            ClusterEvent::Disconnect(worker) | ClusterEvent::Exit { worker, .. } => {
                state.ready.remove(&worker.id());
            }
            _ => {}
        }
    }

    /// Learns from the supervisor's event.
    pub fn observe_supervisor(&self, event: &SupervisorEvent) {
        let metrics = &self.shared.metrics;
        let mut state = self.state();
        match event {
            SupervisorEvent::Started { workers } => state.slots = Some(*workers),
            SupervisorEvent::Scaled { to, .. } => state.slots = Some(*to),
            SupervisorEvent::WorkerReady { worker, .. } => {
                state.ready.insert(*worker);
            }
            SupervisorEvent::WorkerExited { worker, .. } => {
                state.ready.remove(worker);
            }
            SupervisorEvent::WorkerFailed { slot, cause } => {
                metrics.restart(*slot, metrics::cause_of_failure(cause));
            }
            SupervisorEvent::RecycleStarted { slot, reason, .. } => {
                metrics.restart(*slot, metrics::cause_of_recycle(reason));
            }
            SupervisorEvent::BreakerTripped { .. } => {
                state.breaker_tripped = true;
                metrics.breaker_trips.inc();
            }
            SupervisorEvent::BreakerReset => state.breaker_tripped = false,
            SupervisorEvent::ReloadStarted { .. } => state.reloading = Some(Instant::now()),
            SupervisorEvent::ReloadFinished { .. } | SupervisorEvent::ReloadFailed { .. } => {
                let ok = matches!(event, SupervisorEvent::ReloadFinished { .. });
                if let Some(started) = state.reloading.take() {
                    metrics.reloaded(ok, started.elapsed());
                }
            }
            SupervisorEvent::StopStarted { .. } => state.stopping = true,
            SupervisorEvent::StopFinished { .. } => state.finished = true,
            _ => {}
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// What `/healthz` answers: alive while the cluster exists and its
    /// supervisor has not finished. The answer comes from the primary's
    /// runtime, so a primary whose loop is stuck does not answer at all.
    pub fn health(&self) -> Health {
        let cluster = self
            .shared
            .context
            .get()
            .is_some_and(|c| c.format().is_some());
        Health {
            alive: cluster && !self.state().finished,
        }
    }

    /// What `/readyz` answers.
    pub fn readiness(&self) -> Readiness {
        let state = self.state();
        let ready_workers = state.ready.len();
        let wanted = self
            .shared
            .config
            .min_ready
            .or(state.slots)
            .unwrap_or(1)
            .max(1);
        let reason = if state.stopping || state.finished {
            Some("the cluster is stopping".to_string())
        } else if state.breaker_tripped {
            Some("the crash-loop breaker tripped".to_string())
        } else if state.reloading.is_some() && !self.shared.config.ready_while_reloading {
            Some(format!(
                "a rolling reload is in progress ({ready_workers} of {wanted} workers ready)"
            ))
        } else if ready_workers < wanted {
            Some(format!("{ready_workers} of {wanted} workers ready"))
        } else {
            None
        };
        Readiness {
            ready: reason.is_none(),
            ready_workers,
            wanted,
            reason,
        }
    }

    /// One scrape of the whole cluster, as the endpoint serves it:
    /// Prometheus text, or OpenMetrics text when `openmetrics` is set.
    pub async fn render(&self, openmetrics: bool) -> String {
        let dialect = if openmetrics {
            Dialect::OpenMetrics
        } else {
            Dialect::Text
        };
        self.scrape(dialect).await
    }

    pub(crate) async fn scrape(&self, dialect: Dialect) -> String {
        let (answers, snapshot) = self.collect_workers().await;
        // The families borrow their names and labels from the answers.
        let contributions = answers
            .iter()
            .filter_map(|(worker, text)| match exposition::parse(text) {
                Ok(families) => Some(Contribution {
                    worker: worker.id().to_string(),
                    slot: worker.index().map(|s| s.to_string()),
                    families,
                }),
                Err(error) => {
                    tracing::warn!(worker = %worker.id(), %error, "a worker's metrics do not parse; left out");
                    self.shared.scrape_failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
            })
            .collect();
        let own_text = self.shared.metrics.encode(&snapshot);
        let mut own = exposition::parse(&own_text).unwrap_or_default();
        let reserved: Vec<&str> = own.iter().map(|f| f.name.as_ref()).collect();
        let (app, report) =
            exposition::merge(contributions, self.shared.config.aggregation, &reserved);
        self.shared
            .merge_conflicts
            .fetch_add(report.conflicts, Ordering::Relaxed);
        own.extend(app);
        let mut out = String::with_capacity(64 * 1024);
        exposition::render(&own, dialect, &mut out);
        out
    }

    /// Asks every worker whose telemetry side is open for its registry,
    /// waiting up to the scrape timeout, and reads the cluster's own figures
    /// while the workers answer.
    async fn collect_workers(&self) -> (Vec<(WorkerHandle, String)>, metrics::Snapshot) {
        let Some(context) = self.shared.context.get() else {
            return (Vec::new(), self.snapshot().await);
        };
        let _one_at_a_time = self.shared.scrape_lock.lock().await;
        let id = self.shared.next_scrape.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let open = self.state().open.clone();
        let request = ToWorker::Scrape { id }.encode();
        let mut waiting = BTreeSet::new();
        for worker in context.workers() {
            if !open.contains(&worker.id()) || !worker.is_connected() {
                continue;
            }
            match context.try_send(&worker, Format::Binary, &request, Vec::new()) {
                Ok(()) => {
                    waiting.insert(worker.id());
                }
                Err(_) => {
                    self.shared.scrape_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if waiting.is_empty() {
            return (Vec::new(), self.snapshot().await);
        }
        self.state().pending = Some(PendingScrape {
            id,
            waiting,
            answers: Vec::new(),
            done: Some(done_tx),
        });
        // The cluster's own figures are read while the workers answer.
        let (snapshot, _) = tokio::join!(
            self.snapshot(),
            tokio::time::timeout(self.shared.config.scrape_timeout, done_rx)
        );
        let Some(pending) = self.state().pending.take() else {
            return (Vec::new(), snapshot);
        };
        self.shared
            .scrape_failures
            .fetch_add(pending.waiting.len() as u64, Ordering::Relaxed);
        let mut answers = pending.answers;
        answers.sort_by_key(|(worker, _)| worker.id());
        (answers, snapshot)
    }

    /// Everything the cluster's own metrics need, read now. `/proc` is read
    /// on a blocking thread: a large cluster's tables take milliseconds,
    /// which the primary's loop spends on its workers meanwhile.
    async fn snapshot(&self) -> metrics::Snapshot {
        let context = self.shared.context.get();
        let workers = context.map(ServiceContext::workers).unwrap_or_default();
        let mut listeners = context
            .map(ServiceContext::listener_stats)
            .unwrap_or_default();
        listeners.extend(self.shared.config.sockets.iter().map(|(label, inode)| {
            crate::listeners::registry::GroupStats {
                address: label.clone(),
                accept_errors: 0,
                handed: Vec::new(),
                sockets: vec![(None, *inode)],
            }
        }));
        let pids: Vec<u32> = workers.iter().map(WorkerHandle::pid).collect();
        lock(&self.shared.cpu).retain(&pids);
        let with_queues = !listeners.is_empty();
        let count = pids.len();
        let (usages, queues) = tokio::task::spawn_blocking(move || {
            let table = crate::procfs::ProcessTable::read();
            let usages: Vec<_> = pids.iter().map(|&pid| table.tree_usage(pid)).collect();
            let queues = if with_queues {
                crate::procfs::listen_queues()
            } else {
                Default::default()
            };
            (usages, queues)
        })
        .await
        .unwrap_or_else(|_| (vec![None; count], Default::default()));
        let state = self.state();
        metrics::Snapshot {
            workers: workers
                .iter()
                .zip(usages)
                .map(|(w, usage)| metrics::WorkerSnapshot {
                    id: w.id(),
                    slot: w.index(),
                    state: w.state(),
                    ready: state.ready.contains(&w.id()),
                    usage,
                    channel: w.channel_stats(),
                    logs: state
                        .logs
                        .get(&w.id())
                        .map_or((0, 0), |c| (c.received, c.dropped)),
                })
                .collect(),
            listeners,
            queues,
            scrape_failures: self.shared.scrape_failures.load(Ordering::Relaxed),
            merge_conflicts: self.shared.merge_conflicts.load(Ordering::Relaxed),
            reloading: state.reloading.is_some(),
        }
    }

    /// Handles a batch of log records from `from`, in order.
    fn logs_from(&self, from: &WorkerHandle, dropped: u64, records: &[u8]) {
        let (id, slot, pid) = (from.id(), from.index(), from.pid());
        let mut count = 0u64;
        let mut rest = records;
        while !rest.is_empty() {
            match postcard::take_from_bytes::<WireRecord>(rest) {
                Ok((record, after)) => {
                    self.shared
                        .config
                        .logs
                        .emit(&LogRecord::from_wire(id, slot, pid, record));
                    count += 1;
                    rest = after;
                }
                Err(error) => {
                    tracing::warn!(worker = %id, %error, "a worker sent a log record that does not decode; the rest of its batch is dropped");
                    break;
                }
            }
        }
        let newly_dropped = {
            let mut state = self.state();
            let counts = state.logs.entry(id).or_default();
            counts.received += count;
            let newly = dropped.saturating_sub(counts.dropped);
            counts.dropped = counts.dropped.max(dropped);
            newly
        };
        if newly_dropped > 0 {
            tracing::warn!(
                worker = %id,
                dropped = newly_dropped,
                "worker {id} dropped {newly_dropped} log events: it logged faster than the primary took them"
            );
        }
    }
}

impl Service for Telemetry {
    fn name(&self) -> String {
        SERVICE_NAME.into()
    }

    fn attach(&self, context: ServiceContext) {
        let _ = self.shared.context.set(context);
    }

    fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
        match postcard::from_bytes::<FromWorker<'_>>(&frame.body) {
            Ok(FromWorker::Hello) => {
                self.state().open.insert(from.id());
            }
            Ok(FromWorker::Metrics { id, text }) => {
                let mut state = self.state();
                if let Some(pending) = state.pending.as_mut().filter(|p| p.id == id) {
                    if pending.waiting.contains(&from.id()) {
                        pending.answers.push((from.clone(), text.to_string()));
                        pending.answered(from.id());
                    }
                }
            }
            Ok(FromWorker::Logs { dropped, records }) => self.logs_from(from, dropped, records),
            Err(error) => {
                tracing::warn!(worker = %from.id(), %error, "dropped a telemetry frame that does not decode");
            }
        }
    }

    fn on_worker_gone(&self, worker: &WorkerHandle, exit: Option<ExitStatus>) {
        let mut state = self.state();
        if let Some(pending) = state.pending.as_mut() {
            pending.answered(worker.id());
        }
        state.ready.remove(&worker.id());
        if exit.is_some() {
            state.open.remove(&worker.id());
            state.logs.remove(&worker.id());
        }
    }
}
