//! The wire protocol of the primary–worker channel, without any IO.
//!
//! A channel is a Unix stream socket carrying *frames*. Each frame is an
//! 8-byte header followed by its payload:
//!
//! ```text
//! offset 0: magic   u8   0xA7 — catches a peer that is not speaking this protocol
//! offset 1: kind    u8   control (1), user message (2), relayed user message (3)
//!                        or service frame (4)
//! offset 2: format  u8   JSON (1) or compact binary (2)
//! offset 3: fds     u8   how many file descriptors ride with this frame
//! offset 4: length  u32  little endian, payload bytes that follow the header
//! ```
//!
//! File descriptors travel as `SCM_RIGHTS` ancillary data on the `sendmsg`
//! call that carries the frame's first byte. The kernel never merges two
//! fd-carrying sends into one read, so the decoder can check that every batch
//! of received descriptors belongs to exactly one frame header that declared
//! them, and fail loudly otherwise instead of attaching fds to the wrong
//! message.
//!
//! [`FrameDecoder`] is fed raw bytes and fd batches and yields [`Frame`]s; it
//! allocates nothing before a header has been validated against the maximum
//! frame size. Everything here is deterministic and can be fuzzed alone.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::sticky::StickyKey;

/// First byte of every frame header.
pub const MAGIC: u8 = 0xA7;
/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 8;
/// Most file descriptors one frame may carry.
pub const MAX_FDS_PER_FRAME: usize = 64;
/// Default largest payload accepted on a channel: 128 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 128 * 1024 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Internal control message ([`Control`]), always in the binary format.
    Control = 1,
    /// A user message between a worker and the primary.
    User = 2,
    /// A user message between two workers, relayed by the primary. The payload
    /// starts with the peer's worker id (u32, little endian): the target when a
    /// worker sends it, the source when the primary delivers it.
    Relayed = 3,
    /// A frame of one of the cluster's services (a work pool, the bus...).
    /// The payload starts with the service's index (u16, little endian) in
    /// the list of services the worker got in its first frame.
    Service = 4,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Control),
            2 => Some(Self::User),
            3 => Some(Self::Relayed),
            4 => Some(Self::Service),
            _ => None,
        }
    }
}

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[repr(u8)]
pub enum Format {
    /// JSON (`serde_json`): readable, and spoken by any language.
    #[default]
    Json = 1,
    /// A compact binary encoding (`postcard`), for Rust on both ends.
    Binary = 2,
}

impl Format {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Json),
            2 => Some(Self::Binary),
            _ => None,
        }
    }

    /// The name used in settings and on the command line: `json` or `binary`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Binary => "binary",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of the choices of a setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a {what}: {}", reason.as_deref().map_or_else(|| format!("expected {expected}"), str::to_string))]
pub struct UnknownName {
    given: String,
    what: &'static str,
    expected: &'static str,
    /// Why, when the name is of the right kind but wrong.
    reason: Option<String>,
}

impl std::str::FromStr for Format {
    type Err = UnknownName;

