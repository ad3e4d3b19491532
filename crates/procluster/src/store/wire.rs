//! The store's frames between a worker's side and the primary (postcard).
//! Values travel as bytes already in the cluster's format.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::fanout::Limits;

/// Bytes serialised as one byte string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Blob(pub(crate) Vec<u8>);

impl From<Blob> for Bytes {
    fn from(blob: Blob) -> Self {
        Bytes::from(blob.0)
    }
}

impl From<Bytes> for Blob {
    fn from(bytes: Bytes) -> Self {
        Blob(bytes.to_vec())
    }
}

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        deserializer.deserialize_byte_buf(Visit)
    }
}

/// One operation on the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Op {
    Get {
        key: String,
    },
    Set {
        key: String,
        value: Blob,
        ttl_ms: Option<u64>,
    },
    Delete {
        key: String,
    },
    Incr {
        key: String,
        by: i64,
    },
    Cas {
        key: String,
        expected: Option<Blob>,
        new: Option<Blob>,
    },
    GetOrInsert {
        key: String,
        value: Blob,
    },
}

impl Op {
    pub(crate) fn key(&self) -> &str {
        match self {
            Self::Get { key }
            | Self::Set { key, .. }
            | Self::Delete { key }
            | Self::Incr { key, .. }
            | Self::Cas { key, .. }
            | Self::GetOrInsert { key, .. } => key,
        }
    }
}

/// What an operation returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    Value(Option<Blob>),
    Deleted(bool),
    Number(i64),
    Swapped(bool),
    Done,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Failure {
    NotANumber { key: String },
    Overflow { key: String },
    Full(String),
    Invalid(String),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::NotANumber { key } => StoreError::NotANumber { key },
            Failure::Overflow { key } => StoreError::Overflow { key },
            Failure::Full(why) => StoreError::Full(why),
            Failure::Invalid(why) => StoreError::Invalid(why),
        }
    }
}

/// What a change did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChangeKind {
    /// The key was set (by set, increment, swap or insert).
    Set,
    /// The key was deleted.
    Deleted,
    /// The key's time to live ran out.
    Expired,
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Watched {
    Key(String),
    Prefix(String),
}

impl Watched {
    pub(crate) fn matches(&self, key: &str) -> bool {
        match self {
            Self::Key(k) => k == key,
            Self::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// The backend a worker is told to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Backend {
    Local,
    Redis { url: String, prefix: String },
}

/// From a worker's side to the primary.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Up {
    Hello,
    Op {
        id: u64,
        op: Op,
    },
    Watch {
        sub: u64,
        watched: Watched,
        limits: Limits,
    },
    Unwatch {
        sub: u64,
    },
    Credit {
        sub: u64,
        n: u32,
    },
}

/// From the primary to a worker's side (or a backend's reader to a watch).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Down {
    Welcome {
        backend: Backend,
    },
    Done {
        id: u64,
        outcome: Result<Outcome, Failure>,
    },
    Watching {
        sub: u64,
    },
    Refused {
        id: u64,
        why: String,
    },
    Change {
        sub: u64,
        key: String,
        kind: ChangeKind,
        value: Option<Blob>,
        revision: u64,
        /// Changes this watch lost to its overflow policy so far.
        dropped: u64,
    },
    Closed {
        sub: u64,
    },
}

pub(crate) fn encode(message: &impl Serialize) -> Bytes {
    Bytes::from(postcard::to_stdvec(message).unwrap_or_default())
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes)
        .map_err(|e| StoreError::Protocol(format!("a store frame does not decode: {e}")))
}
