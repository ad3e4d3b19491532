//! A worker's side of the cluster's services (work pools, the bus, the
//! store, telemetry): one port per service, through which the service's
//! worker side exchanges frames with its primary side.

use std::any::Any;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Worker, WorkerInner};
use crate::message::ServiceFrame;
use crate::protocol::{Format, FrameKind};
use crate::sync::lock;
use crate::{Error, WorkerId};

/// A worker's port to one service of its cluster. Frames sent here reach
/// the service in the primary, attributed to this worker; frames the
/// service sends this worker arrive in [`ServicePort::recv`]. Each service
/// bounds what it sends (credit, outstanding requests), so the port's queue
/// needs no bound of its own.
pub struct ServicePort {
    index: u16,
    name: String,
    inner: Arc<WorkerInner>,
    frames: tokio::sync::Mutex<mpsc::UnboundedReceiver<ServiceFrame>>,
}

impl std::fmt::Debug for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePort")
            .field("service", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServicePort {
    /// The worker this port belongs to.
    pub fn worker_id(&self) -> WorkerId {
        self.inner.id
    }

    /// The cluster's format for user values.
    pub fn format(&self) -> Format {
        self.inner.format
    }

    /// Sends `body` to the service in the primary, waiting while the
    /// channel's buffer is full.
    ///
    /// # Errors
    /// [`Error::ChannelClosed`] once the worker is cut off from its primary;
    /// the channel's errors (a body over the frame limit).
    pub async fn send(&self, format: Format, body: &[u8], fds: Vec<OwnedFd>) -> Result<(), Error> {
        send_on(&self.inner, self.index, format, body, fds).await
    }

    /// Sends a small frame without making the caller wait (a credit, an
    /// unsubscription): at once while the channel has room, else from a
    /// task of its own. Errors are dropped: they mean the primary is gone,
    /// and with it what the frame was about.
    pub(crate) fn send_soon(&self, format: Format, body: bytes::Bytes) {
        if let Err(Error::Channel(crate::ChannelError::Full)) =
            self.try_send(format, &body, Vec::new())
        {
            let (inner, index) = (self.inner.clone(), self.index);
            tokio::spawn(async move {
                let _ = send_on(&inner, index, format, &body, Vec::new()).await;
            });
        }
    }

    /// Sends `body` without waiting: refused with
    /// [`ChannelError::Full`](crate::ChannelError::Full) while the channel's
    /// buffer is full.
    ///
    /// # Errors
    /// As [`ServicePort::send`], and the full buffer.
    pub fn try_send(&self, format: Format, body: &[u8], fds: Vec<OwnedFd>) -> Result<(), Error> {
        let index = self.index.to_le_bytes();
        self.inner
            .sender
            .try_send_with(FrameKind::Service, format, fds, |buf| {
                std::io::Write::write_all(buf, &index)?;
                std::io::Write::write_all(buf, body)
            })
            .map_err(|e| Error::from_send(e, Error::ChannelClosed))
    }

    /// The next frame from the service; `None` once the worker is cut off
    /// from its primary.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is either returned or stays queued.
    pub async fn recv(&self) -> Option<ServiceFrame> {
        self.frames.lock().await.recv().await
    }
}

/// Sends `body` to service `index`, waiting while the channel is full.
async fn send_on(
    inner: &WorkerInner,
    index: u16,
    format: Format,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<(), Error> {
    let index = index.to_le_bytes();
    inner
        .sender
        .send_with(FrameKind::Service, format, fds, |buf| {
            std::io::Write::write_all(buf, &index)?;
            std::io::Write::write_all(buf, body)
        })
        .await
        .map_err(|e| Error::from_send(e, Error::ChannelClosed))
}

impl Worker {
    /// The worker side of service `name`, made by `init` from the service's
    /// port the first time it is asked for, and shared afterwards: one per
    /// service and worker.
    ///
    /// # Errors
    /// [`Error::Settings`] when the primary has no service of that name (the
    /// primary adds services with
    /// [`ClusterBuilder::service`](crate::primary::ClusterBuilder::service)),
    /// or when the service's worker side is already of another type.
    pub fn service<T, F>(&self, name: &str, init: F) -> Result<Arc<T>, Error>
    where
        T: Send + Sync + 'static,
        F: FnOnce(ServicePort) -> T,
    {
        let inner = &self.inner;
        let mut states = lock(&inner.service_states);
        if let Some(state) = states.get(name) {
            return state.clone().downcast::<T>().map_err(|_| {
                Error::Settings(format!(
                    "the worker side of service {name:?} is already open as another type"
                ))
            });
        }
        let index = inner
            .services
            .iter()
            .position(|s| s == name)
            .and_then(|i| u16::try_from(i).ok())
            .ok_or_else(|| {
                Error::Settings(format!(
                    "the primary has no service named {name:?} (it has: {})",
                    if inner.services.is_empty() {
                        "none".to_string()
                    } else {
                        inner.services.join(", ")
                    }
                ))
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&inner.service_inboxes).insert(index, tx);
        let port = ServicePort {
            index,
            name: name.to_string(),
            inner: inner.clone(),
            frames: tokio::sync::Mutex::new(rx),
        };
        let state = Arc::new(init(port));
        states.insert(
            name.to_string(),
            state.clone() as Arc<dyn Any + Send + Sync>,
        );
        Ok(state)
    }
}

impl WorkerInner {
    /// A frame from a service in the primary; dropped if this worker never
    /// opened the service.
    pub(super) fn to_service(&self, frame: crate::protocol::Frame) {
        let (index, body) = crate::message::split_service_payload(frame.payload);
        let inboxes = lock(&self.service_inboxes);
        let Some(inbox) = inboxes.get(&index) else {
            tracing::debug!(
                index,
                "dropped a frame for a service this worker does not use"
            );
            return;
        };
        let _ = inbox.send(ServiceFrame {
            format: frame.format,
            body,
            fds: frame.fds,
        });
    }
}
