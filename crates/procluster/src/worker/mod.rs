//! The worker side: identity, messages to and from the primary, the shutdown
//! signal, and ports shared through the primary (`listen_*`).
//!
//! ```no_run
//! use procluster::Role;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     match procluster::role()? {
//!         Role::Primary => { /* build and start a Cluster */ }
//!         Role::Worker(worker) => {
//!             worker.send(&format!("hello from worker {}", worker.id())).await?;
//!             worker.shutdown_signal().await;
//!         }
//!     }
//!     Ok(())
//! }
//! ```

mod listen;
mod service;

pub use service::ServicePort;

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::channel::{ChannelReader, ChannelSender};
use crate::handshake::Hello;
use crate::listeners::tcp::{WorkerListeners, incoming_connections};
use crate::message::Message;
use crate::protocol::{Control, Format, Frame, FrameKind, ListenReply};
use crate::sync::lock;
use crate::{Error, WorkerId};

/// Bytes of unread user messages a worker queues before it stops reading its
/// channel.
const INBOX_BUDGET: usize = 64 * 1024 * 1024;

/// This process as a worker of a cluster (Node's `cluster.worker`). Cheap to
/// clone.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Arc<WorkerInner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.id)
            .field("index", &self.inner.index)
            .finish()
    }
}

pub(crate) struct WorkerInner {
    pub(crate) id: WorkerId,
    index: Option<usize>,
    format: Format,
    pub(crate) sender: ChannelSender,
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Message, usize)>>,
    inbox_budget: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    disconnected: AtomicBool,
    next_seq: AtomicU32,
    requests: std::sync::atomic::AtomicU64,
    requests_report_due: AtomicBool,
    /// Bytes of user messages read and not yet reported to the primary.
    consumed: std::sync::atomic::AtomicUsize,
    shutdown_grace: Duration,
    pending_listens: Mutex<HashMap<u32, ListenWaiter>>,
    listeners: Arc<WorkerListeners>,
    /// The cluster's services, by index, as the primary listed them.
    services: Vec<String>,
    /// Where frames of each service this worker uses go.
    service_inboxes: Mutex<HashMap<u16, mpsc::UnboundedSender<crate::message::ServiceFrame>>>,
    /// The worker side of each service this worker uses.
    service_states: Mutex<HashMap<String, Arc<dyn std::any::Any + Send + Sync>>>,
}

/// Where the primary's answer to a listen request goes.
type ListenWaiter = oneshot::Sender<(ListenReply, Vec<OwnedFd>)>;

/// How long a worker whose primary is gone (its channel ended, or spoke
/// garbage) keeps running after its shutdown signal fired, for the
/// application to finish what it was doing, before it exits with code 1.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// Read bytes a worker reports at once (see [`Control::Consumed`]).
const CONSUMED_REPORT: usize = 1024 * 1024;

/// How often a worker reports its request count.
const REQUESTS_REPORT_INTERVAL: Duration = Duration::from_millis(5);

impl Worker {
    /// Starts the worker's runtime on its channel. Needs a Tokio runtime.
    pub(crate) fn start(channel: OwnedFd, hello: Hello) -> Result<Self, Error> {
        // Written before anything else, synchronously, so that a worker that
        // exits at once has still been online.
        let mut online = Vec::new();
        let report = Control::Online {
            pid: std::process::id(),
        }
        .encode();
        crate::protocol::encode_frame(&mut online, FrameKind::Control, Format::Binary, 0, &report);
        rustix::io::write(&channel, &online)
            .map_err(|e| Error::io("cannot write to the worker's channel", e.into()))?;
        let max_frame = usize::try_from(hello.max_frame).unwrap_or(usize::MAX);
        let (sender, mut reader) = crate::channel::open(channel, max_frame)
            .map_err(|e| Error::io("cannot open the worker's channel", e))?;
        reader.set_busy_poll(hello.busy_poll);
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(WorkerInner {
            id: hello.id,
            index: hello.index.and_then(|i| usize::try_from(i).ok()),
            format: hello.format,
            listeners: WorkerListeners::new(sender.clone()),
            sender,
            inbox: tokio::sync::Mutex::new(inbox_rx),
            inbox_budget: Arc::new(Semaphore::new(INBOX_BUDGET)),
            shutdown: watch::channel(false).0,
            disconnected: AtomicBool::new(false),
            next_seq: AtomicU32::new(1),
            requests: Default::default(),
            requests_report_due: AtomicBool::new(false),
            consumed: Default::default(),
            shutdown_grace: hello.shutdown_grace,
            pending_listens: Mutex::new(HashMap::new()),
            services: hello.services,
            service_inboxes: Mutex::default(),
            service_states: Mutex::default(),
        });
        tokio::spawn(read_loop(inner.clone(), reader, inbox_tx));
        if let Some(every) = hello.heartbeat {
            tokio::spawn(heartbeat_loop(Arc::downgrade(&inner), every));
        }
        Ok(Self { inner })
    }

