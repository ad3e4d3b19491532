//! A worker's side of the local bus: frames to the primary through the
//! bus's service port, and a task that hands the primary's frames to the
//! subscriptions and requests waiting for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OnceCell, mpsc, oneshot};

use super::pattern::Pattern;
use super::wire::{self, Down, ReplyTo, Up};
use super::{Backend, BoxFuture, BusError, Limits};
use crate::protocol::Format;
use crate::sync::lock;
use crate::worker::ServicePort;

/// The worker's side of the bus (one per worker).
pub(crate) struct Client {
    shared: Arc<Shared>,
    welcome: OnceCell<wire::Backend>,
}

struct Shared {
    port: ServicePort,
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Where each subscription's frames go.
    subs: HashMap<u64, mpsc::UnboundedSender<Bytes>>,
    /// Answers awaited, by request or subscription id.
    pending: HashMap<u64, oneshot::Sender<Bytes>>,
    welcome: Option<oneshot::Sender<Bytes>>,
    /// The primary is gone.
    closed: bool,
}

impl Client {
    /// Opens the worker's side on its port and starts reading it.
    pub(crate) fn start(port: ServicePort) -> Self {
        let shared = Arc::new(Shared {
            port,
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(read_loop(shared.clone()));
        Self {
            shared,
            welcome: OnceCell::new(),
        }
    }

    /// The backend the primary chose (asked once).
    pub(crate) async fn welcome(&self) -> Result<wire::Backend, BusError> {
        self.welcome
            .get_or_try_init(|| async {
                let (tx, rx) = oneshot::channel();
                lock(&self.shared.state).welcome = Some(tx);
                self.shared.send(&Up::Hello, &[]).await?;
                let frame = rx.await.map_err(|_| BusError::Closed)?;
                match wire::split::<Down<'_>>(&frame)?.0 {
                    Down::Welcome { backend } => Ok(backend),
                    other => Err(BusError::Protocol(format!(
                        "expected the bus's welcome, got {other:?}"
                    ))),
                }
            })
            .await
            .cloned()
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a waiter for the answer with id `id`.
    fn expect(&self, id: u64) -> Result<oneshot::Receiver<Bytes>, BusError> {
        let (tx, rx) = oneshot::channel();
        let mut state = lock(&self.shared.state);
        if state.closed {
            return Err(BusError::Closed);
        }
        state.pending.insert(id, tx);
        Ok(rx)
    }
}

impl Shared {
    async fn send(&self, header: &Up<'_>, body: &[u8]) -> Result<(), BusError> {
        self.port
            .send(Format::Binary, &wire::frame(header, body), Vec::new())
            .await
            .map_err(|e| {
                if e.is_disconnected() {
                    BusError::Closed
                } else {
                    BusError::Cluster(e)
                }
            })
    }

    /// Sends a small frame without making the caller wait.
    fn send_soon(&self, header: &Up<'_>) {
        self.port
            .send_soon(Format::Binary, wire::frame(header, &[]));
    }
}

async fn read_loop(shared: Arc<Shared>) {
    while let Some(frame) = shared.port.recv().await {
        let body = frame.body;
        let header = match wire::split::<Down<'_>>(&body) {
            Ok((header, _)) => header,
            Err(error) => {
                tracing::warn!(%error, "dropped a bad frame from the bus");
                continue;
            }
        };
        let mut state = lock(&shared.state);
        match header {
            Down::Deliver { sub, .. } => {
                if let Some(tx) = state.subs.get(&sub) {
                    let _ = tx.send(body.clone());
                }
            }
            Down::Closed { sub } => {
                if let Some(tx) = state.subs.remove(&sub) {
                    let _ = tx.send(body.clone());
                }
            }
            Down::Welcome { .. } => {
                if let Some(tx) = state.welcome.take() {
                    let _ = tx.send(body.clone());
                }
            }
            Down::Subscribed { sub: id }
            | Down::Refused { id, .. }
            | Down::Reply { id, .. }
            | Down::NoResponders { id } => {
                if let Some(tx) = state.pending.remove(&id) {
                    let _ = tx.send(body.clone());
                }
            }
        }
    }
    // Cut off from the primary: every stream ends, every waiter hears.
    let mut state = lock(&shared.state);
    state.closed = true;
    state.subs.clear();
    state.pending.clear();
    state.welcome = None;
}

impl Backend for Client {
    fn format(&self) -> Format {
        self.shared.port.format()
    }

    fn publish(&self, topic: String, body: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            self.shared
                .send(&Up::Publish { topic: &topic }, &body)
                .await
        })
    }

    fn subscribe(
        &self,
        pattern: Pattern,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), BusError>> {
        Box::pin(async move {
            let sub = self.next_id();
            let answer = self.expect(sub)?;
            let (tx, rx) = mpsc::unbounded_channel();
            lock(&self.shared.state).subs.insert(sub, tx);
            let header = Up::Subscribe {
                sub,
                pattern: pattern.as_str(),
                limits,
            };
            let sent = self.shared.send(&header, &[]).await;
            let answer = match sent {
                Ok(()) => answer.await.map_err(|_| BusError::Closed),
                Err(error) => Err(error),
            };
            let result = answer.and_then(|frame| match wire::split::<Down<'_>>(&frame)?.0 {
                Down::Subscribed { .. } => Ok(()),
                Down::Refused { why, .. } => Err(BusError::Refused(why)),
                other => Err(BusError::Protocol(format!(
                    "unexpected answer to a subscription: {other:?}"
                ))),
            });
            match result {
                Ok(()) => Ok((sub, rx)),
                Err(error) => {
                    let mut state = lock(&self.shared.state);
                    state.subs.remove(&sub);
                    state.pending.remove(&sub);
                    Err(error)
                }
            }
        })
    }

    fn request(
        &self,
        topic: String,
        body: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BusError>> {
        Box::pin(async move {
            let id = self.next_id();
            let answer = self.expect(id)?;
            let header = Up::Request {
                id,
                topic: &topic,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            };
            let result = match self.shared.send(&header, &body).await {
                Err(error) => Err(error),
                Ok(()) => match tokio::time::timeout(timeout, answer).await {
                    Err(_) => Err(BusError::Timeout {
                        topic: topic.clone(),
                        after: timeout,
                    }),
                    Ok(Err(_)) => Err(BusError::Closed),
                    Ok(Ok(frame)) => match wire::split::<Down<'_>>(&frame)?.0 {
                        Down::Reply { .. } => Ok(frame),
                        Down::NoResponders { .. } => Err(BusError::NoResponders {
                            topic: topic.clone(),
                        }),
                        Down::Refused { why, .. } => Err(BusError::Refused(why)),
                        other => Err(BusError::Protocol(format!(
                            "unexpected answer to a request: {other:?}"
                        ))),
                    },
                },
            };
            if result.is_err() {
                lock(&self.shared.state).pending.remove(&id);
            }
            result
        })
    }

    fn respond(&self, to: ReplyTo, body: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move { self.shared.send(&Up::Respond { to }, &body).await })
    }

    fn credit(&self, sub: u64, n: u32) {
        self.shared.send_soon(&Up::Credit { sub, n });
    }

    fn unsubscribe(&self, sub: u64) {
        let removed = lock(&self.shared.state).subs.remove(&sub).is_some();
        if removed {
            self.shared.send_soon(&Up::Unsubscribe { sub });
        }
    }
}