    /// Parses [`Format::name`] back.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "json" => Ok(Self::Json),
            "binary" => Ok(Self::Binary),
            _ => Err(UnknownName {
                given: name.to_string(),
                what: "message format",
                expected: "json or binary",
                reason: None,
            }),
        }
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// How its payload is encoded.
    pub format: Format,
    /// How many fds ride with it.
    pub fds: u8,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// Encodes the header into its 8 wire bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let len = self.len.to_le_bytes();
        [
            MAGIC,
            self.kind as u8,
            self.format as u8,
            self.fds,
            len[0],
            len[1],
            len[2],
            len[3],
        ]
    }

    /// Parses and validates 8 header bytes against `max_len`.
    ///
    /// # Errors
    /// [`ProtocolError`] when a field is out of range.
    pub fn parse(bytes: [u8; HEADER_LEN], max_len: usize) -> Result<Self, ProtocolError> {
        if bytes[0] != MAGIC {
            return Err(ProtocolError::BadMagic(bytes[0]));
        }
        let kind = FrameKind::from_byte(bytes[1]).ok_or(ProtocolError::BadKind(bytes[1]))?;
        let format = Format::from_byte(bytes[2]).ok_or(ProtocolError::BadFormat(bytes[2]))?;
        let fds = bytes[3];
        if usize::from(fds) > MAX_FDS_PER_FRAME {
            return Err(ProtocolError::TooManyFds(usize::from(fds)));
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len as usize > max_len {
            return Err(ProtocolError::TooLarge {
                len: len as usize,
                max: max_len,
            });
        }
        if kind == FrameKind::Control && format != Format::Binary {
            return Err(ProtocolError::BadFormat(bytes[2]));
        }
        if kind == FrameKind::Relayed && len < 4 {
            return Err(ProtocolError::Malformed(
                "relayed frame shorter than its peer id",
            ));
        }
        if kind == FrameKind::Service && len < 2 {
            return Err(ProtocolError::Malformed(
                "service frame shorter than its service index",
            ));
        }
        Ok(Self {
            kind,
            format,
            fds,
            len,
        })
    }
}

/// A complete frame: header, payload and the fds that came with it.
#[derive(Debug)]
pub struct Frame {
    /// What the frame carries.
    pub kind: FrameKind,
    /// How its payload is encoded.
    pub format: Format,
    /// The payload bytes.
    pub payload: Bytes,
    /// Descriptors that rode with the frame; closed when the frame is dropped.
    pub fds: Vec<OwnedFd>,
}

