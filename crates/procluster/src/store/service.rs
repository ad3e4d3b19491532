//! The primary's side of the local store: operations applied one at a time
//! to the [`Core`], watches fed in the order of the changes, keys expired on
//! time, snapshots.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::core::{Change, Core};
use super::wire::{self, Blob, Down, Op, Outcome, Up, Watched};
use super::{Backend, BoxFuture, Limits, StoreConfig, StoreError};
use crate::fanout::{Outlet, Pushed, Sink};
use crate::message::ServiceFrame;
use crate::primary::{Service, ServiceContext, WorkerHandle};
use crate::protocol::Format;
use crate::sync::lock;
use crate::{ChannelError, Error, ExitStatus, WorkerId};

/// Answers a worker's channel may owe at once while it does not read them,
/// over all workers; past it, answers are dropped (and counted).
const MAX_WAITING_ANSWERS: usize = 1 << 16;

/// The primary's side of the store: add it to the cluster with
/// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service)
/// (get it from [`Store::service`](super::Store::service)). Cheap to clone.
#[derive(Clone)]
pub struct StoreService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StoreService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreService")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Counters of the primary's store, for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Keys held now.
    pub keys: usize,
    /// Bytes of keys and values held now.
    pub bytes: usize,
    /// Operations applied so far.
    pub operations: u64,
    /// Operations refused by a limit so far.
    pub refused: u64,
    /// Watches open now.
    pub watches: usize,
    /// Changes dropped so far by watches under
    /// [`Overflow::DropOldest`](super::Overflow::DropOldest) (open watches).
    pub dropped: u64,
    /// Answers dropped because a worker did not read them.
    pub unanswered: u64,
}

struct Shared {
    context: OnceLock<ServiceContext>,
    config: StoreConfig,
    backend: wire::Backend,
    state: Mutex<State>,
    /// Wakes the expiry task when a deadline is set.
    deadline_set: Arc<Notify>,
    expiry_started: AtomicBool,
    operations: AtomicU64,
    refused: AtomicU64,
    unanswered: AtomicU64,
    waiting_answers: AtomicUsize,
    /// The format of a loaded snapshot, checked against the cluster's.
    loaded_format: Option<Format>,
}

struct State {
    core: Core,
    watches: Vec<WatchEntry>,
    next_local: u64,
}

struct WatchEntry {
    owner: Option<WorkerId>,
    sub: u64,
    watched: Watched,
    outlet: Arc<Outlet>,
}

impl StoreService {
    pub(crate) fn new(config: StoreConfig, backend: wire::Backend) -> Result<Self, StoreError> {
        let mut core = Core::new(config.clone());
        let loaded_format = match &config.snapshot {
            Some(path) => load_snapshot(path, &mut core)?,
            None => None,
        };
        if let Some(format) = loaded_format {
            core.set_format(format);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                context: OnceLock::new(),
                config,
                backend,
                state: Mutex::new(State {
                    core,
                    watches: Vec::new(),
                    next_local: 0,
                }),
                deadline_set: Arc::new(Notify::new()),
                expiry_started: AtomicBool::new(false),
                operations: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                unanswered: AtomicU64::new(0),
                waiting_answers: AtomicUsize::new(0),
                loaded_format,
            }),
        })
    }

    pub(crate) fn primary_backend(&self) -> Arc<dyn Backend> {
        Arc::new(PrimaryBackend(self.shared.clone()))
    }

    pub(crate) fn is_local(&self) -> bool {
        self.shared.backend == wire::Backend::Local
    }

    /// The cluster's format, once the cluster is built (the Redis backend
    /// encodes with it).
    #[cfg(feature = "redis")]
    pub(crate) fn format(&self) -> Format {
        lock(&self.shared.state).core.format()
    }

    /// The counters now (of the local store).
    pub fn stats(&self) -> StoreStats {
        let shared = &self.shared;
        let state = lock(&shared.state);
        StoreStats {
            keys: state.core.len(),
            bytes: state.core.bytes(),
            operations: shared.operations.load(Ordering::Relaxed),
            refused: shared.refused.load(Ordering::Relaxed),
            watches: state.watches.len(),
            dropped: state.watches.iter().map(|w| w.outlet.dropped()).sum(),
            unanswered: shared.unanswered.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn save_snapshot(&self) -> Result<(), StoreError> {
        self.shared.save_snapshot()
    }
}

impl Service for StoreService {
    fn name(&self) -> String {
        super::SERVICE_NAME.into()
    }

    fn attach(&self, context: ServiceContext) {
        let format = context.format().unwrap_or_default();
        if let Some(loaded) = self.shared.loaded_format {
            if loaded != format {
                tracing::error!(
                    snapshot = loaded.name(),
                    cluster = format.name(),
                    "the store's snapshot was saved in another format than the cluster's: \
                     its values will not decode"
                );
            }
        }
        lock(&self.shared.state).core.set_format(format);
        let _ = self.shared.context.set(context);
    }

    fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
        let shared = &self.shared;
        let up = match wire::decode::<Up>(&frame.body) {
            Ok(up) => up,
            Err(error) => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %from.id(), %error, "dropped a bad store frame");
                return;
            }
        };
        let answer = match up {
            Up::Hello => Down::Welcome {
                backend: shared.backend.clone(),
            },
            Up::Op { id, op } => Down::Done {
                id,
                outcome: shared.apply(op),
            },
            Up::Watch {
                sub,
                watched,
                limits,
            } => {
                let Some(context) = shared.context.get() else {
                    return;
                };
                let sink = Sink::Worker {
                    context: context.clone(),
                    worker: from.clone(),
                };
                match shared.add_watch(Some(from.id()), sub, watched, limits, sink) {
                    Ok(()) => Down::Watching { sub },
                    Err(why) => Down::Refused { id: sub, why },
                }
            }
            Up::Unwatch { sub } => return shared.remove_watch(Some(from.id()), sub),
            Up::Credit { sub, n } => return shared.credit(Some(from.id()), sub, n),
        };
        shared.answer(from, wire::encode(&answer));
    }

    fn on_worker_gone(&self, worker: &WorkerHandle, _exit: Option<ExitStatus>) {
        let mut state = lock(&self.shared.state);
        state.watches.retain(|w| {
            let keep = w.owner != Some(worker.id());
            if !keep {
                w.outlet.close();
            }
            keep
        });
    }
}

