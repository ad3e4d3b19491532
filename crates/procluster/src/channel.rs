//! The primary–worker channel: a Unix stream socket carrying the frames of
//! [`crate::protocol`], with file descriptors attached.
//!
//! Sending never blocks a caller on the socket: a sender appends its frame to
//! a shared, bounded buffer and a writer task flushes the buffer with as few
//! `sendmsg` calls as it can. This batches small messages (one system call for
//! thousands of them under load) while keeping their order, and the bound on
//! the buffer gives backpressure: when the peer stops reading, senders wait.
//!
//! Receiving goes through `recvmsg` only (a plain `read` would silently drop
//! attached descriptors), with `MSG_CMSG_CLOEXEC` so received descriptors are
//! close-on-exec from the first moment.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The channel's socket, registered with the runtime's reactor.
type UnixStream = AsyncFd<OwnedFd>;
use tokio::sync::Notify;

use crate::protocol::{
    Format, Frame, FrameDecoder, FrameKind, HEADER_LEN, Header, MAX_FDS_PER_FRAME, ProtocolError,
};
use crate::sync::lock;

/// A descriptor queued for sending. `sendmsg` copies descriptors into the
/// peer without consuming ours, so a descriptor the caller keeps (a
/// connection the primary holds until a worker acknowledges it) is shared
/// rather than duplicated.
pub(crate) type SharedFd = Arc<OwnedFd>;

fn shared(fds: Vec<OwnedFd>) -> Vec<SharedFd> {
    fds.into_iter().map(Arc::new).collect()
}

/// Above this many buffered bytes, senders wait for the writer to catch up.
/// A single frame larger than this is still accepted when the buffer is empty.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// A send that finds the channel idle writes at once, from the caller's task,
/// instead of waking the writer: one system call, no task switch, which is
/// what a round trip wants. Sends closer together than this batch through
/// the writer instead, which is what a stream of messages wants.
const DIRECT_WRITE_SPACING: std::time::Duration = std::time::Duration::from_micros(5);
/// Bytes read per `recvmsg`.
const READ_CHUNK: usize = 256 * 1024;

/// What crossed one channel so far, in frames and bytes (headers
/// included), each way, and the frames this side refused to queue (over the
/// size limit, too many descriptors, or the buffer full on a send that does
/// not wait). Counted with relaxed atomic adds, so reading them costs the
/// channel nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Frames queued for the other side.
    pub frames_sent: u64,
    /// Bytes of those frames.
    pub bytes_sent: u64,
    /// Frames received from the other side.
    pub frames_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Frames refused before they were queued.
    pub frames_refused: u64,
}

