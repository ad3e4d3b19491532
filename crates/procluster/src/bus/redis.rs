//! The bus over Redis pub/sub, for clusters on several hosts.
//!
//! A topic is the Redis channel `<prefix>:<topic>`. An exact subscription
//! is a `SUBSCRIBE`; a pattern is a `PSUBSCRIBE` of a glob that matches at
//! least what the pattern matches, and messages are filtered here by the
//! pattern itself (a glob's `*` also crosses dots). Each process has one
//! connection for publishing, so its messages keep their order, and one
//! for its subscriptions, whose reader hands each message to the matching
//! subscriptions' bounded queues ([`Outlet`]) and never waits. A message
//! carries its publisher (host and worker id) in a small header. Requests
//! carry the requester's inbox channel; `PUBLISH` reports how many clients
//! received a request, so nobody listening is an error at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::pattern::Pattern;
use super::wire::{self, Down, ReplyTo};
use super::{Backend, BoxFuture, BusConfig, BusError, BusService, Limits, RedisOptions, Sender};
use crate::fanout::{Outlet, Sink};
use crate::protocol::Format;
use crate::redis_link::{connection_config, random_id};
use crate::sync::lock;

/// This machine's name and this process's pid: the default name of a host.
pub(crate) fn default_host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{name}/{}", std::process::id())
}

/// What precedes a message's body in Redis.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<'a> {
    sender: Sender,
    host: &'a str,
    reply: Option<ReplyTo>,
    /// For a reply: the request's id.
    answers: Option<u64>,
}

fn redis_error(error: redis::RedisError) -> BusError {
    BusError::Backend(error.to_string())
}

/// Where the cluster's format comes from.
enum FormatSource {
    Fixed(Format),
    /// The primary: known once its cluster is built.
    Primary(BusService),
}

pub(crate) struct RedisBus {
    format: FormatSource,
    sender: Sender,
    host: String,
    client_id: u64,
    prefix: String,
    publisher: MultiplexedConnection,
    /// Messages to publish, in order, sent in pipelined batches by a task.
    outgoing: mpsc::Sender<(String, Bytes)>,
    subscriber: PubSubSink,
    state: Arc<Mutex<State>>,
    next_id: AtomicU64,
    most: Limits,
}

#[derive(Default)]
struct State {
    subs: HashMap<u64, Subscribed>,
    /// Redis subscriptions held, by (pattern?, name), with how many of ours
    /// use each.
    held: HashMap<(bool, String), usize>,
    pending: HashMap<u64, oneshot::Sender<Bytes>>,
    closed: bool,
}

struct Subscribed {
    pattern: Pattern,
    /// The Redis channel or glob.
    name: String,
    outlet: Arc<Outlet>,
}

impl RedisBus {
    pub(crate) async fn connect(
        url: &str,
        options: RedisOptions,
        format: Format,
        sender: Sender,
    ) -> Result<Arc<Self>, BusError> {
        Self::open(url, options, FormatSource::Fixed(format), sender).await
    }

    pub(crate) async fn connect_primary(
        url: &str,
        options: RedisOptions,
        service: BusService,
    ) -> Result<Arc<Self>, BusError> {
        Self::open(
            url,
            options,
            FormatSource::Primary(service),
            Sender::Primary,
        )
        .await
    }

    async fn open(
        url: &str,
        options: RedisOptions,
        format: FormatSource,
        sender: Sender,
    ) -> Result<Arc<Self>, BusError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let publisher = client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await
            .map_err(redis_error)?;
        let (mut subscriber, messages) = client
            .get_async_pubsub()
            .await
            .map_err(redis_error)?
            .split();
        let client_id = random_id();
        let prefix = options.prefix;
        let (outgoing, queued) = mpsc::channel(OUTGOING);
        tokio::spawn(publish_loop(publisher.clone(), queued));
        subscriber
            .subscribe(inbox(&prefix, client_id))
            .await
            .map_err(redis_error)?;
        let bus = Arc::new(Self {
            format,
            sender,
            host: options.host.unwrap_or_else(default_host),
            client_id,
            prefix,
            publisher,
            outgoing,
            subscriber,
            state: Arc::default(),
            next_id: AtomicU64::new(1),
            most: BusConfig::default().most,
        });
        tokio::spawn(read_loop(
            messages,
            bus.state.clone(),
            format!("{}:", bus.prefix),
            inbox(&bus.prefix, client_id),
        ));
        Ok(bus)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}:{topic}", self.prefix)
    }

    fn envelope(&self, reply: Option<ReplyTo>, answers: Option<u64>, body: &[u8]) -> Bytes {
        wire::frame(
            &Envelope {
                sender: self.sender,
                host: &self.host,
                reply,
                answers,
            },
            body,
        )
    }

    async fn publish_raw(&self, channel: String, payload: Bytes) -> Result<i64, BusError> {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(&payload[..])
            .query_async(&mut self.publisher.clone())
            .await
            .map_err(redis_error)
    }
}

