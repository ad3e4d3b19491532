//! The primary's side of port sharing: one listener group per distinct
//! request, bound once, shared by the workers that asked for it.
//!
//! The registry knows workers only as members: an id, a slot and the
//! sending half of their channel. What joining a listener means for a
//! worker's lifecycle (the `Listening` event) is the primary's business; the
//! registry answers requests and moves connections.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use socket2::Socket;
use tokio::sync::Notify;

use super::bind::{self, TcpBind};
use super::distributor::{Distributor, Mode, batch_for_frame_limit};
use super::keyed::{self, HasKey, Keyed, Peeked, RoutingKey};
use super::saturation::{Change, QUEUE_POLL, QueueWatch, Rejoin};
use super::slots::ReusePortBinder;
use super::steering::{self, SocketOrder};
use crate::WorkerId;
use crate::channel::{ChannelSender, SharedFd};
use crate::protocol::{Control, FrameKind, HandedConnection, ListenReply, ListenSpec, Policy};
use crate::sticky::{StickyKey, StickyOptions};
use crate::sync::lock;

/// Connections the primary accepts ahead of the workers, per listener; past
/// this it stops accepting and the kernel's backlog holds the rest.
const MAX_QUEUED: usize = 1024;
/// Pause after an accept error such as `EMFILE`, so the primary backs off
/// instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Most connections accepted in one go before they are handed out.
const ACCEPT_BURST: usize = 64;

/// Connections the primary may hold for sticky listeners (waiting for a
/// worker, or for their slot's next worker), per listener.
const MAX_QUEUED_STICKY: usize = 4 * MAX_QUEUED;

/// A connection the primary accepted and holds until a worker takes it.
#[derive(Debug)]
pub(crate) struct Accepted {
    fd: SharedFd,
    peer: Option<std::net::SocketAddr>,
    /// Where a sticky listener routes it.
    key: RoutingKey,
}

impl HasKey for Accepted {
    fn routing_key(&self) -> RoutingKey {
        self.key
    }
}

/// Which socket of a group a worker gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Slot {
    /// The one socket of a shared or round-robin group.
    All,
    /// A reuseport socket kept for a worker slot across restarts.
    Index(usize),
    /// A reuseport socket for a worker forked outside any slot.
    Worker(WorkerId),
}

/// A socket of a group and the task accepting from it in the primary, if
/// any (round-robin, or draining a reuseport slot without a worker).
struct GroupSocket {
    socket: Arc<Socket>,
    holder: Option<WorkerId>,
    acceptor: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for GroupSocket {
    fn drop(&mut self) {
        if let Some(task) = self.acceptor.take() {
            task.abort();
        }
    }
}

/// A worker holding a group: its socket slot and where to send it
/// connections.
struct Holder {
    slot: Slot,
    sender: ChannelSender,
}

struct GroupState {
    holders: BTreeMap<WorkerId, Holder>,
    sockets: BTreeMap<Slot, GroupSocket>,
    distributor: Distributor<Accepted>,
    /// A reuseport group's sockets: the first one, bound to learn the
    /// port, until a slot claims it, then one more per slot.
    reuseport: Option<ReusePortBinder>,
    closed: bool,
    /// The cluster is stopping: these workers were asked to let go of the
    /// group's socket and have not said they did; the primary takes the
    /// queues once they all have.
    stopping: Option<BTreeSet<WorkerId>>,
    /// A reuseport group's sockets in the kernel's order, for steering.
    order: SocketOrder<Slot>,
    /// Steering works here (until the kernel refuses a program).
    steering: bool,
    /// Connections each holder took, while it holds the group.
    handed: BTreeMap<WorkerId, u64>,
    /// The reuseport slots' queues: a slot whose worker stopped taking
    /// connections is steered around, its queue moved to the others.
    queues: QueueWatch<Slot>,
    /// The task that watches a reuseport group's queues.
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// A sticky group's routing.
    keyed: Option<Keyed<Accepted>>,
    /// The task that gives a sticky group's waiting slots up in time.
    expiry: Option<tokio::task::JoinHandle<()>>,
}

/// One listening address shared by workers.
pub(crate) struct Group {
    key: u32,
    policy: Policy,
    /// One reuseport socket per worker slot (reuseport, and sticky by
    /// address routed by the kernel).
    per_slot: bool,
    /// Address actually bound, e.g. `tcp://127.0.0.1:43121`.
    address: String,
    unix_path: Option<PathBuf>,
    state: Mutex<GroupState>,
    /// Wakes acceptors when the queue has room again.
    room: Notify,
    /// Accepts in the primary that failed (other than a client giving up).
    accept_errors: AtomicU64,
}

impl Group {
    fn state(&self) -> MutexGuard<'_, GroupState> {
        lock(&self.state)
    }
}

/// A worker as the registry knows it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// The worker's id.
    pub(crate) id: WorkerId,
    /// Its slot, if it was forked for one (reuseport keeps a socket per slot).
    pub(crate) index: Option<usize>,
    /// Its channel, for the connections handed to it.
    pub(crate) sender: ChannelSender,
}

/// What the registry needs from the cluster's settings.
#[derive(Debug, Clone)]
pub(crate) struct RegistryConfig {
    /// How TCP connections reach workers.
    pub(crate) policy: Policy,
    /// The channels' frame limit: handed connections are batched to fit.
    pub(crate) max_frame: usize,
    /// The descriptors the primary inherited through `LISTEN_FDS`, the only
    /// ones a worker may listen on by number.
    pub(crate) inherited_fds: Range<i32>,
    /// The limits of the sticky policy.
    pub(crate) sticky: StickyOptions,
}

/// A successful listen: the reply to send, the descriptors riding with it,
/// and the group it joined (to leave if the reply cannot be delivered).
pub(crate) struct Joined {
    pub(crate) reply: ListenReply,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) key: u32,
    /// The address bound, for the primary's `Listening` event.
    pub(crate) address: String,
}

/// What the primary's listeners have done since the cluster started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Connections the primary accepted itself, to hand them to workers:
    /// under round-robin, and from reuseport slots whose worker was gone or
    /// not accepting.
    pub accepted_by_primary: u64,
    /// Of those, connections taken from a reuseport slot's queue for
    /// another worker: the slot had no worker (they had been queued before,
    /// or the kernel put them there where steering is off), or its worker
    /// was not accepting.
    pub taken_from_slots: u64,
    /// Failed `accept()` calls in the primary (out of descriptors...).
    pub accept_errors: u64,
}