    /// This worker's id: unique within its primary's life, starting at 1.
    pub fn id(&self) -> WorkerId {
        self.inner.id
    }

    /// The slot this worker fills (0..N-1), stable across restarts of the
    /// slot; `None` when the primary forked it outside any slot.
    pub fn index(&self) -> Option<usize> {
        self.inner.index
    }

    /// This worker's sticky token: used as the value of the cookie, header
    /// or query parameter a [`Policy::Sticky`](crate::Policy::Sticky)
    /// cluster routes by, it brings the client back to this worker's slot,
    /// whichever worker holds the slot then (the token of a slot never
    /// changes). A server that creates a session sets it, say as a cookie,
    /// and the client's later connections come back.
    ///
    /// ```no_run
    /// # fn f(worker: procluster::worker::Worker) {
    /// // On the response that starts a session, under `sticky:cookie=pcs`:
    /// let header = format!("Set-Cookie: pcs={}; Path=/; HttpOnly", worker.sticky_token());
    /// # drop(header); }
    /// ```
    pub fn sticky_token(&self) -> String {
        crate::sticky::token_of(self.inner.index, self.inner.id)
    }

    /// Sends a message to the primary, which receives it attributed to this
    /// worker. Waits while the channel's buffer is full.
    ///
    /// # Errors
    /// [`Error::ChannelClosed`] after this worker disconnected;
    /// [`Error::Encode`] when the value does not serialise.
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.send_frame(FrameKind::User, None, value, Vec::new())
            .await
    }

    /// Sends a message with descriptors attached; they are duplicated, so the
    /// caller keeps its own.
    ///
    /// # Errors
    /// As [`Worker::send`].
    pub async fn send_fds<T: Serialize + ?Sized, F: AsFd>(
        &self,
        value: &T,
        fds: &[F],
    ) -> Result<(), Error> {
        let owned = crate::channel::dup_all(fds)
            .map_err(|e| Error::io("cannot duplicate a descriptor to send", e))?;
        self.send_frame(FrameKind::User, None, value, owned).await
    }

    /// Sends a message to another worker, relayed by the primary. The
    /// receiver sees this worker's id in [`Message::from_worker`].
    ///
    /// # Errors
    /// As [`Worker::send`]. A target that is not connected is not an error
    /// here: the primary drops the message and logs it.
    pub async fn send_to<T: Serialize + ?Sized>(
        &self,
        target: WorkerId,
        value: &T,
    ) -> Result<(), Error> {
        self.send_frame(FrameKind::Relayed, Some(target), value, Vec::new())
            .await
    }

    async fn send_frame<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        target: Option<WorkerId>,
        value: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if self.inner.disconnected.load(Ordering::Relaxed) {
            return Err(Error::ChannelClosed);
        }
        let format = self.inner.format;
        self.inner
            .sender
            .send_with(kind, format, fds, |buf| {
                if let Some(target) = target {
                    std::io::Write::write_all(buf, &target.get().to_le_bytes())?;
                }
                crate::message::encode_into(format, value, buf)
            })
            .await
            .map_err(|e| Error::from_send(e, Error::ChannelClosed))
    }

    /// The next message from the primary (or relayed from another worker);
    /// `None` once this worker is disconnected and every message that arrived
    /// before has been read.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&self) -> Option<Message> {
        let mut inbox = self.inner.inbox.lock().await;
        let mut shutdown = self.inner.shutdown.subscribe();
        let received = loop {
            if let Ok(item) = inbox.try_recv() {
                break Some(item);
            }
            if *shutdown.borrow_and_update() {
                break None;
            }
            tokio::select! {
                item = inbox.recv() => break item,
                _ = shutdown.changed() => {}
            }
        };
        let (message, charge) = received?;
        if charge > 0 {
            self.inner.inbox_budget.add_permits(charge);
        }
        self.report_consumed(message.payload.len());
        Some(message)
    }

    /// Tells the primary what the application has read, every
    /// [`CONSUMED_REPORT`] bytes, so it keeps sending. What is not reported
    /// yet is far below the primary's window, so it never stalls a sender.
    fn report_consumed(&self, bytes: usize) {
        let total = self
            .inner
            .consumed
            .fetch_add(bytes.max(1), Ordering::Relaxed)
            + bytes.max(1);
        if total >= CONSUMED_REPORT {
            let bytes = self.inner.consumed.swap(0, Ordering::Relaxed) as u64;
            if bytes > 0 {
                let report = Control::Consumed { bytes }.encode();
                let _ = self
                    .inner
                    .sender
                    .send_now(FrameKind::Control, &report, Vec::new());
            }
        }
    }

    /// Tells the primary this worker is ready to serve, for clusters that
    /// wait for an explicit signal rather than for listening.
    ///
    /// # Errors
    /// [`Error::ChannelClosed`] if the primary is gone.
    pub fn ready(&self) -> Result<(), Error> {
        Ok(self
            .inner
            .sender
            .send_now(FrameKind::Control, &Control::Ready.encode(), Vec::new())?)
    }

    /// Adds to the count of requests this worker has served; the primary's
    /// supervisor recycles a worker after a configured number. Cheap: the
    /// total is sent a few milliseconds later, once per burst.
    pub fn add_requests(&self, n: u64) {
        self.inner.requests.fetch_add(n, Ordering::Relaxed);
        if !self.inner.requests_report_due.swap(true, Ordering::AcqRel) {
            // One report per interval, sent after it, so the last count of a
            // burst always arrives.
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                tokio::time::sleep(REQUESTS_REPORT_INTERVAL).await;
                let Some(inner) = inner.upgrade() else { return };
                inner.requests_report_due.store(false, Ordering::Release);
                let total = inner.requests.load(Ordering::Relaxed);
                let report = Control::Requests { total }.encode();
                let _ = inner
                    .sender
                    .send_now(FrameKind::Control, &report, Vec::new());
            });
        }
    }

    /// Resolves when this worker should stop: the primary disconnected it,
    /// it disconnected itself, or its primary is gone (its channel ended; the
    /// process then exits with code 1 after [`ORPHAN_GRACE`] unless it ends
    /// sooner). Hand it to a server's graceful shutdown.
    ///
    /// ```no_run
    /// # async fn f(worker: procluster::worker::Worker, listener: tokio::net::TcpListener) {
    /// # let app = axum::Router::new();
    /// axum::serve(listener, app).with_graceful_shutdown(worker.shutdown_signal()).await.unwrap();
    /// # }
    /// ```
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Whether the shutdown signal has fired.
    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Whether this worker is still connected to the cluster.
    pub fn is_connected(&self) -> bool {
        !self.inner.disconnected.load(Ordering::Relaxed) && self.inner.sender.is_open()
    }

    /// Disconnects this worker from the cluster: its cluster listeners close,
    /// its shutdown signal fires and the primary is told. The process keeps
    /// running until its own work is done and `main` returns.
    pub fn disconnect(&self) {
        self.inner.disconnect();
    }

    pub(crate) fn next_seq(&self) -> u32 {
        self.inner.next_seq.fetch_add(1, Ordering::Relaxed)
    }
}

