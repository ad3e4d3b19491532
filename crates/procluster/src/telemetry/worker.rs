//! A worker's side of telemetry: its own metrics registry, which the
//! primary's scrape asks for over the channel, and a `tracing` layer that
//! sends the worker's log events to the primary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::SERVICE_NAME;
use super::wire::{FieldValue, FromWorker, ToWorker, WireRecord, WireSpan, level_code};
use crate::sync::lock;
use crate::worker::{ServicePort, Worker};
use crate::{Error, Format};

/// Bytes of log records a worker holds for the primary before it drops
/// new events (and counts them).
pub const DEFAULT_LOG_BUFFER: usize = 1024 * 1024;

/// This worker's telemetry: a metrics registry the primary's scrape
/// includes, and a [`LogLayer`] for `tracing`. One per worker, shared.
///
/// ```no_run
/// use prometheus_client::metrics::counter::Counter;
/// use tracing_subscriber::layer::SubscriberExt;
///
/// # fn f(worker: procluster::worker::Worker) -> Result<(), procluster::Error> {
/// let telemetry = procluster::telemetry::worker(&worker)?;
/// let requests = Counter::<u64>::default();
/// telemetry.registry().register("requests", "Requests served", requests.clone());
/// requests.inc();
/// // Log events go to the primary, which prints them with this worker's id.
/// let subscriber = tracing_subscriber::registry().with(telemetry.log_layer());
/// tracing::subscriber::set_global_default(subscriber).ok();
/// tracing::info!(path = "/", "served");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerTelemetry {
    shared: Arc<Shared>,
}

struct Shared {
    port: ServicePort,
    registry: Mutex<Registry>,
    logs: Arc<LogBuffer>,
    /// The flusher could not send: the primary is gone.
    closed: AtomicBool,
}

impl Shared {
    fn port_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerTelemetry").finish_non_exhaustive()
    }
}