/// Why bytes read from a channel are not a valid frame stream.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The header does not start with [`MAGIC`].
    #[error(
        "frame header starts with {0:#04x}, expected {MAGIC:#04x}: the peer is not speaking the procluster protocol"
    )]
    BadMagic(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// Unknown payload format, or a format not allowed for this kind.
    #[error("unknown or disallowed payload format {0}")]
    BadFormat(u8),
    /// The frame declares more fds than allowed.
    #[error("frame declares {0} file descriptors, at most {MAX_FDS_PER_FRAME} are allowed")]
    TooManyFds(usize),
    /// The payload is larger than the channel's limit.
    #[error("frame of {len} bytes exceeds the channel's limit of {max} bytes")]
    TooLarge {
        /// Declared payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A frame declares fds that did not arrive with it.
    #[error("frame declares {declared} file descriptors but {received} arrived with it")]
    FdCountMismatch {
        /// Count in the header.
        declared: usize,
        /// Count received with the frame's first byte.
        received: usize,
    },
    /// File descriptors arrived that no frame header claimed.
    #[error("file descriptors arrived that no frame declared")]
    UnclaimedFds,
    /// The kernel truncated the ancillary data (`MSG_CTRUNC`): fds were lost.
    #[error("file descriptors were lost in transit (control message truncated)")]
    FdsTruncated,
    /// The stream ended in the middle of a frame.
    #[error("channel closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
    /// A frame's payload does not decode.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A control message does not decode.
    #[error("malformed control message: {0}")]
    BadControl(String),
}

/// A batch of fds received by one `recvmsg`, and the stream offsets of the
/// bytes that came with it.
#[derive(Debug)]
struct FdBatch {
    /// Offset one past the last byte delivered with the batch.
    end: u64,
    fds: Vec<OwnedFd>,
}

/// Incremental decoder: turns a byte stream plus fd batches into frames
/// (tests below show it fed a byte at a time).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    /// Stream offset of `buf[0]`.
    offset: u64,
    /// Header of the frame whose payload is being collected.
    pending: Option<(Header, Vec<OwnedFd>)>,
    batches: VecDeque<FdBatch>,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder that rejects payloads larger than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(64 * 1024),
            offset: 0,
            pending: None,
            batches: VecDeque::new(),
            max_len,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Pushes bytes and the fds that came with them in one `recvmsg`.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        self.push_bytes(bytes);
        if !fds.is_empty() {
            let end = self.offset + self.buf.len() as u64;
            self.batches.push_back(FdBatch { end, fds });
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.pending.as_ref().map_or(0, |_| HEADER_LEN)
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// A [`ProtocolError`] is final: the stream cannot be resynchronised and
    /// the channel must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.pending.is_none() {
            if self.buf.len() < HEADER_LEN {
                return self.check_unclaimed_at(self.offset);
            }
            let start = self.offset;
            self.check_unclaimed_at(start)?;
            let mut raw = [0u8; HEADER_LEN];
            raw.copy_from_slice(&self.buf[..HEADER_LEN]);
            let header = Header::parse(raw, self.max_len)?;
            let fds = self.claim_fds(start, usize::from(header.fds))?;
            self.advance(HEADER_LEN);
            self.pending = Some((header, fds));
        }
        let len = self.pending.as_ref().map_or(0, |(h, _)| h.len as usize);
        if self.buf.len() < len {
            return Ok(None);
        }
        let (header, fds) = self.pending.take().expect("pending frame checked above");
        let payload = self.buf.split_to(len).freeze();
        self.offset += len as u64;
        Ok(Some(Frame {
            kind: header.kind,
            format: header.format,
            payload,
            fds,
        }))
    }

    /// Checks the stream is at a frame boundary with nothing pending, as it
    /// must be when the peer closes the channel.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`] if a frame was cut off.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        match self.buffered() {
            0 if self.batches.is_empty() => Ok(()),
            0 => Err(ProtocolError::UnclaimedFds),
            n => Err(ProtocolError::Truncated(n)),
        }
    }

    fn advance(&mut self, n: usize) {
        self.buf.advance(n);
        self.offset += n as u64;
    }

    /// Fds whose bytes all lie before `at` should have been claimed by a
    /// header already.
    fn check_unclaimed_at(&self, at: u64) -> Result<Option<Frame>, ProtocolError> {
        match self.batches.front() {
            Some(batch) if batch.end <= at => Err(ProtocolError::UnclaimedFds),
            _ => Ok(None),
        }
    }

    fn claim_fds(&mut self, start: u64, declared: usize) -> Result<Vec<OwnedFd>, ProtocolError> {
        // The batch that carries this frame's fds was read together with the
        // frame's first byte, so its byte range ends after `start`.
        let belongs_here = self.batches.front().is_some_and(|b| b.end > start);
        if declared == 0 {
            // A batch read with this header may belong to a later frame of the
            // same read; one that nobody claims is caught by
            // `check_unclaimed_at` once the stream has moved past it.
            return Ok(Vec::new());
        }
        if !belongs_here {
            return Err(ProtocolError::FdCountMismatch {
                declared,
                received: 0,
            });
        }
        let batch = self.batches.pop_front().expect("front batch checked above");
        if batch.fds.len() != declared {
            return Err(ProtocolError::FdCountMismatch {
                declared,
                received: batch.fds.len(),
            });
        }
        Ok(batch.fds)
    }
}

/// Appends one frame (header and payload) to `out`.
///
/// # Panics
/// If `payload` is larger than `u32::MAX` bytes; callers check sizes against
/// the channel's limit first.
pub fn encode_frame(out: &mut Vec<u8>, kind: FrameKind, format: Format, fds: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload length checked against the limit");
    out.extend_from_slice(
        &Header {
            kind,
            format,
            fds,
            len,
        }
        .to_bytes(),
    );
    out.extend_from_slice(payload);
}

