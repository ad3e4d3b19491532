//! The cluster bus: publish/subscribe, request/reply and broadcast between
//! workers and the primary, over the cluster's channels on one host or over
//! Redis across hosts, with one API.
//!
//! Topics are NATS-style subjects: dot-separated tokens (`chat.room1`). A
//! subscription takes an exact topic or a pattern where `*` stands for one
//! token (`chat.*`) and a final `>` for one or more (`chat.>`). Every
//! current subscriber gets each message once, in the order each publisher
//! published; a message says who sent it (the primary or a worker id, set
//! by the primary from the channel it came on, so a worker cannot pass for
//! another). A message published on a topic that every worker subscribes
//! to is a broadcast.
//!
//! ```no_run
//! use procluster::bus::Bus;
//! use procluster::{Role, primary::Cluster};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! match procluster::role()? {
//!     Role::Primary => {
//!         let bus = Bus::local();
//!         let mut cluster = Cluster::builder().workers(4).service(bus.service()).build()?;
//!         cluster.start().await?;
//!         bus.publish("news", &"the primary is up").await?;
//!         while cluster.next_event().await.is_some() {}
//!     }
//!     Role::Worker(worker) => {
//!         let bus = Bus::open(&worker).await?;
//!         let mut news = bus.subscribe("news").await?;
//!         bus.publish("chat.lobby", &format!("worker {} joined", worker.id())).await?;
//!         while let Some(message) = news.next().await {
//!             let text: String = message.decode()?;
//!             println!("{} says {text}", message.sender());
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Slow subscribers
//!
//! Each subscription has a queue in the primary bounded in messages and
//! bytes ([`Limits`]), and its worker's side holds at most 1024 unread
//! messages (credit flows back as the application reads). When the queue
//! is full, the subscription's [`Overflow`] policy applies: drop the oldest
//! message and count it ([`Subscription::dropped`]), or end the
//! subscription ([`Subscription::overflowed`]). A publisher never waits for
//! a subscriber, and subscribers never wait for each other.
//!
//! # Backends
//!
//! [`Bus::local`] routes through the primary. With the `redis` feature,
//! `Bus::redis(url)` routes through a Redis server that several primaries
//! (hosts) may share; workers are told by their primary, so worker code is
//! the same. The differences are in the README's "Bus and store" section.

mod client;
pub(crate) mod pattern;
#[cfg(feature = "redis")]
mod redis;
mod router;
pub(crate) mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use crate::fanout::{Limits, Overflow};
pub use router::{BusService, BusStats};

use crate::fanout::Credit;
use crate::message::DecodeError;
use crate::protocol::Format;
use crate::{Error, WorkerId};
use pattern::Pattern;
use wire::{Down, ReplyTo};

/// How long [`Bus::request`] waits for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The name of the bus's service in the cluster.
pub const SERVICE_NAME: &str = "bus";

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Sender {
    /// The primary.
    Primary,
    /// A worker, by id.
    Worker(WorkerId),
}

