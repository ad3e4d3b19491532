//! The pool's frames between its primary side and its worker side: a
//! postcard envelope, then the task's or result's bytes (in the cluster's
//! format) as they are, so a payload is never re-encoded on the way.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{HandlerError, PoolError};

/// From the primary to a worker.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(super) enum ToWorker {
    /// Run attempt `attempt` of task `task`; the task follows.
    Run { task: u64, attempt: u32 },
    /// Nobody waits for task `task` any more.
    Cancel { task: u64 },
    /// The pool's settings a worker needs, before its first task: payloads
    /// from this size up go in a sealed memory file.
    Settings { memfd_threshold: Option<u64> },
    /// The outcome of the worker's submission `submission`; the result
    /// follows when it is `Ok`.
    Answer {
        submission: u64,
        outcome: Result<(), PoolError>,
    },
}

/// From a worker to the primary.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(super) enum ToPrimary {
    /// The worker's handler is registered: it takes tasks.
    Ready,
    /// Attempt `attempt` of task `task` ended; the result follows when `Ok`.
    Done {
        task: u64,
        attempt: u32,
        outcome: Result<(), HandlerError>,
    },
    /// The worker is leaving the cluster and did not start the task.
    Refused { task: u64, attempt: u32 },
    /// A task submitted by the worker, waiting for room in the queue when
    /// `wait`; the task follows.
    Submit { submission: u64, wait: bool },
    /// The worker no longer waits for its submission `submission`.
    Withdraw { submission: u64 },
}

/// The envelope, then the payload.
pub(super) fn encode<E: Serialize>(envelope: &E, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + payload.len());
    // Encoding an enum of integers and strings into a vector cannot fail.
    if let Ok(head) = postcard::to_extend(envelope, out) {
        out = head;
    } else {
        out = Vec::new();
    }
    out.extend_from_slice(payload);
    out
}

/// The envelope and the payload after it (a view of the same bytes).
pub(super) fn decode<E: DeserializeOwned>(body: Bytes) -> Result<(E, Bytes), postcard::Error> {
    let (envelope, rest) = postcard::take_from_bytes::<E>(&body)?;
    let at = body.len() - rest.len();
    Ok((envelope, body.slice(at..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_and_its_payload_come_back_apart() {
        let frame = encode(
            &ToPrimary::Done {
                task: 7,
                attempt: 2,
                outcome: Ok(()),
            },
            b"result",
        );
        let (envelope, payload) = decode::<ToPrimary>(Bytes::from(frame)).unwrap();
        assert_eq!(
            envelope,
            ToPrimary::Done {
                task: 7,
                attempt: 2,
                outcome: Ok(())
            }
        );
        assert_eq!(&payload[..], b"result");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<ToWorker>(Bytes::from_static(&[200, 1, 2])).is_err());
        assert!(decode::<ToWorker>(Bytes::new()).is_err());
    }
}