/// The live counters behind [`ChannelStats`], shared by both halves.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    frames_refused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ChannelStats {
        ChannelStats {
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            frames_received: self.frames_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            frames_refused: self.frames_refused.load(Ordering::Relaxed),
        }
    }

    fn refused<T>(&self, result: Result<T, ChannelError>) -> Result<T, ChannelError> {
        if matches!(
            result,
            Err(ChannelError::Full | ChannelError::TooLarge { .. } | ChannelError::TooManyFds(_))
        ) {
            self.frames_refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer closed the channel, or it was closed locally.
    #[error("the channel is closed")]
    Closed,
    /// The peer sent bytes that are not a valid frame stream.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The operating system refused the operation.
    #[error("channel I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A message to send is larger than the channel's limit. It is refused
    /// as soon as its encoding passes the limit, so `len` is a lower bound.
    #[error("message of {len} bytes or more exceeds the channel's limit of {max} bytes")]
    TooLarge {
        /// Payload size reached when the limit was passed.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The peer is not reading: its buffer is over the high-water mark.
    #[error("the channel's buffer is full (the other side is not reading)")]
    Full,
    /// More descriptors than one frame can carry.
    #[error("{0} file descriptors in one message, at most {MAX_FDS_PER_FRAME} are allowed")]
    TooManyFds(usize),
}

/// Duplicates descriptors to send with a message, so the caller keeps its
/// own.
///
/// # Errors
/// When the OS refuses a duplicate (out of descriptors).
pub(crate) fn dup_all<F: AsFd>(fds: &[F]) -> io::Result<Vec<OwnedFd>> {
    fds.iter()
        .map(|fd| fd.as_fd().try_clone_to_owned())
        .collect()
}

/// Creates a connected pair of channel sockets, both close-on-exec. The first
/// is non-blocking (for this process's runtime); the second is left blocking,
/// as a new process expects of an inherited descriptor.
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::ioctl_fionbio(&ours, true)?;
    Ok((ours, theirs))
}

/// Opens a channel on a connected Unix stream socket and starts its writer.
///
/// Must be called inside a Tokio runtime.
pub(crate) fn open(
    socket: OwnedFd,
    max_frame: usize,
) -> io::Result<(ChannelSender, ChannelReader)> {
    rustix::io::ioctl_fionbio(&socket, true)?;
    let fd = Arc::new(crate::sys::async_fd(
        socket,
        Interest::READABLE | Interest::WRITABLE,
    )?);
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(SendShared {
        counters: counters.clone(),
        socket: fd.clone(),
        state: Mutex::new(SendState::default()),
        flush_wanted: Notify::new(),
        space_freed: Notify::new(),
        max_frame,
    });
    tokio::spawn(write_loop(fd.clone(), shared.clone()));
    let reader = ChannelReader {
        fd,
        decoder: FrameDecoder::new(max_frame),
        scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        busy_poll: Duration::ZERO,
        last_read: None,
        counters,
    };
    Ok((ChannelSender { shared }, reader))
}

#[derive(Default)]
struct SendState {
    buf: Vec<u8>,
    /// Offsets in `buf` of frames that carry descriptors, with them.
    fds: VecDeque<(usize, Vec<SharedFd>)>,
    /// Set once the channel can no longer send.
    closed: bool,
    /// Ask the writer to shut down the socket's sending side once drained.
    close_requested: bool,
    /// The writer task holds a taken buffer and is writing it.
    writing: bool,
    /// When a sender last wrote directly.
    last_direct: Option<std::time::Instant>,
    /// The writer has been woken for what is queued and not yet taken it.
    writer_called: bool,
}

struct SendShared {
    counters: Arc<Counters>,
    socket: Arc<UnixStream>,
    state: Mutex<SendState>,
    flush_wanted: Notify,
    space_freed: Notify,
    max_frame: usize,
}

impl SendShared {
    fn lock(&self) -> MutexGuard<'_, SendState> {
        // A panic while holding the lock cannot leave the buffer half-written
        // in a way that matters more than losing the channel; keep going.
        lock(&self.state)
    }
}

/// The sending half of a channel. Cheap to clone; all clones feed one
/// ordered stream.
#[derive(Clone)]
pub(crate) struct ChannelSender {
    shared: Arc<SendShared>,
}

impl std::fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSender").finish_non_exhaustive()
    }
}

