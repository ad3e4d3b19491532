//! The primary's side of the local bus: subscriptions with their bounded
//! queues, routing of published messages, and requests waiting for a reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::pattern::{self, Pattern};
use super::wire::{self, Down, ReplyTo, Up};
use super::{Backend, BoxFuture, BusConfig, BusError, Limits, Sender};
use crate::fanout::{Outlet, Pushed, Sink};
use crate::message::ServiceFrame;
use crate::primary::{Service, ServiceContext, WorkerHandle};
use crate::protocol::Format;
use crate::sync::lock;
use crate::{ChannelError, Error, ExitStatus};

/// The primary's side of the bus: add it to the cluster with
/// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service)
/// (get it from [`Bus::service`](super::Bus::service)). Cheap to clone.
#[derive(Clone)]
pub struct BusService {
    router: Arc<Router>,
}

impl std::fmt::Debug for BusService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusService")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Counters of the primary's side of the bus, for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Subscriptions open now.
    pub subscriptions: usize,
    /// Messages waiting in subscriptions' queues in the primary now.
    pub queued: usize,
    /// Messages published so far (requests included).
    pub published: u64,
    /// Messages dropped so far by subscriptions under
    /// [`Overflow::DropOldest`](super::Overflow::DropOldest), over the
    /// subscriptions open now.
    pub dropped: u64,
    /// Subscriptions ended by overflow under
    /// [`Overflow::Disconnect`](super::Overflow::Disconnect).
    pub overflowed: u64,
    /// Subscriptions and requests refused by a limit, and frames refused as
    /// malformed.
    pub refused: u64,
}

pub(crate) struct Router {
    context: OnceLock<ServiceContext>,
    config: BusConfig,
    backend: wire::Backend,
    state: Mutex<State>,
    published: AtomicU64,
    overflowed: AtomicU64,
    refused: AtomicU64,
}

#[derive(Default)]
struct State {
    subs: Vec<Entry>,
    /// Requests waiting for their first reply, with their deadline.
    requests: HashMap<(Sender, u64), Instant>,
    /// The primary's own requests, by id.
    local_pending: HashMap<u64, oneshot::Sender<Bytes>>,
    next_local: u64,
}

struct Entry {
    owner: Sender,
    sub: u64,
    pattern: Pattern,
    outlet: Arc<Outlet>,
}

