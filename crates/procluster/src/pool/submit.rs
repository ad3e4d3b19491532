//! Submitting tasks, the same way from the primary and from a worker: one
//! task whose result is awaited, or a batch whose results come as a stream.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::dispatch::Core;
use super::error::PoolError;
use super::payload::{Payload, PayloadWriter};
use super::sink::{BatchItem, Outcome, Sink};
use super::worker_side::Side;
use crate::Format;

/// Where submissions go: the pool in this process (the primary), or the
/// primary's pool through this worker's channel.
#[derive(Clone)]
pub(super) enum Via {
    Primary(Arc<Core>),
    Worker(Arc<Side>),
}

impl Via {
    fn format(&self) -> Result<Format, PoolError> {
        match self {
            Via::Primary(core) => core.format(),
            Via::Worker(side) => Ok(side.format()),
        }
    }

    async fn submit(
        &self,
        payload: Payload,
        wait: bool,
        sink: Sink,
    ) -> Result<u64, (PoolError, Sink)> {
        match self {
            Via::Primary(core) => match core.upstream() {
                Some(upstream) => upstream.submit(payload, wait, sink).await,
                None => core.submit(payload, wait, sink).await,
            },
            Via::Worker(side) => side.submit(payload, wait, sink).await,
        }
    }

    fn cancel(&self, id: u64) {
        match self {
            Via::Primary(core) => match core.upstream() {
                Some(upstream) => upstream.cancel(id),
                None => core.cancel(id),
            },
            Via::Worker(side) => side.cancel(id),
        }
    }

    fn memfd_threshold(&self) -> Option<usize> {
        match self {
            // Bytes for Redis are better in memory than in a memory file.
            Via::Primary(core) if core.upstream().is_some() => None,
            Via::Primary(core) => core.memfd_threshold(),
            Via::Worker(side) => side.memfd_threshold(),
        }
    }

    fn encode<T: Serialize + ?Sized>(&self, task: &T) -> Result<(Format, Payload), PoolError> {
        let format = self.format()?;
        encode(format, self.memfd_threshold(), task)
            .map(|payload| (format, payload))
            .map_err(|e| PoolError::Codec(format!("cannot encode the task: {e}")))
    }

    /// Submits one task and waits for its result; dropping the future
    /// cancels the task.
    pub(super) async fn one<T, R>(&self, task: &T, wait: bool) -> Result<R, PoolError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let (format, payload) = self.encode(task)?;
        let (to, outcome) = oneshot::channel();
        let id = self
            .submit(payload, wait, Sink::One(to))
            .await
            .map_err(|(error, _)| error)?;
        let mut ticket = Ticket {
            via: self,
            id,
            armed: true,
        };
        let outcome = outcome
            .await
            .unwrap_or_else(|_| Err(PoolError::Closed("the pool is gone".into())));
        ticket.armed = false;
        decode(format, outcome)
    }
}

/// Encodes a task or a result, in a memory file from `threshold` bytes up.
pub(super) fn encode<T: Serialize + ?Sized>(
    format: Format,
    threshold: Option<usize>,
    value: &T,
) -> std::io::Result<Payload> {
    let mut writer = PayloadWriter::new(threshold);
    crate::message::encode_into(format, value, &mut writer)?;
    writer.finish()
}

fn decode<R: DeserializeOwned>(format: Format, outcome: Outcome) -> Result<R, PoolError> {
    let bytes = outcome?
        .bytes()
        .map_err(|e| PoolError::Codec(format!("cannot read the result's memory file: {e}")))?;
    super::shared::decoding(&bytes, |bytes| {
        crate::message::decode(format, bytes).map_err(|e| PoolError::Codec(e.to_string()))
    })
}

/// Cancels its task when dropped before the result came.
struct Ticket<'a> {
    via: &'a Via,
    id: u64,
    armed: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.via.cancel(self.id);
        }
    }
}

/// In which order a [`Batch`] yields its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// In the order the tasks were given (a slow task holds back the
    /// results after it).
    #[default]
    Submitted,
    /// As each task completes.
    Completed,
}

/// Results a batch may hold (running, queued or unread) at once; the
/// tasks after them are submitted as results are read.
pub const BATCH_WINDOW: usize = 1024;