/// How a worker asks to listen (port sharing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenSpec {
    /// TCP on an address; port 0 means "the same kernel-chosen port for every
    /// worker's k-th request".
    Tcp {
        /// `ip:port` as text, so the primary reports what was asked.
        addr: String,
        /// `listen()` backlog.
        backlog: Option<u32>,
        /// `IPV6_V6ONLY`, for IPv6 addresses.
        ipv6_only: Option<bool>,
    },
    /// UDP on an address.
    Udp {
        /// `ip:port` as text.
        addr: String,
        /// `IPV6_V6ONLY`, for IPv6 addresses.
        ipv6_only: Option<bool>,
        /// `SO_REUSEADDR` (Node's `reuseAddr`).
        reuse_address: bool,
    },
    /// A Unix stream socket at an absolute path (already resolved against the
    /// worker's working directory).
    Unix {
        /// The absolute path.
        path: String,
        /// `listen()` backlog.
        backlog: Option<u32>,
        /// Permission bits the socket file gets after the bind (Node's
        /// `readableAll`/`writableAll`); `None` leaves the umask's.
        mode: Option<u32>,
    },
    /// A descriptor the primary inherited (for example from `LISTEN_FDS`).
    InheritedFd {
        /// The fd number in the primary.
        fd: i32,
    },
}

impl ListenSpec {
    /// Whether the request leaves the port to the kernel (`port 0`): then the
    /// k-th such request of every worker shares one port, and a worker's
    /// second request gets another.
    pub fn wants_any_port(&self) -> bool {
        match self {
            Self::Tcp { addr, .. } | Self::Udp { addr, .. } => addr.ends_with(":0"),
            Self::Unix { .. } | Self::InheritedFd { .. } => false,
        }
    }
}

/// How connections on a shared TCP port reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Policy {
    /// Every worker accepts on one shared listening socket.
    Shared,
    /// The primary accepts and hands each connection to a worker.
    RoundRobin,
    /// One `SO_REUSEPORT` socket per worker slot.
    ReusePort,
    /// The primary accepts, reads each connection's key (the client's
    /// address, or a cookie, header or query parameter of its first
    /// request) without consuming it, and hands the connection to the
    /// worker of the slot the key maps to: the same client reaches the same
    /// worker (see [`sticky`](crate::sticky)).
    Sticky(StickyKey),
}

impl Policy {
    /// The name used in settings and `PROCLUSTER_SCHED_POLICY`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::RoundRobin => "round-robin",
            Self::ReusePort => "reuseport",
            Self::Sticky(_) => "sticky",
        }
    }

    /// Whether the primary accepts connections and hands them to workers
    /// (round-robin and sticky).
    pub fn primary_accepts(self) -> bool {
        matches!(self, Self::RoundRobin | Self::Sticky(_))
    }

    /// The default: `reuseport` on Linux, where the kernel balances
    /// `SO_REUSEPORT` sockets evenly at no cost to the primary (see the
    /// README's benchmark table); `shared` elsewhere, where `SO_REUSEPORT`
    /// does not balance.
    pub fn platform_default() -> Self {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            Self::ReusePort
        } else {
            Self::Shared
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sticky(key) => write!(f, "sticky:{key}"),
            other => f.write_str(other.name()),
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = UnknownName;

    /// Parses what [`Policy`] displays back: `shared`, `round-robin` (or
    /// `rr`, Node's name), `reuseport`, and `sticky:KEY` with a
    /// [`StickyKey`] (`sticky:ip`, `sticky:ip/24/64`, `sticky:cookie=NAME`,
    /// `sticky:header=NAME`, `sticky:query=NAME`; `sticky` alone is
    /// `sticky:ip`).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let unknown = |reason| UnknownName {
            given: name.to_string(),
            what: "port-sharing policy",
            expected: "shared, round-robin, reuseport or sticky:KEY (KEY: ip, ip/V4, ip/V4/V6, cookie=NAME, header=NAME, query=NAME)",
            reason,
        };
        match name {
            "shared" => Ok(Self::Shared),
            "round-robin" | "rr" => Ok(Self::RoundRobin),
            "reuseport" => Ok(Self::ReusePort),
            "sticky" => Ok(Self::Sticky(StickyKey::ADDRESS)),
            _ => match name.strip_prefix("sticky:") {
                Some(key) => key.parse().map(Self::Sticky).map_err(|e| unknown(Some(e))),
                None => Err(unknown(None)),
            },
        }
    }
}

