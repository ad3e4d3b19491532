//! sd_notify for workers: each worker gets a Unix datagram socket of its own
//! (`NOTIFY_SOCKET`), so what arrives there is attributed to it.

use std::path::Path;

use tokio::net::UnixDatagram;
use tokio::sync::mpsc;

use super::Signal;

/// Binds the worker's socket at `path` (replacing a stale one).
pub fn bind(path: &Path) -> std::io::Result<UnixDatagram> {
    let _ = std::fs::remove_file(path);
    UnixDatagram::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot create notify socket {}: {e}", path.display()),
        )
    })
}

/// Reads datagrams until nobody listens for the signals any more.
pub async fn read(socket: UnixDatagram, signals: mpsc::UnboundedSender<Signal>) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            received = socket.recv(&mut buf) => match received {
                Ok(n) => {
                    for signal in parse(&buf[..n]) {
                        if signals.send(signal).is_err() {
                            return;
                        }
                    }
                }
                Err(_) => return,
            },
            () = signals.closed() => return,
        }
    }
}

/// `KEY=VALUE` lines, as sd_notify(3) sends them.
pub fn parse(datagram: &[u8]) -> Vec<Signal> {
    let text = String::from_utf8_lossy(datagram);
    text.lines()
        .filter_map(|line| match line.split_once('=')? {
            ("READY", "1") => Some(Signal::Ready),
            ("STOPPING", "1") => Some(Signal::Stopping),
            ("WATCHDOG", "1") => Some(Signal::Watchdog),
            ("STATUS", status) => Some(Signal::Status(status.to_string())),
            ("X_PROCLUSTER_REQUESTS", n) => n.trim().parse().ok().map(Signal::Requests),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_key_is_read_and_others_ignored() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=warming up\nMAINPID=4\nWATCHDOG=1\nSTOPPING=1"),
            vec![
                Signal::Ready,
                Signal::Status("warming up".into()),
                Signal::Watchdog,
                Signal::Stopping
            ]
        );
        assert_eq!(parse(b"READY=0"), vec![]);
        assert_eq!(
            parse(b"X_PROCLUSTER_REQUESTS=1200\nX_PROCLUSTER_REQUESTS=many"),
            vec![Signal::Requests(1200)]
        );
    }
}
