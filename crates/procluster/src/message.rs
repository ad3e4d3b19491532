//! User messages: what travels between a worker and the primary, and how it
//! is encoded.

use std::io;
use std::os::fd::OwnedFd;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::WorkerId;
use crate::protocol::Format;

/// A frame of one of the cluster's services (a work pool, the bus...), as
/// it arrived at either end.
#[derive(Debug)]
pub struct ServiceFrame {
    /// How the body is encoded (the service decides; the header carries it).
    pub format: Format,
    /// The service's bytes.
    pub body: Bytes,
    /// Descriptors that came with the frame.
    pub fds: Vec<OwnedFd>,
}

/// Splits a service frame's payload into the service's index and its body.
pub(crate) fn split_service_payload(payload: Bytes) -> (u16, Bytes) {
    let index = u16::from_le_bytes([payload[0], payload[1]]);
    (index, payload.slice(2..))
}

/// A message received from the other end of a channel.
///
/// The payload is kept encoded until [`Message::decode`] is called, so one
/// channel can carry messages of several types, as in Node. Descriptors that
/// rode with the message are owned by it and closed when it is dropped,
/// unless taken with [`Message::take_fds`].
#[derive(Debug)]
pub struct Message {
    pub(crate) format: Format,
    pub(crate) payload: Bytes,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) from_worker: Option<WorkerId>,
    /// Bytes of the receiver's queue budget this message holds until it is
    /// handed to the application.
    pub(crate) charge: usize,
}

impl Message {
    /// Decodes the payload as a `T`.
    ///
    /// # Errors
    /// [`DecodeError`] when the payload is not a valid `T` in the channel's
    /// format.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(worker: procluster::worker::Worker) -> Result<(), Box<dyn std::error::Error>> {
    /// #[derive(serde::Deserialize)]
    /// struct Job { id: u64 }
    /// while let Some(message) = worker.recv().await {
    ///     let job: Job = message.decode()?;
    ///     println!("job {}", job.id);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        decode(self.format, &self.payload)
    }

    /// The encoded payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Descriptors that came with the message.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Takes the descriptors out of the message, to keep them after it is
    /// dropped.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// For a message received by a worker: the worker that sent it, when it
    /// was relayed from another worker; `None` when the primary sent it.
    pub fn from_worker(&self) -> Option<WorkerId> {
        self.from_worker
    }
}

/// A payload that does not decode as the requested type.
#[derive(Debug, thiserror::Error)]
#[error("message does not decode as {type_name} ({format}): {reason}")]
pub struct DecodeError {
    type_name: &'static str,
    format: &'static str,
    reason: String,
}

pub(crate) fn decode<T: DeserializeOwned>(format: Format, bytes: &[u8]) -> Result<T, DecodeError> {
    let result = match format {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Format::Binary => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
    };
    result.map_err(|reason| DecodeError {
        type_name: std::any::type_name::<T>(),
        format: format.name(),
        reason,
    })
}

/// Writes `value` encoded in `format` to `out`.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    format: Format,
    value: &T,
    out: impl io::Write,
) -> io::Result<()> {
    match format {
        Format::Json => serde_json::to_writer(out, value).map_err(io::Error::other),
        Format::Binary => postcard::to_io(value, out)
            .map(|_| ())
            .map_err(io::Error::other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Tick {
        n: u64,
        name: String,
    }

    #[test]
    fn both_formats_round_trip() {
        for format in [Format::Json, Format::Binary] {
            let mut out = Vec::new();
            let value = Tick {
                n: 42,
                name: "x".into(),
            };
            encode_into(format, &value, &mut out).unwrap();
            assert_eq!(decode::<Tick>(format, &out).unwrap(), value);
        }
    }

    #[test]
    fn a_wrong_type_is_a_clear_error() {
        let mut out = Vec::new();
        encode_into(Format::Json, &"text", &mut out).unwrap();
        let error = decode::<Tick>(Format::Json, &out).unwrap_err().to_string();
        assert!(error.contains("Tick") && error.contains("json"), "{error}");
    }
}