/// Messages waiting to be published at most; a publisher waits beyond.
const OUTGOING: usize = 4096;

/// Publishes queued messages in order, as many per round trip as are
/// queued (up to 1024).
async fn publish_loop(
    mut connection: MultiplexedConnection,
    mut queued: mpsc::Receiver<(String, Bytes)>,
) {
    let mut batch = Vec::with_capacity(1024);
    while queued.recv_many(&mut batch, 1024).await > 0 {
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.drain(..) {
            pipe.cmd("PUBLISH").arg(channel).arg(&payload[..]).ignore();
        }
        if let Err(error) = pipe.query_async::<()>(&mut connection).await {
            tracing::error!(%error, "cannot publish to Redis; the bus stops publishing");
            return;
        }
    }
}

fn inbox(prefix: &str, client_id: u64) -> String {
    format!("{prefix}!inbox.{client_id}")
}

/// A Redis glob matching every channel the pattern matches (and maybe
/// more: the pattern filters again).
fn glob(prefix: &str, pattern: &Pattern) -> String {
    let escape = |text: &str| {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    let tokens: Vec<String> = pattern
        .as_str()
        .split('.')
        .map(|token| match token {
            "*" | ">" => "*".to_string(),
            literal => escape(literal),
        })
        .collect();
    format!("{}:{}", escape(prefix), tokens.join("."))
}

async fn read_loop(
    mut messages: PubSubStream,
    state: Arc<Mutex<State>>,
    topic_prefix: String,
    inbox: String,
) {
    while let Some(message) = std::future::poll_fn(|cx| Pin::new(&mut messages).poll_next(cx)).await
    {
        let channel = message.get_channel_name();
        let payload = Bytes::copy_from_slice(message.get_payload_bytes());
        let Ok((envelope, body)) = wire::split::<Envelope<'_>>(&payload) else {
            tracing::debug!(channel, "ignored a message that is not the bus's");
            continue;
        };
        let mut state = lock(&state);
        if channel == inbox {
            let Some(id) = envelope.answers else { continue };
            if let Some(waiter) = state.pending.remove(&id) {
                let reply = Down::Reply {
                    id,
                    sender: envelope.sender,
                    host: Some(envelope.host),
                };
                let _ = waiter.send(wire::frame(&reply, &body));
            }
            continue;
        }
        let Some(topic) = channel.strip_prefix(&topic_prefix) else {
            continue;
        };
        let glob: Option<String> = message.get_pattern().ok();
        for (sub, subscribed) in &state.subs {
            let ours = match &glob {
                None => !subscribed.pattern.is_wild() && subscribed.pattern.as_str() == topic,
                Some(glob) => {
                    subscribed.pattern.is_wild()
                        && &subscribed.name == glob
                        && subscribed.pattern.matches(topic)
                }
            };
            if ours {
                let frame = wire::frame(
                    &Down::Deliver {
                        sub: *sub,
                        topic,
                        sender: envelope.sender,
                        reply: envelope.reply,
                        dropped: subscribed.outlet.dropped(),
                        host: Some(envelope.host),
                    },
                    &body,
                );
                subscribed.outlet.push(frame);
            }
        }
    }
    // The connection is gone: every subscription ends, every request fails.
    let mut state = lock(&state);
    state.closed = true;
    for (_, subscribed) in state.subs.drain() {
        subscribed.outlet.close();
    }
    state.pending.clear();
}

