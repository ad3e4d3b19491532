//! Sockets handed to this process by socket activation: systemd's
//! `LISTEN_FDS` protocol (`sd_listen_fds(3)`), read in one place for the
//! library's primary and for the `procluster` command.
//!
//! The protocol: descriptors from 3 up, `LISTEN_FDS` of them, meant for the
//! process whose pid is `LISTEN_PID`, optionally named by `LISTEN_FDNAMES`
//! (colon-separated). The rule is systemd's: the sockets are this process's
//! only when `LISTEN_PID` is set and names it. A child that inherited the
//! variables (and perhaps the descriptors) from a parent that was activated
//! does not take them for its own.
//!
//! ```
//! use procluster::listeners::activation::ListenFds;
//!
//! let fds = ListenFds::parse(Some("42"), Some("2"), Some("web:admin"), 42);
//! assert_eq!(fds.range(), 3..5);
//! assert_eq!(fds.name(1), Some("admin"));
//! // Meant for another process: none of them is ours.
//! assert!(ListenFds::parse(Some("41"), Some("2"), None, 42).is_empty());
//! ```

use std::ops::Range;
use std::os::fd::{OwnedFd, RawFd};

/// The first descriptor of socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// More than this many passed descriptors is taken for a malformed
/// `LISTEN_FDS` rather than a range to scan.
const MAX_LISTEN_FDS: u32 = 1 << 16;

/// The descriptors passed to this process by socket activation, and their
/// names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenFds {
    count: u32,
    names: Vec<String>,
}

/// A socket passed by socket activation, duplicated for use here.
#[derive(Debug)]
pub struct ActivatedSocket {
    /// The descriptor number it was passed at.
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES`, if it has one (systemd's placeholder
    /// `unknown` counts as none).
    pub name: Option<String>,
    /// A close-on-exec duplicate (the original is made close-on-exec too,
    /// so neither leaks into children except where placed on purpose).
    pub socket: OwnedFd,
}

impl ListenFds {
    /// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` for this
    /// process. Nothing is removed from the environment.
    pub fn from_env() -> Self {
        let var = |key| std::env::var(key).ok();
        Self::parse(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        )
    }

    /// The same from given values: `pid` is the process asking. Values that
    /// do not parse mean no socket, as a missing `LISTEN_PID` does.
    pub fn parse(
        listen_pid: Option<&str>,
        listen_fds: Option<&str>,
        listen_fdnames: Option<&str>,
        pid: u32,
    ) -> Self {
        let for_us = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(pid);
        let count = listen_fds
            .and_then(|n| n.trim().parse::<u32>().ok())
            .filter(|&n| n <= MAX_LISTEN_FDS)
            .unwrap_or(0);
        if !for_us || count == 0 {
            return Self::default();
        }
        let names = listen_fdnames
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        Self { count, names }
    }

    /// Whether no socket was passed to this process.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many descriptors were passed.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// The descriptor numbers: `3..3 + LISTEN_FDS`.
    pub fn range(&self) -> Range<RawFd> {
        LISTEN_FDS_START..LISTEN_FDS_START + self.count as RawFd
    }

    /// The name of the `i`-th descriptor (from 0), if `LISTEN_FDNAMES` gives
    /// one other than systemd's placeholder `unknown`.
    pub fn name(&self, i: usize) -> Option<&str> {
        self.names
            .get(i)
            .map(String::as_str)
            .filter(|n| !n.is_empty() && *n != "unknown")
    }

    /// Usable duplicates of the passed descriptors that are open, in order,
    /// with their names. Safe to call more than once: the originals are not
    /// taken over.
    pub fn sockets(&self) -> Vec<ActivatedSocket> {
        self.range()
            .enumerate()
            .filter_map(|(i, fd)| {
                Some(ActivatedSocket {
                    fd,
                    name: self.name(i).map(str::to_string),
                    socket: crate::sys::duplicate_inherited_fd(fd)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sockets_are_ours_only_when_listen_pid_names_us() {
        let ours = ListenFds::parse(Some("7"), Some("3"), None, 7);
        assert_eq!(ours.range(), 3..6);
        assert_eq!(ours.len(), 3);
        assert!(ListenFds::parse(None, Some("3"), None, 7).is_empty());
        assert!(ListenFds::parse(Some("8"), Some("3"), None, 7).is_empty());
        assert!(ListenFds::parse(Some("seven"), Some("3"), None, 7).is_empty());
    }

    #[test]
    fn a_malformed_count_means_no_socket() {
        for count in ["", "-1", "x", "0", "99999999999"] {
            let fds = ListenFds::parse(Some("7"), Some(count), None, 7);
            assert!(fds.is_empty(), "{count:?}");
            assert_eq!(fds.range(), 3..3);
        }
    }

    #[test]
    fn names_follow_the_order_and_unknown_is_no_name() {
        let fds = ListenFds::parse(Some("7"), Some("3"), Some("web:unknown:"), 7);
        assert_eq!(fds.name(0), Some("web"));
        assert_eq!(fds.name(1), None);
        assert_eq!(fds.name(2), None);
        assert_eq!(fds.name(3), None);
    }
}
