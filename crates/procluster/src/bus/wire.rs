//! The bus's frames between a worker's side and the primary: a postcard
//! header, then the message's body as it is (already in the cluster's
//! format).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{BusError, Sender};
use crate::fanout::Limits;

/// Where the answer to a request goes: the requester, and its request's id
/// there. `client` tells processes apart across hosts (Redis backend); it is
/// 0 on the local bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct ReplyTo {
    pub(crate) to: Sender,
    pub(crate) id: u64,
    pub(crate) client: u64,
}

/// The backend a worker is told to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Backend {
    /// The primary, over the channels.
    Local,
    /// A Redis server, shared by every primary that names it; `host` names
    /// this primary's cluster among them.
    Redis {
        url: String,
        prefix: String,
        host: String,
    },
}

/// From a worker's side to the primary.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Up<'a> {
    /// Which backend? Answered by `Welcome`.
    Hello,
    Subscribe {
        sub: u64,
        pattern: &'a str,
        limits: Limits,
    },
    Unsubscribe {
        sub: u64,
    },
    Credit {
        sub: u64,
        n: u32,
    },
    /// The body follows.
    Publish {
        topic: &'a str,
    },
    /// The body follows.
    Request {
        id: u64,
        topic: &'a str,
        timeout_ms: u64,
    },
    /// The body follows.
    Respond {
        to: ReplyTo,
    },
}

/// From the primary (or a backend's reader) to a subscriber or requester.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Down<'a> {
    Welcome {
        backend: Backend,
    },
    Subscribed {
        sub: u64,
    },
    /// A subscription or request refused; `id` is its id.
    Refused {
        id: u64,
        why: String,
    },
    /// The body follows.
    Deliver {
        sub: u64,
        topic: &'a str,
        sender: Sender,
        reply: Option<ReplyTo>,
        /// Messages this subscription lost to its overflow policy so far.
        dropped: u64,
        /// The publisher's host (Redis backend).
        host: Option<&'a str>,
    },
    /// The body follows.
    Reply {
        id: u64,
        sender: Sender,
        host: Option<&'a str>,
    },
    NoResponders {
        id: u64,
    },
    /// The subscription ended because its queue overflowed.
    Closed {
        sub: u64,
    },
}

/// A header and the body after it, as one frame.
pub(crate) fn frame(header: &impl Serialize, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(64 + body.len());
    // Serialising our own enums into a Vec cannot fail.
    out = postcard::to_extend(header, out).unwrap_or_default();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// Splits a frame into its header and body.
pub(crate) fn split<'a, H: Deserialize<'a>>(frame: &'a Bytes) -> Result<(H, Bytes), BusError> {
    let (header, rest) = postcard::take_from_bytes::<H>(frame)
        .map_err(|e| BusError::Protocol(format!("a bus frame does not decode: {e}")))?;
    let body = frame.slice(frame.len() - rest.len()..);
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorkerId;

    #[test]
    fn a_frame_splits_into_its_header_and_body() {
        let frame = frame(
            &Down::Deliver {
                sub: 7,
                topic: "chat.room",
                sender: Sender::Worker(WorkerId::new(3)),
                reply: None,
                dropped: 2,
                host: None,
            },
            b"{\"text\":1}",
        );
        let (header, body) = split::<Down<'_>>(&frame).unwrap();
        let Down::Deliver {
            sub, topic, sender, ..
        } = header
        else {
            panic!("{header:?}")
        };
        assert_eq!((sub, topic), (7, "chat.room"));
        assert_eq!(sender, Sender::Worker(WorkerId::new(3)));
        assert_eq!(&body[..], b"{\"text\":1}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(split::<Up<'_>>(&Bytes::from_static(&[0xff, 0xff, 0xff])).is_err());
    }
}