impl ChannelSender {
    /// Queues one frame whose payload is written by `write_payload`, waiting
    /// while the buffer is over its high-water mark.
    ///
    /// # Cancel safety
    /// Cancelling before the frame is queued queues nothing; once queued (the
    /// future has returned) the frame is sent in order.
    pub(crate) async fn send_with(
        &self,
        kind: FrameKind,
        format: Format,
        fds: Vec<OwnedFd>,
        write_payload: impl FnOnce(&mut PayloadWriter<'_>) -> io::Result<()>,
    ) -> Result<(), ChannelError> {
        let mut frame = Some((fds, write_payload));
        loop {
            let space = self.shared.space_freed.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            match self.queue_if_room(kind, format, &mut frame) {
                Err(ChannelError::Full) => space.await,
                done => return self.shared.counters.refused(done),
            }
        }
    }

    /// Queues a frame if the buffer is under its high-water mark, without
    /// ever waiting: [`ChannelError::Full`] otherwise.
    pub(crate) fn try_send_with(
        &self,
        kind: FrameKind,
        format: Format,
        fds: Vec<OwnedFd>,
        write_payload: impl FnOnce(&mut PayloadWriter<'_>) -> io::Result<()>,
    ) -> Result<(), ChannelError> {
        let queued = self.queue_if_room(kind, format, &mut Some((fds, write_payload)));
        self.shared.counters.refused(queued)
    }

    /// Takes the frame out of `frame` and queues it, unless the buffer is
    /// over its high-water mark (a frame larger than the mark still goes into
    /// an empty buffer): then [`ChannelError::Full`], with `frame` untouched.
    fn queue_if_room(
        &self,
        kind: FrameKind,
        format: Format,
        frame: &mut Option<(
            Vec<OwnedFd>,
            impl FnOnce(&mut PayloadWriter<'_>) -> io::Result<()>,
        )>,
    ) -> Result<(), ChannelError> {
        let fd_count = frame.as_ref().map_or(0, |(fds, _)| fds.len());
        if fd_count > MAX_FDS_PER_FRAME {
            return Err(ChannelError::TooManyFds(fd_count));
        }
        let mut state = self.shared.lock();
        if state.closed || state.close_requested {
            return Err(ChannelError::Closed);
        }
        if state.buf.len() >= HIGH_WATER {
            return Err(ChannelError::Full);
        }
        let (fds, write_payload) = frame.take().ok_or(ChannelError::Closed)?;
        self.append(&mut state, kind, format, shared(fds), write_payload)?;
        self.flush(state);
        Ok(())
    }

    /// Queues a frame without waiting, ignoring the high-water mark. For
    /// small internal replies that must not wait behind user traffic.
    pub(crate) fn send_now(
        &self,
        kind: FrameKind,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), ChannelError> {
        self.send_now_shared(kind, payload, shared(fds))
    }

    /// [`ChannelSender::send_now`] with descriptors the caller keeps too.
    pub(crate) fn send_now_shared(
        &self,
        kind: FrameKind,
        payload: &[u8],
        fds: Vec<SharedFd>,
    ) -> Result<(), ChannelError> {
        let state = self
            .shared
            .counters
            .refused(self.queue_small(kind, payload, fds))?;
        self.flush(state);
        Ok(())
    }

    /// Queues a small control frame for the writer task, never writing it
    /// from the caller: frames sent this way in one turn of the event loop
    /// leave in one `sendmsg`, after the tasks woken before the writer.
    pub(crate) fn send_batched(&self, kind: FrameKind, payload: &[u8]) -> Result<(), ChannelError> {
        let state = self
            .shared
            .counters
            .refused(self.queue_small(kind, payload, Vec::new()))?;
        self.call_writer(state);
        Ok(())
    }

    /// Appends a frame whatever the high-water mark; returns the lock for the
    /// caller to decide how it leaves.
    fn queue_small(
        &self,
        kind: FrameKind,
        payload: &[u8],
        fds: Vec<SharedFd>,
    ) -> Result<MutexGuard<'_, SendState>, ChannelError> {
        if fds.len() > MAX_FDS_PER_FRAME {
            return Err(ChannelError::TooManyFds(fds.len()));
        }
        let mut state = self.shared.lock();
        if state.closed || state.close_requested {
            return Err(ChannelError::Closed);
        }
        self.append(&mut state, kind, Format::Binary, fds, |buf| {
            buf.write_all(payload)
        })?;
        Ok(state)
    }

    /// Writes a lone frame at once when the channel is idle; otherwise (or
    /// for what the socket did not take) wakes the writer.
    fn flush(&self, mut state: MutexGuard<'_, SendState>) {
        let lone = !state.writing
            && state.fds.len() <= 1
            && state.fds.front().is_none_or(|(at, _)| *at == 0);
        let spaced = state
            .last_direct
            .is_none_or(|at| at.elapsed() >= DIRECT_WRITE_SPACING);
        if lone && spaced {
            state.last_direct = Some(std::time::Instant::now());
            let fds = state.fds.front().map_or(&[][..], |(_, fds)| &fds[..]);
            if let Ok(written) = try_sendmsg(self.shared.socket.get_ref(), &state.buf, fds) {
                if written > 0 {
                    state.fds.clear();
                }
                state.buf.drain(..written);
            }
            if state.buf.is_empty() {
                return;
            }
        }
        self.call_writer(state);
    }

    /// Wakes the writer for what is queued. One wake-up per batch: the writer
    /// takes everything queued when it runs, so only the first frame after
    /// its last take needs to call it.
    fn call_writer(&self, mut state: MutexGuard<'_, SendState>) {
        let wake = !std::mem::replace(&mut state.writer_called, true);
        drop(state);
        if wake {
            self.shared.flush_wanted.notify_one();
        }
    }

    fn append(
        &self,
        state: &mut SendState,
        kind: FrameKind,
        format: Format,
        fds: Vec<SharedFd>,
        write_payload: impl FnOnce(&mut PayloadWriter<'_>) -> io::Result<()>,
    ) -> Result<(), ChannelError> {
        let start = state.buf.len();
        state.buf.extend_from_slice(&[0; HEADER_LEN]);
        let max = self.shared.max_frame;
        let mut writer = PayloadWriter {
            buf: &mut state.buf,
            frame_start: start,
            end: (start + HEADER_LEN).saturating_add(max),
            overflow: None,
            finished: false,
        };
        let written = write_payload(&mut writer);
        // On every early return the writer's drop removes the partial frame.
        if let Some(len) = writer.overflow {
            return Err(ChannelError::TooLarge { len, max });
        }
        written.map_err(ChannelError::Io)?;
        let len = writer.written();
        writer.finished = true;
        drop(writer);
        let header = Header {
            kind,
            format,
            fds: fds.len() as u8,
            len: len as u32,
        };
        state.buf[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        if !fds.is_empty() {
            state.fds.push_back((start, fds));
        }
        let counters = &self.shared.counters;
        counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_sent
            .fetch_add((HEADER_LEN + len) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Stops accepting frames; the writer flushes what is queued, then shuts
    /// the socket's sending side down so the peer reads end-of-stream.
    pub(crate) fn close(&self) {
        self.shared.lock().close_requested = true;
        self.shared.flush_wanted.notify_one();
    }

    /// What crossed the channel so far, both ways.
    pub(crate) fn stats(&self) -> ChannelStats {
        self.shared.counters.snapshot()
    }

    /// Whether the channel can still send.
    pub(crate) fn is_open(&self) -> bool {
        let state = self.shared.lock();
        !state.closed && !state.close_requested
    }
}

/// Where a frame's payload is encoded: straight into the channel's buffer,
/// but never past the frame limit (a message over it is refused as soon as
/// it gets there, not after it has been encoded whole). Dropped before the
/// frame is finished (an error, or a panic in the payload's `Serialize`),
/// it removes the partial frame, so the stream stays well formed.
pub(crate) struct PayloadWriter<'a> {
    buf: &'a mut Vec<u8>,
    /// Where the frame's header starts.
    frame_start: usize,
    /// Where the payload must end at the latest (the frame limit).
    end: usize,
    /// Set when a write would have passed `max`: the size it would have made.
    overflow: Option<usize>,
    finished: bool,
}

impl PayloadWriter<'_> {
    /// Payload bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.buf.len() - self.frame_start - HEADER_LEN
    }

    #[cold]
    fn over_limit(&mut self, adding: usize) -> io::Error {
        self.overflow = Some(self.written() + adding);
        io::Error::other("message over the channel's size limit")
    }
}

impl io::Write for PayloadWriter<'_> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all(data).map(|()| data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if self.buf.len() + data.len() > self.end {
            return Err(self.over_limit(data.len()));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for PayloadWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.buf.truncate(self.frame_start);
        }
    }
}

