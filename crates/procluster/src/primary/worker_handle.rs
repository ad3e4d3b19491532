//! The primary's handle on one worker.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::channel::ChannelSender;
use crate::protocol::{Control, Format, FrameKind};
use crate::sync::lock;
use crate::{Error, ExitStatus, Signal, WorkerId};

/// Bytes of user messages a worker may hold unread before senders wait.
/// Half of the worker's own inbox budget, so the worker never has to stop
/// reading its channel.
pub(crate) const UNREAD_WINDOW: usize = 32 * 1024 * 1024;

/// Where a worker is in its life, in Node's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkerState {
    /// Forked; its runtime has not reported in yet (Node's `none`).
    Forked,
    /// Its channel is up.
    Online,
    /// It listens on at least one shared port.
    Listening,
    /// It no longer takes messages or connections from the cluster.
    Disconnected,
    /// It has exited and been reaped.
    Dead,
}

#[derive(Debug)]
pub(crate) struct Lifecycle {
    pub(crate) state: WorkerState,
    pub(crate) exited_after_disconnect: bool,
    pub(crate) exit: Option<ExitStatus>,
    pub(crate) pid: Option<u32>,
    pub(crate) last_heartbeat: Option<std::time::Instant>,
    pub(crate) reported_ready: bool,
    pub(crate) requests: u64,
    /// What a service holds responsible for the worker's end, if anything.
    pub(crate) exit_blame: Option<String>,
}

pub(crate) struct WorkerShared {
    pub(crate) id: WorkerId,
    pub(crate) index: Option<usize>,
    pub(crate) format: Format,
    pub(crate) sender: ChannelSender,
    pub(crate) lifecycle: Mutex<Lifecycle>,
    /// Signals go through a pidfd where the OS has them, so a signal can never
    /// reach a recycled pid.
    pub(crate) pidfd: Option<OwnedFd>,
    /// Bytes of user messages sent to the worker and not yet read by its
    /// application (it reports what it reads).
    pub(crate) unread: Mutex<usize>,
    /// Wakes senders when the worker reports reading.
    pub(crate) unread_room: tokio::sync::Notify,
    /// The worker leads a process group of its own: SIGKILL goes to the whole
    /// group, so nothing it started outlives it.
    pub(crate) own_group: bool,
    /// For a foreign program (no channel), the signal `disconnect` sends.
    pub(crate) stop_signal: Option<Signal>,
    /// The cluster's event stream, for readiness learnt outside the channel.
    pub(crate) events: tokio::sync::mpsc::UnboundedSender<super::EventBatch>,
}

impl WorkerShared {
    pub(crate) fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        lock(&self.lifecycle)
    }
}

/// The primary's handle on a worker: send it messages, signal it, disconnect
/// it. Cheap to clone; every clone refers to the same worker.
#[derive(Clone)]
pub struct WorkerHandle {
    pub(crate) shared: Arc<WorkerShared>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let life = self.shared.lifecycle();
        f.debug_struct("WorkerHandle")
            .field("id", &self.shared.id)
            .field("pid", &life.pid)
            .field("state", &life.state)
            .finish()
    }
}

impl PartialEq for WorkerHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl WorkerHandle {
    /// The worker's id: unique within this primary's life, starting at 1.
    pub fn id(&self) -> WorkerId {
        self.shared.id
    }

    /// The slot this worker fills, when it was forked for one.
    pub fn index(&self) -> Option<usize> {
        self.shared.index
    }

    /// The worker's sticky token (see
    /// [`Worker::sticky_token`](crate::worker::Worker::sticky_token)): the
    /// same for every worker of its slot.
    pub fn sticky_token(&self) -> String {
        crate::sticky::token_of(self.shared.index, self.shared.id)
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.shared.lifecycle().pid.unwrap_or(0)
    }

    /// Its current state.
    pub fn state(&self) -> WorkerState {
        self.shared.lifecycle().state
    }

    /// Whether it still takes messages (its state is before `Disconnected`).
    pub fn is_connected(&self) -> bool {
        self.state() < WorkerState::Disconnected && self.shared.sender.is_open()
    }

    /// Whether it has exited.
    pub fn is_dead(&self) -> bool {
        self.state() == WorkerState::Dead
    }

    /// Whether it exited after a disconnect (asked by either side), rather
    /// than by accident.
    pub fn exited_after_disconnect(&self) -> bool {
        self.shared.lifecycle().exited_after_disconnect
    }

