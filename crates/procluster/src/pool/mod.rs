//! Work pools: tasks submitted in the primary or in any worker, run by a
//! handler in the workers, with results awaited by the submitter, and no
//! task ever lost.
//!
//! A pool is a service of the cluster. The primary declares it and adds it
//! to the cluster; each worker registers a handler for it (typed task and
//! result, serde, in the cluster's format); anyone submits.
//!
//! ```no_run
//! use procluster::pool::{HandlerError, Pool, PoolConfig, WorkerPool};
//! use procluster::primary::Cluster;
//! use procluster::Role;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     match procluster::role()? {
//!         Role::Primary => {
//!             let pool: Pool<u64, u64> = Pool::new("square", PoolConfig::default());
//!             let mut cluster = Cluster::builder().workers(2).service(pool.clone()).build()?;
//!             cluster.start().await?;
//!             println!("7² = {}", pool.submit(7).await?);
//!         }
//!         Role::Worker(worker) => {
//!             let pool: WorkerPool<u64, u64> = WorkerPool::open(&worker, "square")?;
//!             pool.serve(|n, _cancel| async move { Ok::<_, HandlerError>(n * n) }).await?;
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # What the pool guarantees
//!
//! * **Acks late, no task lost.** A task belongs to the primary until its
//!   result arrives. If its worker dies (any exit, any signal) or runs past
//!   the pool's timeout (the worker, presumed hung, is recycled with
//!   SIGKILL), the task runs again on another worker, up to `max_attempts`
//!   times; then it fails with [`PoolError::Failed`], which says for each
//!   attempt what happened (exit code or signal, timeout, handler error). A
//!   handler's error is returned as is ([`PoolError::Handler`]) unless the
//!   handler marked it [retryable](HandlerError::retryable).
//! * **Exactly one outcome per submission.** A task may *run* more than
//!   once (a worker can die after doing the work and before its result
//!   arrives: that is at-least-once execution), but its submitter gets one
//!   outcome; results of abandoned attempts are dropped. Handlers whose work
//!   must not happen twice make it idempotent (see below).
//! * **Poison tasks.** A task that was running on a worker that died runs
//!   alone afterwards (no other task on its worker at the same time), so a
//!   second death can be laid at its door: the pool then tells the cluster
//!   ([`ServiceContext::blame_exit`](crate::primary::ServiceContext::blame_exit)),
//!   and a supervisor restarts the worker without counting the crash for its
//!   crash-loop breaker. A task that kills every worker it touches fails
//!   after its attempts; the other tasks and the cluster carry on.
//! * **Credit.** A worker runs at most `concurrency` tasks at once; the
//!   others wait in the primary's queue, which is bounded: `submit` waits
//!   for room, [`try_submit`](Pool::try_submit) fails at once.
//! * **Reloads and scaling.** A worker that disconnects (a rolling reload,
//!   scaling down, recycling) gets no new task and finishes those it runs
//!   before it exits ([`WorkerPool::serve`] returns once it is idle); a
//!   task that reaches it while it is leaving goes back to the queue. A new
//!   worker takes tasks as soon as its handler is registered.
//! * **Cancellation.** Dropping the future of `submit` (or a whole
//!   [`Batch`]) cancels the task: a queued task is removed, a running one's
//!   handler sees its [`CancelToken`] fire.
//!
//! What exactly-once *effects* would need: the pool cannot know whether a
//! worker that died had already done a task's side effects. For effects
//! that must happen once, give each task an id and have the handler record
//! "task id done" in the same transaction as its effect (a database's
//! unique key, Redis `SET NX`), skipping work already recorded. That is
//! the standard idempotency key; no queue can do it for the handler.
//!
//! # Limits
//!
//! Everything a worker or a submitter can make the primary hold is bounded:
//!
//! * tasks waiting for a worker: [`PoolConfig::queue`]; when full, `submit`
//!   waits and `try_submit` is refused (`stats().refused_full`). A task
//!   that runs again after a failed attempt goes back to the front even when
//!   the queue is full, so the queue can pass its bound by at most the
//!   number of tasks running;
//! * tasks running: [`PoolConfig::concurrency`] per worker;
//! * a worker's submissions in the primary (queued, running, or waiting for
//!   room with their bytes): [`MAX_WORKER_SUBMISSIONS`]; more are refused
//!   with [`PoolError::TooManySubmissions`] (`stats().refused_worker_limit`);
//! * a [`Batch`]: [`BATCH_WINDOW`] tasks submitted and not yet read;
//! * a pool frame from a worker that does not decode is dropped and logged;
//!   a result for a task the worker is not running is ignored.
//!
//! Counters for the telemetry are in [`Pool::stats`].
//!
//! # On Redis
//!
//! With the `redis` feature, [`Pool::redis`] puts the pool's queue in a
//! Redis stream read by a consumer group in which each primary is a
//! consumer, so primaries on several hosts share one pool. The worker side
//! and the API are the same; what differs:
//!
//! * A primary reads a task only when one of its workers has room for it,
//!   runs it exactly as a pool on the channel does (retries on a worker's
//!   death or timeout, `max_attempts`, poison tasks), and acks late: the
//!   result goes to the submitter and the entry is acked in one script,
//!   after the task finished.
//! * A primary killed or stalled while it holds tasks loses none: another
//!   primary takes them over once they were idle for
//!   [`PoolConfig::reclaim_after`] (each primary renews its own four times
//!   in that period), at most [`PoolConfig::max_reclaims`] times per task;
//!   then the task fails with [`PoolError::TooManyReclaims`].
//! * Tasks a primary read but none of its workers can take any more (all
//!   left) go back to the stream at once, with their failed attempts; they
//!   go to its end, so order between tasks is not kept.
//! * The queue's bound is the stream's length less the entries being run:
//!   `submit` waits (polling every 50 ms, sooner when results come) and
//!   `try_submit` fails with [`PoolError::Full`].
//! * Execution is at-least-once (a task taken over from a stalled primary
//!   may have run there too); each submitter still gets one outcome per
//!   submission. The queue's durability is Redis's persistence settings.
//! * [`Pool::stats`] counts what this primary's workers ran (`done`,
//!   `failed`, `retried`...) and what this process submitted (`submitted`,
//!   `cancelled`, `refused_full`, `latency`); `queued` is what waits in Redis
//!   for any primary, as read at most 50 ms ago.
//! * Every primary of a pool must speak the same format; a task in another
//!   one fails with [`PoolError::Codec`].
//! * Cancelling removes a task nobody read yet and fires the token of a
//!   running one (through `PUBLISH`). A submit future dropped while its
//!   entry is being added, or a task cancelled after a primary gave it
//!   back, still runs; its result is dropped.