impl WorkerInner {
    /// Closes the cluster listeners at once, tells the primary, and fires the
    /// shutdown signal after the grace period: connections accepted just
    /// before have time to deliver their request, which a server's graceful
    /// shutdown (hyper's) would otherwise close unanswered.
    fn disconnect(self: &Arc<Self>) {
        if self.disconnected.swap(true, Ordering::SeqCst) {
            return;
        }
        self.listeners.close_all();
        let inner = self.clone();
        tokio::spawn(async move {
            // As Node: the worker's servers are closed before the primary
            // hears of the disconnect, so no connection reaches a socket
            // that only this worker still held open.
            inner.listeners.sockets_released().await;
            let _ = inner.sender.send_now(
                FrameKind::Control,
                &Control::Disconnected.encode(),
                Vec::new(),
            );
            if !inner.shutdown_grace.is_zero() {
                tokio::time::sleep(inner.shutdown_grace).await;
            }
            inner.shutdown.send_replace(true);
        });
    }
}

async fn read_loop(
    inner: Arc<WorkerInner>,
    mut reader: ChannelReader,
    inbox: mpsc::UnboundedSender<(Message, usize)>,
) {
    let mut frames = Vec::new();
    loop {
        let why = match reader.read_frames(&mut frames).await {
            Ok(true) => {
                let mut broken = None;
                for frame in frames.drain(..) {
                    if let Err(why) = dispatch(&inner, &inbox, frame).await {
                        broken = Some(why);
                        break;
                    }
                }
                match broken {
                    None => continue,
                    Some(why) => why,
                }
            }
            Ok(false) => "the primary closed the channel".to_string(),
            Err(error) => format!("the channel to the primary failed: {error}"),
        };
        inner.orphaned(&why);
        return;
    }
}

