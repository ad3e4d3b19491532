//! The primary under systemd: sockets passed to it (its own `LISTEN_FDS`)
//! and status notifications to its own `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;

use procluster::listeners::activation::{ActivatedSocket, ListenFds};

/// The sockets passed to this process by socket activation (the library's
/// one reading of `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`). Each is
/// duplicated close-on-exec (the originals too), so they reach workers only
/// where placed.
pub fn listen_fds() -> Vec<ActivatedSocket> {
    ListenFds::from_env().sockets()
}

/// Sends sd_notify states to this process's `NOTIFY_SOCKET`, if it has one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<std::os::unix::net::SocketAddr>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            match bytes.strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name).ok()
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&path).ok(),
            }
        });
        Self { target }
    }

    /// Sends `state` (e.g. `READY=1`); failures are logged, never fatal.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else { return };
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), target));
        if let Err(error) = sent {
            tracing::debug!(%error, state, "cannot notify systemd");
        }
    }
}