#[derive(Default)]
struct Counters {
    accepted_by_primary: std::sync::atomic::AtomicU64,
    taken_from_slots: std::sync::atomic::AtomicU64,
    accept_errors: std::sync::atomic::AtomicU64,
}

/// Every listener group of a cluster, by request and by key.
pub(crate) struct Registry {
    config: RegistryConfig,
    /// Keep groups open while no worker holds them.
    keep: AtomicBool,
    tables: Mutex<Tables>,
    /// Wakes whoever waits for handed connections to be taken.
    progress: Notify,
    counters: Counters,
}

#[derive(Default)]
struct Tables {
    by_request: HashMap<(String, u32), Arc<Group>>,
    by_key: HashMap<u32, Arc<Group>>,
    next_key: u32,
    /// Worker slots removed from the cluster: their reuseport sockets close
    /// once they have no worker.
    retired: BTreeSet<usize>,
    /// Worker slots a worker was forked for: sticky listeners keep their
    /// keys for them.
    expected: BTreeSet<usize>,
}

impl Registry {
    pub(crate) fn new(config: RegistryConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            keep: AtomicBool::new(false),
            tables: Mutex::default(),
            progress: Notify::new(),
            counters: Counters::default(),
        })
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        lock(&self.tables)
    }

    fn groups(&self) -> Vec<Arc<Group>> {
        self.tables().by_key.values().cloned().collect()
    }

    fn group(&self, key: u32) -> Option<Arc<Group>> {
        self.tables().by_key.get(&key).cloned()
    }

    /// What the listeners have done so far.
    pub(crate) fn stats(&self) -> ListenerStats {
        let read = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        ListenerStats {
            accepted_by_primary: read(&self.counters.accepted_by_primary),
            taken_from_slots: read(&self.counters.taken_from_slots),
            accept_errors: read(&self.counters.accept_errors),
        }
    }

    /// Keeps groups open while no worker holds them, so connections wait
    /// for the next worker instead of being refused.
    pub(crate) fn set_keep(&self, keep: bool) {
        self.keep.store(keep, Ordering::Relaxed);
    }

    fn keeps(&self) -> bool {
        self.keep.load(Ordering::Relaxed)
    }

    /// Answers a worker's listen request: binds (once per distinct request)
    /// and adds the worker to the group.
    ///
    /// # Errors
    /// The bind error, or a refusal (the worker listens there already).
    pub(crate) fn listen(
        self: &Arc<Self>,
        member: &Member,
        spec: &ListenSpec,
        ordinal: u32,
    ) -> io::Result<Joined> {
        let group = self.group_for(spec, ordinal)?;
        let (reply, fds) = self.join(&group, member)?;
        Ok(Joined {
            reply,
            fds,
            key: group.key,
            address: group.address.clone(),
        })
    }

    /// A worker closed one listener, or never got the reply that gave it.
    pub(crate) fn close(self: &Arc<Self>, worker: WorkerId, key: u32) {
        if let Some(group) = self.group(key) {
            self.leave(&group, worker);
        }
    }

    /// A worker disconnected or died: it leaves every group.
    pub(crate) fn worker_gone(self: &Arc<Self>, worker: WorkerId) {
        for group in self.groups() {
            self.leave(&group, worker);
        }
    }

    /// A worker's answer for a handed connection.
    pub(crate) fn ack(&self, worker: WorkerId, key: u32, seq: u64, accepted: bool, credit: u32) {
        let Some(group) = self.group(key) else {
            return;
        };
        let mut state = group.state();
        // A taken connection: our copy closes here.
        if state.distributor.ack(worker, seq, accepted).is_some() {
            *state.handed.entry(worker).or_default() += 1;
        }
        state.distributor.credit(worker, credit as usize);
        if !accepted || credit > 0 {
            dispatch(key, &mut state);
        }
        drop(state);
        group.room.notify_waiters();
        self.progress.notify_waiters();
    }

    /// A worker waits for more connections on a round-robin listener.
    pub(crate) fn credit(&self, worker: WorkerId, key: u32, n: u32) {
        let Some(group) = self.group(key) else {
            return;
        };
        let mut state = group.state();
        state.distributor.credit(worker, n as usize);
        dispatch(key, &mut state);
        drop(state);
        group.room.notify_waiters();
    }

    /// The cluster no longer has slot `index` (it scaled down): its
    /// reuseport sockets close as soon as no worker holds them, their
    /// queues drained to the other workers first.
    pub(crate) fn retire_slot(&self, index: usize) {
        {
            let mut tables = self.tables();
            tables.retired.insert(index);
            tables.expected.remove(&index);
        }
        for group in self.groups() {
            let mut state = group.state();
            let GroupState {
                keyed, distributor, ..
            } = &mut *state;
            if let Some(keyed) = keyed {
                keyed.retire(index as u64, distributor);
                steer(&group, &mut state);
                dispatch(group.key, &mut state);
                if !group.per_slot {
                    continue;
                }
            }
            let vacant = state
                .sockets
                .get(&Slot::Index(index))
                .is_some_and(|s| s.holder.is_none());
            if vacant {
                retire_socket(&group, &mut state, Slot::Index(index));
            }
        }
    }

    /// A worker is being forked for slot `index`: sticky listeners keep the
    /// slot's keys for it (for the wait of the sticky settings), and the
    /// slot is no longer retired.
    pub(crate) fn expect_slot(self: &Arc<Self>, index: usize) {
        {
            let mut tables = self.tables();
            tables.retired.remove(&index);
            tables.expected.insert(index);
        }
        let until = std::time::Instant::now() + self.config.sticky.wait;
        for group in self.groups() {
            let mut state = group.state();
            if let Some(keyed) = &mut state.keyed {
                keyed.expect(index as u64, until);
                steer(&group, &mut state);
                schedule_expiry(Arc::downgrade(self), &group, &mut state);
            }
        }
    }

    /// Stops taking new connections without losing those already waiting.
    /// Workers that accept on a TCP group's socket themselves (shared,
    /// reuseport) are asked to let go of it first, so nothing queues where
    /// only they would look; once they have (`stopped_accepting`), the
    /// primary accepts what waits in the queues, closes the sockets (new
    /// clients are refused) and hands the connections to those workers,
    /// which take them with their next `accept()`. Other groups (UDP, Unix)
    /// simply close.
    pub(crate) fn stop_accepting(self: &Arc<Self>) {
        for group in self.groups() {
            if !group.address.starts_with("tcp://") {
                self.close_group(&group);
                continue;
            }
            let mut state = group.state();
            if state.closed {
                continue;
            }
            state.closed = true;
            let holding: BTreeSet<WorkerId> = if group.policy.primary_accepts() {
                BTreeSet::new()
            } else {
                state.holders.keys().copied().collect()
            };
            let ask = Control::StopAccepting { key: group.key }.encode();
            let mut waiting = BTreeSet::new();
            for worker in holding {
                let sent =
                    state.holders[&worker]
                        .sender
                        .send_now(FrameKind::Control, &ask, Vec::new());
                if sent.is_ok() {
                    waiting.insert(worker);
                }
            }
            state.stopping = Some(waiting);
            take_queues_once_released(&group, &mut state);
        }
    }

    /// A worker let go of a group's socket, as `stop_accepting` asked.
    pub(crate) fn stopped_accepting(&self, worker: WorkerId, key: u32) {
        let Some(group) = self.group(key) else {
            return;
        };
        let mut state = group.state();
        if let Some(waiting) = &mut state.stopping {
            waiting.remove(&worker);
        }
        take_queues_once_released(&group, &mut state);
        drop(state);
        self.progress.notify_waiters();
    }

    /// Resolves once every connection `stop_accepting` took has been taken
    /// by a worker, or at `deadline`; then closes every group. Returns how
    /// many were still waiting (they are closed with their groups).
    pub(crate) async fn drained(&self, deadline: tokio::time::Instant) -> usize {
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let late = tokio::time::Instant::now() >= deadline;
            let mut waiting = 0;
            for group in self.groups() {
                let mut state = group.state();
                if late {
                    // Whoever has not let go of the socket by now: take the
                    // queues all the same.
                    if let Some(stopping) = &mut state.stopping {
                        stopping.clear();
                    }
                    take_queues_once_released(&group, &mut state);
                }
                let unreleased = state.stopping.as_ref().map_or(0, BTreeSet::len);
                waiting += unreleased + state.distributor.queued() + state.distributor.in_flight();
            }
            if waiting == 0 || late {
                self.close_all();
                return waiting;
            }
            let _ = tokio::time::timeout_at(deadline, progress).await;
        }
    }

    /// A snapshot of every open group, for metrics.
    pub(crate) fn group_stats(&self) -> Vec<GroupStats> {
        let mut groups = self.groups();
        groups.sort_by_key(|g| g.key);
        groups
            .iter()
            .map(|group| {
                let state = group.state();
                let inode = |socket: &Socket| rustix::fs::fstat(socket).ok().map(|st| st.st_ino);
                let sockets: Vec<(Option<usize>, u64)> = state
                    .sockets
                    .iter()
                    .filter_map(|(slot, s)| {
                        let slot = match slot {
                            Slot::Index(index) => Some(*index),
                            Slot::All | Slot::Worker(_) => None,
                        };
                        Some((slot, inode(&s.socket)?))
                    })
                    .collect();
                GroupStats {
                    address: group.address.clone(),
                    accept_errors: group.accept_errors.load(Ordering::Relaxed),
                    handed: state.handed.iter().map(|(w, n)| (*w, *n)).collect(),
                    sockets,
                }
            })
            .collect()
    }

    /// Closes every group (the cluster is going away).
    pub(crate) fn close_all(&self) {
        for group in self.groups() {
            self.close_group(&group);
        }
    }
}