mod cancel;
mod config;
mod dispatch;
mod error;
mod payload;
#[cfg(feature = "redis")]
mod redis;
mod shared;
mod sink;
mod stats;
mod submit;
mod wire;
mod worker_side;

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use cancel::CancelToken;
pub use config::{DEFAULT_MEMFD_THRESHOLD, PoolConfig};
pub use dispatch::MAX_WORKER_SUBMISSIONS;
pub use error::{Attempt, AttemptFailure, HandlerError, PoolError};
pub use shared::SharedBytes;
pub use stats::{LATENCY_BUCKETS, Latency, PoolStats};
pub use submit::{BATCH_WINDOW, Batch, Order};

use crate::message::ServiceFrame;
use crate::primary::{Service, ServiceContext, WorkerHandle};
use crate::worker::Worker;
use crate::{Error, ExitStatus};
use dispatch::Core;
use submit::Via;
use worker_side::Side;

/// A pool in the primary: add it to the cluster with
/// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service),
/// then submit tasks of type `T` and await results of type `R`. Cheap to
/// clone; every clone is the same pool.
pub struct Pool<T, R> {
    core: Arc<Core>,
    _types: PhantomData<fn(T) -> R>,
}

impl<T, R> Clone for Pool<T, R> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            _types: PhantomData,
        }
    }
}