    /// When its runtime last sent a heartbeat (see
    /// [`Settings::heartbeat_interval`](crate::primary::Settings)).
    pub fn last_heartbeat(&self) -> Option<std::time::Instant> {
        self.shared.lifecycle().last_heartbeat
    }

    /// Requests served, as last reported by the worker
    /// ([`Worker::add_requests`](crate::worker::Worker::add_requests)).
    pub fn requests(&self) -> u64 {
        self.shared.lifecycle().requests
    }

    /// Reports the worker ready, as if it had called `Worker::ready`: an
    /// [`Event::Ready`](crate::primary::Event::Ready) follows in the
    /// cluster's event stream. For readiness learnt another way, such as a
    /// foreign program's `sd_notify("READY=1")` or a Node IPC message.
    /// Nothing happens once the worker has exited.
    pub fn report_ready(&self) {
        if !self.is_dead() {
            let _ = self
                .shared
                .events
                .send(vec![crate::primary::Event::Ready(self.clone())]);
        }
    }

    /// Records a sign of life now, as a heartbeat from the worker's runtime
    /// would ([`last_heartbeat`](Self::last_heartbeat)); for a foreign
    /// program's `sd_notify("WATCHDOG=1")`.
    pub fn report_heartbeat(&self) {
        self.shared.lifecycle().last_heartbeat = Some(std::time::Instant::now());
    }

    /// Records how many requests the worker has served in all, as a
    /// procluster worker's own count does ([`requests`](Self::requests),
    /// which recycling by `max_requests` reads); for a foreign program that
    /// reports its count another way, such as the `procluster` command's
    /// `X_PROCLUSTER_REQUESTS=N` sd_notify message.
    pub fn report_requests(&self, total: u64) {
        self.shared.lifecycle().requests = total;
    }

    /// The task a service of the cluster holds responsible for the
    /// worker's end, when one does (see
    /// [`ServiceContext::blame_exit`](crate::primary::ServiceContext::blame_exit)):
    /// a supervisor restarts such a worker without counting the failure for
    /// its crash-loop breaker.
    pub fn exit_blame(&self) -> Option<String> {
        self.shared.lifecycle().exit_blame.clone()
    }

    /// What crossed the worker's channel so far: frames and bytes each way,
    /// and frames refused (see [`ChannelStats`](crate::ChannelStats)). A
    /// foreign program has no channel: all zeros.
    pub fn channel_stats(&self) -> crate::ChannelStats {
        self.shared.sender.stats()
    }