/// Flushes the shared buffer whenever senders add to it.
async fn write_loop(fd: Arc<UnixStream>, shared: Arc<SendShared>) {
    let mut spare = Vec::new();
    loop {
        let taken = {
            let mut state = shared.lock();
            // Whatever woke us is taken now, or was written directly by a
            // sender: the next frame queued must call us again.
            state.writer_called = false;
            if state.buf.is_empty() && !state.close_requested {
                None
            } else {
                state.writing = true;
                let buf = std::mem::replace(&mut state.buf, std::mem::take(&mut spare));
                Some((buf, std::mem::take(&mut state.fds), state.close_requested))
            }
        };
        let Some((mut buf, fds, close)) = taken else {
            shared.flush_wanted.notified().await;
            continue;
        };
        let result = write_all(&fd, &buf, fds).await;
        shared.lock().writing = false;
        shared.space_freed.notify_waiters();
        if let Err(error) = result {
            tracing::debug!(%error, "channel write failed; closing the sending side");
            shared.lock().closed = true;
            shared.space_freed.notify_waiters();
            return;
        }
        if close && shared.lock().buf.is_empty() {
            let _ = rustix::net::shutdown(fd.get_ref(), rustix::net::Shutdown::Write);
            shared.lock().closed = true;
            shared.space_freed.notify_waiters();
            return;
        }
        buf.clear();
        // Keep one allocation around, but do not hoard a huge one after a
        // burst of large messages.
        if buf.capacity() <= HIGH_WATER * 2 {
            spare = buf;
        }
    }
}