impl<T, R> std::fmt::Debug for Pool<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.core.name)
            .finish_non_exhaustive()
    }
}

impl<T, R> Pool<T, R>
where
    T: Serialize + Send + 'static,
    R: DeserializeOwned + Send + 'static,
{
    /// A pool named `name` (workers open it by this name).
    pub fn new(name: impl Into<String>, config: PoolConfig) -> Self {
        Self {
            core: Core::new(name.into(), config),
            _types: PhantomData,
        }
    }

    /// A pool whose queue is in the Redis server at `url`
    /// (`redis://HOST:PORT`, `redis+unix:///path/to/socket`), shared by every
    /// primary that opens a pool of the same name there: tasks submitted on
    /// any host run on the workers of any of them, with the guarantees of a
    /// pool on the channel (late acks, retries, timeouts, attempts), and a
    /// primary that dies or stalls while it holds tasks loses none: another
    /// one takes them over after [`PoolConfig::reclaim_after`]. Add it to the
    /// cluster as [`Pool::new`]'s; the workers' side is the same. Needs the
    /// `redis` feature. See [the Redis backend](crate::pool#on-redis).
    ///
    /// # Errors
    /// [`PoolError::Backend`] when the server cannot be reached.
    #[cfg(feature = "redis")]
    pub async fn redis(
        name: impl Into<String>,
        config: PoolConfig,
        url: &str,
    ) -> Result<Self, PoolError> {
        Self::redis_prefixed(name, config, url, "procluster").await
    }

    /// [`Pool::redis`] with a prefix of its own for key names in Redis
    /// (`procluster` by default).
    ///
    /// # Errors
    /// As [`Pool::redis`].
    #[cfg(feature = "redis")]
    pub async fn redis_prefixed(
        name: impl Into<String>,
        config: PoolConfig,
        url: &str,
        prefix: &str,
    ) -> Result<Self, PoolError> {
        let core = Core::new(name.into(), config);
        let upstream = redis::RedisPool::connect(&core, url, prefix).await?;
        core.set_upstream(upstream);
        Ok(Self {
            core,
            _types: PhantomData,
        })
    }

    /// Submits a task and waits for its result, first for room in the queue
    /// when it is full.
    ///
    /// # Errors
    /// [`PoolError::Handler`], [`PoolError::Failed`] (every attempt failed,
    /// each with its reason), [`PoolError::Codec`] (a type that does not
    /// encode or decode), [`PoolError::Closed`] (the pool is in no cluster).
    ///
    /// # Cancel safety
    /// Dropping the future cancels the task: removed from the queue, or its
    /// handler's [`CancelToken`] fires.
    pub async fn submit(&self, task: T) -> Result<R, PoolError> {
        Via::Primary(self.core.clone()).one(&task, true).await
    }

    /// As [`Pool::submit`], but fails at once with [`PoolError::Full`] when
    /// the queue is full instead of waiting for room.
    ///
    /// # Errors
    /// As [`Pool::submit`], and [`PoolError::Full`].
    pub async fn try_submit(&self, task: T) -> Result<R, PoolError> {
        Via::Primary(self.core.clone()).one(&task, false).await
    }

    /// Submits every task of `tasks` (lazily, as room allows) and returns
    /// their results as a stream, in `order`.
    ///
    /// ```no_run
    /// # async fn f(pool: procluster::pool::Pool<u64, u64>) {
    /// use procluster::pool::Order;
    /// let mut results = pool.submit_all(0..1000, Order::Completed);
    /// while let Some(result) = results.next().await {
    ///     println!("{result:?}");
    /// }
    /// # }
    /// ```
    pub fn submit_all<I>(&self, tasks: I, order: Order) -> Batch<R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        Batch::start(Via::Primary(self.core.clone()), tasks, order)
    }

    /// The pool's counters now.
    pub fn stats(&self) -> PoolStats {
        self.core.stats()
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }
}