impl std::fmt::Display for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Primary => f.write_str("the primary"),
            Self::Worker(id) => write!(f, "worker {id}"),
        }
    }
}

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A topic or pattern is not well formed.
    #[error("bad topic {topic:?}: {why}")]
    BadTopic {
        /// The topic (cut at 80 characters).
        topic: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A request's topic had no subscriber when it was published.
    #[error("no responder for a request on {topic:?}: nothing subscribes to it")]
    NoResponders {
        /// The request's topic.
        topic: String,
    },
    /// No reply came in time.
    #[error("no reply to a request on {topic:?} within {after:?}")]
    Timeout {
        /// The request's topic.
        topic: String,
        /// How long it waited.
        after: Duration,
    },
    /// The primary refused: a limit of the bus was reached.
    #[error("the bus refused: {0}")]
    Refused(String),
    /// The bus is gone: this worker is cut off from its primary, or the
    /// backend's connection failed for good.
    #[error("the bus is closed")]
    Closed,
    /// A value did not encode.
    #[error("cannot encode a bus message: {0}")]
    Encode(std::io::Error),
    /// A frame of the bus did not decode.
    #[error("bus protocol error: {0}")]
    Protocol(String),
    /// The cluster failed (no bus service in the primary, a channel error).
    #[error(transparent)]
    Cluster(#[from] Error),
    /// The backend failed (Redis); the text says how.
    #[error("bus backend error: {0}")]
    Backend(String),
}

/// The operations every backend provides, on encoded bodies.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The cluster's format for user values.
    fn format(&self) -> Format;
    fn publish(&self, topic: String, body: Bytes) -> BoxFuture<'_, Result<(), BusError>>;
    /// A new subscription: its id and where its frames ([`Down::Deliver`],
    /// [`Down::Closed`]) arrive.
    fn subscribe(
        &self,
        pattern: Pattern,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), BusError>>;
    /// The reply's frame ([`Down::Reply`]).
    fn request(
        &self,
        topic: String,
        body: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BusError>>;
    fn respond(&self, to: ReplyTo, body: Bytes) -> BoxFuture<'_, Result<(), BusError>>;
    /// The application read `n` more messages of subscription `sub`.
    fn credit(&self, sub: u64, n: u32);
    /// The subscription was dropped.
    fn unsubscribe(&self, sub: u64);
}

/// A handle on the cluster bus, in the primary or in a worker. Cheap to
/// clone.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<dyn Backend>,
    /// The primary's side, when this handle is the primary's.
    service: Option<BusService>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("primary", &self.service.is_some())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// The bus of this host's cluster, routed by the primary over the
    /// channels. Call it in the primary and add [`Bus::service`] to the
    /// cluster.
    pub fn local() -> Self {
        Self::local_with(BusConfig::default())
    }

    /// [`Bus::local`] with limits of its own.
    pub fn local_with(config: BusConfig) -> Self {
        let service = BusService::new(config, wire::Backend::Local);
        Self {
            backend: service.primary_backend(),
            service: Some(service),
        }
    }

    /// A bus shared through the Redis server at `url` (`redis://HOST:PORT`,
    /// `redis+unix:///path/to/socket`) by every primary that names it, and
    /// their workers. Call it in the primary and add [`Bus::service`] to
    /// the cluster: workers learn from it where to connect.
    ///
    /// # Errors
    /// [`BusError::Backend`] when the server cannot be reached.
    #[cfg(feature = "redis")]
    pub async fn redis(url: &str) -> Result<Self, BusError> {
        Self::redis_with(url, RedisOptions::default()).await
    }

    /// [`Bus::redis`] with options of its own.
    ///
    /// # Errors
    /// As [`Bus::redis`].
    #[cfg(feature = "redis")]
    pub async fn redis_with(url: &str, options: RedisOptions) -> Result<Self, BusError> {
        let host = options.host.clone().unwrap_or_else(redis::default_host);
        let options = RedisOptions {
            host: Some(host.clone()),
            ..options
        };
        let backend = wire::Backend::Redis {
            url: url.to_string(),
            prefix: options.prefix.clone(),
            host,
        };
        let service = BusService::new(BusConfig::default(), backend);
        // The primary's own format is known once the cluster is built; the
        // backend asks the service for it.
        let redis = redis::RedisBus::connect_primary(url, options, service.clone()).await?;
        Ok(Self {
            backend: redis,
            service: Some(service),
        })
    }

    /// The primary's side of the bus, to add to the cluster with
    /// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service).
    ///
    /// # Panics
    /// On a worker's handle (it has no primary side).
    pub fn service(&self) -> BusService {
        self.service
            .clone()
            .expect("Bus::service is for the primary's handle (Bus::local or Bus::redis)")
    }

    /// The bus in a worker: the backend its primary chose.
    ///
    /// # Errors
    /// [`BusError::Cluster`] when the primary has no bus service,
    /// [`BusError::Closed`] when the primary is gone, [`BusError::Backend`]
    /// when the backend cannot be reached.
    pub async fn open(worker: &crate::worker::Worker) -> Result<Self, BusError> {
        let client = worker.service(SERVICE_NAME, client::Client::start)?;
        match client.welcome().await? {
            wire::Backend::Local => Ok(Self {
                backend: client,
                service: None,
            }),
            #[cfg(feature = "redis")]
            wire::Backend::Redis { url, prefix, host } => Ok(Self {
                backend: redis::RedisBus::connect(
                    &url,
                    RedisOptions {
                        prefix,
                        host: Some(host),
                    },
                    client.format(),
                    Sender::Worker(worker.id()),
                )
                .await?,
                service: None,
            }),
            #[cfg(not(feature = "redis"))]
            wire::Backend::Redis { .. } => Err(BusError::Backend(
                "the primary's bus uses Redis, but this program was built without \
                 procluster's `redis` feature"
                    .into(),
            )),
        }
    }

    /// Publishes `value` on `topic` to every current subscriber.
    ///
    /// # Errors
    /// [`BusError::BadTopic`], [`BusError::Encode`], and
    /// [`BusError::Closed`] once the bus is gone.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<(), BusError> {
        pattern::check_topic(topic)?;
        let body = self.encode(value)?;
        self.backend.publish(topic.to_string(), body).await
    }

    /// Subscribes to a topic or pattern with the default [`Limits`].
    ///
    /// # Errors
    /// [`BusError::BadTopic`], [`BusError::Refused`] when the primary's
    /// limit of subscriptions per worker is reached.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, BusError> {
        self.subscribe_with(pattern, Limits::default()).await
    }

    /// Subscribes with limits of its own on the subscription's queue in the
    /// primary (at most the bus's [`BusConfig::most`]).
    ///
    /// # Errors
    /// As [`Bus::subscribe`].
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        limits: Limits,
    ) -> Result<Subscription, BusError> {
        let pattern = Pattern::parse(pattern)?;
        let text = pattern.as_str().to_string();
        let (sub, frames) = self.backend.subscribe(pattern, limits).await?;
        Ok(Subscription {
            pattern: text,
            sub,
            frames,
            credit: Credit::default(),
            backend: self.backend.clone(),
            dropped: 0,
            overflowed: false,
        })
    }

    /// Publishes `value` as a request on `topic` and returns the first
    /// reply, waiting [`DEFAULT_REQUEST_TIMEOUT`] at most.
    ///
    /// # Errors
    /// [`BusError::NoResponders`] at once when nothing subscribes to the
    /// topic, [`BusError::Timeout`] when no reply comes in time, and as
    /// [`Bus::publish`].
    pub async fn request<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<BusMessage, BusError> {
        self.request_timeout(topic, value, DEFAULT_REQUEST_TIMEOUT)
            .await
    }

    /// [`Bus::request`] with a timeout of its own.
    ///
    /// # Errors
    /// As [`Bus::request`].
    pub async fn request_timeout<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        timeout: Duration,
    ) -> Result<BusMessage, BusError> {
        pattern::check_topic(topic)?;
        let body = self.encode(value)?;
        let frame = self
            .backend
            .request(topic.to_string(), body, timeout)
            .await?;
        let (header, body) = wire::split::<Down<'_>>(&frame)?;
        let Down::Reply { sender, host, .. } = header else {
            return Err(BusError::Protocol(format!(
                "expected a reply, got {header:?}"
            )));
        };
        Ok(BusMessage {
            topic: topic.to_string(),
            sender,
            host: host.map(str::to_string),
            format: self.backend.format(),
            body,
            reply: None,
        })
    }

    /// The cluster's format for messages.
    pub fn format(&self) -> Format {
        self.backend.format()
    }

    /// Counters of the primary's side of the local bus (`None` in a worker
    /// and on Redis).
    pub fn stats(&self) -> Option<BusStats> {
        self.service
            .as_ref()
            .filter(|s| s.is_local())
            .map(BusService::stats)
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, BusError> {
        let mut body = Vec::new();
        crate::message::encode_into(self.backend.format(), value, &mut body)
            .map_err(BusError::Encode)?;
        Ok(Bytes::from(body))
    }
}