impl Shared {
    /// Applies one operation and tells the watches what changed, in order.
    fn apply(self: &Arc<Self>, op: Op) -> Result<Outcome, wire::Failure> {
        let with_deadline = matches!(
            op,
            Op::Set {
                ttl_ms: Some(_),
                ..
            }
        );
        let mut changes = Vec::new();
        let mut state = lock(&self.state);
        let watched = !state.watches.is_empty();
        state.core.set_recording(watched);
        let outcome = state.core.apply(op, Instant::now(), &mut changes);
        self.operations.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        notify(&mut state, &changes);
        drop(state);
        if with_deadline && outcome.is_ok() {
            self.start_expiry();
            self.deadline_set.notify_one();
        }
        outcome
    }

    fn start_expiry(self: &Arc<Self>) {
        if !self.expiry_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(expire_loop(Arc::downgrade(self), self.deadline_set.clone()));
        }
    }

    /// Sends an answer to a worker, in a task of its own if its channel is
    /// full (within [`MAX_WAITING_ANSWERS`]).
    fn answer(self: &Arc<Self>, worker: &WorkerHandle, frame: Bytes) {
        let Some(context) = self.context.get() else {
            return;
        };
        if let Err(Error::Channel(ChannelError::Full)) =
            context.try_send(worker, Format::Binary, &frame, Vec::new())
        {
            if self.waiting_answers.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING_ANSWERS {
                self.waiting_answers.fetch_sub(1, Ordering::AcqRel);
                self.unanswered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let (context, worker) = (context.clone(), worker.clone());
            let this = Arc::downgrade(self);
            tokio::spawn(async move {
                let _ = context
                    .send(&worker, Format::Binary, &frame, Vec::new())
                    .await;
                if let Some(this) = this.upgrade() {
                    this.waiting_answers.fetch_sub(1, Ordering::AcqRel);
                }
            });
        }
    }

    fn add_watch(
        &self,
        owner: Option<WorkerId>,
        sub: u64,
        watched: Watched,
        limits: Limits,
        sink: Sink,
    ) -> Result<(), String> {
        let mut state = lock(&self.state);
        let held = state.watches.iter().filter(|w| w.owner == owner).count();
        if held >= self.config.watches_per_worker {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "{held} watches are open, the most one worker may hold \
                 (StoreConfig::watches_per_worker)"
            ));
        }
        let limits = limits.clamped(self.config.most);
        let reserved: u64 = state
            .watches
            .iter()
            .filter(|w| w.owner == owner)
            .map(|w| w.outlet.limits().max_bytes)
            .sum();
        if reserved + limits.max_bytes > self.config.watch_bytes_per_worker {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "the watches of one worker already reserve {reserved} bytes of queue; another \
                 {} would pass StoreConfig::watch_bytes_per_worker ({})",
                limits.max_bytes, self.config.watch_bytes_per_worker
            ));
        }
        let closed = wire::encode(&Down::Closed { sub });
        let outlet = Outlet::new(sink, limits, closed);
        state.watches.push(WatchEntry {
            owner,
            sub,
            watched,
            outlet,
        });
        Ok(())
    }

    fn remove_watch(&self, owner: Option<WorkerId>, sub: u64) {
        lock(&self.state).watches.retain(|w| {
            let keep = !(w.owner == owner && w.sub == sub);
            if !keep {
                w.outlet.close();
            }
            keep
        });
    }

    fn credit(&self, owner: Option<WorkerId>, sub: u64, n: u32) {
        let outlet = lock(&self.state)
            .watches
            .iter()
            .find(|w| w.owner == owner && w.sub == sub)
            .map(|w| w.outlet.clone());
        if let Some(outlet) = outlet {
            outlet.add_credit(n);
        }
    }

    fn save_snapshot(&self) -> Result<(), StoreError> {
        let Some(path) = &self.config.snapshot else {
            return Ok(());
        };
        let (format, entries) = {
            let state = lock(&self.state);
            (state.core.format(), state.core.dump(Instant::now()))
        };
        save_snapshot(path, format, entries)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The expiry task wakes, finds the store gone and ends.
        self.deadline_set.notify_one();
        if let Err(error) = self.save_snapshot() {
            tracing::error!(%error, "cannot save the store's snapshot");
        }
    }
}

