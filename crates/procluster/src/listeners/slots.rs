//! Reuseport sockets for worker slots: one `SO_REUSEPORT` socket per slot,
//! all on one address, bound when a slot first needs it and kept across
//! the restarts of the slot's worker (its queue waits for the next worker
//! instead of being dropped with the socket), closed when the slot goes.
//!
//! [`ReusePortBinder`] binds the sockets of one address (the first one
//! learns the port when asked for port 0, the others join it);
//! [`SlotSockets`] keeps one of them per slot. The primary's listener
//! groups bind through the binder; the `procluster` command, whose workers
//! get their sockets at fork time, keeps them in a [`SlotSockets`].
//!
//! ```
//! use procluster::listeners::slots::{ReusePortBinder, SlotSockets};
//!
//! # fn main() -> std::io::Result<()> {
//! let binder = ReusePortBinder::tcp("127.0.0.1:0".parse().unwrap(), Default::default())?;
//! let address = binder.address().to_string();
//! let mut slots = SlotSockets::new(binder);
//! let first = slots.get_or_bind(0)?;
//! let second = slots.get_or_bind(1)?;
//! // Both on the kernel-chosen port; the slot keeps its socket.
//! assert_eq!(procluster::listeners::describe_socket(&*second), address);
//! assert!(std::sync::Arc::ptr_eq(&first, &slots.get_or_bind(0)?));
//! // Scaled down to one slot: slot 1's socket is closed once nobody else
//! // holds it.
//! slots.retain_below(1);
//! assert_eq!(slots.len(), 1);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use socket2::{Socket, Type};

use super::bind::{self, TcpBind};
use super::saturation::{Change, QueueWatch, Rejoin};
use super::steering::{self, SocketOrder};
use crate::WorkerId;

/// What kind of socket to bind again.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Tcp(TcpBind),
    Udp,
}

/// Binds `SO_REUSEPORT` sockets on one address, the first of them at once
/// (to learn the port the kernel picks for port 0).
#[derive(Debug)]
pub struct ReusePortBinder {
    /// The address actually bound (the kernel's port, not 0).
    addr: SocketAddr,
    kind: Kind,
    /// `tcp://…` or `udp://…`.
    address: String,
    /// The first socket, until someone takes it.
    spare: Option<Socket>,
    blocking: bool,
}

impl ReusePortBinder {
    /// Binds the first TCP socket on `addr` (with `SO_REUSEPORT`, whatever
    /// `options.reuse_port` says).
    ///
    /// # Errors
    /// The bind error, naming the address.
    pub fn tcp(addr: SocketAddr, options: TcpBind) -> io::Result<Self> {
        // The first binds alone, so a port another cluster or process holds
        // (even with SO_REUSEPORT) is in use; the others join it.
        let first = TcpBind {
            reuse_port: true,
            first: true,
            ..options
        };
        let others = TcpBind {
            first: false,
            ..first
        };
        Self::from_first(bind::tcp(addr, first)?, Kind::Tcp(others))
    }

    /// Binds the first UDP socket on `addr`, with `SO_REUSEPORT`.
    ///
    /// # Errors
    /// The bind error, naming the address.
    pub fn udp(addr: SocketAddr) -> io::Result<Self> {
        Self::from_first(bind::udp(addr, true)?, Kind::Udp)
    }

    fn from_first(first: Socket, kind: Kind) -> io::Result<Self> {
        let addr = first
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("reuseport is for TCP and UDP sockets"))?;
        Ok(Self {
            addr,
            kind,
            address: bind::describe_socket(&first),
            spare: Some(first),
            blocking: false,
        })
    }

    /// Sockets come out in blocking mode, as socket activation hands them
    /// to programs (the mode belongs to the socket that every holder
    /// shares). The default is non-blocking.
    pub fn blocking(mut self, blocking: bool) -> Self {
        self.blocking = blocking;
        self
    }

    /// The address bound, as `tcp://127.0.0.1:43121` or `udp://…`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A socket on the address: the first one while nobody has taken it,
    /// then a new one each call.
    ///
    /// # Errors
    /// The bind error (`EMFILE` when out of descriptors, for instance).
    pub fn next_socket(&mut self) -> io::Result<Socket> {
        let socket = match self.spare.take() {
            Some(socket) => socket,
            None => match self.kind {
                Kind::Tcp(options) => bind::tcp(self.addr, options)?,
                Kind::Udp => bind::udp(self.addr, true)?,
            },
        };
        if self.blocking {
            socket.set_nonblocking(false)?;
        }
        Ok(socket)
    }

    /// Whether the sockets are stream (TCP) sockets.
    pub fn is_stream(&self) -> bool {
        matches!(self.kind, Kind::Tcp(_))
    }
}

