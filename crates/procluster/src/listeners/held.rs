//! A worker's listeners other than TCP (UDP sockets, Unix listeners, sockets
//! the primary inherited): each holds its place in the primary's listener
//! group while it lives and gives it back when dropped, as a
//! [`TcpListener`](super::TcpListener) does, so the primary closes a socket
//! once its last holder lets go.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::tcp::WorkerListeners;

/// A worker's hold on a listener group of the primary.
struct Hold {
    key: u32,
    owner: Arc<WorkerListeners>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.owner.close(self.key);
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("key", &self.key).finish()
    }
}

impl WorkerListeners {
    fn hold(self: &Arc<Self>, key: u32) -> Hold {
        Hold {
            key,
            owner: self.clone(),
        }
    }
}

/// A UDP socket shared through the cluster (Node's `dgram` socket in a
/// worker). Use it as a [`tokio::net::UdpSocket`] (it dereferences to one);
/// dropping it releases the port, for this worker, in the primary.
#[derive(Debug)]
pub struct UdpSocket {
    socket: tokio::net::UdpSocket,
    /// `None` for an exclusive socket, bound by the worker itself.
    _hold: Option<Hold>,
}

impl UdpSocket {
    pub(crate) fn new(
        socket: tokio::net::UdpSocket,
        owner: &Arc<WorkerListeners>,
        key: u32,
    ) -> Self {
        Self {
            socket,
            _hold: Some(owner.hold(key)),
        }
    }

    pub(crate) fn exclusive(socket: tokio::net::UdpSocket) -> Self {
        Self {
            socket,
            _hold: None,
        }
    }
}

/// Options for a worker's `listen_udp_with`
/// (Node's `dgram.createSocket` and `bind` options).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct UdpOptions {
    /// For an IPv6 address: IPv6 only (default: dual stack; Node's
    /// `ipv6Only`).
    pub ipv6_only: Option<bool>,
    /// `SO_REUSEADDR` (Node's `reuseAddr`).
    pub reuse_address: bool,
    /// Bind in this worker, bypassing the primary (Node's `exclusive`).
    pub exclusive: bool,
}

/// Options for a worker's `listen_unix_with`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct UnixOptions {
    /// `listen()` backlog (default [`DEFAULT_BACKLOG`](super::DEFAULT_BACKLOG)).
    pub backlog: Option<u32>,
    /// The socket file is readable by all (Node's `readableAll`).
    pub readable_all: bool,
    /// The socket file is writable by all, so any user may connect (Node's
    /// `writableAll`).
    pub writable_all: bool,
}

impl UnixOptions {
    /// The socket file's permission bits these options ask for, if any:
    /// the owner's read and write always, and the others' as asked.
    pub(crate) fn mode(&self) -> Option<u32> {
        if !self.readable_all && !self.writable_all {
            return None;
        }
        let mut mode = 0o600;
        if self.readable_all {
            mode |= 0o044;
        }
        if self.writable_all {
            mode |= 0o022;
        }
        Some(mode)
    }
}

impl std::ops::Deref for UdpSocket {
    type Target = tokio::net::UdpSocket;

    fn deref(&self) -> &Self::Target {
        &self.socket
    }
}

/// A Unix stream listener shared through the cluster. Use it as a
/// [`tokio::net::UnixListener`] (it dereferences to one); dropping it
/// releases it in the primary, which removes the socket file once the last
/// worker has let go.
#[derive(Debug)]
pub struct UnixListener {
    listener: tokio::net::UnixListener,
    _hold: Hold,
}

impl UnixListener {
    pub(crate) fn new(
        listener: tokio::net::UnixListener,
        owner: &Arc<WorkerListeners>,
        key: u32,
    ) -> Self {
        Self {
            listener,
            _hold: owner.hold(key),
        }
    }
}

impl std::ops::Deref for UnixListener {
    type Target = tokio::net::UnixListener;

    fn deref(&self) -> &Self::Target {
        &self.listener
    }
}

/// A socket the primary inherited (systemd's `LISTEN_FDS`), shared with this
/// worker. Dropping it releases it in the primary;
/// [`FdListener::into_owned`] keeps the descriptor for good and lets the
/// primary forget this worker's hold.
#[derive(Debug)]
pub struct FdListener {
    fd: OwnedFd,
    _hold: Hold,
}

impl FdListener {
    pub(crate) fn new(fd: OwnedFd, owner: &Arc<WorkerListeners>, key: u32) -> Self {
        Self {
            fd,
            _hold: owner.hold(key),
        }
    }

    /// The descriptor, owned by the caller from now on; the primary no
    /// longer counts this worker as holding the socket.
    pub fn into_owned(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for FdListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for FdListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