/// Opens this worker's side of the cluster's telemetry service (added in
/// the primary with [`Telemetry`](super::Telemetry)); later calls return
/// the same one.
///
/// # Errors
/// [`Error::Settings`] when the primary has no telemetry service.
pub fn worker(worker: &Worker) -> Result<WorkerTelemetry, Error> {
    let opened = worker.service(SERVICE_NAME, |port| {
        // Said at once, so that the primary knows this worker's side is open
        // before anything the worker sends after this call (its readiness).
        let _ = port.try_send(Format::Binary, &FromWorker::Hello.encode(), Vec::new());
        let shared = Arc::new(Shared {
            port,
            registry: Mutex::new(Registry::default()),
            logs: Arc::new(LogBuffer::new(DEFAULT_LOG_BUFFER)),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(answer_scrapes(shared.clone()));
        tokio::spawn(flush_logs(shared.clone()));
        WorkerTelemetry { shared }
    })?;
    Ok((*opened).clone())
}

impl WorkerTelemetry {
    /// The worker's registry: what is registered here is in every scrape of
    /// the cluster's endpoint, added up across workers or per worker as the
    /// primary chose. Hold the guard briefly (a scrape waits for it).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.shared.registry)
    }

    /// A `tracing` layer that sends every event (level, target, fields, the
    /// spans it is in) to the primary, which prints it with this worker's
    /// id, slot and pid. It never waits: while the worker's log buffer is
    /// full (the primary is slow, or the worker logs faster than the channel
    /// carries) events are dropped and counted, and the primary reports
    /// the count.
    pub fn log_layer(&self) -> LogLayer {
        LogLayer {
            logs: self.shared.logs.clone(),
        }
    }

    /// Waits until every log event recorded so far has left for the
    /// primary (before the worker exits, say). Returns at once if the
    /// primary is gone.
    pub async fn flush_logs(&self) {
        let logs = &self.shared.logs;
        loop {
            let flushed = logs.flushed.notified();
            tokio::pin!(flushed);
            flushed.as_mut().enable();
            let idle = lock(&logs.state).is_empty() && !logs.sending.load(Ordering::Acquire);
            if idle || !self.shared.port_open() {
                return;
            }
            flushed.await;
        }
    }

    /// Log events dropped so far because the buffer was full.
    pub fn dropped_logs(&self) -> u64 {
        self.shared.logs.dropped.load(Ordering::Relaxed)
    }
}

/// Answers the primary's scrapes with the registry's text, one at a time.
async fn answer_scrapes(shared: Arc<Shared>) {
    let mut text = String::new();
    while let Some(frame) = shared.port.recv().await {
        let Ok(ToWorker::Scrape { id }) = postcard::from_bytes(&frame.body) else {
            tracing::debug!("ignored a telemetry frame this worker does not understand");
            continue;
        };
        text.clear();
        let encoded = {
            let registry = lock(&shared.registry);
            prometheus_client::encoding::text::encode(&mut text, &registry)
        };
        if encoded.is_err() {
            text.clear();
        }
        let answer = FromWorker::Metrics { id, text: &text }.encode();
        if shared
            .port
            .send(Format::Binary, &answer, Vec::new())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Sends what the log buffer holds, one batch per frame, whenever it has
/// something.
async fn flush_logs(shared: Arc<Shared>) {
    let logs = &shared.logs;
    let mut batch = Vec::new();
    loop {
        let wake = logs.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        {
            let mut state = lock(&logs.state);
            std::mem::swap(&mut *state, &mut batch);
            logs.sending.store(!batch.is_empty(), Ordering::Release);
        }
        if batch.is_empty() {
            logs.flushed.notify_waiters();
            wake.await;
            continue;
        }
        let frame = FromWorker::Logs {
            dropped: logs.dropped.load(Ordering::Relaxed),
            records: &batch,
        }
        .encode();
        batch.clear();
        if batch.capacity() > logs.limit {
            batch = Vec::new();
        }
        let sent = shared.port.send(Format::Binary, &frame, Vec::new()).await;
        if sent.is_err() {
            shared.closed.store(true, Ordering::Release);
            logs.sending.store(false, Ordering::Release);
            logs.flushed.notify_waiters();
            return;
        }
    }
}

/// Encoded records waiting for the flusher, bounded in bytes.
#[derive(Debug)]
struct LogBuffer {
    state: Mutex<Vec<u8>>,
    limit: usize,
    dropped: AtomicU64,
    /// Wakes the flusher when the buffer gets its first record.
    wake: Notify,
    /// The flusher holds a batch it has not sent yet.
    sending: AtomicBool,
    /// The flusher found the buffer empty.
    flushed: Notify,
}

impl LogBuffer {
    fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(Vec::new()),
            limit,
            dropped: AtomicU64::new(0),
            wake: Notify::new(),
            sending: AtomicBool::new(false),
            flushed: Notify::new(),
        }
    }

    /// Appends one encoded record, or drops it when the buffer is full.
    fn push(&self, record: &WireRecord) {
        let mut state = lock(&self.state);
        let was_empty = state.is_empty();
        let start = state.len();
        let fits = postcard::to_io(record, &mut *state).is_ok() && state.len() <= self.limit;
        if !fits {
            state.truncate(start);
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        drop(state);
        if was_empty {
            self.wake.notify_one();
        }
    }
}

/// The `tracing` layer made by [`WorkerTelemetry::log_layer`].
#[derive(Debug, Clone)]
pub struct LogLayer {
    logs: Arc<LogBuffer>,
}

/// A span's fields, recorded when it was created.
struct SpanFields(Vec<(String, FieldValue)>);

impl<S> tracing_subscriber::Layer<S> for LogLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<SpanFields>() {
            Some(SpanFields(existing)) => existing.extend(fields.fields),
            None => extensions.insert(SpanFields(fields.fields)),
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| WireSpan {
                        name: span.name().to_string(),
                        fields: span
                            .extensions()
                            .get::<SpanFields>()
                            .map(|f| f.0.clone())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let metadata = event.metadata();
        let time_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.logs.push(&WireRecord {
            time_us,
            level: level_code(*metadata.level()),
            target: metadata.target().to_string(),
            message: fields.message,
            fields: fields.fields,
            spans,
        });
    }
}

/// Collects an event's or a span's fields; `message` apart.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, FieldValue)>,
}

impl Fields {
    fn add(&mut self, field: &Field, value: FieldValue) {
        self.fields.push((field.name().to_string(), value));
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write;
            let _ = write!(self.message, "{value:?}");
        } else {
            self.add(field, FieldValue::Str(format!("{value:?}")));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.add(field, FieldValue::Str(value.to_string()));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.add(field, FieldValue::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.add(field, FieldValue::U64(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.add(field, FieldValue::F64(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.add(field, FieldValue::Bool(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn records(bytes: &[u8]) -> Vec<WireRecord> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (record, after) = postcard::take_from_bytes::<WireRecord>(rest).unwrap();
            out.push(record);
            rest = after;
        }
        out
    }

    #[test]
    fn events_are_recorded_with_fields_and_spans() {
        let logs = Arc::new(LogBuffer::new(DEFAULT_LOG_BUFFER));
        let layer = LogLayer { logs: logs.clone() };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", id = 7u64);
            let _entered = span.enter();
            tracing::warn!(path = "/x", ok = true, "served {}", 1);
        });
        let got = records(&lock(&logs.state));
        assert_eq!(got.len(), 1);
        let record = &got[0];
        assert_eq!(record.level, 3);
        assert_eq!(record.message, "served 1");
        assert_eq!(
            record.fields,
            [
                ("path".to_string(), FieldValue::Str("/x".into())),
                ("ok".to_string(), FieldValue::Bool(true))
            ]
        );
        assert_eq!(record.spans[0].name, "request");
        assert_eq!(record.spans[0].fields[0].1, FieldValue::U64(7));
    }

    #[test]
    fn a_full_buffer_drops_and_counts_and_never_grows() {
        let logs = LogBuffer::new(200);
        let record = WireRecord {
            time_us: 1,
            level: 2,
            target: "t".into(),
            message: "x".repeat(50),
            fields: Vec::new(),
            spans: Vec::new(),
        };
        for _ in 0..10 {
            logs.push(&record);
        }
        assert!(lock(&logs.state).len() <= 200);
        let kept = records(&lock(&logs.state)).len() as u64;
        assert_eq!(kept + logs.dropped.load(Ordering::Relaxed), 10);
        assert!(kept >= 3);
    }
}