/// Options of the Redis backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Prefix of the bus's channel names in Redis (default `procluster`):
    /// clusters with different prefixes share a server without meeting.
    pub prefix: String,
    /// This primary's name among the hosts that share the server, as
    /// subscribers see it in [`BusMessage::host`] (default: the machine's
    /// host name and the primary's pid).
    pub host: Option<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "procluster".into(),
            host: None,
        }
    }
}

/// Limits of the primary's side of the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusConfig {
    /// The largest queue a subscription may ask for (and its policy when
    /// it asks for none).
    pub most: Limits,
    /// Subscriptions one worker (or the primary) may hold at once.
    pub subscriptions_per_worker: usize,
    /// Bytes the queues of one worker's (or the primary's) subscriptions
    /// may hold together: each subscription reserves its
    /// [`Limits::max_bytes`], and one past the budget is refused. With the
    /// other limits, it bounds what a worker can make the primary hold.
    pub bytes_per_worker: u64,
    /// Requests waiting for a reply, over all workers.
    pub requests_in_flight: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            most: Limits {
                capacity: 1 << 20,
                max_bytes: 256 * 1024 * 1024,
                overflow: Overflow::DropOldest,
            },
            subscriptions_per_worker: 1024,
            bytes_per_worker: 1 << 30,
            requests_in_flight: 65536,
        }
    }
}

