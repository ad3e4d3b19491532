//! The worker's side of a TCP listener shared through the primary: the
//! socket it accepts on (shared and reuseport), or the connections the
//! primary hands it (round-robin), with the credit and acknowledgements
//! that keep a handed connection from ever being lost.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::bind;
use crate::channel::ChannelSender;
use crate::protocol::{Control, FrameKind, HandedConnection, ListenReply, ListenSpec};
use crate::sync::lock;

/// Options for a worker's `listen_tcp_with`.
#[derive(Debug, Clone, Default)]
pub struct TcpOptions {
    /// `listen()` backlog (default [`DEFAULT_BACKLOG`](super::DEFAULT_BACKLOG)).
    pub backlog: Option<u32>,
    /// For an IPv6 address: accept IPv6 only (default: dual stack).
    pub ipv6_only: Option<bool>,
    /// Bind in this worker, bypassing the primary (Node's `exclusive`).
    pub exclusive: bool,
    /// Round-robin only: connections the primary may hand this worker ahead
    /// of its `accept()` calls (default [`DEFAULT_PREFETCH`]). More keeps a
    /// busy worker fed without a round trip per connection; 0 makes the
    /// worker take exactly as many connections as it has `accept()` calls
    /// waiting, which caps its concurrency precisely.
    pub prefetch: Option<u32>,
}

/// Connections handed ahead of `accept()` calls on a round-robin listener.
pub const DEFAULT_PREFETCH: u32 = 16;

/// A connection handed by the primary, not yet taken by `accept()`.
struct Queued {
    seq: u64,
    fd: OwnedFd,
    peer: Option<SocketAddr>,
    /// When it arrived, if no `accept()` was waiting for it then (it came
    /// on prefetch credit).
    ahead: Option<Instant>,
}

/// How long a connection handed ahead of `accept()` may wait for the
/// application before the worker gives it back to the primary for another
/// worker: a worker busy with long requests must not strand connections.
const PREFETCH_PATIENCE: std::time::Duration = std::time::Duration::from_millis(5);

/// Connections handed to a worker by the primary, waiting for `accept()`.
#[derive(Default)]
struct HandedState {
    queue: VecDeque<Queued>,
    /// `accept()` calls now waiting.
    waiting: usize,
    /// Credit the primary believes this listener has.
    granted: usize,
    /// Extra credit beyond the waiting `accept()` calls.
    prefetch: usize,
    /// A task watches connections queued ahead of `accept()` calls.
    patrolled: bool,
    closed: bool,
}

impl HandedState {
    /// Credit to grant the primary now, counted as granted: enough to cover
    /// the waiting `accept()` calls plus the prefetch reserve. While the
    /// waiting calls are covered, the reserve is topped up only once half of
    /// it is used, so connections come in batches, one message each.
    /// `finishing` waiting calls are about to return (they took their
    /// connection) and do not count.
    fn credit_due(&mut self, finishing: usize) -> usize {
        let waiting = self.waiting.saturating_sub(finishing);
        let wanted = (waiting + self.prefetch).saturating_sub(self.queue.len());
        let grant = wanted.saturating_sub(self.granted);
        let starving = self.granted + self.queue.len() < waiting;
        if grant == 0 || (!starving && grant < self.prefetch.div_ceil(2)) {
            return 0;
        }
        self.granted += grant;
        grant
    }
}

#[derive(Default)]
pub(crate) struct Handed {
    state: Mutex<HandedState>,
    arrived: Notify,
    /// The socket this worker accepts on (shared and reuseport), until the
    /// listener closes: a worker that leaves the cluster lets go of it at
    /// once, so a socket the primary has closed is not kept listening (and
    /// queueing connections nobody will take) by a worker still finishing
    /// its work.
    socket: Mutex<Option<Arc<tokio::net::TcpListener>>>,
}

impl Handed {
    fn state(&self) -> MutexGuard<'_, HandedState> {
        lock(&self.state)
    }

    fn socket(&self) -> Option<Arc<tokio::net::TcpListener>> {
        lock(&self.socket).clone()
    }
}

/// A worker's cluster listeners: the TCP listeners that receive
/// connections from the primary, by key, and how many requests for each
/// kernel-chosen port it made (the k-th `listen(0)` of every worker shares a
/// port).
pub(crate) struct WorkerListeners {
    sender: ChannelSender,
    listeners: Mutex<HashMap<u32, Weak<Handed>>>,
    ordinals: Mutex<HashMap<String, u32>>,
    /// Sockets of closed listeners that an `accept()` may still hold for a
    /// moment.
    closing: Mutex<Vec<std::sync::Weak<tokio::net::TcpListener>>>,
}