impl Backend for RedisBus {
    fn format(&self) -> Format {
        match &self.format {
            FormatSource::Fixed(format) => *format,
            FormatSource::Primary(service) => service.format(),
        }
    }

    fn publish(&self, topic: String, body: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let payload = self.envelope(None, None, &body);
            self.outgoing
                .send((self.channel(&topic), payload))
                .await
                .map_err(|_| BusError::Closed)
        })
    }

    fn subscribe(
        &self,
        pattern: Pattern,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), BusError>> {
        Box::pin(async move {
            let sub = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let wild = pattern.is_wild();
            let name = if wild {
                glob(&self.prefix, &pattern)
            } else {
                self.channel(pattern.as_str())
            };
            let closed = wire::frame(&Down::Closed { sub }, &[]);
            let outlet = Outlet::new(Sink::Local(tx), limits.clamped(self.most), closed);
            let first = {
                let mut state = lock(&self.state);
                if state.closed {
                    return Err(BusError::Closed);
                }
                state.subs.insert(
                    sub,
                    Subscribed {
                        pattern,
                        name: name.clone(),
                        outlet,
                    },
                );
                let count = state.held.entry((wild, name.clone())).or_default();
                *count += 1;
                *count == 1
            };
            if first {
                let mut subscriber = self.subscriber.clone();
                let done = if wild {
                    subscriber.psubscribe(&name).await
                } else {
                    subscriber.subscribe(&name).await
                };
                if let Err(error) = done {
                    self.unsubscribe(sub);
                    return Err(redis_error(error));
                }
            }
            Ok((sub, rx))
        })
    }

    fn request(
        &self,
        topic: String,
        body: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BusError>> {
        Box::pin(async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            {
                let mut state = lock(&self.state);
                if state.closed {
                    return Err(BusError::Closed);
                }
                state.pending.insert(id, tx);
            }
            let reply = ReplyTo {
                to: self.sender,
                id,
                client: self.client_id,
            };
            let payload = self.envelope(Some(reply), None, &body);
            let result = match self.publish_raw(self.channel(&topic), payload).await {
                Err(error) => Err(error),
                Ok(0) => Err(BusError::NoResponders {
                    topic: topic.clone(),
                }),
                Ok(_) => match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(frame)) => Ok(frame),
                    Ok(Err(_)) => Err(BusError::Closed),
                    Err(_) => Err(BusError::Timeout {
                        topic: topic.clone(),
                        after: timeout,
                    }),
                },
            };
            if result.is_err() {
                lock(&self.state).pending.remove(&id);
            }
            result
        })
    }

    fn respond(&self, to: ReplyTo, body: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let payload = self.envelope(None, Some(to.id), &body);
            self.publish_raw(inbox(&self.prefix, to.client), payload)
                .await?;
            Ok(())
        })
    }

    fn credit(&self, sub: u64, n: u32) {
        let outlet = lock(&self.state).subs.get(&sub).map(|s| s.outlet.clone());
        if let Some(outlet) = outlet {
            outlet.add_credit(n);
        }
    }

    fn unsubscribe(&self, sub: u64) {
        let last = {
            let mut state = lock(&self.state);
            let Some(subscribed) = state.subs.remove(&sub) else {
                return;
            };
            subscribed.outlet.close();
            let key = (subscribed.pattern.is_wild(), subscribed.name);
            let count = state.held.entry(key.clone()).or_default();
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.held.remove(&key);
                Some(key)
            } else {
                None
            }
        };
        if let Some((wild, name)) = last {
            let mut subscriber = self.subscriber.clone();
            tokio::spawn(async move {
                let _ = if wild {
                    subscriber.punsubscribe(&name).await
                } else {
                    subscriber.unsubscribe(&name).await
                };
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_cover_their_patterns_and_escape_literals() {
        let pattern = |p| Pattern::parse(p).unwrap();
        assert_eq!(glob("pc", &pattern("chat.*")), "pc:chat.*");
        assert_eq!(glob("pc", &pattern("a.>")), "pc:a.*");
        assert_eq!(glob("p[1]", &pattern("x?.*")), "p\\[1\\]:x\\?.*");
    }
}
