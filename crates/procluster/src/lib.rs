//! # procluster
//!
//! The Node.js `cluster` model for Rust. A **primary** process starts worker
//! processes (new processes of the same executable, or of another program),
//! owns the ports they share, talks to each over a channel that carries typed
//! messages and file descriptors, and reports their lifecycle: `Fork`,
//! `Online`, `Listening`, `Message`, `Disconnect`, `Exit`.
//!
//! A program decides its role at the top of `main`:
//!
//! ```no_run
//! use procluster::{Role, primary::{Cluster, Event}};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     match procluster::role()? {
//!         Role::Primary => {
//!             let mut cluster = Cluster::builder().workers(4).build()?;
//!             cluster.start().await?;
//!             while let Some(event) = cluster.next_event().await {
//!                 if let Event::Message { worker, message } = event {
//!                     let text: String = message.decode()?;
//!                     println!("worker {} says {text}", worker.id());
//!                 }
//!             }
//!         }
//!         Role::Worker(worker) => {
//!             worker.send(&format!("hello from pid {}", std::process::id())).await?;
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # A tour of the modules
//!
//! Layers, each using only those in the rows above it:
//!
//! | layer | modules | what it is |
//! |---|---|---|
//! | vocabulary | `process` ([`WorkerId`], [`Signal`], [`ExitStatus`]), `sys`, `sync` | the words for processes; the one module with `unsafe` code; locking that survives a panic |
//! | protocol | `protocol` ([`Format`], [`Policy`]) | frames and control messages, no IO (fuzzed alone) |
//! | channel | `channel`, [`message`], `handshake`, `error` ([`Error`]) | the socket that carries frames and descriptors; a worker's first frame; the crate's error |
//! | port sharing | [`listeners`], [`sticky`] | the primary's listener registry and a worker's listeners, which never see each other's process; the keys, hashing and limits of sticky sessions |
//! | processes | [`primary`], [`worker`] | the cluster and its workers, their lifecycle and events |
//! | supervision | [`supervisor`] | restarts, reloads, recycling, stopping |
//! | delivery | `fanout` | bounded queues with credit from the primary to many subscribers |
//! | services | [`pool`], [`bus`], [`store`], [`telemetry`] | parts of the cluster that live in the primary, reached from every worker: work pools (tasks run by the workers, none lost), the bus, the shared store, the metrics endpoint with health probes and workers' logs |
//!
//! # How a process knows it is a worker
//!
//! A primary starts each worker with one variable in its environment,
//! [`WORKER_MARKER`] (`PROCLUSTER_PRIMARY=<the primary's pid>`), and the
//! worker's end of its channel at fd [`CHANNEL_FD`]; the worker's settings
//! are the first frame on the channel. [`role()`] is a worker's only when the
//! marker names its parent process and the socket at fd 3 leads back to
//! that process, so a worker's own children, which inherit its environment,
//! are never taken for workers. Nothing is removed from the environment:
//! calling [`role()`] is safe at any time, from any thread.
//!
//! A program run by the `procluster` command (any language) gets no channel:
//! it finds `PROCLUSTER_WORKER_ID` and `PROCLUSTER_WORKER_INDEX` in its
//! environment, and its sockets by systemd's socket activation.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod bus;
mod channel;
mod error;
mod fanout;
mod handshake;
pub mod listeners;
pub mod message;
pub mod pool;
pub mod primary;
mod process;
mod procfs;
#[cfg(feature = "fuzzing")]
pub mod protocol;
#[cfg(not(feature = "fuzzing"))]
mod protocol;
#[cfg(feature = "redis")]
mod redis_link;
pub mod sticky;
pub mod store;
pub mod supervisor;
mod sync;
#[allow(unsafe_code)]
mod sys;
pub mod telemetry;
pub mod worker;

use std::sync::{Mutex, OnceLock};

pub use channel::{ChannelError, ChannelStats};
pub use error::{Error, Result};
pub use message::{DecodeError, Message};
pub use process::{ExitStatus, Signal, UnknownSignal, WorkerId};
pub use protocol::{Format, Policy, UnknownName};

use crate::sync::lock;

/// The fd number at which a worker finds its channel. In a worker the
/// library owns this descriptor once [`role()`] has run: the application
/// must not close it or take it for itself.
pub const CHANNEL_FD: i32 = 3;

