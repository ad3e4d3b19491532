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

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use socket2::{Socket, Type};

use super::bind::{self, TcpBind};

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
#[derive(Debug)]
pub struct SlotSockets {
    binder: ReusePortBinder,
    sockets: BTreeMap<usize, Arc<OwnedFd>>,
}

impl SlotSockets {
    /// No slot has a socket yet; the binder's first socket goes to the
    /// first slot that asks.
    pub fn new(binder: ReusePortBinder) -> Self {
        Self {
            binder,
            sockets: BTreeMap::new(),
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
        if let Some(socket) = self.sockets.get(&slot) {
            return Ok(socket.clone());
        }
        let socket = Arc::new(OwnedFd::from(self.binder.next_socket()?));
        self.sockets.insert(slot, socket.clone());
        Ok(socket)
    }

    /// The slot's socket, if it has one.
    pub fn get(&self, slot: usize) -> Option<&Arc<OwnedFd>> {
        self.sockets.get(&slot)
    }

    /// Takes the slot's socket out (it closes when the last holder drops
    /// it, and the kernel stops routing connections to it).
    pub fn remove(&mut self, slot: usize) -> Option<Arc<OwnedFd>> {
        self.sockets.remove(&slot)
    }

    /// Keeps the sockets of slots `0..count` only: the cluster scaled down.
    pub fn retain_below(&mut self, count: usize) {
        self.sockets.retain(|&slot, _| slot < count);
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