impl WorkerListeners {
    /// The listeners of the worker whose channel to the primary is `sender`.
    pub(crate) fn new(sender: ChannelSender) -> Arc<Self> {
        Arc::new(Self {
            sender,
            listeners: Mutex::default(),
            ordinals: Mutex::default(),
            closing: Mutex::default(),
        })
    }

    fn table(&self) -> MutexGuard<'_, HashMap<u32, Weak<Handed>>> {
        lock(&self.listeners)
    }

    /// Closes every cluster listener (the worker is disconnecting): waiting
    /// `accept()` calls fail and queued connections go back to the primary.
    pub(crate) fn close_all(&self) {
        let all: Vec<(u32, Arc<Handed>)> = self
            .table()
            .drain()
            .filter_map(|(k, h)| Some((k, h.upgrade()?)))
            .collect();
        let mut closing = lock(&self.closing);
        for (key, handed) in all {
            if let Some(socket) = refuse_queued(key, &handed, &self.sender) {
                closing.push(Arc::downgrade(&socket));
            }
        }
    }

    /// The primary asks this worker to stop accepting on the socket of
    /// listener `key` (the cluster is stopping): the listener lets go of
    /// the socket but keeps taking the connections the primary hands over,
    /// and the primary hears once the socket is closed here.
    pub(crate) fn stop_accepting(self: &Arc<Self>, key: u32) {
        let socket = self
            .table()
            .get(&key)
            .and_then(Weak::upgrade)
            .and_then(|handed| {
                let socket = lock(&handed.socket).take();
                handed.arrived.notify_waiters();
                socket
            });
        let listeners = self.clone();
        tokio::spawn(async move {
            if let Some(socket) = socket {
                let socket = Arc::downgrade(&socket);
                release(socket).await;
            }
            let done = Control::StoppedAccepting { key };
            let _ = listeners
                .sender
                .send_now(FrameKind::Control, &done.encode(), Vec::new());
        });
    }

    /// Resolves once every socket of the listeners closed by `close_all` is
    /// closed in this process: the `accept()` calls that held them have
    /// woken up and let go (they were told to; this takes a few turns of
    /// the event loop, and at most a second is waited).
    pub(crate) async fn sockets_released(&self) {
        let closing = std::mem::take(&mut *lock(&self.closing));
        for socket in closing {
            release(socket).await;
        }
    }

    /// The k-th request for the same thing in this worker; 0 for a fixed
    /// address, which all requests share.
    pub(crate) fn next_ordinal(&self, spec: &ListenSpec) -> u32 {
        if !spec.wants_any_port() {
            return 0;
        }
        let mut ordinals = lock(&self.ordinals);
        let next = ordinals.entry(format!("{spec:?}")).or_insert(0);
        *next += 1;
        *next - 1
    }

    /// A request that failed, or was given up, does not count.
    pub(crate) fn release_ordinal(&self, spec: &ListenSpec) {
        if spec.wants_any_port() {
            let mut ordinals = lock(&self.ordinals);
            if let Some(next) = ordinals.get_mut(&format!("{spec:?}")) {
                *next = next.saturating_sub(1);
            }
        }
    }
}

impl WorkerListeners {
    /// Tells the primary this worker no longer holds the listener `key`.
    pub(crate) fn close(&self, key: u32) {
        let close = Control::CloseListener { key };
        let _ = self
            .sender
            .send_now(FrameKind::Control, &close.encode(), Vec::new());
    }

