//! The process signals a supervisor handles when it owns them.

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::shell::StartError;

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SignalAction {
    /// SIGTERM, SIGINT: stop gracefully (the second time: at once).
    Stop,
    /// SIGHUP: rolling reload.
    Reload,
    /// SIGTTIN: one more worker.
    AddWorker,
    /// SIGTTOU: one worker less (never below one).
    RemoveWorker,
}

/// Streams of the signals the supervisor owns.
#[derive(Debug)]
pub(super) struct Signals {
    streams: Vec<(Signal, SignalAction)>,
}

impl Signals {
    /// Installs the handlers. From then on these signals no longer have
    /// their default effect on the process.
    pub(super) fn install() -> Result<Self, StartError> {
        let wanted = [
            ("SIGTERM", SignalKind::terminate(), SignalAction::Stop),
            ("SIGINT", SignalKind::interrupt(), SignalAction::Stop),
            ("SIGHUP", SignalKind::hangup(), SignalAction::Reload),
            (
                "SIGTTIN",
                SignalKind::from_raw(crate::Signal::TTIN.number()),
                SignalAction::AddWorker,
            ),
            (
                "SIGTTOU",
                SignalKind::from_raw(crate::Signal::TTOU.number()),
                SignalAction::RemoveWorker,
            ),
        ];
        let mut streams = Vec::with_capacity(wanted.len());
        for (name, kind, action) in wanted {
            let stream = signal(kind).map_err(|source| StartError::Signal {
                signal: name,
                source,
            })?;
            streams.push((stream, action));
        }
        Ok(Self { streams })
    }

    /// The next signal received; pending forever without signals.
    ///
    /// # Cancel safety
    /// Cancel safe (each stream's `recv` is).
    pub(super) async fn recv(signals: &mut Option<Self>) -> SignalAction {
        let Some(signals) = signals else {
            return std::future::pending().await;
        };
        std::future::poll_fn(|cx| {
            for (stream, action) in &mut signals.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*action);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
