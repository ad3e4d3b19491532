//! The primary's side of the cluster's services (work pools, the bus, the
//! store, telemetry): parts of the cluster that live in the primary and
//! speak with their worker side over the workers' channels.
//!
//! A service's frames travel in frames of their own kind, tagged with the
//! service's index in the cluster's list of services (the worker learns the
//! list in its first frame). So a service can never read or forge user
//! messages, control messages or another service's frames, and the primary
//! attributes each frame to the worker whose channel it came on.
//!
//! Flow control is each service's own: a service must bound what it sends a
//! worker (credit, outstanding requests) and what a worker can make it hold.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};

use super::{Inner, WorkerHandle};
use crate::message::ServiceFrame;
use crate::protocol::{Format, FrameKind};
use crate::{Error, ExitStatus, WorkerId};

/// The most services one cluster can have (a frame carries the index in
/// two bytes).
pub(crate) const MAX_SERVICES: usize = u16::MAX as usize;

/// A service of the cluster: a part of it that lives in the primary and
/// speaks with its worker side over the workers' channels, such as a work
/// pool or a shared store. Add one with
/// [`ClusterBuilder::service`](super::ClusterBuilder::service); in a worker,
/// [`Worker::service`](crate::worker::Worker::service) opens its side.
///
/// Every call comes from a worker's task or the cluster's and must not
/// block: a service hands work to tasks of its own.
///
/// ```no_run
/// use procluster::primary::{Service, ServiceContext, WorkerHandle};
/// use procluster::message::ServiceFrame;
/// use std::sync::{Arc, OnceLock};
///
/// /// Answers every frame with the same bytes.
/// #[derive(Clone, Default)]
/// struct Echo(Arc<OnceLock<ServiceContext>>);
///
/// impl Service for Echo {
///     fn name(&self) -> String {
///         "echo".into()
///     }
///     fn attach(&self, context: ServiceContext) {
///         let _ = self.0.set(context);
///     }
///     fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
///         if let Some(context) = self.0.get() {
///             let _ = context.try_send(from, frame.format, &frame.body, frame.fds);
///         }
///     }
/// }
/// ```
pub trait Service: Send + Sync + 'static {
    /// The name the worker side asks for; unique within a cluster.
    fn name(&self) -> String;

    /// The cluster is built: where the service finds its workers and how it
    /// sends them frames.
    fn attach(&self, context: ServiceContext);

    /// A frame from the service's side in a worker, attributed by the
    /// channel it came on.
    fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame);

    /// A worker no longer takes part in the cluster: it disconnected
    /// (`exit` is `None`; it may still finish what it is doing) or it exited
    /// (`Some`, after its disconnect). Nothing to do by default.
    fn on_worker_gone(&self, worker: &WorkerHandle, exit: Option<ExitStatus>) {
        let _ = (worker, exit);
    }
}

/// What a service knows of the cluster it belongs to.
#[derive(Clone)]
pub struct ServiceContext {
    index: u16,
    cluster: Weak<Inner>,
}

impl std::fmt::Debug for ServiceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceContext")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ServiceContext {
    pub(crate) fn new(index: u16, cluster: &Arc<Inner>) -> Self {
        Self {
            index,
            cluster: Arc::downgrade(cluster),
        }
    }

    /// The workers alive now, by id.
    pub fn workers(&self) -> Vec<WorkerHandle> {
        self.cluster
            .upgrade()
            .map(|inner| inner.all_workers())
            .unwrap_or_default()
    }

    /// A worker by id, while it is alive.
    pub fn worker(&self, id: WorkerId) -> Option<WorkerHandle> {
        self.cluster.upgrade()?.worker(id)
    }

    /// The cluster's shared listeners, for metrics.
    pub(crate) fn listener_stats(&self) -> Vec<crate::listeners::registry::GroupStats> {
        self.cluster
            .upgrade()
            .map(|inner| inner.listeners.group_stats())
            .unwrap_or_default()
    }

    /// The cluster's format for user values.
    pub fn format(&self) -> Option<Format> {
        Some(self.cluster.upgrade()?.settings.format)
    }

    /// Holds `task` (a description, such as "task 12 of pool \"hash\"")
    /// responsible for the end of `worker`, which it was running when the
    /// worker died: call it from [`Service::on_worker_gone`] when the exit
    /// is reported, before the cluster's `Exit` event goes out. A
    /// supervisor then restarts the worker's slot without counting the
    /// failure for its crash-loop breaker
    /// ([`CrashCause::TaskFault`](crate::supervisor::CrashCause)), so a task
    /// that kills every worker it touches does not stop the cluster.
    pub fn blame_exit(&self, worker: &WorkerHandle, task: impl Into<String>) {
        worker.shared.lifecycle().exit_blame = Some(task.into());
    }

    /// Sends `body` to the worker side of this service in `worker`, waiting
    /// while the channel's buffer is full.
    ///
    /// # Errors
    /// [`Error::NotConnected`] once the worker is disconnected or gone, and
    /// the channel's errors (a body over the frame limit).
    pub async fn send(
        &self,
        worker: &WorkerHandle,
        format: Format,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        let index = self.index.to_le_bytes();
        worker
            .shared
            .sender
            .send_with(FrameKind::Service, format, fds, |buf| {
                std::io::Write::write_all(buf, &index)?;
                std::io::Write::write_all(buf, body)
            })
            .await
            .map_err(|e| Error::from_send(e, Error::NotConnected(worker.id())))
    }

    /// Sends `body` without waiting: refused with
    /// [`ChannelError::Full`](crate::ChannelError::Full) while the channel's
    /// buffer is full, for services that must never wait on one worker.
    ///
    /// # Errors
    /// As [`ServiceContext::send`], and the full buffer.
    pub fn try_send(
        &self,
        worker: &WorkerHandle,
        format: Format,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        let index = self.index.to_le_bytes();
        worker
            .shared
            .sender
            .try_send_with(FrameKind::Service, format, fds, |buf| {
                std::io::Write::write_all(buf, &index)?;
                std::io::Write::write_all(buf, body)
            })
            .map_err(|e| Error::from_send(e, Error::NotConnected(worker.id())))
    }
}

/// Tells every service that `worker` is gone.
pub(crate) fn worker_gone(
    services: &[Arc<dyn Service>],
    worker: &WorkerHandle,
    exit: Option<ExitStatus>,
) {
    for service in services {
        service.on_worker_gone(worker, exit);
    }
}