/// Takes a bound TCP or UDP socket as the first of a reuseport address
/// (it must have `SO_REUSEPORT` set for the others to join it).
impl TryFrom<Socket> for ReusePortBinder {
    type Error = io::Error;

    fn try_from(first: Socket) -> io::Result<Self> {
        let kind = match first.r#type()? {
            Type::STREAM => Kind::Tcp(TcpBind {
                reuse_port: true,
                ..TcpBind::default()
            }),
            _ => Kind::Udp,
        };
        Self::from_first(first, kind)
    }
}

/// One reuseport socket per worker slot, kept across the slot's restarts.
///
/// For TCP, new connections are steered by the kernel to the slots that
/// have a ready worker ([`worker_ready`](Self::worker_ready),
/// [`worker_exited`](Self::worker_exited)): a slot whose worker is
/// restarting gets none until the new one is ready, so nothing waits in its
/// queue meanwhile (Linux 4.6 and later; elsewhere, or before any worker is
/// ready, the kernel spreads connections over every slot's socket). Called
/// every [`QUEUE_POLL`](super::saturation::QUEUE_POLL),
/// [`watch_queues`](Self::watch_queues) also steers new connections around
/// a slot whose worker stopped accepting, until it has taken what waits in
/// its queue.
///
/// [`stick_by_address`](Self::stick_by_address) makes the kernel send each
/// client address to one slot instead (sticky sessions by address): the
/// rendezvous hashing of [`crate::sticky`], run by the kernel, so a slot's
/// next worker gets its keys back. A slot whose worker is gone keeps its
/// keys for the wait given, then they go to the other slots until it has a
/// ready worker again.
#[derive(Debug)]
pub struct SlotSockets {
    binder: ReusePortBinder,
    sockets: BTreeMap<usize, Arc<OwnedFd>>,
    /// The sockets in the kernel's order.
    order: SocketOrder<usize>,
    /// The ready workers of each slot (two during a slot's reload).
    workers: BTreeMap<usize, BTreeSet<WorkerId>>,
    /// Steering works here (until the kernel refuses a program).
    steering: bool,
    /// The slots' queues: which workers stopped accepting.
    queues: QueueWatch<usize>,
    /// Slots being removed: no new connections, closed once their worker
    /// has exited.
    retiring: BTreeSet<usize>,
    /// Sticky by address, when asked for.
    sticky: Option<StickySlots>,
}

/// The state of sticky steering by address.
#[derive(Debug)]
struct StickySlots {
    v4_prefix: u8,
    v6_prefix: u8,
    /// How long a slot without a ready worker keeps its keys.
    wait: std::time::Duration,
    /// Slots without a ready worker, since when.
    vacant_since: BTreeMap<usize, Instant>,
    /// Vacant slots whose wait is over: their keys go elsewhere.
    expired: BTreeSet<usize>,
}

impl SlotSockets {
    /// No slot has a socket yet; the binder's first socket goes to the
    /// first slot that asks.
    pub fn new(binder: ReusePortBinder) -> Self {
        let steering = binder.is_stream();
        Self {
            binder,
            sockets: BTreeMap::new(),
            order: SocketOrder::default(),
            workers: BTreeMap::new(),
            steering,
            queues: QueueWatch::new(Rejoin::WhenDrained),
            retiring: BTreeSet::new(),
            sticky: None,
        }
    }

