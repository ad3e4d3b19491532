//! How a process learns that it is a worker, and what its primary wants of
//! it.
//!
//! The primary puts one marker in a worker's environment,
//! `PROCLUSTER_PRIMARY=<the primary's pid>`, places the worker's end of the
//! channel at fd [`CHANNEL_FD`](crate::CHANNEL_FD), and writes the worker's
//! settings ([`Hello`]) as the channel's first frame before the worker
//! starts. A process is a worker when all of this holds:
//!
//! 1. the marker names its parent process (a worker's own children inherit
//!    the environment, but their parent is the worker, not the primary);
//! 2. fd 3 is a Unix socket whose peer is the primary (on Linux, checked
//!    with the socket's peer credentials);
//! 3. the first frame on it is a valid [`Hello`].
//!
//! Nothing here changes the environment: the marker stays, documented, and
//! the check is safe wherever and however often it runs.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::protocol::{self, Format, FrameKind, HEADER_LEN, Header, ProtocolError};
use crate::{CHANNEL_FD, WORKER_MARKER, WorkerId};

/// Longest a worker waits for its first frame. The primary writes it before
/// the worker starts, so it is there at once unless something is wrong.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest first frame a worker accepts.
const MAX_HELLO_LEN: usize = 64 * 1024;

/// What the primary tells a new worker in the channel's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// The worker's id.
    pub(crate) id: WorkerId,
    /// The worker's slot, if it was forked for one.
    pub(crate) index: Option<u64>,
    /// The format of user messages.
    pub(crate) format: Format,
    /// The channel's frame limit in bytes.
    pub(crate) max_frame: u64,
    /// How often to send a heartbeat, if at all.
    pub(crate) heartbeat: Option<Duration>,
    /// Between closing a disconnecting worker's listeners and firing its
    /// shutdown signal.
    pub(crate) shutdown_grace: Duration,
    /// The channel's busy-poll window (zero: off).
    pub(crate) busy_poll: Duration,
    /// The cluster's services, by name; a service's frames carry its index
    /// in this list.
    pub(crate) services: Vec<String>,
}

impl Hello {
    /// The whole first frame: header and payload.
    pub(crate) fn to_frame(&self) -> Vec<u8> {
        let payload = postcard::to_stdvec(self).expect("a hello always serialises");
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        protocol::encode_frame(&mut frame, FrameKind::Control, Format::Binary, 0, &payload);
        frame
    }

    /// Decodes a first frame's payload.
    ///
    /// # Errors
    /// [`ProtocolError::BadControl`] when it is not a hello.
    pub(crate) fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        postcard::from_bytes(payload).map_err(|e| ProtocolError::BadControl(e.to_string()))
    }
}

/// What `detect` found.
pub(crate) enum Detected {
    /// No marker, or a marker inherited from an ancestor: not a worker.
    NotWorker,
    /// A worker: its channel and its settings.
    Worker(OwnedFd, Hello),
}

/// Why a process marked as a worker cannot be one.
#[derive(Debug)]
pub(crate) struct Broken(pub(crate) String);

/// Whether the environment marks this process as a worker of its parent
/// (steps 1 of the module's list: cheap, no system call but `getppid`).
pub(crate) fn marked_by_parent() -> Option<u32> {
    let primary: u32 = std::env::var(WORKER_MARKER).ok()?.parse().ok()?;
    let parent = rustix::process::getppid()?;
    (parent.as_raw_nonzero().get() as u32 == primary).then_some(primary)
}

/// Decides whether this process is a worker, and if so takes its channel
/// and reads its settings. `ready_to_start` runs after the checks that
/// consume nothing, so a refusal there (no runtime) repeats itself on the
/// next call.
pub(crate) fn detect<E>(
    ready_to_start: impl FnOnce() -> Result<(), E>,
) -> Result<Detected, DetectError<E>> {
    let Some(primary) = marked_by_parent() else {
        return Ok(Detected::NotWorker);
    };
    let broken = |why: &str| DetectError::Broken(Broken(why.to_string()));
    crate::sys::with_inherited_fd(CHANNEL_FD, |fd| check_peer(fd, primary))
        .ok_or_else(|| broken("its channel (fd 3) is not open"))?
        .map_err(|why| broken(&why))?;
    ready_to_start().map_err(DetectError::Refused)?;
    let channel = crate::sys::adopt_inherited_fd(CHANNEL_FD)
        .ok_or_else(|| broken("its channel (fd 3) is not open"))?;
    let payload = read_first_frame(&channel, FIRST_FRAME_TIMEOUT)
        .map_err(|e| broken(&format!("cannot read its settings from the channel: {e}")))?;
    let hello = Hello::decode(&payload).map_err(|e| {
        broken(&format!(
            "the channel's first frame is not a worker's settings: {e}"
        ))
    })?;
    Ok(Detected::Worker(channel, hello))
}