/// Writes `buf`, attaching each fd batch to the `sendmsg` that starts at its
/// frame's header.
async fn write_all(
    fd: &UnixStream,
    buf: &[u8],
    mut fds: VecDeque<(usize, Vec<SharedFd>)>,
) -> io::Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        let (end, attach) = match fds.front() {
            Some((at, _)) if *at == pos => (fds.get(1).map_or(buf.len(), |(next, _)| *next), true),
            Some((at, _)) => (*at, false),
            None => (buf.len(), false),
        };
        let batch = if attach {
            fds.pop_front().map(|(_, f)| f)
        } else {
            None
        };
        pos += send_segment(fd, &buf[pos..end], batch.as_deref().unwrap_or(&[])).await?;
    }
    Ok(())
}

/// Sends one segment; descriptors go with its first byte. Returns bytes sent
/// (the whole segment).
async fn send_segment(
    fd: &UnixStream,
    mut bytes: &[u8],
    mut fds: &[SharedFd],
) -> io::Result<usize> {
    let total = bytes.len();
    while !bytes.is_empty() {
        let mut ready = fd.writable().await?;
        match ready.try_io(|socket| try_sendmsg(socket.get_ref(), bytes, fds)) {
            Ok(Ok(n)) => {
                fds = &[];
                bytes = &bytes[n..];
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(total)
}

/// One non-blocking `sendmsg` of `bytes`, with `fds` on its first byte.
fn try_sendmsg(socket: &OwnedFd, bytes: &[u8], fds: &[SharedFd]) -> io::Result<usize> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let iov = [IoSlice::new(bytes)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&borrowed));
    }
    Ok(rustix::net::sendmsg(
        socket,
        &iov,
        &mut control,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// The receiving half of a channel.
pub(crate) struct ChannelReader {
    fd: Arc<UnixStream>,
    decoder: FrameDecoder,
    scratch: Box<[u8]>,
    /// How long after a read the reader keeps polling the socket itself
    /// instead of waiting for the reactor (zero: never).
    busy_poll: Duration,
    /// When bytes last arrived.
    last_read: Option<Instant>,
    /// Shared with the sending half.
    counters: Arc<Counters>,
}

impl ChannelReader {
    /// After each read, keep polling the socket for `window` before waiting
    /// on the reactor again: the reply to a message just sent is picked up
    /// without the event loop going to sleep and being woken, at the price
    /// of the CPU spent polling. Other tasks keep running meanwhile (the
    /// reader yields between polls).
    pub(crate) fn set_busy_poll(&mut self, window: Duration) {
        self.busy_poll = window;
    }

    fn busy_polling(&self) -> bool {
        !self.busy_poll.is_zero()
            && self
                .last_read
                .is_some_and(|at| at.elapsed() < self.busy_poll)
    }

    /// Reads once and appends every frame completed by what arrived to `out`.
    /// Returns `Ok(false)` at a clean end of stream.
    ///
    /// # Errors
    /// A protocol error (garbage, truncated or oversized frame, lost fds) or
    /// an I/O error; either is final for this channel.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes read are kept in the decoder.
    pub(crate) async fn read_frames(&mut self, out: &mut Vec<Frame>) -> Result<bool, ChannelError> {
        loop {
            let received = if self.busy_polling() {
                match receive(self.fd.get_ref(), &mut self.scratch) {
                    Ok(received) => received,
                    Err(_would_block) => {
                        // Let the other tasks run (the runtime polls its
                        // reactor without sleeping), then look again.
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
            } else {
                let mut ready = self.fd.readable().await?;
                let scratch = &mut self.scratch;
                let capacity = scratch.len();
                let received = match ready.try_io(|socket| receive(socket.get_ref(), scratch)) {
                    Ok(Ok(received)) => received,
                    Ok(Err(e)) => Err(ChannelError::Io(e)),
                    Err(_would_block) => continue,
                };
                let drained =
                    matches!(&received, Ok((n, fds)) if *n > 0 && *n < capacity && fds.is_empty());
                if drained && cfg!(any(target_os = "linux", target_os = "android")) {
                    // On Linux a short read without descriptors emptied the
                    // socket (a read that takes descriptors stops early,
                    // after their message): the next read waits for the
                    // reactor instead of paying a system call to learn it.
                    ready.clear_ready();
                }
                received
            };
            if !self.busy_poll.is_zero() {
                self.last_read = Some(Instant::now());
            }
            match received {
                Ok((0, fds)) => {
                    drop(fds);
                    self.decoder.finish()?;
                    return Ok(false);
                }
                Ok((n, fds)) => {
                    self.decoder.push(&self.scratch[..n], fds);
                    let before = out.len();
                    while let Some(frame) = self.decoder.next_frame()? {
                        out.push(frame);
                    }
                    let counters = &self.counters;
                    counters
                        .frames_received
                        .fetch_add((out.len() - before) as u64, Ordering::Relaxed);
                    counters
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(true);
                }
                Err(ChannelError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                // A peer that exits with our frames unread resets the
                // socket: that is its end, not a protocol error.
                Err(ChannelError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.decoder.finish()?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One `recvmsg`. The outer `io::Result` is only for would-block, so that
/// `try_io` can clear readiness; everything else is in the inner result.
fn receive(
    socket: &OwnedFd,
    buf: &mut [u8],
) -> io::Result<Result<(usize, Vec<OwnedFd>), ChannelError>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = match rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
        Ok(msg) => msg,
        Err(e) if e == rustix::io::Errno::AGAIN => return Err(io::ErrorKind::WouldBlock.into()),
        Err(e) => return Ok(Err(ChannelError::Io(e.into()))),
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        // Whatever did arrive is closed when `fds` drops.
        return Ok(Err(ProtocolError::FdsTruncated.into()));
    }
    Ok(Ok((msg.bytes, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender and a reader on the two ends of one socket pair.
    fn pair(max_frame: usize) -> (ChannelSender, ChannelReader) {
        let (a, b) = socket_pair().unwrap();
        let (sender, _) = open(a, max_frame).unwrap();
        let (_, reader) = open(b, max_frame).unwrap();
        (sender, reader)
    }

    async fn next_payloads(reader: &mut ChannelReader, count: usize) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while frames.len() < count {
            assert!(
                reader.read_frames(&mut frames).await.unwrap(),
                "end of stream"
            );
        }
        frames.into_iter().map(|f| f.payload.to_vec()).collect()
    }

    #[tokio::test]
    async fn both_halves_count_frames_and_bytes_and_refusals() {
        let (a, b) = socket_pair().unwrap();
        let (sender, _) = open(a, 1024).unwrap();
        let (receiver, mut reader) = open(b, 1024).unwrap();
        for _ in 0..3 {
            sender
                .try_send_with(FrameKind::User, Format::Json, Vec::new(), |buf| {
                    buf.write_all(b"12345")
                })
                .unwrap();
        }
        let refused = sender.try_send_with(FrameKind::User, Format::Json, Vec::new(), |buf| {
            buf.write_all(&[0; 2000])
        });
        assert!(matches!(refused, Err(ChannelError::TooLarge { .. })));
        next_payloads(&mut reader, 3).await;
        let sent = sender.stats();
        assert_eq!(
            (sent.frames_sent, sent.bytes_sent, sent.frames_refused),
            (3, 3 * (HEADER_LEN as u64 + 5), 1)
        );
        let received = receiver.stats();
        assert_eq!(
            (received.frames_received, received.bytes_received),
            (3, 3 * (HEADER_LEN as u64 + 5))
        );
    }

    #[tokio::test]
    async fn a_panic_while_encoding_leaves_no_partial_frame_behind() {
        let (sender, mut reader) = pair(1024);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = sender.try_send_with(FrameKind::User, Format::Json, Vec::new(), |buf| {
                buf.write_all(b"half a mess")?;
                panic!("a Serialize implementation panicked");
            });
        }));
        assert!(panicked.is_err());
        sender
            .try_send_with(FrameKind::User, Format::Json, Vec::new(), |buf| {
                buf.write_all(b"after")
            })
            .unwrap();
        assert_eq!(next_payloads(&mut reader, 1).await, [b"after".to_vec()]);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_when_it_reaches_it() {
        let (sender, mut reader) = pair(1024);
        let mut offered = 0;
        let refused = sender.try_send_with(FrameKind::User, Format::Json, Vec::new(), |buf| {
            for _ in 0..100 {
                buf.write_all(&[b'x'; 100])?;
                offered += 100;
            }
            Ok(())
        });
        assert!(
            matches!(
                refused,
                Err(ChannelError::TooLarge {
                    len: 1100,
                    max: 1024
                })
            ),
            "{refused:?}"
        );
        assert_eq!(offered, 1000, "encoding stopped at the limit");
        // A message of exactly the limit still goes, and nothing of the
        // refused one went before it.
        sender
            .try_send_with(FrameKind::User, Format::Json, Vec::new(), |buf| {
                buf.write_all(&[b'y'; 1024])
            })
            .unwrap();
        assert_eq!(next_payloads(&mut reader, 1).await, [vec![b'y'; 1024]]);
    }
}