/// The results of [`Pool::submit_all`](super::Pool::submit_all): a stream
/// (`futures::Stream`) of `Result<R, PoolError>`, one per task, also read
/// with [`Batch::next`]. Tasks are submitted as the queue has room and as
/// results are read (at most [`BATCH_WINDOW`] at a time), so a batch of any
/// length holds bounded memory. Dropping the batch cancels every task not
/// finished yet.
pub struct Batch<R> {
    via: Via,
    format: Result<Format, PoolError>,
    order: Order,
    items: mpsc::UnboundedReceiver<BatchItem>,
    /// Results that came before their turn (`Order::Submitted`).
    held: BTreeMap<usize, Outcome>,
    yielded: usize,
    total: Option<usize>,
    window: Arc<Semaphore>,
    /// Tasks submitted and not finished, by index, to cancel on drop
    /// (`None` while the submission is on its way).
    ids: Ids,
    feeder: tokio::task::JoinHandle<()>,
    _result: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for Batch<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("order", &self.order)
            .field("yielded", &self.yielded)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl<R: DeserializeOwned> Batch<R> {
    pub(super) fn start<T, I>(via: Via, tasks: I, order: Order) -> Self
    where
        T: Serialize + Send + 'static,
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        let (to, items) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(BATCH_WINDOW));
        let ids = Arc::new(Mutex::new(HashMap::new()));
        let feeder = tokio::spawn(feed(
            via.clone(),
            tasks.into_iter(),
            to,
            window.clone(),
            ids.clone(),
        ));
        Self {
            format: via.format(),
            via,
            order,
            items,
            held: BTreeMap::new(),
            yielded: 0,
            total: None,
            window,
            ids,
            feeder,
            _result: PhantomData,
        }
    }

    /// The next result; `None` once every task's result was yielded.
    ///
    /// # Cancel safety
    /// Cancel safe: a result is either returned or kept for the next call.
    pub async fn next(&mut self) -> Option<Result<R, PoolError>> {
        std::future::poll_fn(|cx| self.poll_result(cx)).await
    }

    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<R, PoolError>>> {
        loop {
            if self.order == Order::Submitted {
                if let Some(outcome) = self.held.remove(&self.yielded) {
                    return Poll::Ready(Some(self.yield_one(outcome)));
                }
            }
            if self.total == Some(self.yielded) {
                return Poll::Ready(None);
            }
            match self.items.poll_recv(cx) {
                Poll::Ready(Some(BatchItem::Result(index, outcome))) => {
                    crate::sync::lock(&self.ids).remove(&index);
                    match self.order {
                        Order::Completed => return Poll::Ready(Some(self.yield_one(outcome))),
                        Order::Submitted => {
                            self.held.insert(index, outcome);
                        }
                    }
                }
                Poll::Ready(Some(BatchItem::End(count))) => self.total = Some(count),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn yield_one(&mut self, outcome: Outcome) -> Result<R, PoolError> {
        self.yielded += 1;
        self.window.add_permits(1);
        decode(self.format.clone()?, outcome)
    }
}

impl<R: DeserializeOwned> futures_core::Stream for Batch<R> {
    type Item = Result<R, PoolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_result(cx)
    }
}

impl<R> Drop for Batch<R> {
    fn drop(&mut self) {
        self.feeder.abort();
        let ids: Vec<u64> = crate::sync::lock(&self.ids)
            .drain()
            .filter_map(|(_, id)| id)
            .collect();
        for id in ids {
            self.via.cancel(id);
        }
    }
}

/// A batch's submitted tasks by index.
type Ids = Arc<Mutex<HashMap<usize, Option<u64>>>>;

/// How many submissions a batch has on their way at once to a pool on
/// Redis (each is a round trip there; together they share them).
const UPSTREAM_SUBMITS: usize = 64;

/// Submits a batch's tasks in order, as the window and the queue allow.
async fn feed<T: Serialize>(
    via: Via,
    tasks: impl Iterator<Item = T>,
    to: mpsc::UnboundedSender<BatchItem>,
    window: Arc<Semaphore>,
    ids: Ids,
) {
    let in_flight = match &via {
        Via::Primary(core) if core.upstream().is_some() => UPSTREAM_SUBMITS,
        _ => 1,
    };
    let mut submitting = tokio::task::JoinSet::new();
    let mut count = 0;
    for task in tasks {
        let Ok(place) = window.acquire().await else {
            return;
        };
        place.forget();
        let index = count;
        count += 1;
        let payload = match via.encode(&task) {
            Ok((_, payload)) => payload,
            Err(error) => {
                let _ = to.send(BatchItem::Result(index, Err(error)));
                continue;
            }
        };
        let sink = Sink::Batch {
            to: to.clone(),
            index,
        };
        crate::sync::lock(&ids).insert(index, None);
        let submitted = {
            let (via, to, ids) = (via.clone(), to.clone(), ids.clone());
            async move {
                let submitted = via.submit(payload, true, sink).await;
                submitted_one(index, submitted, &to, &ids);
            }
        };
        if in_flight == 1 {
            submitted.await;
            continue;
        }
        submitting.spawn(submitted);
        while submitting.len() >= in_flight {
            let _ = submitting.join_next().await;
        }
        while submitting.try_join_next().is_some() {}
    }
    while submitting.join_next().await.is_some() {}
    let _ = to.send(BatchItem::End(count));
}

/// Records a batch's submission, or hands its error over as its result.
fn submitted_one(
    index: usize,
    submitted: Result<u64, (PoolError, Sink)>,
    to: &mpsc::UnboundedSender<BatchItem>,
    ids: &Ids,
) {
    match submitted {
        Ok(id) => {
            // Its result may have come already (and taken the index out).
            if let Some(slot) = crate::sync::lock(ids).get_mut(&index) {
                *slot = Some(id);
            }
        }
        Err((error, _)) => {
            crate::sync::lock(ids).remove(&index);
            let _ = to.send(BatchItem::Result(index, Err(error)));
        }
    }
}