impl BusService {
    pub(crate) fn new(config: BusConfig, backend: wire::Backend) -> Self {
        Self {
            router: Arc::new(Router {
                context: OnceLock::new(),
                config,
                backend,
                state: Mutex::default(),
                published: AtomicU64::new(0),
                overflowed: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// The backend of the primary's own [`Bus`](super::Bus) handle.
    pub(crate) fn primary_backend(&self) -> Arc<dyn Backend> {
        Arc::new(PrimaryBackend(self.router.clone()))
    }

    pub(crate) fn is_local(&self) -> bool {
        self.router.backend == wire::Backend::Local
    }

    /// The cluster's format, once the cluster is built (the Redis backend
    /// encodes with it).
    #[cfg(feature = "redis")]
    pub(crate) fn format(&self) -> Format {
        self.router
            .context
            .get()
            .and_then(ServiceContext::format)
            .unwrap_or_default()
    }

    /// The counters now (all zero on Redis: the server routes).
    pub fn stats(&self) -> BusStats {
        let router = &self.router;
        let state = lock(&router.state);
        BusStats {
            subscriptions: state.subs.len(),
            queued: state.subs.iter().map(|e| e.outlet.queued()).sum(),
            dropped: state.subs.iter().map(|e| e.outlet.dropped()).sum(),
            published: router.published.load(Ordering::Relaxed),
            overflowed: router.overflowed.load(Ordering::Relaxed),
            refused: router.refused.load(Ordering::Relaxed),
        }
    }
}

impl Service for BusService {
    fn name(&self) -> String {
        super::SERVICE_NAME.into()
    }

    fn attach(&self, context: ServiceContext) {
        let _ = self.router.context.set(context);
    }

    fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
        let router = &self.router;
        let sender = Sender::Worker(from.id());
        let (header, body) = match wire::split::<Up<'_>>(&frame.body) {
            Ok(split) => split,
            Err(error) => {
                router.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %from.id(), %error, "dropped a bad bus frame");
                return;
            }
        };
        match header {
            Up::Hello => router.send_to(
                from,
                wire::frame(
                    &Down::Welcome {
                        backend: router.backend.clone(),
                    },
                    &[],
                ),
            ),
            Up::Subscribe {
                sub,
                pattern,
                limits,
            } => {
                let answer = match router.worker_sink(from) {
                    Some(sink) => match router.add(sender, sub, pattern, limits, sink) {
                        Ok(()) => Down::Subscribed { sub },
                        Err(error) => Down::Refused {
                            id: sub,
                            why: error.to_string(),
                        },
                    },
                    None => return,
                };
                router.send_to(from, wire::frame(&answer, &[]));
            }
            Up::Unsubscribe { sub } => router.remove(sender, sub),
            Up::Credit { sub, n } => router.credit(sender, sub, n),
            Up::Publish { topic } => {
                if pattern::check_topic(topic).is_ok() {
                    router.route(sender, topic, &body, None);
                } else {
                    router.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            Up::Request {
                id,
                topic,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                if let Err(answer) = router.request(sender, id, topic, &body, timeout) {
                    router.send_to(from, wire::frame(&answer, &[]));
                }
            }
            Up::Respond { to } => router.respond(sender, to, &body),
        }
    }

    fn on_worker_gone(&self, worker: &WorkerHandle, _exit: Option<ExitStatus>) {
        self.router.forget(Sender::Worker(worker.id()));
    }
}

impl Router {
    fn worker_sink(&self, worker: &WorkerHandle) -> Option<Sink> {
        Some(Sink::Worker {
            context: self.context.get()?.clone(),
            worker: worker.clone(),
        })
    }

    /// Sends a small frame to a worker, waiting in a task of its own if the
    /// channel is full.
    fn send_to(&self, worker: &WorkerHandle, frame: Bytes) {
        let Some(context) = self.context.get() else {
            return;
        };
        if let Err(Error::Channel(ChannelError::Full)) =
            context.try_send(worker, Format::Binary, &frame, Vec::new())
        {
            let (context, worker) = (context.clone(), worker.clone());
            tokio::spawn(async move {
                let _ = context
                    .send(&worker, Format::Binary, &frame, Vec::new())
                    .await;
            });
        }
    }

    fn add(
        &self,
        owner: Sender,
        sub: u64,
        pattern: &str,
        limits: Limits,
        sink: Sink,
    ) -> Result<(), BusError> {
        let refuse = |error| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(error)
        };
        let pattern = match Pattern::parse(pattern) {
            Ok(pattern) => pattern,
            Err(error) => return refuse(error),
        };
        let mut state = lock(&self.state);
        let held = state.subs.iter().filter(|e| e.owner == owner).count();
        if held >= self.config.subscriptions_per_worker {
            drop(state);
            return refuse(BusError::Refused(format!(
                "{owner} already holds {held} subscriptions, the most the bus allows \
                 (BusConfig::subscriptions_per_worker)"
            )));
        }
        if state.subs.iter().any(|e| e.owner == owner && e.sub == sub) {
            drop(state);
            return refuse(BusError::Protocol(format!(
                "{owner} reused subscription id {sub}"
            )));
        }
        let limits = limits.clamped(self.config.most);
        let reserved: u64 = state
            .subs
            .iter()
            .filter(|e| e.owner == owner)
            .map(|e| e.outlet.limits().max_bytes)
            .sum();
        if reserved + limits.max_bytes > self.config.bytes_per_worker {
            drop(state);
            return refuse(BusError::Refused(format!(
                "{owner}'s subscriptions already reserve {reserved} bytes of queue; another \
                 {} would pass BusConfig::bytes_per_worker ({}): ask for smaller queues \
                 (Limits::max_bytes) or raise the budget",
                limits.max_bytes, self.config.bytes_per_worker
            )));
        }
        let closed = wire::frame(&Down::Closed { sub }, &[]);
        let outlet = Outlet::new(sink, limits, closed);
        state.subs.push(Entry {
            owner,
            sub,
            pattern,
            outlet,
        });
        Ok(())
    }

    fn remove(&self, owner: Sender, sub: u64) {
        let mut state = lock(&self.state);
        state.subs.retain(|e| {
            let keep = !(e.owner == owner && e.sub == sub);
            if !keep {
                e.outlet.close();
            }
            keep
        });
    }

    fn credit(&self, owner: Sender, sub: u64, n: u32) {
        let outlet = {
            let state = lock(&self.state);
            state
                .subs
                .iter()
                .find(|e| e.owner == owner && e.sub == sub)
                .map(|e| e.outlet.clone())
        };
        if let Some(outlet) = outlet {
            outlet.add_credit(n);
        }
    }

    /// Everything of a worker that left: its subscriptions and requests.
    fn forget(&self, owner: Sender) {
        let mut state = lock(&self.state);
        state.subs.retain(|e| {
            if e.owner == owner {
                e.outlet.close();
            }
            e.owner != owner
        });
        state.requests.retain(|(to, _), _| *to != owner);
    }

    /// Hands a message to every matching subscription; returns how many
    /// matched.
    fn route(&self, sender: Sender, topic: &str, body: &[u8], reply: Option<ReplyTo>) -> usize {
        self.published.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        let mut matched = 0;
        let mut overflowed = false;
        for entry in state.subs.iter().filter(|e| e.pattern.matches(topic)) {
            matched += 1;
            let frame = wire::frame(
                &Down::Deliver {
                    sub: entry.sub,
                    topic,
                    sender,
                    reply,
                    dropped: entry.outlet.dropped(),
                    host: None,
                },
                body,
            );
            if entry.outlet.push(frame) == Pushed::Closed {
                overflowed = true;
            }
        }
        if overflowed {
            // Subscriptions closed by overflow (or whose worker is gone).
            let before = state.subs.len();
            state.subs.retain(|e| !e.outlet.is_closed());
            let ended = (before - state.subs.len()) as u64;
            self.overflowed.fetch_add(ended, Ordering::Relaxed);
        }
        matched
    }

    /// Publishes a request; `Err` is the answer to send the requester at
    /// once (no responder, or refused).
    fn request<'a>(
        &self,
        requester: Sender,
        id: u64,
        topic: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(), Down<'a>> {
        if pattern::check_topic(topic).is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Down::Refused {
                id,
                why: format!("bad topic {topic:?}"),
            });
        }
        {
            let mut state = lock(&self.state);
            if state.requests.len() >= self.config.requests_in_flight {
                let now = Instant::now();
                state.requests.retain(|_, deadline| *deadline > now);
            }
            if state.requests.len() >= self.config.requests_in_flight {
                drop(state);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Down::Refused {
                    id,
                    why: format!(
                        "{} requests are waiting for a reply, the most the bus allows \
                         (BusConfig::requests_in_flight)",
                        self.config.requests_in_flight
                    ),
                });
            }
            state
                .requests
                .insert((requester, id), Instant::now() + timeout);
        }
        let reply = ReplyTo {
            to: requester,
            id,
            client: 0,
        };
        if self.route(requester, topic, body, Some(reply)) == 0 {
            lock(&self.state).requests.remove(&(requester, id));
            return Err(Down::NoResponders { id });
        }
        Ok(())
    }

    /// Forwards the first reply to a request to its requester.
    fn respond(&self, responder: Sender, to: ReplyTo, body: &[u8]) {
        let mut state = lock(&self.state);
        if state.requests.remove(&(to.to, to.id)).is_none() {
            return; // Answered already, timed out, or never asked.
        }
        let frame = wire::frame(
            &Down::Reply {
                id: to.id,
                sender: responder,
                host: None,
            },
            body,
        );
        match to.to {
            Sender::Primary => {
                if let Some(waiter) = state.local_pending.remove(&to.id) {
                    let _ = waiter.send(frame);
                }
            }
            Sender::Worker(id) => {
                drop(state);
                if let Some(worker) = self.context.get().and_then(|c| c.worker(id)) {
                    self.send_to(&worker, frame);
                }
            }
        }
    }
}