/// The primary's answer to a [`Control::Listen`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenReply {
    /// A listening socket rides with the reply as its one fd.
    Socket {
        /// The key of the listener in the primary.
        key: u32,
        /// The address actually bound, as text.
        address: String,
    },
    /// Connections will arrive as [`Control::Connections`] messages.
    RoundRobin {
        /// The key of the listener in the primary.
        key: u32,
        /// The address actually bound, as text.
        address: String,
    },
    /// Binding failed.
    Failed {
        /// `errno` when the failure came from the OS.
        os_error: Option<i32>,
        /// What failed, naming the address.
        message: String,
    },
}

/// Internal messages; never visible to users, never forgeable by them (they
/// travel in frames of kind [`FrameKind::Control`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Worker → primary: the worker's runtime has its channel up.
    Online {
        /// The worker's process id, as it sees it.
        pid: u32,
    },
    /// Worker → primary: the worker asks to be disconnected (it will close its
    /// cluster listeners and finish its work). Primary → worker: please do so.
    Disconnect,
    /// Worker → primary: the worker has closed its cluster listeners and
    /// considers itself disconnected.
    Disconnected,
    /// Worker → primary: the application is ready to serve.
    Ready,
    /// Worker → primary: the worker's runtime is alive.
    Heartbeat,
    /// Worker → primary: the application has read this many more bytes of
    /// user messages (the primary's window of unread bytes reopens).
    Consumed {
        /// Bytes read since the last report.
        bytes: u64,
    },
    /// Worker → primary: requests served so far (for recycling after N).
    Requests {
        /// Running total.
        total: u64,
    },
    /// Worker → primary: please listen on behalf of this worker.
    Listen {
        /// Matches the reply to the request.
        seq: u32,
        /// What to listen on.
        spec: ListenSpec,
        /// How many earlier requests for the same spec this worker made: the
        /// k-th `listen(0)` of every worker shares one port.
        ordinal: u32,
    },
    /// Primary → worker: the answer to [`Control::Listen`] with the same `seq`.
    ListenResult {
        /// The request's `seq`.
        seq: u32,
        /// The outcome.
        reply: ListenReply,
    },
    /// Worker → primary: the worker listens (reported for exclusive and
    /// shared listeners, so the primary can emit `Listening`).
    Listening {
        /// The address, as text.
        address: String,
    },
    /// Worker → primary: the worker closed the listener with this key.
    CloseListener {
        /// The listener's key.
        key: u32,
    },
    /// Primary → worker: accepted connections ride with this message, one
    /// descriptor per entry of `handed`, in the same order.
    Connections {
        /// The listener they were accepted on.
        key: u32,
        /// What the worker needs to know of each connection.
        handed: Vec<HandedConnection>,
    },
    /// Worker → primary: whether the connection `seq` was taken.
    ConnectionAck {
        /// The listener it was handed on.
        key: u32,
        /// The connection's `seq`.
        seq: u64,
        /// `false` if the worker refused it (listener closed, queue full); the
        /// primary then hands it to another worker.
        accepted: bool,
        /// Credit granted with the answer (see [`Control::Credit`]): a
        /// worker that keeps a connection in reserve renews it here, saving
        /// a message per connection.
        credit: u32,
    },
    /// Worker → primary: the application waits in `accept()` for `n` more
    /// connections on a round-robin listener.
    Credit {
        /// The listener.
        key: u32,
        /// How many more connections the worker will take now.
        n: u32,
    },
    /// Primary → worker: stop accepting on the socket of listener `key`
    /// and let go of it (the cluster is stopping); keep taking the
    /// connections the primary hands over.
    StopAccepting {
        /// The listener.
        key: u32,
    },
    /// Worker → primary: this worker no longer holds the socket of `key`.
    StoppedAccepting {
        /// The listener.
        key: u32,
    },
}

/// One connection of a [`Control::Connections`] message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedConnection {
    /// Sequence number the worker acknowledges it with.
    pub seq: u64,
    /// The client's address, as `accept` gave it to the primary.
    pub peer: Option<std::net::SocketAddr>,
}