/// What a failed listen request replies, with the errno where there is one.
pub(crate) fn failure_reply(error: &io::Error) -> ListenReply {
    ListenReply::Failed {
        os_error: error.raw_os_error().or_else(|| errno_of(error)),
        message: error.to_string(),
    }
}

/// `bind_error` keeps the kind but not the errno; recover it for the reply.
fn errno_of(error: &io::Error) -> Option<i32> {
    use rustix::io::Errno;
    Some(match error.kind() {
        io::ErrorKind::AddrInUse => Errno::ADDRINUSE.raw_os_error(),
        io::ErrorKind::PermissionDenied => Errno::ACCESS.raw_os_error(),
        io::ErrorKind::AddrNotAvailable => Errno::ADDRNOTAVAIL.raw_os_error(),
        io::ErrorKind::NotFound => Errno::NOENT.raw_os_error(),
        io::ErrorKind::InvalidInput => Errno::INVAL.raw_os_error(),
        _ => return None,
    })
}

/// Longest path a Unix socket address holds (`sun_path`, less its NUL).
const MAX_UNIX_PATH: usize = 107;

/// The form of an absolute socket path to bind: the path itself, or, when
/// it is too long for a socket address, the path relative to the primary's
/// working directory if that one fits (as Node's primary does).
fn bindable_path(path: &std::path::Path) -> PathBuf {
    let fits = |p: &std::path::Path| p.as_os_str().len() <= MAX_UNIX_PATH;
    if fits(path) {
        return path.to_path_buf();
    }
    match std::env::current_dir() {
        Ok(cwd) => {
            let relative = relative_to(path, &cwd);
            if fits(&relative) {
                relative
            } else {
                path.to_path_buf()
            }
        }
        Err(_) => path.to_path_buf(),
    }
}

/// `path` relative to `base`, both absolute, by their components alone.
fn relative_to(path: &std::path::Path, base: &std::path::Path) -> PathBuf {
    let path: Vec<_> = path.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut relative = PathBuf::new();
    for _ in common..base.len() {
        relative.push("..");
    }
    for component in &path[common..] {
        relative.push(component);
    }
    relative
}

/// How a group bound to what `spec` asks for describes its address, when
/// the request names one exactly (not port 0, not a host name).
fn bound_form(spec: &ListenSpec) -> Option<String> {
    match spec {
        ListenSpec::Tcp { addr, .. } => {
            let addr: std::net::SocketAddr = addr.parse().ok()?;
            (addr.port() != 0).then(|| format!("tcp://{addr}"))
        }
        ListenSpec::Udp { addr, .. } => {
            let addr: std::net::SocketAddr = addr.parse().ok()?;
            (addr.port() != 0).then(|| format!("udp://{addr}"))
        }
        ListenSpec::Unix { path, .. } => Some(format!("unix:{path}")),
        ListenSpec::InheritedFd { .. } => None,
    }
}

