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
//! The modules follow the architecture: [`protocol`] (frames, sans IO),
//! `channel` (the socket and fd passing), [`primary`], [`worker`],
//! [`listeners`] (port sharing).

#![warn(missing_docs)]

mod channel;
mod error;
pub mod listeners;
pub mod message;
pub mod primary;
pub mod protocol;
pub mod supervisor;
mod sys;
pub mod worker;

use std::sync::OnceLock;

pub use channel::ChannelError;
pub use error::{Error, Result};
pub use message::{DecodeError, Message};
pub use protocol::{Format, Policy};
pub use rustix::process::Signal;

/// A worker's id: unique within one primary's life, starting at 1.
pub type WorkerId = u32;

/// The fd number at which a worker finds its channel.
pub const CHANNEL_FD: i32 = 3;

/// Names of the internal environment variables that mark a worker. They are
/// removed from the worker's environment as soon as it has read them.
pub mod env_keys {
    /// The worker's id.
    pub const WORKER_ID: &str = "PROCLUSTER_WORKER_ID";
    /// The worker's slot index.
    pub const WORKER_INDEX: &str = "PROCLUSTER_WORKER_INDEX";
    /// The fd number of the worker's channel.
    pub const CHANNEL_FD: &str = "PROCLUSTER_CHANNEL_FD";
    /// The user message format (`json` or `binary`).
    pub const FORMAT: &str = "PROCLUSTER_FORMAT";
    /// The channel's frame size limit.
    pub const MAX_FRAME: &str = "PROCLUSTER_MAX_FRAME";
    /// Heartbeat interval in milliseconds.
    pub const HEARTBEAT_MS: &str = "PROCLUSTER_HEARTBEAT_MS";
    /// Delay between closing a disconnecting worker's listeners and firing
    /// its shutdown signal, in milliseconds.
    pub const SHUTDOWN_GRACE_MS: &str = "PROCLUSTER_SHUTDOWN_GRACE_MS";
    /// The channel's busy-poll window in microseconds (see
    /// [`crate::primary::ClusterBuilder::busy_poll`]).
    pub const BUSY_POLL_US: &str = "PROCLUSTER_BUSY_POLL_US";
    /// Overrides the port-sharing policy: `shared`, `round-robin` or
    /// `reuseport`. Read by the primary; not internal.
    pub const SCHED_POLICY: &str = "PROCLUSTER_SCHED_POLICY";

    pub(crate) const INTERNAL: [&str; 8] = [
        SHUTDOWN_GRACE_MS,
        BUSY_POLL_US,
        WORKER_ID,
        WORKER_INDEX,
        CHANNEL_FD,
        FORMAT,
        MAX_FRAME,
        HEARTBEAT_MS,
    ];
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
/// In a worker, the first call reads and removes the internal environment
/// (so the worker's own children are not mistaken for workers), takes the
/// channel at fd 3 and reports the worker online. Later calls return the same
/// role. Call it first thing in `main`: removing environment variables must
/// not race with other threads reading the environment (`getenv` in C code,
/// such as a DNS lookup or a time zone load), so no thread of the program
/// should be doing that yet. A Tokio runtime's own threads do not.
///
/// # Errors
/// [`Error::NoRuntime`] in a worker called outside a Tokio runtime, and
/// [`Error::BrokenWorkerEnvironment`] when the environment names a worker but
/// its channel is not there.
pub fn role() -> Result<Role> {
    static ROLE: &OnceLock<Role> = &ROLE_CACHE;
    static START: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(role) = ROLE.get() {
        return Ok(role.clone());
    }
    let _once = START.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(role) = ROLE.get() {
        return Ok(role.clone());
    }
    if BROKEN.get().is_some() {
        // A worker whose start failed stays a broken worker: it must not
        // take itself for a primary on a second call.
        return Err(Error::BrokenWorkerEnvironment {
            id: String::new(),
            fd: String::new(),
        });
    }
    let role = match take_worker_env()? {
        None => Role::Primary,
        Some(env) => match worker::Worker::start(env) {
            Ok(worker) => Role::Worker(worker),
            Err(error) => {
                let _ = BROKEN.set(());
                return Err(error);
            }
        },
    };
    Ok(ROLE.get_or_init(|| role).clone())
}

/// The role, once known.
static ROLE_CACHE: OnceLock<Role> = OnceLock::new();

/// Set when a worker's start failed after its environment was consumed.
static BROKEN: OnceLock<()> = OnceLock::new();

fn take_worker_env() -> Result<Option<worker::WorkerEnv>> {
    // The channel marks a library worker. A program run by the `procluster`
    // command sees PROCLUSTER_WORKER_ID too, but no channel: it is on its own.
    if std::env::var_os(env_keys::CHANNEL_FD).is_none() {
        return Ok(None);
    }
    let id_text = std::env::var_os(env_keys::WORKER_ID).unwrap_or_default();
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime);
    }
    let var = |key| std::env::var(key).ok();
    let id_text = id_text.to_string_lossy().into_owned();
    let fd_text = var(env_keys::CHANNEL_FD).unwrap_or_default();
    let index = var(env_keys::WORKER_INDEX).and_then(|v| v.parse().ok());
    let format = var(env_keys::FORMAT)
        .and_then(|v| Format::from_name(&v))
        .unwrap_or_default();
    let max_frame = var(env_keys::MAX_FRAME)
        .and_then(|v| v.parse().ok())
        .unwrap_or(protocol::DEFAULT_MAX_FRAME_LEN);
    let heartbeat = var(env_keys::HEARTBEAT_MS)
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    let shutdown_grace = var(env_keys::SHUTDOWN_GRACE_MS)
        .and_then(|v| v.parse().ok())
        .map_or(
            primary::DEFAULT_SHUTDOWN_GRACE,
            std::time::Duration::from_millis,
        );
    let busy_poll = var(env_keys::BUSY_POLL_US)
        .and_then(|v| v.parse().ok())
        .map_or(std::time::Duration::ZERO, std::time::Duration::from_micros);
    let broken = || Error::BrokenWorkerEnvironment {
        id: id_text.clone(),
        fd: fd_text.clone(),
    };
    // Validated before anything is consumed, so a failure repeats itself.
    let id: WorkerId = id_text.parse().map_err(|_| broken())?;
    let fd: i32 = fd_text.parse().map_err(|_| broken())?;
    let channel = sys::adopt_inherited_fd(fd).ok_or_else(broken)?;
    for key in env_keys::INTERNAL {
        sys::remove_env(key);
    }
    Ok(Some(worker::WorkerEnv {
        id,
        index,
        format,
        max_frame,
        heartbeat,
        shutdown_grace,
        busy_poll,
        channel,
    }))
}

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
    std::env::var_os(env_keys::CHANNEL_FD).is_some()
        || matches!(ROLE_CACHE.get(), Some(Role::Worker(_)))
}

/// Reads `PROCLUSTER_SCHED_POLICY`.
pub(crate) fn policy_from_env() -> Result<Option<Policy>> {
    match std::env::var(env_keys::SCHED_POLICY) {
        Err(_) => Ok(None),
        Ok(name) => Policy::from_name(&name).map(Some).ok_or_else(|| {
            Error::Settings(format!(
                "{}={name:?}: expected shared, round-robin or reuseport",
                env_keys::SCHED_POLICY
            ))
        }),
    }
}

/// The README's examples, compiled as doc tests so they keep working as
/// written.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
