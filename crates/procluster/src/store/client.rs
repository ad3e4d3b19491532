//! A worker's side of the local store: operations sent to the primary with
//! an id, many in flight at once, and a task that hands answers and changes
//! to whoever waits for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore, mpsc, oneshot};

use super::wire::{self, Down, Op, Outcome, Up, Watched};
use super::{Backend, BoxFuture, Limits, StoreError};
use crate::protocol::Format;
use crate::sync::lock;
use crate::worker::ServicePort;

/// Operations one worker has in flight at most; more wait for one to end.
/// It bounds what the primary may owe this worker.
const MAX_IN_FLIGHT: usize = 4096;

pub(crate) struct Client {
    shared: Arc<Shared>,
    welcome: OnceCell<wire::Backend>,
    in_flight: Semaphore,
}

struct Shared {
    port: ServicePort,
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    watches: HashMap<u64, mpsc::UnboundedSender<Bytes>>,
    pending: HashMap<u64, oneshot::Sender<Down>>,
    welcome: Option<oneshot::Sender<Down>>,
    closed: bool,
}

impl Client {
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
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    pub(crate) async fn welcome(&self) -> Result<wire::Backend, StoreError> {
        self.welcome
            .get_or_try_init(|| async {
                let (tx, rx) = oneshot::channel();
                lock(&self.shared.state).welcome = Some(tx);
                self.shared.send(&Up::Hello).await?;
                match rx.await.map_err(|_| StoreError::Closed)? {
                    Down::Welcome { backend } => Ok(backend),
                    other => Err(StoreError::Protocol(format!(
                        "expected the store's welcome, got {other:?}"
                    ))),
                }
            })
            .await
            .cloned()
    }

    fn expect(&self) -> Result<(u64, oneshot::Receiver<Down>), StoreError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut state = lock(&self.shared.state);
        if state.closed {
            return Err(StoreError::Closed);
        }
        state.pending.insert(id, tx);
        Ok((id, rx))
    }

    fn forget(&self, id: u64) {
        lock(&self.shared.state).pending.remove(&id);
    }
}

impl Shared {
    async fn send(&self, up: &Up) -> Result<(), StoreError> {
        self.port
            .send(Format::Binary, &wire::encode(up), Vec::new())
            .await
            .map_err(|e| {
                if e.is_disconnected() {
                    StoreError::Closed
                } else {
                    StoreError::Cluster(e)
                }
            })
    }

    /// Sends a small frame without making the caller wait.
    fn send_soon(&self, up: &Up) {
        self.port.send_soon(Format::Binary, wire::encode(up));
    }
}

async fn read_loop(shared: Arc<Shared>) {
    while let Some(frame) = shared.port.recv().await {
        let down = match wire::decode::<Down>(&frame.body) {
            Ok(down) => down,
            Err(error) => {
                tracing::warn!(%error, "dropped a bad frame from the store");
                continue;
            }
        };
        let mut state = lock(&shared.state);
        match down {
            Down::Change { sub, .. } => {
                if let Some(tx) = state.watches.get(&sub) {
                    let _ = tx.send(frame.body);
                }
            }
            Down::Closed { sub } => {
                if let Some(tx) = state.watches.remove(&sub) {
                    let _ = tx.send(frame.body);
                }
            }
            Down::Welcome { .. } => {
                if let Some(tx) = state.welcome.take() {
                    let _ = tx.send(down);
                }
            }
            Down::Done { id, .. } | Down::Watching { sub: id } | Down::Refused { id, .. } => {
                if let Some(tx) = state.pending.remove(&id) {
                    let _ = tx.send(down);
                }
            }
        }
    }
    let mut state = lock(&shared.state);
    state.closed = true;
    state.watches.clear();
    state.pending.clear();
    state.welcome = None;
}

impl Backend for Client {
    fn format(&self) -> Format {
        self.shared.port.format()
    }

    fn call(&self, op: Op) -> BoxFuture<'_, Result<Outcome, StoreError>> {
        Box::pin(async move {
            let _slot = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| StoreError::Closed)?;
            let (id, answer) = self.expect()?;
            if let Err(error) = self.shared.send(&Up::Op { id, op }).await {
                self.forget(id);
                return Err(error);
            }
            match answer.await.map_err(|_| StoreError::Closed)? {
                Down::Done { outcome, .. } => outcome.map_err(StoreError::from),
                other => Err(StoreError::Protocol(format!(
                    "unexpected answer to an operation: {other:?}"
                ))),
            }
        })
    }

    fn watch(
        &self,
        watched: Watched,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), StoreError>> {
        Box::pin(async move {
            let (sub, answer) = self.expect()?;
            let (tx, rx) = mpsc::unbounded_channel();
            lock(&self.shared.state).watches.insert(sub, tx);
            let sent = self
                .shared
                .send(&Up::Watch {
                    sub,
                    watched,
                    limits,
                })
                .await;
            let result = match sent {
                Err(error) => Err(error),
                Ok(()) => match answer.await.map_err(|_| StoreError::Closed)? {
                    Down::Watching { .. } => Ok(()),
                    Down::Refused { why, .. } => Err(StoreError::Full(why)),
                    other => Err(StoreError::Protocol(format!(
                        "unexpected answer to a watch: {other:?}"
                    ))),
                },
            };
            match result {
                Ok(()) => Ok((sub, rx)),
                Err(error) => {
                    let mut state = lock(&self.shared.state);
                    state.watches.remove(&sub);
                    state.pending.remove(&sub);
                    Err(error)
                }
            }
        })
    }

    fn credit(&self, sub: u64, n: u32) {
        self.shared.send_soon(&Up::Credit { sub, n });
    }

    fn unwatch(&self, sub: u64) {
        let removed = lock(&self.shared.state).watches.remove(&sub).is_some();
        if removed {
            self.shared.send_soon(&Up::Unwatch { sub });
        }
    }
}