fn request_key(spec: &ListenSpec) -> String {
    match spec {
        ListenSpec::Tcp { addr, .. } => format!("tcp:{addr}"),
        ListenSpec::Udp { addr, .. } => format!("udp:{addr}"),
        ListenSpec::Unix { path, .. } => format!("unix:{path}"),
        ListenSpec::InheritedFd { fd } => format!("fd:{fd}"),
    }
}

impl Registry {
    fn group_for(self: &Arc<Self>, spec: &ListenSpec, ordinal: u32) -> io::Result<Arc<Group>> {
        let request = (request_key(spec), ordinal);
        let mut tables = self.tables();
        if let Some(group) = tables.by_request.get(&request) {
            return Ok(group.clone());
        }
        // A fixed address another request already bound (say, the port a
        // `listen(0)` got): the same socket, not a second bind.
        if let Some(bound) = bound_form(spec) {
            if let Some(group) = tables.by_key.values().find(|g| g.address == bound) {
                return Ok(group.clone());
            }
        }
        let key = tables.next_key;
        let group = Arc::new(self.create_group(key, spec, &tables.expected)?);
        tables.next_key += 1;
        tables.by_request.insert(request, group.clone());
        tables.by_key.insert(key, group.clone());
        Ok(group)
    }

    /// A new group for `spec`; a sticky group keeps the keys of the slots
    /// in `expected` (workers were forked for them).
    fn create_group(
        &self,
        key: u32,
        spec: &ListenSpec,
        expected: &BTreeSet<usize>,
    ) -> io::Result<Group> {
        let mut policy = Policy::Shared;
        let mut unix_path = None;
        let socket = match spec {
            ListenSpec::Tcp {
                addr,
                backlog,
                ipv6_only,
            } => {
                policy = self.config.policy;
                let addr = bind::parse_addr(addr)?;
                let per_slot = policy == Policy::ReusePort || self.kernel_routes(policy);
                let options = TcpBind {
                    backlog: *backlog,
                    ipv6_only: *ipv6_only,
                    reuse_port: per_slot,
                    first: true,
                };
                if per_slot {
                    // Later sockets join the port the first one got.
                    let binder = ReusePortBinder::tcp(addr, options)?;
                    let address = binder.address().to_string();
                    let group = self.new_group(key, policy, address, None, None, Some(binder));
                    return Ok(self.with_keys(group, expected));
                }
                bind::tcp(addr, options)?
            }
            ListenSpec::Udp {
                addr,
                ipv6_only,
                reuse_address,
            } => bind::udp_with(
                bind::parse_addr(addr)?,
                bind::UdpBind {
                    ipv6_only: *ipv6_only,
                    reuse_address: *reuse_address,
                    reuse_port: false,
                },
            )?,
            ListenSpec::Unix {
                path,
                backlog,
                mode,
            } => {
                let path = PathBuf::from(path);
                let socket = bind::unix(&bindable_path(&path), *backlog)?;
                if let Some(mode) = mode {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                        .map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("cannot set the mode of {}: {e}", path.display()),
                            )
                        })?;
                }
                unix_path = Some(path);
                socket
            }
            ListenSpec::InheritedFd { fd } => self.inherited(*fd)?,
        };
        // A Unix socket bound by a relative path is known by the path asked for.
        let address = match &unix_path {
            Some(path) => format!("unix:{}", path.display()),
            None => bind::describe_socket(&socket),
        };
        let group = self.new_group(key, policy, address, Some(socket), unix_path, None);
        Ok(self.with_keys(group, expected))
    }

    /// A group with its one socket (shared, round-robin) or its reuseport
    /// binder.
    fn new_group(
        &self,
        key: u32,
        policy: Policy,
        address: String,
        socket: Option<Socket>,
        unix_path: Option<PathBuf>,
        reuseport: Option<ReusePortBinder>,
    ) -> Group {
        let per_slot = reuseport.is_some();
        // Workers that accept on a socket of their own take what the
        // primary hands them without asking for it.
        let mode = if policy.primary_accepts() && !per_slot {
            Mode::Credit
        } else {
            Mode::Push
        };
        let keyed = match policy {
            Policy::Sticky(key) => Some(Keyed::new(key, self.config.sticky)),
            _ => None,
        };
        let mut sockets = BTreeMap::new();
        if let Some(socket) = socket {
            sockets.insert(Slot::All, GroupSocket::new(socket));
        }
        Group {
            key,
            policy,
            per_slot,
            address,
            unix_path,
            state: Mutex::new(GroupState {
                holders: BTreeMap::new(),
                sockets,
                distributor: Distributor::new(mode)
                    .with_max_batch(batch_for_frame_limit(self.config.max_frame)),
                reuseport,
                closed: false,
                stopping: None,
                order: SocketOrder::default(),
                steering: true,
                handed: BTreeMap::new(),
                queues: QueueWatch::new(Rejoin::AfterRetry),
                watcher: None,
                keyed,
                expiry: None,
            }),
            room: Notify::new(),
            accept_errors: AtomicU64::new(0),
        }
    }

    /// Whether the kernel routes `policy`'s connections: sticky by address
    /// where the kernel takes a reuseport program, unless the primary is
    /// asked to.
    fn kernel_routes(&self, policy: Policy) -> bool {
        matches!(policy, Policy::Sticky(key) if key.is_address())
            && self.config.sticky.kernel_routing
            && steering::kernel_takes_programs()
    }

    /// A sticky group keeps the keys of the slots in `expected` (workers
    /// were forked for them) for the wait of the sticky settings.
    fn with_keys(&self, group: Group, expected: &BTreeSet<usize>) -> Group {
        let until = std::time::Instant::now() + self.config.sticky.wait;
        if let Some(keyed) = &mut group.state().keyed {
            for index in expected {
                keyed.expect(*index as u64, until);
            }
        }
        group
    }

    /// A socket the primary inherited from systemd (`LISTEN_FDS`), shared as
    /// is. Only those: a worker may not ask for any other descriptor of the
    /// primary (another worker's channel, say).
    fn inherited(&self, fd: i32) -> io::Result<Socket> {
        let not_found = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "cannot listen on fd:{fd}: the primary did not inherit it through LISTEN_FDS"
                ),
            )
        };
        if !self.config.inherited_fds.contains(&fd) {
            return Err(not_found());
        }
        crate::sys::duplicate_inherited_fd(fd)
            .map(Socket::from)
            .ok_or_else(not_found)
    }

    /// Adds `member` to `group` and says what it gets.
    fn join(self: &Arc<Self>, group: &Arc<Group>, member: &Member) -> io::Result<Answer> {
        let mut state = group.state();
        if state.closed {
            return Err(io::Error::other("listener is closing; try again"));
        }
        let key = group.key;
        let address = group.address.clone();
        if state.holders.contains_key(&member.id) {
            // As Node: one worker listening twice on one fixed address.
            return Err(bind::bind_error(
                io::Error::from(io::ErrorKind::AddrInUse),
                &format!("{address} (this worker listens there already)"),
            ));
        }
        let holder = |slot| Holder {
            slot,
            sender: member.sender.clone(),
        };
        match group.policy {
            Policy::Shared => {
                let fd = state.sockets[&Slot::All]
                    .socket
                    .as_fd()
                    .try_clone_to_owned()?;
                state.holders.insert(member.id, holder(Slot::All));
                Ok((ListenReply::Socket { key, address }, vec![fd]))
            }
            Policy::RoundRobin | Policy::Sticky(_) if !group.per_slot => {
                state.holders.insert(member.id, holder(Slot::All));
                take_connections(&mut state, member);
                self.ensure_acceptor(group, &mut state, Slot::All);
                dispatch(key, &mut state);
                Ok((ListenReply::RoundRobin { key, address }, Vec::new()))
            }
            _ => {
                let slot = member.index.map_or(Slot::Worker(member.id), Slot::Index);
                if !state.sockets.contains_key(&slot) {
                    let socket = state
                        .reuseport
                        .as_mut()
                        .ok_or_else(|| io::Error::other("reuseport group without an address"))?
                        .next_socket()?;
                    state.sockets.insert(slot, GroupSocket::new(socket));
                    state.order.listening(slot);
                }
                let entry = state.sockets.get_mut(&slot).expect("inserted above");
                let fd = entry.socket.as_fd().try_clone_to_owned()?;
                entry.holder = Some(member.id);
                if let Some(task) = entry.acceptor.take() {
                    task.abort();
                }
                state.holders.insert(member.id, holder(slot));
                state.queues.forget(slot);
                take_connections(&mut state, member);
                steer(group, &mut state);
                self.drain_vacant(group, &mut state);
                // Sticky: the client's slot wins over a busy worker, so
                // queues are not watched.
                if state.steering && state.watcher.is_none() && state.keyed.is_none() {
                    state.watcher = Some(tokio::spawn(watch_queues(
                        Arc::downgrade(self),
                        group.clone(),
                    )));
                }
                // Connections drained while nobody held the group go out now.
                dispatch(key, &mut state);
                Ok((ListenReply::Socket { key, address }, vec![fd]))
            }
        }
    }

    /// Starts the primary accepting on a socket of the group (round-robin,
    /// or a reuseport slot left without a worker).
    fn ensure_acceptor(self: &Arc<Self>, group: &Arc<Group>, state: &mut GroupState, slot: Slot) {
        let Some(entry) = state.sockets.get_mut(&slot) else {
            return;
        };
        if entry.acceptor.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let socket = match entry.socket.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(error) => {
                tracing::error!(address = %group.address, %error, "cannot start accepting");
                return;
            }
        };
        entry.acceptor = Some(tokio::spawn(accept_loop(
            Arc::downgrade(self),
            group.clone(),
            socket,
        )));
    }

    /// Reuseport slots without a worker are drained to the workers that
    /// remain, so nothing waits in a queue nobody reads.
    fn drain_vacant(self: &Arc<Self>, group: &Arc<Group>, state: &mut GroupState) {
        if !state.distributor.has_targets() {
            return;
        }
        let keyed = state.keyed.as_ref();
        let vacant: Vec<Slot> = state
            .sockets
            .iter()
            .filter(|(_, s)| s.holder.is_none())
            .map(|(slot, _)| *slot)
            // A sticky slot waiting for its next worker keeps its queue.
            .filter(|slot| keyed.is_none_or(|k| !k.has_slot(routing_slot(*slot))))
            .collect();
        for slot in vacant {
            self.ensure_acceptor(group, state, slot);
        }
    }

    fn leave(self: &Arc<Self>, group: &Arc<Group>, worker: WorkerId) {
        self.progress.notify_waiters();
        let mut state = group.state();
        let Some(Holder { slot, .. }) = state.holders.remove(&worker) else {
            return;
        };
        if let Some(stopping) = &mut state.stopping {
            stopping.remove(&worker);
        }
        take_queues_once_released(group, &mut state);
        state.handed.remove(&worker);
        if state.keyed.is_some() {
            self.leave_keyed(group, &mut state, worker);
        }
        state.distributor.remove_target(worker);
        if let Some(entry) = state.sockets.get_mut(&slot) {
            if entry.holder == Some(worker) {
                entry.holder = None;
            }
        }
        state.queues.forget(slot);
        let retired = match slot {
            Slot::Worker(_) => true,
            Slot::Index(index) => self.tables().retired.contains(&index),
            Slot::All => false,
        };
        if retired {
            retire_socket(group, &mut state, slot);
        }
        if state.holders.is_empty() && !self.keeps() {
            drop(state);
            self.close_group(group);
            return;
        }
        dispatch(group.key, &mut state);
        if group.per_slot {
            // New connections avoid the slot first; then what it queued is
            // handed to the others.
            steer(group, &mut state);
            self.drain_vacant(group, &mut state);
        }
    }

    /// A sticky group's worker left: its slot's keys wait for the slot's
    /// next worker, unless the slot is gone for good.
    fn leave_keyed(self: &Arc<Self>, group: &Arc<Group>, state: &mut GroupState, worker: WorkerId) {
        let Some(slot) = state.keyed.as_ref().and_then(|k| k.slot_of(worker)) else {
            return;
        };
        let retired = match crate::sticky::slot_index(slot) {
            Some(index) => self.tables().retired.contains(&index),
            // A worker forked outside any slot has no successor.
            None => true,
        };
        let GroupState {
            keyed, distributor, ..
        } = state;
        if let Some(keyed) = keyed {
            let until = std::time::Instant::now() + keyed.options.wait;
            keyed.left(worker, retired, until, distributor);
        }
        schedule_expiry(Arc::downgrade(self), group, state);
    }

    /// Nobody holds the group any more: stop accepting, close what was
    /// queued (clients see the connection closed, not a hang) and release
    /// the address.
    fn close_group(&self, group: &Arc<Group>) {
        {
            let mut tables = self.tables();
            tables.by_key.remove(&group.key);
            tables.by_request.retain(|_, g| !Arc::ptr_eq(g, group));
        }
        let mut state = group.state();
        state.closed = true;
        if let Some(watcher) = state.watcher.take() {
            watcher.abort();
        }
        if let Some(expiry) = state.expiry.take() {
            expiry.abort();
        }
        let mut leftovers = state.distributor.drain_all();
        if let Some(keyed) = &mut state.keyed {
            leftovers.extend(keyed.drain());
        }
        state.sockets.clear();
        state.reuseport = None;
        drop(state);
        drop(leftovers);
        if let Some(path) = &group.unix_path {
            let _ = std::fs::remove_file(path);
        }
        group.room.notify_waiters();
        tracing::debug!(address = %group.address, "listener closed");
    }
}

