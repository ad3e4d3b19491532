//! The cluster's shared store: a key–value store held by the primary and
//! reached from every worker (or held by Redis and shared by several
//! primaries), with one API.
//!
//! Values are any serde type, stored in the cluster's format. Every
//! operation goes through the primary one at a time, so the store is
//! linearizable on one host: an increment from four workers at once counts
//! every one, a compare-and-swap sees the latest value. It lives in the
//! primary, so it outlives any worker; it has limits on keys and bytes
//! ([`StoreConfig`]) with a clear error when one is reached, and can be
//! saved to a file and loaded again ([`StoreConfig::snapshot`]).
//!
//! A worker may have many operations in flight at once (spawn them, or join
//! their futures): they travel in the same channel batches, which is how a
//! worker reaches high rates without waiting for each answer.
//!
//! ```no_run
//! use procluster::store::Store;
//! use procluster::{Role, primary::Cluster};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! match procluster::role()? {
//!     Role::Primary => {
//!         let store = Store::local();
//!         let mut cluster = Cluster::builder().workers(4).service(store.service()).build()?;
//!         cluster.start().await?;
//!         while cluster.next_event().await.is_some() {}
//!     }
//!     Role::Worker(worker) => {
//!         let store = Store::open(&worker).await?;
//!         let hits = store.incr("hits", 1).await?;
//!         store.set_ttl("session.42", &"alice", Duration::from_secs(60)).await?;
//!         let name: Option<String> = store.get("session.42").await?;
//!         let mut changes = store.watch_prefix("session.").await?;
//!         while let Some(change) = changes.next().await {
//!             println!("{} is now {:?} ({hits} hits)", change.key(), change.kind());
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```

mod client;
mod core;
#[cfg(feature = "redis")]
mod redis;
mod service;
pub(crate) mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

pub use crate::fanout::{Limits, Overflow};
pub use service::{StoreService, StoreStats};
pub use wire::ChangeKind;

use crate::Error;
use crate::fanout::Credit;
use crate::message::DecodeError;
use crate::protocol::Format;
use wire::{Blob, Down, Op, Outcome, Watched};

/// The name of the store's service in the cluster.
pub const SERVICE_NAME: &str = "store";

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An increment of a key whose value is not an integer.
    #[error("cannot increment {key:?}: its value is not an integer")]
    NotANumber {
        /// The key.
        key: String,
    },
    /// An increment past the range of `i64`.
    #[error("cannot increment {key:?}: the result would overflow an i64")]
    Overflow {
        /// The key.
        key: String,
    },
    /// A limit of the store was reached; the text says which.
    #[error("the store is full: {0}")]
    Full(String),
    /// A key or value the store does not take (empty or too long key).
    #[error("invalid store operation: {0}")]
    Invalid(String),
    /// The store is gone: this worker is cut off from its primary, or the
    /// backend's connection failed for good.
    #[error("the store is closed")]
    Closed,
    /// A value did not encode.
    #[error("cannot encode a store value: {0}")]
    Encode(std::io::Error),
    /// A stored value did not decode as the type asked for.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame of the store did not decode.
    #[error("store protocol error: {0}")]
    Protocol(String),
    /// A snapshot could not be read or written.
    #[error("store snapshot {path}: {why}")]
    Snapshot {
        /// The snapshot's file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The cluster failed (no store service in the primary, a channel
    /// error).
    #[error(transparent)]
    Cluster(#[from] Error),
    /// The backend failed (Redis); the text says how.
    #[error("store backend error: {0}")]
    Backend(String),
}

/// Limits and persistence of the primary's store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Keys held at most (default one million).
    pub max_keys: usize,
    /// Bytes of keys and values held at most (default 256 MiB).
    pub max_bytes: usize,
    /// Longest key in bytes (default 1024).
    pub max_key: usize,
    /// Largest value in bytes (default 16 MiB).
    pub max_value: usize,
    /// Watches one worker (or the primary) may hold at once.
    pub watches_per_worker: usize,
    /// Bytes the queues of one worker's (or the primary's) watches may hold
    /// together: each watch reserves its [`Limits::max_bytes`], and one
    /// past the budget is refused.
    pub watch_bytes_per_worker: u64,
    /// The largest queue a watch may ask for in the primary.
    pub most: Limits,
    /// A file the store is loaded from when it is made (if the file exists)
    /// and saved to by [`Store::save_snapshot`] and when the store is
    /// dropped.
    pub snapshot: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
            max_key: 1024,
            max_value: 16 * 1024 * 1024,
            watches_per_worker: 1024,
            watch_bytes_per_worker: 1 << 30,
            most: Limits {
                capacity: 1 << 20,
                max_bytes: 256 * 1024 * 1024,
                overflow: Overflow::DropOldest,
            },
            snapshot: None,
        }
    }
}

/// The operations every backend provides, on encoded values.
pub(crate) trait Backend: Send + Sync + 'static {
    fn format(&self) -> Format;
    fn call(&self, op: Op) -> BoxFuture<'_, Result<Outcome, StoreError>>;
    /// A new watch: its id and where its frames ([`Down::Change`],
    /// [`Down::Closed`]) arrive.
    fn watch(
        &self,
        watched: Watched,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), StoreError>>;
    fn credit(&self, sub: u64, n: u32);
    fn unwatch(&self, sub: u64);
}

/// A handle on the cluster's store, in the primary or in a worker. Cheap to
/// clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    service: Option<StoreService>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("primary", &self.service.is_some())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store held by this primary. Add [`Store::service`] to the cluster.
    pub fn local() -> Self {
        // Without a snapshot file nothing can fail.
        Self::local_with(StoreConfig::default()).unwrap_or_else(|_| unreachable!())
    }

    /// A store held by this primary with limits of its own, loaded from its
    /// snapshot file if that exists.
    ///
    /// # Errors
    /// [`StoreError::Snapshot`] when the snapshot exists but cannot be read
    /// or does not fit the limits.
    pub fn local_with(config: StoreConfig) -> Result<Self, StoreError> {
        let service = StoreService::new(config, wire::Backend::Local)?;
        Ok(Self {
            backend: service.primary_backend(),
            service: Some(service),
        })
    }

    /// A store held by the Redis server at `url` (`redis://HOST:PORT`,
    /// `redis+unix:///path/to/socket`), shared by every primary that names
    /// it with the same `prefix` of key names, and their workers. Call it in
    /// the primary and add [`Store::service`] to the cluster.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the server cannot be reached.
    #[cfg(feature = "redis")]
    pub async fn redis(url: &str) -> Result<Self, StoreError> {
        Self::redis_prefixed(url, "procluster").await
    }

    /// [`Store::redis`] with a prefix of its own for key names in Redis
    /// (`procluster` by default).
    ///
    /// # Errors
    /// As [`Store::redis`].
    #[cfg(feature = "redis")]
    pub async fn redis_prefixed(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let backend = wire::Backend::Redis {
            url: url.to_string(),
            prefix: prefix.to_string(),
        };
        let service = StoreService::new(StoreConfig::default(), backend)?;
        let redis =
            redis::RedisStore::connect_primary(url, prefix.to_string(), service.clone()).await?;
        Ok(Self {
            backend: Arc::new(redis),
            service: Some(service),
        })
    }

    /// The primary's side of the store, to add to the cluster with
    /// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service).
    ///
    /// # Panics
    /// On a worker's handle (it has no primary side).
    pub fn service(&self) -> StoreService {
        self.service
            .clone()
            .expect("Store::service is for the primary's handle (Store::local or Store::redis)")
    }

    /// The store in a worker: the backend its primary chose.
    ///
    /// # Errors
    /// [`StoreError::Cluster`] when the primary has no store service,
    /// [`StoreError::Closed`] when the primary is gone,
    /// [`StoreError::Backend`] when the backend cannot be reached.
    pub async fn open(worker: &crate::worker::Worker) -> Result<Self, StoreError> {
        let client = worker.service(SERVICE_NAME, client::Client::start)?;
        match client.welcome().await? {
            wire::Backend::Local => Ok(Self {
                backend: client,
                service: None,
            }),
            #[cfg(feature = "redis")]
            wire::Backend::Redis { url, prefix } => Ok(Self {
                backend: Arc::new(redis::RedisStore::connect(&url, prefix, client.format()).await?),
                service: None,
            }),
            #[cfg(not(feature = "redis"))]
            wire::Backend::Redis { .. } => Err(StoreError::Backend(
                "the primary's store uses Redis, but this program was built without \
                 procluster's `redis` feature"
                    .into(),
            )),
        }
    }

    /// The value of `key`, if it has one.
    ///
    /// # Errors
    /// [`StoreError::Decode`] when the value is not a `T`; [`StoreError::Closed`]
    /// once the store is gone.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.call(Op::Get { key: key.into() }).await? {
            Outcome::Value(value) => value.map(|v| self.decode(&v.0)).transpose(),
            other => Err(unexpected(&other)),
        }
    }

    /// The value of `key`, encoded in the cluster's format.
    ///
    /// # Errors
    /// As [`Store::get`].
    pub async fn get_raw(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.call(Op::Get { key: key.into() }).await? {
            Outcome::Value(value) => Ok(value.map(Bytes::from)),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `value`, with no time to live.
    ///
    /// # Errors
    /// [`StoreError::Full`] when a limit would be passed (nothing changes).
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.set_with(key, value, None).await
    }

    /// Sets `key` to `value` for `ttl`; then it expires (watches see
    /// [`ChangeKind::Expired`]).
    ///
    /// # Errors
    /// As [`Store::set`].
    pub async fn set_ttl<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.set_with(key, value, Some(ttl)).await
    }

    /// Sets `key` to `value` with an optional time to live.
    ///
    /// # Errors
    /// As [`Store::set`].
    pub async fn set_with<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let op = Op::Set {
            key: key.into(),
            value: self.encode(value)?,
            ttl_ms: ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        };
        match self.call(op).await? {
            Outcome::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes `key`; whether it existed.
    ///
    /// # Errors
    /// [`StoreError::Closed`] once the store is gone.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        match self.call(Op::Delete { key: key.into() }).await? {
            Outcome::Deleted(existed) => Ok(existed),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds `by` to the integer at `key` (a missing key counts as 0) and
    /// returns the new value, atomically. A time to live the key had stays.
    ///
    /// # Errors
    /// [`StoreError::NotANumber`], [`StoreError::Overflow`].
    pub async fn incr(&self, key: &str, by: i64) -> Result<i64, StoreError> {
        match self
            .call(Op::Incr {
                key: key.into(),
                by,
            })
            .await?
        {
            Outcome::Number(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `new` (deletes it for `None`) only if its value is
    /// `expected` now (missing for `None`), atomically; whether it did.
    /// Values are compared in their encoded form.
    ///
    /// # Errors
    /// As [`Store::set`].
    pub async fn compare_and_swap<T: Serialize + ?Sized>(
        &self,
        key: &str,
        expected: Option<&T>,
        new: Option<&T>,
    ) -> Result<bool, StoreError> {
        let op = Op::Cas {
            key: key.into(),
            expected: expected.map(|v| self.encode(v)).transpose()?,
            new: new.map(|v| self.encode(v)).transpose()?,
        };
        match self.call(op).await? {
            Outcome::Swapped(swapped) => Ok(swapped),
            other => Err(unexpected(&other)),
        }
    }

    /// The value of `key`, inserting `value` first if it has none,
    /// atomically.
    ///
    /// # Errors
    /// As [`Store::set`] and [`Store::get`].
    pub async fn get_or_insert<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<T, StoreError> {
        let op = Op::GetOrInsert {
            key: key.into(),
            value: self.encode(value)?,
        };
        match self.call(op).await? {
            Outcome::Value(Some(current)) => self.decode(&current.0),
            other => Err(unexpected(&other)),
        }
    }

    /// The changes of one key from now on, in the order they happened.
    ///
    /// # Errors
    /// [`StoreError::Full`] when the limit of watches is reached.
    pub async fn watch(&self, key: &str) -> Result<Watch, StoreError> {
        self.watch_with(Watched::Key(key.into()), Limits::default())
            .await
    }

    /// The changes of every key that starts with `prefix`, in order.
    ///
    /// # Errors
    /// As [`Store::watch`].
    pub async fn watch_prefix(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.watch_with(Watched::Prefix(prefix.into()), Limits::default())
            .await
    }

    /// [`Store::watch_prefix`] with limits of its own on the watch's queue
    /// in the primary.
    ///
    /// # Errors
    /// As [`Store::watch`].
    pub async fn watch_prefix_with(
        &self,
        prefix: &str,
        limits: Limits,
    ) -> Result<Watch, StoreError> {
        self.watch_with(Watched::Prefix(prefix.into()), limits)
            .await
    }

    async fn watch_with(&self, watched: Watched, limits: Limits) -> Result<Watch, StoreError> {
        let (sub, frames) = self.backend.watch(watched, limits).await?;
        Ok(Watch {
            sub,
            frames,
            credit: Credit::default(),
            backend: self.backend.clone(),
            dropped: 0,
            overflowed: false,
        })
    }

    /// Counters of the primary's local store (`None` in a worker and on
    /// Redis).
    pub fn stats(&self) -> Option<StoreStats> {
        self.service
            .as_ref()
            .filter(|s| s.is_local())
            .map(StoreService::stats)
    }

    /// Writes the store to its snapshot file now (the primary's handle, with
    /// [`StoreConfig::snapshot`] set; otherwise nothing to do).
    ///
    /// # Errors
    /// [`StoreError::Snapshot`] when the file cannot be written.
    pub fn save_snapshot(&self) -> Result<(), StoreError> {
        match &self.service {
            Some(service) => service.save_snapshot(),
            None => Ok(()),
        }
    }

    /// The cluster's format for values.
    pub fn format(&self) -> Format {
        self.backend.format()
    }

    async fn call(&self, op: Op) -> Result<Outcome, StoreError> {
        self.backend.call(op).await
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Blob, StoreError> {
        let mut out = Vec::new();
        crate::message::encode_into(self.backend.format(), value, &mut out)
            .map_err(StoreError::Encode)?;
        Ok(Blob(out))
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, StoreError> {
        Ok(crate::message::decode(self.backend.format(), bytes)?)
    }
}

fn unexpected(outcome: &Outcome) -> StoreError {
    StoreError::Protocol(format!("unexpected outcome {outcome:?}"))
}

/// One change of a watched key.
#[derive(Debug, Clone)]
pub struct Change {
    key: String,
    kind: ChangeKind,
    value: Option<Bytes>,
    revision: u64,
    format: Format,
}

impl Change {
    /// The key that changed.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What happened to it.
    pub fn kind(&self) -> ChangeKind {
        self.kind
    }

    /// The store's revision after this change (one more per change of any
    /// key on the local backend; on Redis, the change stream's order).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The new value, for [`ChangeKind::Set`].
    ///
    /// # Errors
    /// When the value is not a `T`.
    pub fn value<T: DeserializeOwned>(&self) -> Result<Option<T>, DecodeError> {
        self.value
            .as_ref()
            .map(|v| crate::message::decode(self.format, v))
            .transpose()
    }
}

/// The changes of a key or a prefix, in order. Dropping it stops watching.
pub struct Watch {
    sub: u64,
    frames: mpsc::UnboundedReceiver<Bytes>,
    credit: Credit,
    backend: Arc<dyn Backend>,
    dropped: u64,
    overflowed: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// The next change; `None` once the watch has ended (the store closed,
    /// or it overflowed under [`Overflow::Disconnect`]).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            let frame = self.frames.recv().await?;
            match wire::decode::<Down>(&frame) {
                Ok(Down::Change {
                    key,
                    kind,
                    value,
                    revision,
                    dropped,
                    ..
                }) => {
                    self.dropped = self.dropped.max(dropped);
                    if let Some(n) = self.credit.read_one() {
                        self.backend.credit(self.sub, n);
                    }
                    return Some(Change {
                        key,
                        kind,
                        value: value.map(Bytes::from),
                        revision,
                        format: self.backend.format(),
                    });
                }
                Ok(Down::Closed { .. }) => {
                    self.overflowed = true;
                    self.frames.close();
                }
                _ => {}
            }
        }
    }

    /// Changes this watch lost to [`Overflow::DropOldest`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether it ended because its queue overflowed under
    /// [`Overflow::Disconnect`].
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.backend.unwatch(self.sub);
    }
}