impl Control {
    /// Encodes the message with the binary format.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("control messages always serialise")
    }

    /// Decodes a control payload.
    ///
    /// # Errors
    /// [`ProtocolError::BadControl`] when it is not a valid control message.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        postcard::from_bytes(bytes).map_err(|e| ProtocolError::BadControl(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::fd::AsRawFd;

    fn frame_bytes(kind: FrameKind, format: Format, fds: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(&mut v, kind, format, fds, payload);
        v
    }

    fn dev_null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// A descriptor to send (the write end of a new pipe) and the read end,
    /// kept by the test to tell when every copy of the write end is closed:
    /// a read then gives end of file instead of `EAGAIN`. Unlike a count of
    /// the process's open descriptors, this holds while other tests of the
    /// same process open and close theirs.
    fn tracked_fd() -> (OwnedFd, OwnedFd) {
        use rustix::pipe::{PipeFlags, pipe_with};
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).unwrap();
        (write, read)
    }

    /// Whether the write ends of all these pipes are closed everywhere.
    fn all_closed(read_ends: &[OwnedFd]) -> bool {
        read_ends
            .iter()
            .all(|r| matches!(rustix::io::read(r, &mut [0u8; 1]), Ok(0)))
    }

    /// `frames` (payload, fds declared) encoded back to back, and the
    /// offset at which each frame starts.
    fn wire_of(frames: &[(Vec<u8>, u8)]) -> (Vec<u8>, Vec<usize>) {
        let mut wire = Vec::new();
        let mut starts = Vec::new();
        for (payload, fds) in frames {
            starts.push(wire.len());
            encode_frame(&mut wire, FrameKind::User, Format::Binary, *fds, payload);
        }
        (wire, starts)
    }

    /// Chunk boundaries inside `0..len` from arbitrary indexes, sorted,
    /// without duplicates, ending with `len`.
    fn boundaries(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(len.max(1))).collect();
        at.push(len);
        at.retain(|&c| c > 0);
        at.sort_unstable();
        at.dedup();
        at
    }

    /// Feeds `wire` cut at `ends` (each chunk with the fds `fds_for` gives
    /// it) and collects frames until the stream ends or fails.
    fn decode_chunks(
        wire: &[u8],
        ends: &[usize],
        mut fds_for: impl FnMut(usize, usize) -> Vec<OwnedFd>,
    ) -> (Vec<Frame>, Result<(), ProtocolError>, FrameDecoder) {
        let mut d = FrameDecoder::new(4096);
        let mut frames = Vec::new();
        let mut from = 0;
        for &to in ends {
            d.push(&wire[from..to], fds_for(from, to));
            from = to;
            loop {
                match d.next_frame() {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(error) => return (frames, Err(error), d),
                }
            }
        }
        let end = d.finish();
        (frames, end, d)
    }

    #[test]
    fn frames_split_at_every_byte_decode_the_same() {
        let mut wire = frame_bytes(FrameKind::User, Format::Json, 0, b"first");
        wire.extend(frame_bytes(FrameKind::User, Format::Binary, 0, b""));
        wire.extend(frame_bytes(
            FrameKind::Control,
            Format::Binary,
            0,
            &Control::Ready.encode(),
        ));
        for split in 0..wire.len() {
            let mut d = FrameDecoder::new(1024);
            let mut frames = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                d.push_bytes(part);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames.len(), 3, "split at {split}");
            assert_eq!(&frames[0].payload[..], b"first");
            assert_eq!(frames[1].format, Format::Binary);
            assert_eq!(Control::decode(&frames[2].payload).unwrap(), Control::Ready);
            d.finish().unwrap();
        }
    }

    #[test]
    fn fds_attach_to_the_frame_that_declares_them() {
        let mut d = FrameDecoder::new(1024);
        let mut wire = frame_bytes(FrameKind::User, Format::Json, 0, b"a");
        let second = frame_bytes(FrameKind::User, Format::Json, 2, b"b");
        let split = wire.len();
        wire.extend(second);
        d.push(&wire[..split + 1], vec![dev_null(), dev_null()]);
        d.push(&wire[split + 1..], vec![]);
        let first = d.next_frame().unwrap().unwrap();
        assert!(first.fds.is_empty());
        let second = d.next_frame().unwrap().unwrap();
        assert_eq!(second.fds.len(), 2);
        assert!(second.fds[0].as_raw_fd() >= 0);
    }

    #[test]
    fn undeclared_fds_are_an_error() {
        let mut d = FrameDecoder::new(1024);
        let mut wire = frame_bytes(FrameKind::User, Format::Json, 0, b"a");
        wire.extend(frame_bytes(FrameKind::User, Format::Json, 0, b"b"));
        d.push(&wire[..3], vec![dev_null()]);
        d.push(&wire[3..], vec![]);
        let mut result = Ok(None);
        for _ in 0..3 {
            result = d.next_frame();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result.unwrap_err(), ProtocolError::UnclaimedFds);
    }

    #[test]
    fn declared_fds_that_did_not_arrive_are_an_error() {
        let mut d = FrameDecoder::new(1024);
        d.push(&frame_bytes(FrameKind::User, Format::Json, 1, b"a"), vec![]);
        assert_eq!(
            d.next_frame().unwrap_err(),
            ProtocolError::FdCountMismatch {
                declared: 1,
                received: 0
            }
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut d = FrameDecoder::new(16);
        d.push_bytes(
            &Header {
                kind: FrameKind::User,
                format: Format::Json,
                fds: 0,
                len: u32::MAX,
            }
            .to_bytes(),
        );
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(d.buf.capacity() < 1024 * 1024);
    }

    #[test]
    fn garbage_is_refused() {
        let mut d = FrameDecoder::new(1024);
        d.push_bytes(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.next_frame().unwrap_err(), ProtocolError::BadMagic(b'G'));
    }

    #[test]
    fn a_frame_cut_short_is_reported_at_the_end() {
        let mut d = FrameDecoder::new(1024);
        let wire = frame_bytes(FrameKind::User, Format::Json, 0, b"abcdef");
        d.push_bytes(&wire[..10]);
        assert!(d.next_frame().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ProtocolError::Truncated(_))));
    }

    #[test]
    fn control_messages_round_trip() {
        let all = [
            Control::Online { pid: 7 },
            Control::Disconnect,
            Control::Listen {
                seq: 3,
                spec: ListenSpec::Tcp {
                    addr: "127.0.0.1:0".into(),
                    backlog: Some(5),
                    ipv6_only: None,
                },
                ordinal: 0,
            },
            Control::ListenResult {
                seq: 3,
                reply: ListenReply::Failed {
                    os_error: Some(98),
                    message: "in use".into(),
                },
            },
            Control::Connections {
                key: 1,
                handed: vec![
                    HandedConnection {
                        seq: u64::MAX,
                        peer: Some("127.0.0.1:9".parse().unwrap()),
                    },
                    HandedConnection { seq: 2, peer: None },
                ],
            },
        ];
        for c in all {
            assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes in random chunks, some with descriptors, never
        /// panic, never allocate past the limit, either decode or fail with
        /// an error, and leave no descriptor open once the decoder and its
        /// frames are dropped.
        #[test]
        fn random_bytes_never_panic(chunks in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..64), 0..3usize), 0..16)) {
            let mut d = FrameDecoder::new(4096);
            let mut read_ends = Vec::new();
            let mut frames = Vec::new();
            'outer: for (chunk, fd_count) in chunks {
                let mut fds = Vec::new();
                for _ in 0..fd_count {
                    let (fd, read) = tracked_fd();
                    fds.push(fd);
                    read_ends.push(read);
                }
                d.push(&chunk, fds);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => {
                            let _ = Control::decode(&f.payload);
                            frames.push(f);
                        }
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
            prop_assert!(d.buf.capacity() <= 64 * 1024 + 4096 + 1024);
            drop((d, frames));
            prop_assert!(all_closed(&read_ends), "a descriptor was leaked");
        }

        /// Frames that declare descriptors, cut at arbitrary points, with
        /// each batch delivered as the kernel does (with the read that holds
        /// the first byte of its frame, never two batches in one read): every
        /// frame gets exactly its own descriptors, in order.
        #[test]
        fn fds_reach_the_frame_that_declares_them_under_any_chunking(
            frames in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..64), 0..4u8), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let (wire, starts) = wire_of(&frames);
            let mut ends = boundaries(&cuts, wire.len());
            // No read holds the first bytes of two frames that carry fds.
            let mut last_with_fds = None;
            for (i, (_, fds)) in frames.iter().enumerate() {
                if *fds == 0 {
                    continue;
                }
                let start = starts[i];
                let shares_a_read =
                    |last: usize| !ends.iter().any(|&e| last < e && e <= start);
                if last_with_fds.is_some_and(shares_a_read) {
                    ends.push(start);
                    ends.sort_unstable();
                }
                last_with_fds = Some(start);
            }
            let mut sent: Vec<Vec<i32>> = vec![Vec::new(); frames.len()];
            let mut read_ends = Vec::new();
            let (got, end, decoder) = decode_chunks(&wire, &ends, |from, to| {
                let Some(i) = (0..frames.len())
                    .find(|&i| frames[i].1 > 0 && from <= starts[i] && starts[i] < to)
                else {
                    return Vec::new();
                };
                (0..frames[i].1)
                    .map(|_| {
                        let (fd, read) = tracked_fd();
                        sent[i].push(fd.as_raw_fd());
                        read_ends.push(read);
                        fd
                    })
                    .collect()
            });
            prop_assert_eq!(end, Ok(()));
            prop_assert_eq!(got.len(), frames.len());
            for (i, frame) in got.iter().enumerate() {
                prop_assert_eq!(&frame.payload[..], &frames[i].0[..]);
                let numbers: Vec<i32> = frame.fds.iter().map(|f| f.as_raw_fd()).collect();
                prop_assert_eq!(&numbers, &sent[i], "frame {}", i);
            }
            drop((got, decoder));
            prop_assert!(all_closed(&read_ends), "a descriptor was leaked");
        }

        /// The same frames with descriptors attached to arbitrary reads, in
        /// arbitrary numbers: a frame the decoder returns carries exactly
        /// the descriptors it declares, or decoding fails with an error; no
        /// descriptor stays open once the decoder and its frames are
        /// dropped.
        #[test]
        fn misplaced_fds_fail_cleanly_and_leak_nothing(
            frames in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..64), 0..4u8), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            batches in proptest::collection::vec(0..4usize, 13),
        ) {
            let (wire, _) = wire_of(&frames);
            let ends = boundaries(&cuts, wire.len());
            let mut read_ends = Vec::new();
            let mut chunk = 0;
            let (got, _, decoder) = decode_chunks(&wire, &ends, |_, _| {
                let count = batches[chunk];
                chunk += 1;
                (0..count)
                    .map(|_| {
                        let (fd, read) = tracked_fd();
                        read_ends.push(read);
                        fd
                    })
                    .collect()
            });
            for (i, frame) in got.iter().enumerate() {
                prop_assert_eq!(&frame.payload[..], &frames[i].0[..]);
                prop_assert_eq!(frame.fds.len(), usize::from(frames[i].1), "frame {}", i);
            }
            drop((got, decoder));
            prop_assert!(all_closed(&read_ends), "a descriptor was leaked");
        }

        /// Valid frames with random payloads survive any chunking.
        #[test]
        fn valid_frames_survive_any_chunking(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8), cut in 1usize..50) {
            let mut wire = Vec::new();
            for p in &payloads { encode_frame(&mut wire, FrameKind::User, Format::Binary, 0, p); }
            let mut d = FrameDecoder::new(4096);
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push_bytes(chunk);
                while let Some(f) = d.next_frame().unwrap() { got.push(f.payload.to_vec()); }
            }
            prop_assert_eq!(got, payloads);
            prop_assert!(d.finish().is_ok());
        }
    }
}