type Answer = (ListenReply, Vec<OwnedFd>);

/// One shared listener as metrics see it.
#[derive(Debug, Clone)]
pub(crate) struct GroupStats {
    /// The address bound, e.g. `tcp://127.0.0.1:43121`.
    pub(crate) address: String,
    /// Accepts in the primary that failed.
    pub(crate) accept_errors: u64,
    /// Connections handed to each worker that holds it now (round-robin,
    /// and the draining of vacant reuseport slots).
    pub(crate) handed: Vec<(WorkerId, u64)>,
    /// Its sockets: the slot of a reuseport socket (`None` for the one
    /// socket of a shared group) and the socket's inode, by which the
    /// kernel's tables name it.
    pub(crate) sockets: Vec<(Option<usize>, u64)>,
}

impl GroupSocket {
    fn new(socket: Socket) -> Self {
        Self {
            socket: Arc::new(socket),
            holder: None,
            acceptor: None,
        }
    }
}

async fn accept_loop(registry: Weak<Registry>, group: Arc<Group>, socket: OwnedFd) {
    let listener = match crate::sys::async_fd(socket, tokio::io::Interest::READABLE) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(address = %group.address, %error, "cannot accept connections");
            return;
        }
    };
    loop {
        let room = group.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        let room_left = {
            let state = group.state();
            match &state.keyed {
                Some(keyed) => {
                    MAX_QUEUED_STICKY.saturating_sub(state.distributor.queued() + keyed.held())
                }
                None => MAX_QUEUED.saturating_sub(state.distributor.queued()),
            }
        };
        if room_left == 0 {
            room.await;
            continue;
        }
        match accept_burst(&listener, room_left.min(ACCEPT_BURST)).await {
            Ok(burst) => {
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let count = burst.len() as u64;
                registry
                    .counters
                    .accepted_by_primary
                    .fetch_add(count, Ordering::Relaxed);
                if group.per_slot {
                    registry
                        .counters
                        .taken_from_slots
                        .fetch_add(count, Ordering::Relaxed);
                }
                let burst = match group.sticky() {
                    Some(sticky) => look_for_keys(&registry, &group, &sticky, burst),
                    None => burst,
                };
                let mut state = group.state();
                if state.closed {
                    return;
                }
                for accepted in burst {
                    offer(&mut state, accepted);
                }
                dispatch(group.key, &mut state);
            }
            Err(error) if is_transient(&error) => {}
            Err(error) => {
                if let Some(registry) = registry.upgrade() {
                    registry
                        .counters
                        .accept_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                group.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(address = %group.address, %error, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Accepts what the listening socket has waiting, up to `max`, as bare
/// descriptors: they only pass through the primary, so they are never
/// registered with the primary's event loop (which would cost two
/// `epoll_ctl` calls per connection). A burst goes to the workers in one
/// message each.
async fn accept_burst(
    listener: &tokio::io::unix::AsyncFd<OwnedFd>,
    max: usize,
) -> io::Result<Vec<Accepted>> {
    use rustix::net::SocketFlags;
    let mut burst = Vec::new();
    loop {
        let mut ready = listener.readable().await?;
        while burst.len() < max {
            let accepted = ready.try_io(|socket| {
                // Non-blocking, as the worker's runtime wants it (the flag
                // belongs to the connection, so the worker need not set it).
                let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
                rustix::net::acceptfrom_with(socket.get_ref(), flags).map_err(io::Error::from)
            });
            match accepted {
                Ok(Ok((fd, peer))) => burst.push(Accepted {
                    fd: SharedFd::new(fd),
                    peer: peer.and_then(|p| std::net::SocketAddr::try_from(p).ok()),
                    key: RoutingKey::default(),
                }),
                // What was accepted goes out; the error comes back next time.
                Ok(Err(_)) if !burst.is_empty() => return Ok(burst),
                Ok(Err(error)) => return Err(error),
                // Nothing more waiting.
                Err(_would_block) => break,
            }
        }
        if !burst.is_empty() {
            return Ok(burst);
        }
    }
}

/// What a sticky group's acceptor needs to read keys without its lock.
struct Sticky {
    key: StickyKey,
    options: StickyOptions,
    pending: Arc<tokio::sync::Semaphore>,
}

impl Group {
    fn sticky(&self) -> Option<Sticky> {
        let state = self.state();
        let keyed = state.keyed.as_ref()?;
        Some(Sticky {
            key: keyed.key,
            options: keyed.options,
            pending: keyed.pending.clone(),
        })
    }
}

/// Gives each connection of a burst its routing key: at once for an
/// address key, or when its request head (peeked at once) has the key or
/// cannot have it. The others wait for their key in a task each (at most
/// `max_pending` at once; beyond, they are routed by their address).
/// Returns the connections routed now.
fn look_for_keys(
    registry: &Arc<Registry>,
    group: &Arc<Group>,
    sticky: &Sticky,
    burst: Vec<Accepted>,
) -> Vec<Accepted> {
    let mut routed = Vec::with_capacity(burst.len());
    let by_address = |accepted: &Accepted| keyed::address_key(&sticky.key, accepted.peer);
    for mut accepted in burst {
        if sticky.key.is_address() {
            accepted.key = by_address(&accepted);
            routed.push(accepted);
            continue;
        }
        match keyed::peek(accepted.fd.as_fd(), &sticky.key, sticky.options.max_head) {
            Peeked::Key(key) => accepted.key = key,
            Peeked::Fallback => accepted.key = by_address(&accepted),
            Peeked::More => {
                if let Ok(permit) = sticky.pending.clone().try_acquire_owned() {
                    match Arc::try_unwrap(accepted.fd) {
                        Ok(fd) => {
                            let deadline = std::time::Instant::now() + sticky.options.key_timeout;
                            tokio::spawn(wait_for_key(
                                Arc::downgrade(registry),
                                group.clone(),
                                (fd, accepted.peer),
                                (sticky.key, sticky.options.max_head, deadline),
                                permit,
                            ));
                            continue;
                        }
                        Err(fd) => accepted.fd = fd,
                    }
                }
                accepted.key = by_address(&accepted);
            }
        }
        routed.push(accepted);
    }
    routed
}

/// Waits for a connection's key (see [`keyed::read_key`]), then routes it.
async fn wait_for_key(
    registry: Weak<Registry>,
    group: Arc<Group>,
    (fd, peer): (OwnedFd, Option<std::net::SocketAddr>),
    (key, max_head, deadline): (StickyKey, usize, std::time::Instant),
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (fd, found) = keyed::read_key(fd, key, max_head, deadline).await;
    drop(permit);
    let Some(fd) = fd else { return };
    let accepted = Accepted {
        fd: SharedFd::new(fd),
        peer,
        key: found.unwrap_or_else(|| keyed::address_key(&key, peer)),
    };
    let mut state = group.state();
    if state.closed || registry.upgrade().is_none() {
        return;
    }
    offer(&mut state, accepted);
    dispatch(group.key, &mut state);
}

/// Queues a connection for the workers: for its key's worker only under
/// the sticky policy, for whichever worker can take it otherwise.
fn offer(state: &mut GroupState, accepted: Accepted) {
    let GroupState {
        keyed, distributor, ..
    } = state;
    match keyed {
        Some(keyed) => keyed.place(accepted, distributor),
        None => distributor.offer(accepted),
    }
}

/// Starts the task that gives a sticky group's waiting slots up once their
/// time is over, if there are any and it is not running.
fn schedule_expiry(registry: Weak<Registry>, group: &Arc<Group>, state: &mut GroupState) {
    let Some(keyed) = &state.keyed else { return };
    if keyed.next_deadline().is_none() || state.expiry.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    let group = group.clone();
    state.expiry = Some(tokio::spawn(async move {
        loop {
            let deadline = {
                let state = group.state();
                match state.keyed.as_ref().and_then(Keyed::next_deadline) {
                    Some(deadline) if !state.closed => deadline,
                    _ => return,
                }
            };
            tokio::time::sleep_until(deadline.into()).await;
            let mut state = group.state();
            let GroupState {
                keyed, distributor, ..
            } = &mut *state;
            if let Some(keyed) = keyed {
                keyed.expire(std::time::Instant::now(), distributor);
            }
            if group.per_slot {
                // Their keys go to the other slots, and so does what waited
                // in their queues.
                steer(&group, &mut state);
                if let Some(registry) = registry.upgrade() {
                    registry.drain_vacant(&group, &mut state);
                }
            }
            dispatch(group.key, &mut state);
        }
    }));
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Hands queued connections to workers: one message per worker, its
/// connections' descriptors attached.
fn dispatch(key: u32, state: &mut GroupState) {
    let GroupState {
        distributor,
        holders,
        ..
    } = state;
    distributor.dispatch(|worker, batch| {
        let Some(holder) = holders.get(&worker) else {
            return false;
        };
        let fds = batch.iter().map(|(_, conn)| conn.fd.clone()).collect();
        let control = Control::Connections {
            key,
            handed: batch
                .iter()
                .map(|(seq, conn)| HandedConnection {
                    seq: *seq,
                    peer: conn.peer,
                })
                .collect(),
        };
        holder
            .sender
            .send_now_shared(FrameKind::Control, &control.encode(), fds)
            .is_ok()
    });
}

/// Watches a reuseport group's queues: a slot whose queue stops shrinking
/// while connections wait in it gets no new connections until the next
/// looks tell whether its worker still accepts; one whose queue then still
/// does not shrink has a worker that is not accepting (busy with long
/// requests, or hung), and the primary hands what waits there to the other
/// workers, so no connection waits behind a busy worker while another is
/// idle. After
/// [`STUCK_RETRY`](super::saturation::STUCK_RETRY) the slot is tried again.
async fn watch_queues(registry: Weak<Registry>, group: Arc<Group>) {
    let mut ticks = tokio::time::interval(QUEUE_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let mut state = group.state();
        if state.closed || !state.steering {
            state.watcher = None;
            return;
        }
        let now = std::time::Instant::now();
        let mut changed = false;
        let held: Vec<(Slot, WorkerId)> = state
            .sockets
            .iter()
            .filter_map(|(slot, s)| Some((*slot, s.holder?)))
            .collect();
        let others_accepting = state.holders.len() > 1;
        for (slot, worker) in held {
            let waiting = if state.queues.is_stuck(slot) {
                0
            } else {
                state
                    .sockets
                    .get(&slot)
                    .and_then(|s| crate::sys::listen_queue_len(s.socket.as_fd()).ok())
                    .unwrap_or(0)
            };
            match state.queues.observe(slot, waiting, now, others_accepting) {
                Some(Change::Retry(slot)) => {
                    if let Some(entry) = state.sockets.get_mut(&slot) {
                        if let Some(task) = entry.acceptor.take() {
                            task.abort();
                        }
                    }
                    state.distributor.add_target(worker);
                    changed = true;
                }
                Some(Change::Avoid(_)) => changed = true,
                Some(Change::Stuck(slot)) => {
                    tracing::debug!(address = %group.address, ?slot, waiting, "a slot's worker is not accepting; its connections go to the others");
                    // Its own worker gets none of what the primary moves.
                    state.distributor.remove_target(worker);
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            steer(&group, &mut state);
            let stuck: Vec<Slot> = state.queues.stuck().collect();
            for slot in stuck {
                registry.ensure_acceptor(&group, &mut state, slot);
            }
            dispatch(group.key, &mut state);
        }
    }
}

/// `member` takes connections the primary hands out: under a sticky key,
/// those of its slot's keys; otherwise its turn in the rotation.
fn take_connections(state: &mut GroupState, member: &Member) {
    let GroupState {
        keyed, distributor, ..
    } = state;
    match keyed {
        Some(keyed) => {
            let slot = crate::sticky::slot_id(member.index, member.id);
            keyed.joined(member.id, slot, distributor);
        }
        None => distributor.add_target(member.id),
    }
}

/// Points the kernel's choice of a reuseport group's socket at the slots
/// that have a worker: a slot whose worker is restarting, or that is being
/// retired, gets no new connection. Where the kernel refuses the program,
/// the group keeps the kernel's own choice and the primary drains vacant
/// slots (as it does anyway for what was queued before).
fn steer(group: &Group, state: &mut GroupState) {
    steer_without(group, state, None);
}

/// [`steer`], also keeping new connections from slot `closing`.
fn steer_without(group: &Group, state: &mut GroupState, closing: Option<Slot>) {
    if !group.per_slot || !state.steering {
        return;
    }
    if let Some(keyed) = &state.keyed {
        // Sticky by address: the kernel hashes each client to the slot the
        // primary would, over the slots with a worker or waiting for one.
        let StickyKey::Address {
            v4_prefix,
            v6_prefix,
        } = keyed.key
        else {
            return;
        };
        let slots: Vec<(crate::sticky::SlotId, u32)> = keyed
            .slots()
            .filter_map(|id| {
                let slot = slot_of_routing(id);
                if Some(slot) == closing {
                    return None;
                }
                Some((id, state.order.position(&slot)?))
            })
            .collect();
        let program = steering::by_address(&slots, v4_prefix, v6_prefix);
        if let Some(target) = state.sockets.values().next() {
            if let Err(error) = steering::attach(&*target.socket, &program) {
                state.steering = false;
                tracing::error!(address = %group.address, %error, "the kernel refused the program that routes clients by address; they are spread by the kernel's own hash");
            }
        }
        return;
    }
    let eligible = state.order.indexes(|slot| {
        Some(*slot) != closing
            && !state.queues.is_avoided(*slot)
            && state.sockets.get(slot).is_some_and(|s| s.holder.is_some())
    });
    let program = steering::spread(&eligible, state.order.len());
    let Some(target) = state.sockets.values().next() else {
        return;
    };
    if let Err(error) = steering::attach(&*target.socket, &program) {
        state.steering = false;
        tracing::warn!(
            address = %group.address,
            %error,
            "the kernel refused the reuseport steering program; new connections may queue for a slot whose worker is restarting, and are drained from there"
        );
    }
}

/// The routing slot of a group's socket slot.
fn routing_slot(slot: Slot) -> crate::sticky::SlotId {
    match slot {
        Slot::Index(index) => crate::sticky::slot_id(Some(index), WorkerId::new(0)),
        Slot::Worker(id) => crate::sticky::slot_id(None, id),
        Slot::All => u64::MAX,
    }
}

/// The socket slot of a routing slot.
fn slot_of_routing(id: crate::sticky::SlotId) -> Slot {
    match crate::sticky::slot_index(id) {
        Some(index) => Slot::Index(index),
        None => Slot::Worker(WorkerId::new(id as u32)),
    }
}

/// Once every worker asked by `stop_accepting` has let go of the group's
/// socket: accepts what waits in the queues, closes the sockets, and hands
/// the connections to the workers that hold the group.
fn take_queues_once_released(group: &Group, state: &mut GroupState) {
    if !state.stopping.as_ref().is_some_and(BTreeSet::is_empty) || state.sockets.is_empty() {
        return;
    }
    state.reuseport = None;
    let holders: Vec<WorkerId> = state.holders.keys().copied().collect();
    for worker in holders {
        state.distributor.add_target(worker);
    }
    let slots: Vec<Slot> = state.sockets.keys().copied().collect();
    let before = state.distributor.queued() + state.distributor.in_flight();
    for slot in slots {
        retire_socket(group, state, slot);
    }
    let taken = (state.distributor.queued() + state.distributor.in_flight()).saturating_sub(before);
    if taken > 0 {
        tracing::debug!(address = %group.address, taken, "handing the connections queued at stop to the workers");
    }
}

/// Takes a reuseport slot's socket out of its group: what waits in its
/// queue is accepted and handed to the remaining workers, then the socket is
/// closed so the kernel stops routing new connections to it.
///
/// A connection that reaches the socket between the last `accept` and the
/// `close` is reset by the kernel, unless `net.ipv4.tcp_migrate_req` (Linux
/// 5.14 and later) lets it migrate to another socket of the port; the window
/// is one system call wide.
fn retire_socket(group: &Group, state: &mut GroupState, slot: Slot) {
    // Steered away before it goes, so nothing new reaches it between the
    // last accept and the close.
    steer_without(group, state, Some(slot));
    let Some(entry) = state.sockets.remove(&slot) else {
        return;
    };
    loop {
        match entry.socket.accept() {
            Ok((stream, peer)) => {
                // Workers take connections as they come: non-blocking.
                if stream.set_nonblocking(true).is_ok() {
                    let peer = peer.as_socket();
                    // Nobody waits here for a key: a sticky listener
                    // routes what is left by the client's address.
                    let key = state
                        .keyed
                        .as_ref()
                        .map(|k| keyed::address_key(&k.key, peer))
                        .unwrap_or_default();
                    offer(
                        state,
                        Accepted {
                            fd: SharedFd::new(OwnedFd::from(stream)),
                            peer,
                            key,
                        },
                    );
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(entry);
    if group.per_slot {
        // The kernel moved its last socket into the closed one's place.
        state.order.closed(slot);
        steer(group, state);
    }
    dispatch(group.key, state);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_path_relative_to_a_base_climbs_only_what_it_must() {
        assert_eq!(
            relative_to(Path::new("/a/b/c/sock"), Path::new("/a/b")),
            Path::new("c/sock")
        );
        assert_eq!(
            relative_to(Path::new("/a/x/sock"), Path::new("/a/b/c")),
            Path::new("../../x/sock")
        );
        assert_eq!(
            relative_to(Path::new("/a/sock"), Path::new("/a")),
            Path::new("sock")
        );
    }
}