    /// The TCP listener the primary's `reply` (and its descriptors) gives.
    ///
    /// # Errors
    /// A reply without the socket it announces, or a socket the runtime
    /// refuses.
    pub(crate) fn tcp_listener(
        self: &Arc<Self>,
        reply: ListenReply,
        mut fds: Vec<OwnedFd>,
        asked: SocketAddr,
        options: &TcpOptions,
    ) -> io::Result<TcpListener> {
        let handed = Arc::new(Handed::default());
        handed.state().prefetch = options.prefetch.unwrap_or(DEFAULT_PREFETCH) as usize;
        let (key, socket, local_addr) = match reply {
            ListenReply::Socket { key, .. } => {
                let fd = fds
                    .pop()
                    .ok_or_else(|| io::Error::other("the primary sent no socket"))?;
                let std_listener = std::net::TcpListener::from(fd);
                std_listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                let local_addr = listener.local_addr()?;
                (key, Some(listener), local_addr)
            }
            ListenReply::RoundRobin { key, address } => {
                let bound = address
                    .strip_prefix("tcp://")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(asked);
                (key, None, bound)
            }
            ListenReply::Failed { message, .. } => return Err(io::Error::other(message)),
        };
        let round_robin = socket.is_none();
        *lock(&handed.socket) = socket.map(Arc::new);
        self.table().insert(key, Arc::downgrade(&handed));
        Ok(TcpListener {
            key,
            handed,
            round_robin,
            batch_acks: on_single_threaded_runtime(),
            local_addr,
            owner: Some(self.clone()),
        })
    }

    /// A listener this worker binds itself, outside the cluster (Node's
    /// `exclusive`); the primary is told it listens, for its `Listening`
    /// event.
    ///
    /// # Errors
    /// The bind error, naming the address.
    pub(crate) fn exclusive_tcp_listener(
        &self,
        addr: SocketAddr,
        options: &TcpOptions,
    ) -> io::Result<TcpListener> {
        let socket = bind::tcp(
            addr,
            bind::TcpBind {
                backlog: options.backlog,
                ipv6_only: options.ipv6_only,
                reuse_port: false,
                first: true,
            },
        )?;
        let address = bind::describe_socket(&socket);
        let std_listener = std::net::TcpListener::from(OwnedFd::from(socket));
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let local_addr = listener.local_addr()?;
        let _ = self.sender.send_now(
            FrameKind::Control,
            &Control::Listening { address }.encode(),
            Vec::new(),
        );
        let handed = Arc::new(Handed::default());
        *lock(&handed.socket) = Some(Arc::new(listener));
        Ok(TcpListener {
            key: u32::MAX,
            handed,
            round_robin: false,
            batch_acks: false,
            local_addr,
            owner: None,
        })
    }
}