/// How `detect` failed.
#[derive(Debug)]
pub(crate) enum DetectError<E> {
    /// Marked as a worker, but not a usable one.
    Broken(Broken),
    /// The caller refused to start (for example, no runtime).
    Refused(E),
}

/// The socket at fd 3 must be a Unix stream socket whose other end the
/// primary made.
fn check_peer(fd: std::os::fd::BorrowedFd<'_>, primary: u32) -> Result<(), String> {
    let not_a_channel = |what: &str| format!("fd 3 is not its channel: {what}");
    let kind =
        rustix::net::sockopt::socket_type(fd).map_err(|_| not_a_channel("it is not a socket"))?;
    if kind != rustix::net::SocketType::STREAM {
        return Err(not_a_channel("it is not a stream socket"));
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let peer = rustix::net::sockopt::socket_peercred(fd)
            .map_err(|_| not_a_channel("it is not a Unix socket"))?;
        if peer.pid.as_raw_nonzero().get() as u32 != primary {
            return Err(not_a_channel("its peer is not the primary"));
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = primary;
    Ok(())
}

/// Reads exactly one frame (header and payload) and nothing after it: what
/// follows belongs to the channel, descriptors included.
fn read_first_frame(channel: &OwnedFd, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut header = [0u8; HEADER_LEN];
    read_exact(channel, &mut header, deadline)?;
    let header = Header::parse(header, MAX_HELLO_LEN)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if header.kind != FrameKind::Control || header.fds != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the first frame is not a control frame without descriptors",
        ));
    }
    let mut payload = vec![0u8; header.len as usize];
    read_exact(channel, &mut payload, deadline)?;
    Ok(payload)
}

fn read_exact(fd: &OwnedFd, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let timeout = rustix::event::Timespec::try_from(left).ok();
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(0) => continue,
            Ok(_) => {}
        }
        match rustix::net::recv(fd.as_fd(), &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok((n, _)) => buf = &mut buf[n..],
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            id: WorkerId::new(42),
            index: Some(3),
            format: Format::Binary,
            max_frame: 1 << 20,
            heartbeat: Some(Duration::from_millis(250)),
            shutdown_grace: Duration::from_millis(20),
            busy_poll: Duration::from_micros(50),
            services: vec!["pool:images".into(), "bus".into()],
        }
    }

    #[test]
    fn a_hello_reads_back_as_written_and_nothing_after_it_is_consumed() {
        let (ours, theirs) = crate::channel::socket_pair().unwrap();
        let mut wire = hello().to_frame();
        wire.extend_from_slice(b"next frame");
        rustix::io::write(&ours, &wire).unwrap();
        let payload = read_first_frame(&theirs, Duration::from_secs(5)).unwrap();
        assert_eq!(Hello::decode(&payload).unwrap(), hello());
        let mut rest = [0u8; 10];
        read_exact(&theirs, &mut rest, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(&rest, b"next frame");
    }

    #[test]
    fn a_channel_that_says_nothing_times_out() {
        let (_ours, theirs) = crate::channel::socket_pair().unwrap();
        let error = read_first_frame(&theirs, Duration::from_millis(20)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_first_frame_that_is_not_a_hello_is_refused() {
        let (ours, theirs) = crate::channel::socket_pair().unwrap();
        let mut wire = Vec::new();
        protocol::encode_frame(&mut wire, FrameKind::User, Format::Json, 0, b"{}");
        rustix::io::write(&ours, &wire).unwrap();
        assert!(read_first_frame(&theirs, Duration::from_secs(5)).is_err());
        assert!(Hello::decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn the_peer_check_tells_the_primary_from_anyone_else() {
        let (_ours, theirs) = crate::channel::socket_pair().unwrap();
        let me = std::process::id();
        assert!(check_peer(theirs.as_fd(), me).is_ok());
        if cfg!(target_os = "linux") {
            assert!(check_peer(theirs.as_fd(), me + 1).is_err());
        }
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(check_peer(file.as_fd(), me).is_err());
    }
}
