//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::WorkerId;
use crate::channel::ChannelError;
use crate::message::DecodeError;

/// Everything that can go wrong in procluster, with what happened and, where
/// it helps, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker program could not be started.
    #[error("cannot start worker program {program:?}: {source}")]
    Spawn {
        /// The program that was to be executed.
        program: PathBuf,
        /// Why the OS refused.
        #[source]
        source: io::Error,
    },
    /// A setting is invalid; the message says which and why.
    #[error("invalid cluster settings: {0}")]
    Settings(String),
    /// The worker is no longer connected: it disconnected or exited.
    #[error("worker {0} is not connected")]
    NotConnected(WorkerId),
    /// The channel to the other process is closed.
    #[error("the channel to the primary is closed")]
    ChannelClosed,
    /// A channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A value could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(io::Error),
    /// A payload did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// This process was started as a worker, but cannot be one; the text
    /// says why (its channel is not open, or not the primary's).
    #[error("this process was started as a worker of its parent but cannot be one: {0}")]
    BrokenWorkerEnvironment(String),
    /// `role()` needs a Tokio runtime for a worker.
    #[error("procluster::role() must be called inside a Tokio runtime in a worker process")]
    NoRuntime,
    /// Any other OS error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// A failed send: a closed channel becomes `closed` (the peer is gone),
    /// a payload that would not serialise [`Error::Encode`].
    pub(crate) fn from_send(error: ChannelError, closed: Error) -> Self {
        match error {
            ChannelError::Closed => closed,
            // The channel's only IO error while queueing is the serialiser's.
            ChannelError::Io(e) => Self::Encode(e),
            other => Self::Channel(other),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the OS refused for lack of resources: too many open files
    /// (`EMFILE`, `ENFILE`), processes (`EAGAIN`) or no memory (`ENOMEM`).
    /// Such a failure to start a worker says nothing about the worker: a
    /// supervisor retries it later instead of counting it as a crash.
    pub fn is_resource_shortage(&self) -> bool {
        let source = match self {
            Self::Spawn { source, .. } | Self::Io { source, .. } => source,
            _ => return false,
        };
        if source.kind() == io::ErrorKind::OutOfMemory {
            return true;
        }
        use rustix::io::Errno;
        let short = [Errno::MFILE, Errno::NFILE, Errno::AGAIN, Errno::NOMEM];
        source
            .raw_os_error()
            .is_some_and(|raw| short.iter().any(|e| e.raw_os_error() == raw))
    }

    /// Whether this error means the peer is gone (closed channel, or a worker
    /// that is no longer connected).
    pub fn is_disconnected(&self) -> bool {
        matches!(
            self,
            Self::NotConnected(_) | Self::ChannelClosed | Self::Channel(ChannelError::Closed)
        )
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_shortages_are_told_apart() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert!(Error::io("cannot open a channel", emfile).is_resource_shortage());
        let eagain = io::Error::from_raw_os_error(rustix::io::Errno::AGAIN.raw_os_error());
        let spawn = Error::Spawn {
            program: "server".into(),
            source: eagain,
        };
        assert!(spawn.is_resource_shortage());
        let enoent = io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error());
        assert!(!Error::io("x", enoent).is_resource_shortage());
        assert!(!Error::Settings("bad".into()).is_resource_shortage());
    }
}