/// Waits until the `accept()` calls that held a socket have woken up and let
/// go of it (they were told to: a few turns of the event loop), at most a
/// second.
async fn release(socket: std::sync::Weak<tokio::net::TcpListener>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while socket.strong_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// Closes a listener: queued connections go back to the primary, waiting
/// `accept()` calls wake up and fail. Returns the socket it accepted on, which
/// those calls may hold a little longer.
fn refuse_queued(
    key: u32,
    handed: &Handed,
    sender: &ChannelSender,
) -> Option<Arc<tokio::net::TcpListener>> {
    let refused: Vec<u64> = {
        let mut state = handed.state();
        state.closed = true;
        state.queue.drain(..).map(|queued| queued.seq).collect()
    };
    let socket = lock(&handed.socket).take();
    for seq in refused {
        refuse(sender, key, seq);
    }
    handed.arrived.notify_waiters();
    socket
}

/// Connections handed to this worker by the primary, one descriptor each.
pub(crate) fn incoming_connections(
    listeners: &Arc<WorkerListeners>,
    key: u32,
    handed_connections: Vec<HandedConnection>,
    fds: Vec<OwnedFd>,
) {
    let handed = listeners.table().get(&key).and_then(Weak::upgrade);
    let mut refused = Vec::new();
    let mut queued = 0;
    let mut start_patrol = false;
    {
        let mut state = handed.as_ref().map(|h| h.state());
        let mut fds = fds.into_iter();
        let now = Instant::now();
        for HandedConnection { seq, peer } in handed_connections {
            let fd = fds.next();
            let Some((state, fd)) = state.as_mut().zip(fd) else {
                refused.push(seq);
                continue;
            };
            state.granted = state.granted.saturating_sub(1);
            if state.closed {
                refused.push(seq);
                continue;
            }
            let ahead = state.waiting <= state.queue.len();
            state.queue.push_back(Queued {
                seq,
                fd,
                peer,
                ahead: ahead.then_some(now),
            });
            queued += 1;
            if ahead && !state.patrolled {
                state.patrolled = true;
                start_patrol = true;
            }
        }
    }
    if let Some(handed) = handed {
        for _ in 0..queued {
            handed.arrived.notify_one();
        }
        if start_patrol {
            tokio::spawn(give_back_untaken(Arc::downgrade(listeners), key, handed));
        }
    }
    for seq in refused {
        refuse(&listeners.sender, key, seq);
    }
}

fn refuse(sender: &ChannelSender, key: u32, seq: u64) {
    let ack = Control::ConnectionAck {
        key,
        seq,
        accepted: false,
        credit: 0,
    };
    let _ = sender.send_now(FrameKind::Control, &ack.encode(), Vec::new());
}

/// Watches the connections handed ahead of `accept()` calls (one task per
/// listener while there are any): if the application has taken none of them
/// in time, they go back to the primary, which then stops feeding this
/// worker until its application calls `accept()` again.
async fn give_back_untaken(listeners: Weak<WorkerListeners>, key: u32, handed: Arc<Handed>) {
    let mut deadline = Instant::now() + PREFETCH_PATIENCE;
    loop {
        tokio::time::sleep_until(deadline.into()).await;
        let Some(listeners) = listeners.upgrade() else {
            return;
        };
        let mut state = handed.state();
        let Some(oldest) = state.queue.iter().find_map(|q| q.ahead) else {
            state.patrolled = false;
            return;
        };
        let due = oldest + PREFETCH_PATIENCE;
        if state.waiting > 0 || due > Instant::now() {
            // Being taken, or not old enough yet: look again later.
            deadline = due.max(Instant::now() + PREFETCH_PATIENCE / 4);
            continue;
        }
        // Nobody is accepting: every connection queued ahead goes back, and
        // the primary forgets this worker's credit, as do we. Refused under
        // the lock, so a credit granted by an `accept()` starting meanwhile
        // reaches the primary after the refusals that reset it.
        state.granted = 0;
        state.patrolled = false;
        let (back, keep): (VecDeque<Queued>, VecDeque<Queued>) =
            state.queue.drain(..).partition(|q| q.ahead.is_some());
        state.queue = keep;
        for queued in back {
            refuse(&listeners.sender, key, queued.seq);
        }
        return;
    }
}

fn on_single_threaded_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// A TCP listener shared through the cluster. Accepts connections whichever
/// policy the cluster uses; closes when the worker disconnects.
///
/// With the `axum` feature it implements `axum::serve::Listener`.
pub struct TcpListener {
    key: u32,
    handed: Arc<Handed>,
    round_robin: bool,
    /// Acknowledgements may wait for the writer task (see `take_handed`):
    /// the listener was made on a single-threaded runtime.
    batch_acks: bool,
    local_addr: SocketAddr,
    /// The worker's listeners, for a cluster listener (`None` for an
    /// exclusive one, bound by the worker itself).
    owner: Option<Arc<WorkerListeners>>,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("local_addr", &self.local_addr)
            .field("round_robin", &self.round_robin)
            .finish_non_exhaustive()
    }
}

/// Ends `accept()` once the worker disconnects.
fn disconnecting() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the worker is disconnecting from the cluster",
    )
}

