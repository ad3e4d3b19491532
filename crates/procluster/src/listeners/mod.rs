//! Ports shared through the primary (Node's `server.listen()` in a worker).
//!
//! A worker asks; the primary binds once per distinct request and answers
//! according to the cluster's [`Policy`](crate::Policy):
//!
//! - **shared**: every worker gets the same listening socket and the kernel
//!   spreads connections;
//! - **round-robin**: the primary accepts and hands each connection to a
//!   worker whose application is waiting in `accept()`, keeping it until the
//!   worker takes it, so a refused connection or a worker that dies first
//!   costs nothing;
//! - **reuseport**: one `SO_REUSEPORT` socket per worker slot, kept by the
//!   primary across restarts of the slot; while a slot has no worker, the
//!   primary drains its queue to the other workers.
//!
//! UDP, Unix sockets and inherited descriptors are always shared.
//!
//! ```no_run
//! # async fn serve(worker: procluster::worker::Worker) -> std::io::Result<()> {
//! let listener = worker.listen_tcp("127.0.0.1:3000").await?;
//! loop {
//!     let (stream, peer) = listener.accept().await?;
//!     // serve `stream`...
//! #   drop((stream, peer));
//! }
//! # }
//! ```

//!
//! The module has two sides that never import the primary or the worker:
//! `registry` (in the primary: groups of sockets, the acceptors, the
//! distribution of connections) and `tcp` (in a worker: the listener that
//! accepts). [`bind`] makes the sockets for both, and for the command;
//! [`slots`] keeps one reuseport socket per worker slot; [`activation`]
//! reads the sockets passed by systemd (`LISTEN_FDS`).

pub mod activation;
pub mod bind;
mod distributor;
mod held;
mod keyed;
pub(crate) mod registry;
pub mod saturation;
pub mod slots;
pub(crate) mod steering;
pub(crate) mod tcp;

pub use bind::{DEFAULT_BACKLOG, describe_socket};
pub use held::{FdListener, UdpOptions, UdpSocket, UnixListener, UnixOptions};
pub use registry::ListenerStats;
pub use tcp::{DEFAULT_PREFETCH, TcpListener, TcpOptions};