    /// How it exited, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.shared.lifecycle().exit
    }

    /// Sends a message. Waits while the channel's buffer is full.
    ///
    /// # Errors
    /// [`Error::NotConnected`] once the worker is disconnected or dead;
    /// [`Error::Encode`] when `value` does not serialise.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(worker: procluster::primary::WorkerHandle) -> procluster::Result<()> {
    /// worker.send(&"reload-config").await?;
    /// # Ok(()) }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.send_with_fds(value, Vec::new()).await
    }

    /// Sends a message with descriptors attached (sockets, files, pipes...).
    /// The descriptors are duplicated, so the caller keeps its own and may
    /// send the same one again.
    ///
    /// # Errors
    /// As [`WorkerHandle::send`], and an I/O error if a descriptor cannot be
    /// duplicated.
    pub async fn send_fds<T: Serialize + ?Sized, F: AsFd>(
        &self,
        value: &T,
        fds: &[F],
    ) -> Result<(), Error> {
        let owned = crate::channel::dup_all(fds)
            .map_err(|e| Error::io("cannot duplicate a descriptor to send", e))?;
        self.send_with_fds(value, owned).await
    }

    /// Sends a message, giving away the descriptors.
    ///
    /// # Errors
    /// As [`WorkerHandle::send`].
    pub async fn send_with_fds<T: Serialize + ?Sized>(
        &self,
        value: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if self.state() >= WorkerState::Disconnected {
            return Err(Error::NotConnected(self.id()));
        }
        self.wait_for_window().await?;
        let format = self.shared.format;
        let mut len = 0;
        self.shared
            .sender
            .send_with(FrameKind::User, format, fds, |buf| {
                let encoded = crate::message::encode_into(format, value, &mut *buf);
                len = buf.written();
                encoded
            })
            .await
            .map_err(|e| Error::from_send(e, Error::NotConnected(self.id())))?;
        self.charge_unread(len);
        Ok(())
    }

    /// Waits while the worker holds [`UNREAD_WINDOW`] bytes it has not read:
    /// the channel then never fills with user messages, so control messages
    /// (a disconnect, a connection) always get through.
    async fn wait_for_window(&self) -> Result<(), Error> {
        loop {
            let room = self.shared.unread_room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if *lock(&self.shared.unread) < UNREAD_WINDOW {
                return Ok(());
            }
            if self.state() >= WorkerState::Disconnected {
                return Err(Error::NotConnected(self.id()));
            }
            room.await;
        }
    }

    pub(crate) fn charge_unread(&self, bytes: usize) {
        *lock(&self.shared.unread) += bytes.max(1);
    }

    /// The worker read `bytes` more.
    pub(crate) fn consumed(&self, bytes: u64) {
        let mut unread = lock(&self.shared.unread);
        *unread = unread.saturating_sub(usize::try_from(bytes).unwrap_or(usize::MAX));
        drop(unread);
        self.shared.unread_room.notify_waiters();
    }

    /// Whether the worker's window of unread messages has room.
    pub(crate) fn has_window(&self) -> bool {
        *lock(&self.shared.unread) < UNREAD_WINDOW
    }

    /// Node's `worker.kill(signal)`: the worker leaves the cluster at once
    /// (the primary closes its channel, so it gets no more messages, and its
    /// runtime fires its shutdown signal) and is sent `signal` (SIGTERM if
    /// you have no reason to pick another). Its `Exit` event then reports
    /// `exited_after_disconnect == true`, as Node's does. To send a signal
    /// and nothing else, use [`WorkerHandle::signal`]; to let the worker
    /// finish its work first, [`WorkerHandle::disconnect`].
    ///
    /// # Errors
    /// As [`WorkerHandle::signal`].
    pub fn kill(&self, signal: Signal) -> Result<(), Error> {
        {
            let mut life = self.shared.lifecycle();
            if life.exit.is_some() {
                return Ok(());
            }
            life.exited_after_disconnect = true;
        }
        self.shared.sender.close();
        self.signal(signal)
    }

    /// Sends `signal` to the worker process and nothing else: no
    /// disconnect, no bookkeeping (Node's `worker.process.kill(signal)`).
    /// The worker's `Exit` event reports what the signal did.
    ///
    /// # Errors
    /// An I/O error from the OS; a worker that is already dead is not an
    /// error.
    pub fn signal(&self, signal: Signal) -> Result<(), Error> {
        let Some(pid) = self.live_pid() else {
            return Ok(());
        };
        if signal == Signal::KILL && self.shared.own_group {
            // The group id is the worker's pid, held while it is unreaped.
            let _ = crate::sys::kill_group(pid, signal);
        }
        let result = match &self.shared.pidfd {
            Some(pidfd) => crate::sys::pidfd_signal(pidfd, signal),
            None => crate::sys::kill(pid, signal),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => Ok(()),
            Err(e) => Err(Error::io(format!("cannot signal worker {}", self.id()), e)),
        }
    }

    /// The pid while the process is not yet reaped (so it cannot have been
    /// recycled).
    fn live_pid(&self) -> Option<u32> {
        let life = self.shared.lifecycle();
        if life.exit.is_some() { None } else { life.pid }
    }

    /// Disconnects the worker gracefully: it closes its cluster listeners,
    /// its shutdown signal fires, and it exits once its work is done. The
    /// `Exit` event then reports `exited_after_disconnect == true`.
    ///
    /// A foreign program ([`Program::Foreign`](crate::primary::Program))
    /// has no channel: it is sent its stop signal instead (once), and its
    /// `Disconnect` and `Exit` events come when it exits.
    ///
    /// Returns at once; watch for the `Disconnect` and `Exit` events.
    pub fn disconnect(&self) {
        {
            let mut life = self.shared.lifecycle();
            if life.state >= WorkerState::Disconnected {
                return;
            }
            if life.exited_after_disconnect && self.shared.stop_signal.is_some() {
                return; // already signalled
            }
            life.exited_after_disconnect = true;
        }
        if let Some(signal) = self.shared.stop_signal {
            if let Err(error) = self.signal(signal) {
                tracing::warn!(worker = %self.id(), %error, "cannot ask a worker to stop");
            }
            return;
        }
        // Best effort: if the channel is already gone, the worker is exiting.
        let _ = self.shared.sender.send_now(
            FrameKind::Control,
            &Control::Disconnect.encode(),
            Vec::new(),
        );
    }
}
