//! A worker's listen calls: ask the primary, wait for its answer, make the
//! listener. Every call is cancel safe: a call dropped after its request
//! went out gives back whatever the primary reserved for it.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Worker, WorkerInner};
use crate::listeners::bind;
use crate::listeners::{
    FdListener, TcpListener, TcpOptions, UdpOptions, UdpSocket, UnixListener, UnixOptions,
};
use crate::protocol::{Control, FrameKind, ListenReply, ListenSpec};
use crate::sync::lock;

impl Worker {
    /// Listens on a TCP address through the primary (Node's
    /// `server.listen(port, host)`): every worker asking for the same address
    /// shares it, and the k-th request for port 0 gets the same
    /// kernel-chosen port in every worker.
    ///
    /// # Errors
    /// The bind error (`AddrInUse`, `PermissionDenied`, `InvalidInput`...),
    /// with a message that names the address.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped before it returns, the call releases the
    /// listener the primary may have given it.
    pub async fn listen_tcp(&self, addr: &str) -> io::Result<TcpListener> {
        self.listen_tcp_with(addr, TcpOptions::default()).await
    }

    /// [`Worker::listen_tcp`] with options.
    ///
    /// # Errors
    /// As [`Worker::listen_tcp`].
    ///
    /// # Cancel safety
    /// As [`Worker::listen_tcp`].
    pub async fn listen_tcp_with(
        &self,
        addr: &str,
        options: TcpOptions,
    ) -> io::Result<TcpListener> {
        let parsed = bind::parse_addr(addr)?;
        if options.exclusive {
            return self
                .inner
                .listeners
                .exclusive_tcp_listener(parsed, &options);
        }
        let spec = ListenSpec::Tcp {
            addr: parsed.to_string(),
            backlog: options.backlog,
            ipv6_only: options.ipv6_only,
        };
        let (reply, fds) = self.request_listen(spec).await?;
        self.inner
            .listeners
            .tcp_listener(reply, fds, parsed, &options)
    }

    /// Binds a UDP socket shared by every worker that asks for the same
    /// address; datagrams spread across them.
    ///
    /// # Errors
    /// The bind error, naming the address.
    ///
    /// # Cancel safety
    /// As [`Worker::listen_tcp`].
    pub async fn listen_udp(&self, addr: &str) -> io::Result<UdpSocket> {
        self.listen_udp_with(addr, UdpOptions::default()).await
    }

    /// [`Worker::listen_udp`] with options.
    ///
    /// # Errors
    /// As [`Worker::listen_udp`].
    ///
    /// # Cancel safety
    /// As [`Worker::listen_tcp`].
    pub async fn listen_udp_with(&self, addr: &str, options: UdpOptions) -> io::Result<UdpSocket> {
        let parsed = bind::parse_addr(addr)?;
        if options.exclusive {
            let socket = bind::udp_with(
                parsed,
                bind::UdpBind {
                    ipv6_only: options.ipv6_only,
                    reuse_address: options.reuse_address,
                    reuse_port: false,
                },
            )?;
            let socket = tokio::net::UdpSocket::from_std(socket.into())?;
            return Ok(UdpSocket::exclusive(socket));
        }
        let spec = ListenSpec::Udp {
            addr: parsed.to_string(),
            ipv6_only: options.ipv6_only,
            reuse_address: options.reuse_address,
        };
        let (key, fd) = self.request_socket(spec).await?;
        let owner = &self.inner.listeners;
        let release = |e| {
            owner.close(key);
            e
        };
        let socket = std::net::UdpSocket::from(fd);
        socket.set_nonblocking(true).map_err(release)?;
        let socket = tokio::net::UdpSocket::from_std(socket).map_err(release)?;
        Ok(UdpSocket::new(socket, owner, key))
    }

    /// Listens on a Unix socket path, resolved against this worker's working
    /// directory. The primary removes the file when the last worker closes
    /// it.
    ///
    /// # Errors
    /// The bind error, naming the path.
    ///
    /// # Cancel safety
    /// As [`Worker::listen_tcp`].
    pub async fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<UnixListener> {
        self.listen_unix_with(path, UnixOptions::default()).await
    }