impl<T: 'static, R: 'static> Service for Pool<T, R> {
    fn name(&self) -> String {
        self.core.name.clone()
    }

    fn attach(&self, context: ServiceContext) {
        self.core.attach(context);
    }

    fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
        self.core.on_frame(from, frame);
    }

    fn on_worker_gone(&self, worker: &WorkerHandle, exit: Option<ExitStatus>) {
        self.core.on_worker_gone(worker, exit);
    }
}

/// A pool seen from a worker: register the handler that runs its tasks
/// with [`WorkerPool::serve`], and submit tasks to it as the primary can
/// (they run on any worker, this one included). Cheap to clone.
pub struct WorkerPool<T, R> {
    side: Arc<Side>,
    _types: PhantomData<fn(T) -> R>,
}

impl<T, R> Clone for WorkerPool<T, R> {
    fn clone(&self) -> Self {
        Self {
            side: self.side.clone(),
            _types: PhantomData,
        }
    }
}

impl<T, R> std::fmt::Debug for WorkerPool<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").finish_non_exhaustive()
    }
}

impl<T, R> WorkerPool<T, R>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    /// This worker's side of pool `name`.
    ///
    /// # Errors
    /// [`Error::Settings`] when the primary has no service of that name.
    pub fn open(worker: &Worker, name: &str) -> Result<Self, Error> {
        let side = worker.service(name, |port| Side::new(name, port, worker.clone()))?;
        side.start();
        Ok(Self {
            side,
            _types: PhantomData,
        })
    }

    /// Runs the pool's tasks with `handler` (several at once when the pool's
    /// `concurrency` says so, each in a task of its own) until this worker
    /// leaves the cluster and the tasks it runs are done: await it before
    /// the worker's `main` returns. The handler gets each task with a
    /// [`CancelToken`] that fires when nobody waits for its result any more.
    ///
    /// A task that does not decode as `T` is answered with a handler error;
    /// a handler that panics counts as a handler error too.
    ///
    /// # Errors
    /// [`PoolError::Closed`] when this worker already serves the pool or is
    /// cut off from its primary.
    pub async fn serve<F, Fut>(&self, handler: F) -> Result<(), PoolError>
    where
        F: Fn(T, CancelToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        let format = self.side.format();
        let handler = Arc::new(handler);
        let erased: worker_side::Handler = Arc::new(move |payload: Bytes, cancel, threshold| {
            let handler = handler.clone();
            Box::pin(async move {
                let task: T = shared::decoding(&payload, |bytes| {
                    crate::message::decode(format, bytes)
                        .map_err(|e| HandlerError::new(format!("the task does not decode: {e}")))
                })?;
                // The task's bytes go now, unless the task holds a view of them
                // (`SharedBytes`).
                drop(payload);
                let result = handler(task, cancel).await?;
                submit::encode(format, threshold, &result)
                    .map_err(|e| HandlerError::new(format!("cannot encode the result: {e}")))
            })
        });
        self.side.serve(erased).await
    }

    /// Submits a task from this worker and waits for its result; see
    /// [`Pool::submit`].
    ///
    /// # Errors
    /// As [`Pool::submit`], and [`PoolError::TooManySubmissions`].
    ///
    /// # Cancel safety
    /// Dropping the future cancels the task.
    pub async fn submit(&self, task: T) -> Result<R, PoolError> {
        Via::Worker(self.side.clone()).one(&task, true).await
    }

    /// Submits a task from this worker, failing at once with
    /// [`PoolError::Full`] when the pool's queue is full; see
    /// [`Pool::try_submit`].
    ///
    /// # Errors
    /// As [`Pool::try_submit`].
    pub async fn try_submit(&self, task: T) -> Result<R, PoolError> {
        Via::Worker(self.side.clone()).one(&task, false).await
    }

    /// Submits a batch from this worker; see [`Pool::submit_all`].
    pub fn submit_all<I>(&self, tasks: I, order: Order) -> Batch<R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        Batch::start(Via::Worker(self.side.clone()), tasks, order)
    }
}
