//! How a worker tells the primary it is ready: not at all (`none`), after a
//! delay, through sd_notify (`notify`), or through a Node IPC channel
//! (`node-ipc`).
//!
//! For each fork, [`Readiness::prepare`] gives what the worker needs (a
//! `NOTIFY_SOCKET`, or a `NODE_CHANNEL_FD`) and a [`Signals`] stream the
//! primary reads for that worker.

pub mod node_ipc;
pub mod notify;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

/// `--ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    None,
    Notify,
    NodeIpc,
    Delay(Duration),
}

impl ReadyMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(Self::None),
            "notify" => Ok(Self::Notify),
            "node-ipc" => Ok(Self::NodeIpc),
            _ => match text.strip_prefix("delay:") {
                Some(duration) => crate::args::parse_duration(duration).map(Self::Delay),
                None => Err(format!(
                    "unknown readiness {text:?}: expected none, notify, node-ipc or delay:DURATION"
                )),
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Notify => "notify".into(),
            Self::NodeIpc => "node-ipc".into(),
            Self::Delay(d) => format!("delay:{}ms", d.as_millis()),
        }
    }
}

/// What a worker said about itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// READY=1, `process.send('ready')`, or the delay passed.
    Ready,
    /// STOPPING=1.
    Stopping,
    /// STATUS=...
    Status(String),
    /// WATCHDOG=1: the worker is alive (feeds hang detection).
    Watchdog,
    /// How many requests the worker has served in all, for
    /// `--max-requests`: `X_PROCLUSTER_REQUESTS=N` on NOTIFY_SOCKET, or
    /// `process.send({procluster: {requests: N}})`.
    Requests(u64),
    /// Any other IPC message from a Node worker (JSON text).
    Message(String),
}

/// Where a worker's readiness signals arrive.
pub type Signals = mpsc::UnboundedReceiver<Signal>;

/// What to add to one fork.
#[derive(Debug, Default)]
pub struct ForkExtras {
    pub env: Vec<(String, String)>,
    /// A descriptor for the worker, at the next free number.
    pub fd: Option<OwnedFd>,
    /// Removed when the worker is gone.
    pub cleanup: Option<PathBuf>,
}

/// Sets up readiness for each worker in one mode.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub mode: ReadyMode,
    /// Where per-worker notify sockets go.
    pub notify_dir: PathBuf,
    /// The user (and group) workers run as, who must be able to write to
    /// their notify socket.
    pub owner: Option<(u32, Option<u32>)>,
}

impl Readiness {
    /// Prepares fork number `seq`: what the worker gets, and the stream of
    /// what it says. `fd_number` is where the fd (if any) will sit.
    pub fn prepare(&self, seq: u64, fd_number: i32) -> std::io::Result<(ForkExtras, Signals)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut extras = ForkExtras::default();
        match self.mode {
            ReadyMode::None => {
                let _ = tx.send(Signal::Ready);
            }
            ReadyMode::Delay(delay) => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Signal::Ready);
                });
            }
            ReadyMode::Notify => {
                let path = self.notify_dir.join(format!("{seq}.sock"));
                let socket = notify::bind(&path)?;
                if let Some((uid, gid)) = self.owner {
                    let owner = Some(rustix::process::Uid::from_raw(uid));
                    let group = gid.map(rustix::process::Gid::from_raw);
                    rustix::fs::chown(&path, owner, group).map_err(std::io::Error::from)?;
                }
                extras
                    .env
                    .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
                extras.cleanup = Some(path);
                tokio::spawn(notify::read(socket, tx));
            }
            ReadyMode::NodeIpc => {
                let (ours, theirs) = node_ipc::pair()?;
                extras
                    .env
                    .push(("NODE_CHANNEL_FD".into(), fd_number.to_string()));
                extras
                    .env
                    .push(("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into()));
                extras.fd = Some(theirs);
                tokio::spawn(node_ipc::read(ours, tx));
            }
        }
        Ok((extras, rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(ReadyMode::parse("none"), Ok(ReadyMode::None));
        assert_eq!(ReadyMode::parse("notify"), Ok(ReadyMode::Notify));
        assert_eq!(ReadyMode::parse("node-ipc"), Ok(ReadyMode::NodeIpc));
        assert_eq!(
            ReadyMode::parse("delay:250ms"),
            Ok(ReadyMode::Delay(Duration::from_millis(250)))
        );
        assert!(ReadyMode::parse("delay:").is_err());
        assert!(
            ReadyMode::parse("sometimes")
                .unwrap_err()
                .contains("expected none")
        );
    }
}