/// The one environment variable a primary sets in its workers:
/// `PROCLUSTER_PRIMARY=<the primary's pid>`. It stays in the worker's
/// environment (and its children's), but marks a worker only in a direct
/// child of that primary whose fd 3 is the primary's channel.
pub const WORKER_MARKER: &str = "PROCLUSTER_PRIMARY";

/// Environment variables the cluster reads or sets beside the marker.
pub(crate) mod env_keys {
    /// A foreign program's worker id (Program::Foreign, and the command's
    /// programs).
    pub(crate) const WORKER_ID: &str = "PROCLUSTER_WORKER_ID";
    /// A foreign program's slot.
    pub(crate) const WORKER_INDEX: &str = "PROCLUSTER_WORKER_INDEX";
    /// A foreign program's sticky token.
    pub(crate) const STICKY_TOKEN: &str = "PROCLUSTER_STICKY_TOKEN";
    /// Overrides the port-sharing policy: `shared`, `round-robin` or
    /// `reuseport`. Read by the primary.
    pub(crate) const SCHED_POLICY: &str = "PROCLUSTER_SCHED_POLICY";
}

/// What this process is in its cluster.
#[derive(Debug, Clone)]
pub enum Role {
    /// Not started by a primary: this process is the primary.
    Primary,
    /// Started by a primary, with its handle on the cluster.
    Worker(worker::Worker),
}

impl Role {
    /// Node's `cluster.isPrimary`.
    pub fn is_primary(&self) -> bool {
        matches!(self, Self::Primary)
    }
}

/// Tells the primary from a worker (Node's `cluster.isPrimary`).
///
/// In a worker, the first call takes the channel at fd 3, reads the
/// worker's settings from it and reports the worker online; later calls
/// return the same role. It changes nothing in the environment, so it may be
/// called at any time, from any thread (see the crate docs for how a worker
/// is recognised).
///
/// # Errors
/// [`Error::NoRuntime`] in a worker called outside a Tokio runtime, and
/// [`Error::BrokenWorkerEnvironment`] when this process was started as a
/// worker but its channel is not usable.
pub fn role() -> Result<Role> {
    static START: Mutex<()> = Mutex::new(());
    if let Some(role) = ROLE.get() {
        return Ok(role.clone());
    }
    let _once = lock(&START);
    if let Some(role) = ROLE.get() {
        return Ok(role.clone());
    }
    if let Some(why) = BROKEN.get() {
        // A worker whose start failed stays a broken worker: it must not
        // take itself for a primary on a second call.
        return Err(Error::BrokenWorkerEnvironment(why.clone()));
    }
    let ready = || {
        tokio::runtime::Handle::try_current()
            .map(drop)
            .map_err(|_| Error::NoRuntime)
    };
    let role = match handshake::detect(ready) {
        Ok(handshake::Detected::NotWorker) => Role::Primary,
        Ok(handshake::Detected::Worker(channel, hello)) => {
            match worker::Worker::start(channel, hello) {
                Ok(worker) => Role::Worker(worker),
                Err(error) => {
                    let _ = BROKEN.set(error.to_string());
                    return Err(error);
                }
            }
        }
        Err(handshake::DetectError::Refused(error)) => return Err(error),
        Err(handshake::DetectError::Broken(handshake::Broken(why))) => {
            let _ = BROKEN.set(why.clone());
            return Err(Error::BrokenWorkerEnvironment(why));
        }
    };
    Ok(ROLE.get_or_init(|| role).clone())
}

/// The role, once known.
static ROLE: OnceLock<Role> = OnceLock::new();

/// Why this process, started as a worker, cannot be one.
static BROKEN: OnceLock<String> = OnceLock::new();

/// Whether this process was started as a worker of a procluster primary,
/// without starting anything: for choosing a runtime before building one
/// (a primary does little work and runs best on Tokio's single-threaded
/// runtime; workers usually want the multi-threaded one).
///
/// ```no_run
/// let runtime = if procluster::is_worker_process() {
///     tokio::runtime::Builder::new_multi_thread().enable_all().build()
/// } else {
///     tokio::runtime::Builder::new_current_thread().enable_all().build()
/// };
/// ```
pub fn is_worker_process() -> bool {
    matches!(ROLE.get(), Some(Role::Worker(_))) || handshake::marked_by_parent().is_some()
}

/// The README's examples, compiled as doc tests so they keep working as
/// written.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