    /// [`Worker::listen_unix`] with options.
    ///
    /// # Errors
    /// As [`Worker::listen_unix`].
    ///
    /// # Cancel safety
    /// As [`Worker::listen_tcp`].
    pub async fn listen_unix_with(
        &self,
        path: impl AsRef<Path>,
        options: UnixOptions,
    ) -> io::Result<UnixListener> {
        let absolute = std::env::current_dir()?.join(path.as_ref());
        let spec = ListenSpec::Unix {
            path: absolute.display().to_string(),
            backlog: options.backlog,
            mode: options.mode(),
        };
        let (key, fd) = self.request_socket(spec).await?;
        let owner = &self.inner.listeners;
        let release = |e| {
            owner.close(key);
            e
        };
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).map_err(release)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(release)?;
        Ok(UnixListener::new(listener, owner, key))
    }

    /// Listens on a descriptor the *primary* holds, such as one systemd passed
    /// to it (`LISTEN_FDS`), as Node's `listen({fd})` does in a worker.
    ///
    /// # Errors
    /// `NotFound` when the primary has no such descriptor.
    ///
    /// # Cancel safety
    /// As [`Worker::listen_tcp`].
    pub async fn listen_fd(&self, fd: i32) -> io::Result<FdListener> {
        let (key, fd) = self.request_socket(ListenSpec::InheritedFd { fd }).await?;
        Ok(FdListener::new(fd, &self.inner.listeners, key))
    }

    /// A listen request whose answer is one socket, with the listener's key.
    async fn request_socket(&self, spec: ListenSpec) -> io::Result<(u32, OwnedFd)> {
        let (reply, mut fds) = self.request_listen(spec).await?;
        let key = match reply {
            ListenReply::Socket { key, .. } | ListenReply::RoundRobin { key, .. } => key,
            ListenReply::Failed { message, .. } => return Err(io::Error::other(message)),
        };
        match fds.pop() {
            Some(fd) => Ok((key, fd)),
            None => {
                self.inner.listeners.close(key);
                Err(io::Error::other("the primary sent no socket"))
            }
        }
    }

    async fn request_listen(&self, spec: ListenSpec) -> io::Result<(ListenReply, Vec<OwnedFd>)> {
        let mut pending = PendingListen::send(&self.inner, self.next_seq(), spec)?;
        let (reply, fds) = pending.answer().await?;
        if let ListenReply::Failed { os_error, message } = &reply {
            let kind = os_error.map_or(io::ErrorKind::Other, |code| {
                io::Error::from_raw_os_error(code).kind()
            });
            return Err(io::Error::new(kind, message.clone()));
        }
        pending.keep();
        Ok((reply, fds))
    }
}

impl WorkerInner {
    /// The primary answered listen request `seq`. A request nobody waits
    /// for any more (its call was dropped) gives back what it got.
    pub(super) fn listen_answered(&self, seq: u32, reply: ListenReply, fds: Vec<OwnedFd>) {
        let waiter = lock(&self.pending_listens).remove(&seq);
        let unclaimed = match waiter {
            Some(waiter) => waiter.send((reply, fds)).err().map(|(reply, _)| reply),
            None => Some(reply),
        };
        if let Some(reply) = unclaimed {
            self.give_back(&reply);
        }
    }

    fn give_back(&self, reply: &ListenReply) {
        if let ListenReply::Socket { key, .. } | ListenReply::RoundRobin { key, .. } = reply {
            self.listeners.close(*key);
        }
    }
}

/// A listen request on its way: until [`PendingListen::keep`], dropping it
/// gives back whatever the primary reserved for it and the ordinal it took.
struct PendingListen {
    inner: Arc<WorkerInner>,
    seq: u32,
    spec: ListenSpec,
    answer: Option<oneshot::Receiver<(ListenReply, Vec<OwnedFd>)>>,
    kept: bool,
}

impl PendingListen {
    fn send(inner: &Arc<WorkerInner>, seq: u32, spec: ListenSpec) -> io::Result<Self> {
        let ordinal = inner.listeners.next_ordinal(&spec);
        let (tx, rx) = oneshot::channel();
        lock(&inner.pending_listens).insert(seq, tx);
        let pending = Self {
            inner: inner.clone(),
            seq,
            spec: spec.clone(),
            answer: Some(rx),
            kept: false,
        };
        let request = Control::Listen { seq, spec, ordinal };
        inner
            .sender
            .send_now(FrameKind::Control, &request.encode(), Vec::new())
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the channel to the primary is closed",
                )
            })?;
        Ok(pending)
    }

    async fn answer(&mut self) -> io::Result<(ListenReply, Vec<OwnedFd>)> {
        let not_answered =
            || io::Error::new(io::ErrorKind::NotConnected, "the primary did not answer");
        let answer = self.answer.as_mut().ok_or_else(not_answered)?;
        let result = answer.await.map_err(|_| not_answered());
        self.answer = None;
        result
    }

    /// The request succeeded and its listener now belongs to the caller.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for PendingListen {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // Not answered yet: a late answer finds no waiter and is given back
        // when it arrives. Answered but not taken: give it back now.
        lock(&self.inner.pending_listens).remove(&self.seq);
        if let Some(mut answer) = self.answer.take() {
            if let Ok((reply, _fds)) = answer.try_recv() {
                self.inner.give_back(&reply);
            }
        }
        self.inner.listeners.release_ordinal(&self.spec);
    }
}