impl TcpListener {
    /// Accepts the next connection.
    ///
    /// # Errors
    /// `ConnectionAborted` once the worker is disconnecting; otherwise the
    /// OS's accept errors.
    ///
    /// # Cancel safety
    /// Cancel safe: a connection is either returned or stays queued.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let _waiting = self.start_waiting()?;
        loop {
            let arrived = self.handed.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(accepted) = self.take_handed()? {
                return Ok(accepted);
            }
            match self.handed.socket() {
                Some(socket) => tokio::select! {
                    () = &mut arrived => {}
                    accepted = socket.accept() => return accepted,
                },
                None => arrived.await,
            }
        }
    }

    /// Counts this call as waiting, and grants the primary credit for it on a
    /// round-robin listener.
    fn start_waiting(&self) -> io::Result<WaitingGuard<'_>> {
        let grant = {
            let mut state = self.handed.state();
            if state.closed {
                return Err(disconnecting());
            }
            state.waiting += 1;
            state.credit_due(0)
        };
        if grant > 0 && self.round_robin {
            self.send(Control::Credit {
                key: self.key,
                n: grant as u32,
            });
        }
        Ok(WaitingGuard {
            handed: &self.handed,
        })
    }

    fn take_handed(&self) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        let fd = {
            let mut state = self.handed.state();
            if state.closed {
                return Err(disconnecting());
            }
            let Some(Queued { seq, fd, peer, .. }) = state.queue.pop_front() else {
                return Ok(None);
            };
            // Credit to replace what was taken rides on the ack instead of a
            // message of its own.
            let credit = if self.round_robin {
                // This call is about to return with its connection.
                state.credit_due(1) as u32
            } else {
                0
            };
            // Acknowledged under the lock, so the ack is queued before a
            // concurrent disconnect's notice: the primary never hands this
            // connection to a second worker. The ack must also leave before
            // the application reads from the connection (a worker that died
            // in between would have its connection handed again). On the
            // single-threaded runtime the writer task, woken here, runs before
            // any task the application spawns for the connection, so acks
            // of one turn of the event loop leave together in one write; on
            // the multi-threaded one nothing orders them, so the ack is
            // written at once.
            if let Some(owner) = &self.owner {
                let ack = Control::ConnectionAck {
                    key: self.key,
                    seq,
                    accepted: true,
                    credit,
                }
                .encode();
                let _ = if self.batch_acks {
                    owner.sender.send_batched(FrameKind::Control, &ack)
                } else {
                    owner.sender.send_now(FrameKind::Control, &ack, Vec::new())
                };
            }
            (fd, peer)
        };
        let (fd, peer) = fd;
        // The primary accepted it non-blocking (the flag belongs to the
        // connection, shared with the primary's copy).
        let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        let peer = match peer {
            Some(peer) => peer,
            None => stream.peer_addr().unwrap_or(self.local_addr),
        };
        Ok(Some((stream, peer)))
    }

    fn send(&self, control: Control) {
        if let Some(owner) = &self.owner {
            let _ = owner
                .sender
                .send_now(FrameKind::Control, &control.encode(), Vec::new());
        }
    }

    /// The address the listener is bound to (for port 0: the port the kernel
    /// chose, the same in every worker).
    ///
    /// # Errors
    /// None in practice; the signature matches Tokio's.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    /// Whether connections come from the primary (round-robin) rather than
    /// from a socket this worker accepts on.
    pub fn is_round_robin(&self) -> bool {
        self.round_robin
    }
}

struct WaitingGuard<'a> {
    handed: &'a Handed,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.handed.state();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let Some(owner) = &self.owner else { return };
        owner.table().remove(&self.key);
        drop(refuse_queued(self.key, &self.handed, &owner.sender));
        owner.close(self.key);
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match TcpListener::accept(self).await {
                Ok(accepted) => return accepted,
                // Disconnecting: the server's graceful shutdown takes over.
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionAborted
                        && self.handed.state().closed =>
                {
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(prefetch: usize) -> HandedState {
        HandedState {
            prefetch,
            ..HandedState::default()
        }
    }

    #[test]
    fn without_prefetch_credit_matches_the_waiting_accept_calls() {
        let mut s = state(0);
        s.waiting = 1;
        assert_eq!(s.credit_due(0), 1, "one accept() waits: one connection");
        // Its connection arrives and is taken: nothing more is asked for by
        // the call that is returning with it.
        s.granted -= 1;
        assert_eq!(s.credit_due(1), 0);
        s.waiting = 0;
        assert_eq!(s.credit_due(0), 0);
    }

    #[test]
    fn the_prefetch_reserve_is_topped_up_by_halves() {
        let mut s = state(16);
        s.waiting = 1;
        assert_eq!(s.credit_due(0), 17);
        // An accept loop: a connection arrives, the waiting call takes it
        // (credit rides on its ack), the next call starts waiting.
        let mut grants = Vec::new();
        for _ in 0..32 {
            s.granted -= 1;
            let on_ack = s.credit_due(1);
            let on_wait = s.credit_due(0);
            grants.push(on_ack + on_wait);
            assert!(s.granted >= 8, "the reserve never runs dry");
        }
        let topped_up: Vec<(usize, usize)> = grants
            .iter()
            .enumerate()
            .filter(|(_, g)| **g > 0)
            .map(|(i, g)| (i, *g))
            .collect();
        assert_eq!(topped_up, [(7, 8), (15, 8), (23, 8), (31, 8)], "{grants:?}");
    }

    #[test]
    fn an_accept_call_with_nothing_coming_is_always_covered() {
        let mut s = state(16);
        s.waiting = 3;
        s.granted = 2;
        // Two connections are on their way for three waiting calls: short.
        assert!(s.credit_due(0) >= 1);
    }
}