/// Hands each change to the watches that follow its key.
fn notify(state: &mut State, changes: &[Change]) {
    if changes.is_empty() || state.watches.is_empty() {
        return;
    }
    let mut closed = false;
    for change in changes {
        for watch in state
            .watches
            .iter()
            .filter(|w| w.watched.matches(&change.key))
        {
            let frame = wire::encode(&Down::Change {
                sub: watch.sub,
                key: change.key.clone(),
                kind: change.kind,
                value: change.value.clone().map(Blob::from),
                revision: change.revision,
                dropped: watch.outlet.dropped(),
            });
            if watch.outlet.push(frame) == Pushed::Closed {
                closed = true;
            }
        }
    }
    if closed {
        state.watches.retain(|w| !w.outlet.is_closed());
    }
}

/// Expires keys on time, for as long as the store lives.
async fn expire_loop(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            lock(&shared.state).core.next_deadline()
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = woken => {}
                }
            }
            None => woken.await,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = lock(&shared.state);
        let mut changes = Vec::new();
        let watched = !state.watches.is_empty();
        state.core.set_recording(watched);
        state.core.expire_due(Instant::now(), &mut changes);
        notify(&mut state, &changes);
    }
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"PCSTORE1";

type SnapshotEntry = (String, Blob, Option<u64>);

fn snapshot_error(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Snapshot {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Loads a snapshot if the file exists; its values' format.
fn load_snapshot(path: &Path, core: &mut Core) -> Result<Option<Format>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(snapshot_error(path, e)),
    };
    let body = bytes
        .strip_prefix(&SNAPSHOT_MAGIC[..])
        .ok_or_else(|| snapshot_error(path, "not a procluster store snapshot"))?;
    let (&format, body) = body
        .split_first()
        .ok_or_else(|| snapshot_error(path, "the file is cut short"))?;
    let format = match format {
        1 => Format::Json,
        2 => Format::Binary,
        other => {
            return Err(snapshot_error(
                path,
                format!("unknown value format {other}"),
            ));
        }
    };
    let entries: Vec<SnapshotEntry> =
        postcard::from_bytes(body).map_err(|e| snapshot_error(path, e))?;
    let entries = entries
        .into_iter()
        .map(|(k, v, ms)| (k, Bytes::from(v.0), ms.map(Duration::from_millis)))
        .collect();
    core.load(entries, Instant::now())
        .map_err(|f| snapshot_error(path, StoreError::from(f)))?;
    Ok(Some(format))
}

/// Writes a snapshot beside its file, then moves it in place.
fn save_snapshot(
    path: &Path,
    format: Format,
    entries: Vec<(String, Bytes, Option<Duration>)>,
) -> Result<(), StoreError> {
    let entries: Vec<SnapshotEntry> = entries
        .into_iter()
        .map(|(k, v, left)| {
            let ms = left.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
            (k, Blob(v.to_vec()), ms)
        })
        .collect();
    let mut out = SNAPSHOT_MAGIC.to_vec();
    out.push(format as u8);
    out = postcard::to_extend(&entries, out).map_err(|e| snapshot_error(path, e))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, &out).map_err(|e| snapshot_error(path, e))?;
    std::fs::rename(&temporary, path).map_err(|e| snapshot_error(path, e))
}

/// The primary's own use of its store.
struct PrimaryBackend(Arc<Shared>);

impl Backend for PrimaryBackend {
    fn format(&self) -> Format {
        lock(&self.0.state).core.format()
    }

    fn call(&self, op: Op) -> BoxFuture<'_, Result<Outcome, StoreError>> {
        let outcome = self.0.apply(op).map_err(StoreError::from);
        Box::pin(async move { outcome })
    }

    fn watch(
        &self,
        watched: Watched,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), StoreError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sub = {
            let mut state = lock(&self.0.state);
            state.next_local += 1;
            state.next_local
        };
        let added = self
            .0
            .add_watch(None, sub, watched, limits, Sink::Local(tx))
            .map_err(StoreError::Full);
        Box::pin(async move { added.map(|()| (sub, rx)) })
    }

    fn credit(&self, sub: u64, n: u32) {
        self.0.credit(None, sub, n);
    }

    fn unwatch(&self, sub: u64) {
        self.0.remove_watch(None, sub);
    }
}
