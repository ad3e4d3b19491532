//! The primary under systemd: sockets passed to it (its own `LISTEN_FDS`)
//! and status notifications to its own `NOTIFY_SOCKET`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

/// A socket systemd passed to this process.
#[derive(Debug)]
pub struct Inherited {
    pub name: Option<String>,
    pub socket: OwnedFd,
}

/// The sockets passed to this process, if `LISTEN_PID` names it. Each is
/// duplicated close-on-exec (the originals too), so they reach workers only
/// where placed.
pub fn listen_fds() -> Vec<Inherited> {
    let var = |key| std::env::var(key).ok();
    let for_us = var("LISTEN_PID")
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    let count: i32 = var("LISTEN_FDS").and_then(|n| n.parse().ok()).unwrap_or(0);
    if !for_us || count <= 0 {
        return Vec::new();
    }
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    (0..count)
        .filter_map(|i| {
            let socket = procluster::primary::inherited_fd(3 + i)?;
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty() && *n != "unknown")
                .cloned();
            Some(Inherited { name, socket })
        })
        .collect()
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