/// The primary's own use of its bus.
struct PrimaryBackend(Arc<Router>);

impl Backend for PrimaryBackend {
    fn format(&self) -> Format {
        self.0
            .context
            .get()
            .and_then(ServiceContext::format)
            .unwrap_or_default()
    }

    fn publish(&self, topic: String, body: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        self.0.route(Sender::Primary, &topic, &body, None);
        Box::pin(async { Ok(()) })
    }

    fn subscribe(
        &self,
        pattern: Pattern,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), BusError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sub = {
            let mut state = lock(&self.0.state);
            state.next_local += 1;
            state.next_local
        };
        let added = self.0.add(
            Sender::Primary,
            sub,
            pattern.as_str(),
            limits,
            Sink::Local(tx),
        );
        Box::pin(async move { added.map(|()| (sub, rx)) })
    }

    fn request(
        &self,
        topic: String,
        body: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BusError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let id = {
                let mut state = lock(&self.0.state);
                state.next_local += 1;
                let id = state.next_local;
                state.local_pending.insert(id, tx);
                id
            };
            let sent = self.0.request(Sender::Primary, id, &topic, &body, timeout);
            let result = match sent {
                Err(Down::NoResponders { .. }) => Err(BusError::NoResponders {
                    topic: topic.clone(),
                }),
                Err(Down::Refused { why, .. }) => Err(BusError::Refused(why)),
                Err(_) => Err(BusError::Closed),
                Ok(()) => match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(frame)) => Ok(frame),
                    Ok(Err(_)) => Err(BusError::Closed),
                    Err(_) => Err(BusError::Timeout {
                        topic: topic.clone(),
                        after: timeout,
                    }),
                },
            };
            if result.is_err() {
                let mut state = lock(&self.0.state);
                state.local_pending.remove(&id);
                state.requests.remove(&(Sender::Primary, id));
            }
            result
        })
    }

    fn respond(&self, to: ReplyTo, body: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        self.0.respond(Sender::Primary, to, &body);
        Box::pin(async { Ok(()) })
    }

    fn credit(&self, sub: u64, n: u32) {
        self.0.credit(Sender::Primary, sub, n);
    }

    fn unsubscribe(&self, sub: u64) {
        self.0.remove(Sender::Primary, sub);
    }
}