/// A message received from the bus.
pub struct BusMessage {
    topic: String,
    sender: Sender,
    host: Option<String>,
    format: Format,
    body: Bytes,
    reply: Option<(ReplyTo, Arc<dyn Backend>)>,
}

impl std::fmt::Debug for BusMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusMessage")
            .field("topic", &self.topic)
            .field("sender", &self.sender)
            .field("len", &self.body.len())
            .field("request", &self.reply.is_some())
            .finish()
    }
}

impl BusMessage {
    /// The topic it was published on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Who published it.
    pub fn sender(&self) -> Sender {
        self.sender
    }

    /// On the Redis backend, the host (cluster) of the publisher, as its
    /// primary names itself ([`RedisOptions::host`]): worker ids are only
    /// unique within one host. `None` on the local bus.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Decodes the body as a `T`.
    ///
    /// # Errors
    /// When the body is not a `T` in the cluster's format.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        crate::message::decode(self.format, &self.body)
    }

    /// The encoded body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Whether it is a request, waiting for [`BusMessage::respond`].
    pub fn is_request(&self) -> bool {
        self.reply.is_some()
    }

    /// Answers a request. The requester takes the first answer; later ones
    /// are dropped.
    ///
    /// # Errors
    /// [`BusError::Refused`] when the message is not a request; as
    /// [`Bus::publish`].
    pub async fn respond<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), BusError> {
        let Some((to, backend)) = &self.reply else {
            return Err(BusError::Refused(format!(
                "the message on {:?} is not a request: there is nobody to respond to",
                self.topic
            )));
        };
        let mut body = Vec::new();
        crate::message::encode_into(self.format, value, &mut body).map_err(BusError::Encode)?;
        backend.respond(*to, Bytes::from(body)).await
    }
}

/// A subscription: the messages published on its topic or pattern, in
/// order per publisher. Dropping it unsubscribes.
pub struct Subscription {
    pattern: String,
    sub: u64,
    frames: mpsc::UnboundedReceiver<Bytes>,
    credit: Credit,
    backend: Arc<dyn Backend>,
    dropped: u64,
    overflowed: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next message; `None` once the subscription has ended (the bus
    /// closed, or it overflowed under [`Overflow::Disconnect`]).
    ///
    /// # Cancel safety
    /// Cancel safe: a message is either returned or stays queued.
    pub async fn next(&mut self) -> Option<BusMessage> {
        loop {
            let frame = self.frames.recv().await?;
            let Ok((header, body)) = wire::split::<Down<'_>>(&frame) else {
                continue;
            };
            match header {
                Down::Deliver {
                    topic,
                    sender,
                    reply,
                    dropped,
                    host,
                    ..
                } => {
                    self.dropped = self.dropped.max(dropped);
                    if let Some(n) = self.credit.read_one() {
                        self.backend.credit(self.sub, n);
                    }
                    return Some(BusMessage {
                        topic: topic.to_string(),
                        sender,
                        host: host.map(str::to_string),
                        format: self.backend.format(),
                        body,
                        reply: reply.map(|to| (to, self.backend.clone())),
                    });
                }
                Down::Closed { .. } => {
                    self.overflowed = true;
                    self.frames.close();
                }
                _ => {}
            }
        }
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Messages this subscription lost to [`Overflow::DropOldest`], as of
    /// the last message received.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether it ended because its queue overflowed under
    /// [`Overflow::Disconnect`].
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.backend.unsubscribe(self.sub);
    }
}
