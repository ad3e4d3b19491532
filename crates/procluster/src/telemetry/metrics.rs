//! The cluster's own metrics, built on `prometheus-client`: counters kept
//! from the supervisor's events, and what is read at each scrape (workers,
//! their process trees, channels, listeners).

use std::collections::HashMap;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::procfs::TreeUsage;
use crate::listeners::registry::GroupStats;
use crate::primary::WorkerState;
use crate::supervisor::{CrashCause, RecycleReason};
use crate::{ChannelStats, WorkerId};

type Labels = Vec<(String, String)>;

/// The counters the supervisor's events feed.
pub(crate) struct ClusterMetrics {
    registry: Registry,
    restarts: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    reload_seconds: Histogram,
    pub(crate) breaker_trips: Counter,
}

impl ClusterMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("procluster");
        let restarts = Family::<Labels, Counter>::default();
        registry.register(
            "worker_restarts",
            "Workers replaced, by slot and cause (crash, signal, hang, ready_timeout, spawn, memory, requests, age)",
            restarts.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "reloads",
            "Rolling reloads, by result (ok, failed)",
            reloads.clone(),
        );
        let reload_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register_with_unit(
            "reload_duration",
            "How long rolling reloads took, from start to finish or failure",
            Unit::Seconds,
            reload_seconds.clone(),
        );
        let breaker_trips = Counter::default();
        registry.register(
            "breaker_trips",
            "Times the crash-loop breaker tripped",
            breaker_trips.clone(),
        );
        Self {
            registry,
            restarts,
            reloads,
            reload_seconds,
            breaker_trips,
        }
    }

    pub(crate) fn restart(&self, slot: usize, cause: &str) {
        self.restarts
            .get_or_create(&vec![
                ("slot".into(), slot.to_string()),
                ("cause".into(), cause.into()),
            ])
            .inc();
    }

    pub(crate) fn reloaded(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
        self.reload_seconds.observe(took.as_secs_f64());
    }

    /// The kept counters and the snapshot, as OpenMetrics text.
    pub(crate) fn encode(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut now = Registry::with_prefix("procluster");
        now.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        let encoded = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &now))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out));
        if encoded.is_err() {
            tracing::warn!("cannot encode the cluster's metrics");
        }
        out
    }
}

/// The cause label of a failed worker.
pub(crate) fn cause_of_failure(cause: &CrashCause) -> &'static str {
    match cause {
        CrashCause::Exited { info, .. } if info.signal().is_some() => "signal",
        CrashCause::Exited { .. } => "crash",
        CrashCause::SpawnFailed(_) => "spawn",
        CrashCause::ReadyTimeout => "ready_timeout",
        CrashCause::Hang => "hang",
        CrashCause::NoResources(_) => "no_resources",
        CrashCause::TaskFault { .. } => "task",
    }
}

/// The cause label of a recycled worker.
pub(crate) fn cause_of_recycle(reason: &RecycleReason) -> &'static str {
    match reason {
        RecycleReason::Memory { .. } => "memory",
        RecycleReason::Requests { .. } => "requests",
        RecycleReason::MaxAge { .. } => "age",
    }
}

/// One worker, read at a scrape.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSnapshot {
    pub(crate) id: WorkerId,
    pub(crate) slot: Option<usize>,
    pub(crate) state: WorkerState,
    pub(crate) ready: bool,
    pub(crate) usage: Option<TreeUsage>,
    pub(crate) channel: ChannelStats,
    /// Log events received, and dropped by the worker.
    pub(crate) logs: (u64, u64),
}

impl WorkerSnapshot {
    fn labels(&self) -> Labels {
        let mut labels = vec![("worker".to_string(), self.id.to_string())];
        if let Some(slot) = self.slot {
            labels.push(("slot".into(), slot.to_string()));
        }
        labels
    }
}

/// Everything read at one scrape.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) workers: Vec<WorkerSnapshot>,
    pub(crate) listeners: Vec<GroupStats>,
    /// Accept queue of listening sockets, by inode.
    pub(crate) queues: HashMap<u64, u64>,
    pub(crate) scrape_failures: u64,
    pub(crate) merge_conflicts: u64,
    pub(crate) reloading: bool,
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// Writes one family of (labels, value) rows.
fn family<T: Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, T)],
    write: impl Fn(prometheus_client::encoding::MetricEncoder<'_>, T) -> std::fmt::Result,
    metric_type: MetricType,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in rows {
        write(metric.encode_family(labels)?, *value)?;
    }
    Ok(())
}

fn gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        rows,
        |m, v| ConstGauge::new(v).encode(m),
        MetricType::Gauge,
    )
}

fn counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        rows,
        |m, v| ConstCounter::new(v).encode(m),
        MetricType::Counter,
    )
}

fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Forked => "forked",
        WorkerState::Online => "online",
        WorkerState::Listening => "listening",
        WorkerState::Disconnected => "disconnected",
        WorkerState::Dead => "dead",
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.0;
        let e = &mut encoder;
        let mut by_state: Vec<(Labels, f64)> = ["forked", "online", "listening", "disconnected"]
            .iter()
            .map(|name| (vec![("state".to_string(), name.to_string())], 0.0))
            .collect();
        for worker in &s.workers {
            let name = state_name(worker.state);
            if let Some(row) = by_state.iter_mut().find(|(l, _)| l[0].1 == name) {
                row.1 += 1.0;
            }
        }
        gauges(e, "workers", "Worker processes, by state", None, &by_state)?;
        let ready = s.workers.iter().filter(|w| w.ready).count() as f64;
        gauges(
            e,
            "workers_ready",
            "Workers ready to serve",
            None,
            &[(Vec::new(), ready)],
        )?;
        gauges(
            e,
            "reload_in_progress",
            "1 while a rolling reload is in progress",
            None,
            &[(Vec::new(), if s.reloading { 1.0 } else { 0.0 })],
        )?;

        let with_usage: Vec<(Labels, TreeUsage)> = s
            .workers
            .iter()
            .filter_map(|w| Some((w.labels(), w.usage?)))
            .collect();
        let rows = |f: &dyn Fn(&TreeUsage) -> f64| -> Vec<(Labels, f64)> {
            with_usage.iter().map(|(l, u)| (l.clone(), f(u))).collect()
        };
        family(
            e,
            "worker_cpu",
            "CPU time of the worker's process tree (user and system)",
            Some(&Unit::Seconds),
            &rows(&|u| u.cpu_seconds),
            |m, v| ConstCounter::new(v).encode(m),
            MetricType::Counter,
        )?;
        gauges(
            e,
            "worker_resident_memory",
            "Resident memory of the worker's process tree",
            Some(&Unit::Bytes),
            &rows(&|u| u.rss_bytes as f64),
        )?;
        gauges(
            e,
            "worker_open_fds",
            "Open descriptors of the worker's process tree",
            None,
            &rows(&|u| u.open_fds as f64),
        )?;
        gauges(
            e,
            "worker_threads",
            "Threads of the worker's process tree",
            None,
            &rows(&|u| u.threads as f64),
        )?;
        gauges(
            e,
            "worker_processes",
            "Processes in the worker's tree (the worker and its descendants)",
            None,
            &rows(&|u| u.processes as f64),
        )?;
        gauges(
            e,
            "worker_uptime",
            "Time since the worker process started",
            Some(&Unit::Seconds),
            &rows(&|u| u.uptime),
        )?;

        let mut messages = Vec::new();
        let mut bytes = Vec::new();
        let mut refused = Vec::new();
        for worker in &s.workers {
            let labels = worker.labels();
            let c = worker.channel;
            for (direction, frames, n) in [
                ("to_worker", c.frames_sent, c.bytes_sent),
                ("from_worker", c.frames_received, c.bytes_received),
            ] {
                let mut l = labels.clone();
                l.push(("direction".into(), direction.into()));
                messages.push((l.clone(), frames));
                bytes.push((l, n));
            }
            refused.push((labels, c.frames_refused));
        }
        counters(
            e,
            "channel_frames",
            "Frames on the worker's channel, by direction",
            None,
            &messages,
        )?;
        counters(
            e,
            "channel",
            "Bytes on the worker's channel, by direction",
            Some(&Unit::Bytes),
            &bytes,
        )?;
        counters(
            e,
            "channel_frames_refused",
            "Frames the primary refused to queue for the worker (buffer full, over the size limit)",
            None,
            &refused,
        )?;

        let mut handed = Vec::new();
        let mut errors = Vec::new();
        let mut queue = Vec::new();
        for listener in &s.listeners {
            let address = ("listener".to_string(), listener.address.clone());
            errors.push((vec![address.clone()], listener.accept_errors));
            for (worker, n) in &listener.handed {
                let slot = s
                    .workers
                    .iter()
                    .find(|w| w.id == *worker)
                    .and_then(|w| w.slot);
                let mut labels = vec![address.clone(), ("worker".into(), worker.to_string())];
                if let Some(slot) = slot {
                    labels.push(("slot".into(), slot.to_string()));
                }
                handed.push((labels, *n));
            }
            for (slot, inode) in &listener.sockets {
                if let Some(depth) = s.queues.get(inode) {
                    let mut labels = vec![address.clone()];
                    if let Some(slot) = slot {
                        labels.push(("slot".into(), slot.to_string()));
                    }
                    queue.push((labels, *depth as f64));
                }
            }
        }
        counters(
            e,
            "connections_handed",
            "Connections the primary handed to each worker (round-robin, and draining of vacant reuseport slots)",
            None,
            &handed,
        )?;
        counters(
            e,
            "accept_errors",
            "Accepts that failed in the primary, per listener",
            None,
            &errors,
        )?;
        gauges(
            e,
            "listen_queue_depth",
            "Connections waiting in a listening socket's accept queue (ss -lnt Recv-Q)",
            None,
            &queue,
        )?;

        let received: Vec<(Labels, u64)> =
            s.workers.iter().map(|w| (w.labels(), w.logs.0)).collect();
        let dropped: Vec<(Labels, u64)> =
            s.workers.iter().map(|w| (w.labels(), w.logs.1)).collect();
        counters(
            e,
            "log_events",
            "Log events received from each worker",
            None,
            &received,
        )?;
        counters(
            e,
            "log_events_dropped",
            "Log events a worker dropped because its buffer was full",
            None,
            &dropped,
        )?;
        counters(
            e,
            "app_scrape_failures",
            "Workers left out of a scrape (no answer in time, or unreadable metrics)",
            None,
            &[(Vec::new(), s.scrape_failures)],
        )?;
        counters(
            e,
            "app_metric_conflicts",
            "Workers' metric families left out: their type differed between workers, or their name is the cluster's",
            None,
            &[(Vec::new(), s.merge_conflicts)],
        )?;
        Ok(())
    }
}