    /// Makes the kernel send each client address (its first `v4_prefix` or
    /// `v6_prefix` bits) to one slot, the same slot across restarts of its
    /// worker; a slot without a ready worker keeps its keys for `wait`.
    /// Slots whose worker stops accepting are no longer steered around:
    /// the client's slot wins.
    ///
    /// # Errors
    /// For UDP sockets, and when the kernel refuses the program (before
    /// Linux 4.6, or a sandbox that forbids it).
    pub fn stick_by_address(
        &mut self,
        v4_prefix: u8,
        v6_prefix: u8,
        wait: std::time::Duration,
    ) -> io::Result<()> {
        if !self.binder.is_stream() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "sticky sessions are for TCP listeners",
            ));
        }
        self.sticky = Some(StickySlots {
            v4_prefix: v4_prefix.min(32),
            v6_prefix: v6_prefix.min(128),
            wait,
            vacant_since: self.sockets.keys().map(|s| (*s, Instant::now())).collect(),
            expired: BTreeSet::new(),
        });
        self.queues = QueueWatch::new(Rejoin::WhenDrained);
        // A first socket to try the program on.
        let slot = self.sockets.keys().next().copied().unwrap_or(0);
        self.steering = false;
        let socket = self.get_or_bind(slot)?;
        self.steering = true;
        let program = self.sticky_program();
        steering::attach(&*socket, &program).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "the kernel refused the program that routes clients by address ({error}); sticky sessions by address need Linux 4.6 or later without a sandbox that forbids SO_ATTACH_REUSEPORT_CBPF"
                ),
            )
        })
    }

    /// The sticky program for the slots keys go to now.
    fn sticky_program(&self) -> Vec<steering::Instruction> {
        let Some(sticky) = &self.sticky else {
            return Vec::new();
        };
        let slots: Vec<(u64, u32)> = self
            .sockets
            .keys()
            .filter(|slot| !self.retiring.contains(slot) && !sticky.expired.contains(slot))
            .filter_map(|slot| Some((*slot as u64, self.order.position(slot)?)))
            .collect();
        steering::by_address(&slots, sticky.v4_prefix, sticky.v6_prefix)
    }
    /// `worker` of `slot` is ready: the slot's socket gets new connections.
    pub fn worker_ready(&mut self, slot: usize, worker: WorkerId) {
        self.workers.entry(slot).or_default().insert(worker);
        self.queues.forget(slot);
        if let Some(sticky) = &mut self.sticky {
            sticky.vacant_since.remove(&slot);
            sticky.expired.remove(&slot);
        }
        self.steer();
    }

    /// `worker` of `slot` ended: with no other ready worker in the slot, its
    /// socket gets no new connection until one is ready.
    pub fn worker_exited(&mut self, slot: usize, worker: WorkerId) {
        if let Some(ready) = self.workers.get_mut(&slot) {
            ready.remove(&worker);
            if ready.is_empty() {
                self.workers.remove(&slot);
                if let Some(sticky) = &mut self.sticky {
                    sticky.vacant_since.insert(slot, Instant::now());
                }
            }
        }
        self.queues.forget(slot);
        self.steer();
    }

    /// Looks at the queue of every slot with a ready worker (`TCP_INFO`;
    /// call it every [`QUEUE_POLL`](super::saturation::QUEUE_POLL)). A
    /// slot whose queue has stopped shrinking has a worker that is not
    /// accepting (busy, or hung): new connections go to the other slots
    /// until that worker has taken what waits in its queue. Those
    /// connections stay where they are (the worker holds its socket; only
    /// the primary's own listener groups can move them). Returns the slots
    /// whose state changed.
    pub fn watch_queues(&mut self, now: Instant) -> Vec<Change<usize>> {
        if !self.steering {
            return Vec::new();
        }
        if let Some(sticky) = &mut self.sticky {
            // Sticky: the client's slot wins over a busy worker; only a
            // vacant slot's wait running out changes where keys go.
            let over: Vec<usize> = sticky
                .vacant_since
                .iter()
                .filter(|(slot, since)| {
                    now.saturating_duration_since(**since) >= sticky.wait
                        && !sticky.expired.contains(slot)
                })
                .map(|(slot, _)| *slot)
                .collect();
            if !over.is_empty() {
                tracing::debug!(address = %self.binder.address(), ?over, "sticky slots without a worker give their keys to the others");
                sticky.expired.extend(over);
                self.steer();
            }
            return Vec::new();
        }
        let ready: Vec<usize> = self.workers.keys().copied().collect();
        let mut changes = Vec::new();
        for slot in ready {
            let Some(socket) = self.sockets.get(&slot) else {
                continue;
            };
            let waiting = crate::sys::listen_queue_len(socket.as_fd()).unwrap_or(0);
            let others_accepting = self
                .workers
                .keys()
                .any(|other| *other != slot && !self.queues.is_avoided(*other));
            if let Some(change) = self.queues.observe(slot, waiting, now, others_accepting) {
                if let Change::Stuck(slot) = change {
                    tracing::debug!(address = %self.binder.address(), slot, waiting, "a slot's worker is not accepting; new connections go to the others until it takes what waits for it");
                }
                changes.push(change);
            }
        }
        if !changes.is_empty() {
            self.steer();
        }
        changes
    }

    /// Whether `slot`'s worker was found not accepting (and is steered
    /// around).
    pub fn is_stuck(&self, slot: usize) -> bool {
        self.queues.is_avoided(slot)
    }

    fn steer(&mut self) {
        if !self.steering {
            return;
        }
        if self.sticky.is_some() {
            let program = self.sticky_program();
            let Some(socket) = self.sockets.values().next() else {
                return;
            };
            if let Err(error) = steering::attach(&**socket, &program) {
                tracing::error!(address = %self.binder.address(), %error, "the kernel refused the program that routes clients by address; they are spread by the kernel's own hash");
                self.steering = false;
            }
            return;
        }
        let eligible = self.order.indexes(|slot| {
            self.workers.contains_key(slot)
                && !self.queues.is_avoided(*slot)
                && !self.retiring.contains(slot)
        });
        let program = steering::spread(&eligible, self.order.len());
        let Some(socket) = self.sockets.values().next() else {
            return;
        };
        if let Err(error) = steering::attach(&**socket, &program) {
            self.steering = false;
            tracing::warn!(
                address = %self.binder.address(),
                %error,
                "the kernel refused the reuseport steering program; a restarting slot's queue waits for its next worker"
            );
        }
    }

    /// The address, as `tcp://…` or `udp://…`.
    pub fn address(&self) -> &str {
        self.binder.address()
    }

    /// The slot's socket, bound now if the slot has none.
    ///
    /// # Errors
    /// The bind error.
    pub fn get_or_bind(&mut self, slot: usize) -> io::Result<Arc<OwnedFd>> {
        if let Some(socket) = self.sockets.get(&slot).cloned() {
            if self.retiring.remove(&slot) {
                self.steer();
            }
            return Ok(socket);
        }
        let socket = Arc::new(OwnedFd::from(self.binder.next_socket()?));
        self.sockets.insert(slot, socket.clone());
        self.order.listening(slot);
        if let Some(sticky) = &mut self.sticky {
            if !self.workers.contains_key(&slot) {
                sticky.vacant_since.insert(slot, Instant::now());
            }
        }
        self.steer();
        Ok(socket)
    }

    /// The slot's socket, if it has one.
    pub fn get(&self, slot: usize) -> Option<&Arc<OwnedFd>> {
        self.sockets.get(&slot)
    }

    /// Takes the slot's socket out (it closes when the last holder drops
    /// it, and the kernel stops routing connections to it).
    pub fn remove(&mut self, slot: usize) -> Option<Arc<OwnedFd>> {
        let removed = self.sockets.remove(&slot);
        self.queues.forget(slot);
        self.retiring.remove(&slot);
        if let Some(sticky) = &mut self.sticky {
            sticky.vacant_since.remove(&slot);
            sticky.expired.remove(&slot);
        }
        if removed.is_some() {
            self.order.closed(slot);
            self.steer();
        }
        removed
    }

    /// The cluster scales down to `count` slots: the sockets of the slots
    /// above get no new connection from now on (where steering works), and
    /// each closes once its worker has exited ([`take_retired`](Self::take_retired)).
    pub fn retire_from(&mut self, count: usize) {
        self.retiring
            .extend(self.sockets.range(count..).map(|(slot, _)| *slot));
        self.steer();
    }

    /// Takes out the sockets of retiring slots whose worker has exited
    /// (they close when dropped). What still waits in their queues is the
    /// caller's to accept first: nobody else will, and closing a listening
    /// socket resets the connections in its queue.
    pub fn take_retired(&mut self) -> Vec<Arc<OwnedFd>> {
        let done: Vec<usize> = self
            .retiring
            .iter()
            .copied()
            .filter(|slot| !self.workers.contains_key(slot))
            .collect();
        done.into_iter()
            .filter_map(|slot| {
                self.retiring.remove(&slot);
                self.remove(slot)
            })
            .collect()
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.binder.local_addr()
    }

    /// Each open slot socket's inode (`fstat`'s `st_ino`, as
    /// `/proc/net/tcp` lists it), by slot.
    pub fn inodes(&self) -> Vec<(usize, u64)> {
        self.sockets
            .iter()
            .filter_map(|(slot, socket)| {
                rustix::fs::fstat(&**socket)
                    .ok()
                    .map(|stat| (*slot, stat.st_ino))
            })
            .collect()
    }

    /// Whether the sockets are stream (TCP) sockets.
    pub fn is_stream(&self) -> bool {
        self.binder.is_stream()
    }

    /// Closes `slot`'s socket if no worker of the slot is ready and nothing
    /// waits in its queue (for instance when its worker could not be
    /// started for lack of descriptors: the socket is one of them). The slot
    /// binds a new one when it next asks.
    pub fn release_unused(&mut self, slot: usize) {
        if self.workers.contains_key(&slot) {
            return;
        }
        let Some(socket) = self.sockets.get(&slot) else {
            return;
        };
        if crate::sys::listen_queue_len(socket.as_fd()).unwrap_or(0) == 0 {
            self.remove(slot);
        }
    }

    /// Keeps the sockets of slots `0..count` only, closing the others at
    /// once (see [`retire_from`](Self::retire_from) to let their workers
    /// finish first).
    pub fn retain_below(&mut self, count: usize) {
        let gone: Vec<usize> = self.sockets.range(count..).map(|(slot, _)| *slot).collect();
        for slot in gone {
            self.remove(slot);
        }
    }

    /// How many slots hold a socket.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether no slot holds a socket.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(socket: &impl std::os::fd::AsFd) -> SocketAddr {
        socket2::SockRef::from(socket)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap()
    }

    #[test]
    fn every_slot_gets_its_own_socket_on_the_first_port() {
        let binder =
            ReusePortBinder::tcp("127.0.0.1:0".parse().unwrap(), TcpBind::default()).unwrap();
        let port = binder.local_addr().port();
        assert_ne!(port, 0);
        let mut slots = SlotSockets::new(binder);
        let a = slots.get_or_bind(0).unwrap();
        let b = slots.get_or_bind(3).unwrap();
        assert_eq!(local(&*a).port(), port);
        assert_eq!(local(&*b).port(), port);
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &slots.get_or_bind(3).unwrap()), "kept");
    }

    #[test]
    fn scaling_down_drops_the_removed_slots() {
        let binder = ReusePortBinder::udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(binder.address().starts_with("udp://127.0.0.1:"));
        let mut slots = SlotSockets::new(binder);
        for slot in 0..4 {
            slots.get_or_bind(slot).unwrap();
        }
        slots.retain_below(2);
        assert_eq!(slots.len(), 2);
        assert!(slots.get(2).is_none() && slots.get(1).is_some());
        assert!(slots.remove(1).is_some());
        assert!(slots.remove(1).is_none());
    }

    #[test]
    fn blocking_sockets_for_socket_activation() {
        let first = bind::tcp(
            "127.0.0.1:0".parse().unwrap(),
            TcpBind {
                reuse_port: true,
                ..TcpBind::default()
            },
        )
        .unwrap();
        let mut binder = ReusePortBinder::try_from(first).unwrap().blocking(true);
        assert!(binder.is_stream());
        let socket = binder.next_socket().unwrap();
        assert!(!socket.nonblocking().unwrap());
        let again = binder.next_socket().unwrap();
        assert!(!again.nonblocking().unwrap());
        assert_eq!(local(&again), binder.local_addr());
    }
}