impl WorkerInner {
    /// The primary is gone, or cannot be understood: the worker leaves the
    /// cluster as a disconnect would (listeners closed, shutdown signal
    /// fired, `recv` ends), and the process exits after [`ORPHAN_GRACE`]
    /// unless the application ends it sooner. As Node, a worker never
    /// outlives its primary for long.
    fn orphaned(self: &Arc<Self>, why: &str) {
        tracing::warn!(
            "{why}: the worker leaves the cluster and exits within {} s",
            ORPHAN_GRACE.as_secs()
        );
        self.disconnected.store(true, Ordering::SeqCst);
        self.listeners.close_all();
        self.sender.close();
        self.shutdown.send_replace(true);
        for (_, waiter) in lock(&self.pending_listens).drain() {
            drop(waiter);
        }
        // Services' ports end: their `recv` returns `None`.
        lock(&self.service_inboxes).clear();
        tokio::spawn(async {
            tokio::time::sleep(ORPHAN_GRACE).await;
            std::process::exit(1);
        });
    }
}

/// Hands one frame on. An error means the primary cannot be understood.
async fn dispatch(
    inner: &Arc<WorkerInner>,
    inbox: &mpsc::UnboundedSender<(Message, usize)>,
    frame: Frame,
) -> Result<(), String> {
    match frame.kind {
        FrameKind::Control => match Control::decode(&frame.payload) {
            Ok(Control::Disconnect) => inner.disconnect(),
            Ok(Control::ListenResult { seq, reply }) => {
                inner.listen_answered(seq, reply, frame.fds)
            }
            Ok(Control::Connections { key, handed }) => {
                incoming_connections(&inner.listeners, key, handed, frame.fds)
            }
            Ok(Control::StopAccepting { key }) => inner.listeners.stop_accepting(key),
            Ok(other) => tracing::debug!(?other, "ignoring an unexpected control message"),
            Err(error) => return Err(format!("the primary sent a bad control message: {error}")),
        },
        FrameKind::Service => inner.to_service(frame),
        FrameKind::User | FrameKind::Relayed => {
            let (from_worker, payload) = if frame.kind == FrameKind::Relayed {
                let id = u32::from_le_bytes(
                    frame.payload[..4]
                        .try_into()
                        .expect("length checked by the decoder"),
                );
                (Some(WorkerId::new(id)), frame.payload.slice(4..))
            } else {
                (None, frame.payload)
            };
            let charge = payload.len().clamp(1, INBOX_BUDGET);
            match inner.inbox_budget.acquire_many(charge as u32).await {
                Ok(permit) => permit.forget(),
                Err(_) => return Ok(()),
            }
            let message = Message {
                format: frame.format,
                payload,
                fds: frame.fds,
                from_worker,
                charge: 0,
            };
            let _ = inbox.send((message, charge));
        }
    }
    Ok(())
}

async fn heartbeat_loop(inner: std::sync::Weak<WorkerInner>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner
            .sender
            .send_now(FrameKind::Control, &Control::Heartbeat.encode(), Vec::new())
            .is_err()
        {
            return;
        }
    }
}
