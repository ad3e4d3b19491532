//! Bytes in a task or a result that are not copied out of the payload they
//! arrived in.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

thread_local! {
    /// The payload being decoded on this thread, if a pool is decoding one.
    static DECODING: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Decodes with `decode` while [`SharedBytes`] may borrow from `payload`.
pub(super) fn decoding<T>(payload: &Bytes, decode: impl FnOnce(&[u8]) -> T) -> T {
    let previous = DECODING.with(|current| current.borrow_mut().replace(payload.clone()));
    let decoded = decode(payload);
    DECODING.with(|current| *current.borrow_mut() = previous);
    decoded
}

/// A byte string for large task and result fields (images, PDFs): decoded
/// by a pool in the binary format, it is a view of the bytes that arrived
/// (for a large payload, the pages of its sealed memory file, mapped
/// read-only), not a copy. Anywhere else it decodes as a copy, like a
/// `Vec<u8>`. It encodes as one byte string.
///
/// ```
/// use procluster::pool::SharedBytes;
/// let image = SharedBytes::from(vec![0x89, b'P', b'N', b'G']);
/// assert_eq!(&image[..], b"\x89PNG");
/// assert_eq!(image.len(), 4);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct SharedBytes(Bytes);

impl SharedBytes {
    /// The bytes, as a `bytes::Bytes` (a cheap handle on the same memory).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.0.len())
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Bytes::from(bytes))
    }
}

impl From<Bytes> for SharedBytes {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(Visit)
    }
}

struct Visit;

impl<'de> serde::de::Visitor<'de> for Visit {
    type Value = SharedBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E>(self, borrowed: &'de [u8]) -> Result<SharedBytes, E> {
        let view = DECODING.with(|current| {
            let current = current.borrow();
            let payload = current.as_ref()?;
            let (start, end) = (
                payload.as_ptr() as usize,
                payload.as_ptr() as usize + payload.len(),
            );
            let at = borrowed.as_ptr() as usize;
            (at >= start && at + borrowed.len() <= end).then(|| payload.slice_ref(borrowed))
        });
        Ok(SharedBytes(
            view.unwrap_or_else(|| Bytes::copy_from_slice(borrowed)),
        ))
    }

    fn visit_bytes<E>(self, bytes: &[u8]) -> Result<SharedBytes, E> {
        Ok(SharedBytes(Bytes::copy_from_slice(bytes)))
    }

    fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<SharedBytes, E> {
        Ok(SharedBytes(Bytes::from(bytes)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SharedBytes, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(byte) = seq.next_element()? {
            out.push(byte);
        }
        Ok(SharedBytes(Bytes::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_in_a_pool_it_is_a_view_of_the_payload_and_elsewhere_a_copy() {
        let value = (7u32, SharedBytes::from(vec![1u8; 4096]));
        let payload = Bytes::from(postcard::to_allocvec(&value).unwrap());
        let (n, view): (u32, SharedBytes) =
            decoding(&payload, |bytes| postcard::from_bytes(bytes).unwrap());
        assert_eq!((n, &view[..]), (7, &[1u8; 4096][..]));
        let range = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        assert!(
            range.contains(&(view.as_ptr() as usize)),
            "a view, not a copy"
        );

        let (_, copy): (u32, SharedBytes) = postcard::from_bytes(&payload).unwrap();
        assert!(!range.contains(&(copy.as_ptr() as usize)));
        assert_eq!(copy, view);

        let json = serde_json::to_vec(&value).unwrap();
        let (_, from_json): (u32, SharedBytes) = serde_json::from_slice(&json).unwrap();
        assert_eq!(from_json, view);
    }
}
