//! Sticky sessions: the same client reaches the same worker.
//!
//! Under [`Policy::Sticky`](crate::Policy::Sticky) the primary accepts each
//! connection and reads its routing key without consuming anything: the
//! client's address, or a cookie, a header or a query parameter of the first
//! request, found by peeking (`MSG_PEEK`) at the request head. The
//! connection then goes to the worker of the slot the key maps to, with
//! every byte the client sent still unread, so an unmodified server works.
//! A keep-alive connection stays where it was placed: the key is read once
//! per connection.
//!
//! Keys map to worker slots by rendezvous (highest random weight) hashing
//! over slot numbers: a worker restarted in slot k gets its keys back,
//! growing from N to N+1 slots moves about 1/(N+1) of the keys, and removing
//! a slot moves only that slot's keys. While a slot's worker restarts, its
//! keys wait for the replacement for [`StickyOptions::wait`], then go to the
//! slot that comes next for them.
//!
//! A server that creates a session can pin the client to itself: it sets
//! the cookie (or header, or query parameter) the policy reads to its
//! [`sticky_token`](crate::worker::Worker::sticky_token) (the `procluster`
//! command gives programs `PROCLUSTER_STICKY_TOKEN`), and later requests
//! carrying it reach its slot, whichever worker holds the slot then.
//!
//! Bad and slow clients cannot stall the others: a connection that sends
//! nothing within [`StickyOptions::key_timeout`], a head over
//! [`StickyOptions::max_head`], a head without the key, a TLS handshake or
//! bytes that are not HTTP are routed by the client's address instead.
//! Waiting connections cost no CPU (the primary looks again only when more
//! bytes arrive) and no buffer: each look peeks from the start.
//!
//! ```
//! use procluster::sticky::{KeyName, StickyKey};
//! use procluster::Policy;
//!
//! let by_cookie = Policy::Sticky(StickyKey::Cookie(KeyName::new("sid").unwrap()));
//! assert_eq!(by_cookie.to_string(), "sticky:cookie=sid");
//! let by_network: Policy = "sticky:ip/24".parse().unwrap();
//! assert_eq!(by_network, Policy::Sticky(StickyKey::Address { v4_prefix: 24, v6_prefix: 128 }));
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) mod head;
pub(crate) mod rendezvous;
pub(crate) mod table;

/// Longest cookie, header or query parameter name a policy can read.
pub const MAX_NAME: usize = 64;

/// The name of a cookie, header or query parameter: 1 to [`MAX_NAME`]
/// visible ASCII characters other than `=`, `;`, `,`, `&`, `?`, `:` and
/// quotes. A header name matches whatever its case; a cookie or query
/// parameter name matches exactly.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl KeyName {
    /// Checks and keeps `name`.
    ///
    /// # Errors
    /// A name that is empty, longer than [`MAX_NAME`], or has a character
    /// that cannot appear in a cookie, header or parameter name.
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let bad = |reason: &'static str| InvalidName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_NAME {
            return Err(bad("it is longer than 64 bytes"));
        }
        let allowed = |b: u8| {
            b.is_ascii_graphic() && !matches!(b, b'=' | b';' | b',' | b'&' | b'?' | b':' | b'"')
        };
        if !name.bytes().all(allowed) {
            return Err(bad(
                "it has a space, a control character or one of = ; , & ? : \"",
            ));
        }
        let mut bytes = [0; MAX_NAME];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Self {
            len: name.len() as u8,
            bytes,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for KeyName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::new(&name).map_err(serde::de::Error::custom)
    }
}

/// A name a [`KeyName`] cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} cannot be a sticky key's name: {reason}")]
pub struct InvalidName {
    name: String,
    reason: &'static str,
}

/// What decides a connection's worker under [`Policy::Sticky`](crate::Policy::Sticky).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StickyKey {
    /// The client's address, its first `v4_prefix` bits for IPv4 (32: the
    /// whole address) and `v6_prefix` bits for IPv6 (128). A shorter
    /// prefix keeps clients behind one carrier's rotating addresses
    /// together (say /24 and /64). Nothing is read from the connection.
    Address {
        /// Bits of an IPv4 address that count (0 to 32).
        v4_prefix: u8,
        /// Bits of an IPv6 address that count (0 to 128).
        v6_prefix: u8,
    },
    /// The value of this cookie in the first request's `Cookie` headers.
    Cookie(KeyName),
    /// The value of this header of the first request (its first
    /// occurrence).
    Header(KeyName),
    /// The value of this parameter of the first request's query string.
    Query(KeyName),
}

impl StickyKey {
    /// The client's whole address, IPv4 or IPv6.
    pub const ADDRESS: Self = Self::Address {
        v4_prefix: 32,
        v6_prefix: 128,
    };

    /// Whether the key is the client's address (nothing to read).
    pub fn is_address(&self) -> bool {
        matches!(self, Self::Address { .. })
    }
}

impl fmt::Display for StickyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address {
                v4_prefix,
                v6_prefix,
            } => {
                f.write_str("ip")?;
                if (*v4_prefix, *v6_prefix) != (32, 128) {
                    write!(f, "/{v4_prefix}")?;
                    if *v6_prefix != 128 {
                        write!(f, "/{v6_prefix}")?;
                    }
                }
                Ok(())
            }
            Self::Cookie(name) => write!(f, "cookie={name}"),
            Self::Header(name) => write!(f, "header={name}"),
            Self::Query(name) => write!(f, "query={name}"),
        }
    }
}

impl std::str::FromStr for StickyKey {
    type Err = String;

    /// Parses what follows `sticky:` in a policy's name: `ip`, `ip/V4`,
    /// `ip/V4/V6`, `cookie=NAME`, `header=NAME` or `query=NAME`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some((kind, name)) = text.split_once('=') {
            let name = KeyName::new(name).map_err(|e| e.to_string())?;
            return match kind {
                "cookie" => Ok(Self::Cookie(name)),
                "header" => Ok(Self::Header(name)),
                "query" => Ok(Self::Query(name)),
                other => Err(format!(
                    "{other:?} is not a sticky key: expected ip, cookie=NAME, header=NAME or query=NAME"
                )),
            };
        }
        let mut parts = text.split('/');
        if parts.next() != Some("ip") {
            return Err(format!(
                "{text:?} is not a sticky key: expected ip, ip/V4, ip/V4/V6, cookie=NAME, header=NAME or query=NAME"
            ));
        }
        let prefix = |part: Option<&str>, max: u8, default: u8| -> Result<u8, String> {
            match part {
                None => Ok(default),
                Some(bits) => match bits.parse::<u8>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(format!(
                        "{bits:?} is not a prefix length of {text:?}: expected 0 to {max}"
                    )),
                },
            }
        };
        let v4_prefix = prefix(parts.next(), 32, 32)?;
        let v6_prefix = prefix(parts.next(), 128, 128)?;
        if let Some(extra) = parts.next() {
            return Err(format!("{text:?} has one prefix too many ({extra:?})"));
        }
        Ok(Self::Address {
            v4_prefix,
            v6_prefix,
        })
    }
}

/// How long a restarting slot's keys wait for its next worker, by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);
/// How long the primary waits for a connection's key, by default.
pub const DEFAULT_KEY_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest request head read for a key, by default.
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
/// How many connections may wait for their key at once, by default.
pub const DEFAULT_MAX_PENDING: usize = 16 * 1024;

/// The limits of the sticky policy (see the [module](self) docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StickyOptions {
    /// How long the keys of a slot whose worker is gone wait for its next
    /// worker before they go to another slot (default [`DEFAULT_WAIT`]).
    /// The keys come back once the slot has a worker again.
    pub wait: Duration,
    /// How long the primary waits for a connection to send enough of its
    /// request head to find the key; past it the connection is routed by
    /// the client's address (default [`DEFAULT_KEY_TIMEOUT`]).
    pub key_timeout: Duration,
    /// The longest request head searched for the key; a longer head is
    /// routed by the client's address (default [`DEFAULT_MAX_HEAD`]).
    pub max_head: usize,
    /// How many connections may wait for their key at once; past it a new
    /// connection is routed by its address at once (default
    /// [`DEFAULT_MAX_PENDING`]).
    pub max_pending: usize,
    /// For an address key: let the kernel route each connection (one
    /// `SO_REUSEPORT` socket per worker slot and a classic BPF program that
    /// hashes the client's address the same way), so the primary never
    /// touches it. Used where the kernel takes the program (Linux 4.6 and
    /// later, without a sandbox that forbids it); otherwise, or when false,
    /// the primary accepts and routes. Default true.
    pub kernel_routing: bool,
}

impl Default for StickyOptions {
    fn default() -> Self {
        Self {
            wait: DEFAULT_WAIT,
            key_timeout: DEFAULT_KEY_TIMEOUT,
            max_head: DEFAULT_MAX_HEAD,
            max_pending: DEFAULT_MAX_PENDING,
            kernel_routing: true,
        }
    }
}

/// Where a key's connections go: a worker slot's number, or, for a worker
/// forked outside any slot, its id (with the top bit set).
pub(crate) type SlotId = u64;

const WORKER_BIT: u64 = 1 << 63;

/// The routing slot of a worker with slot `index`, or of worker `id`.
pub(crate) fn slot_id(index: Option<usize>, id: crate::WorkerId) -> SlotId {
    match index {
        Some(index) => index as u64,
        None => WORKER_BIT | u64::from(id.get()),
    }
}

/// The slot index of a routing slot (`None` for a worker outside any
/// slot).
pub(crate) fn slot_index(slot: SlotId) -> Option<usize> {
    (slot & WORKER_BIT == 0).then_some(slot as usize)
}

const TOKEN_PREFIX: &str = "procluster-slot-";
const WORKER_TOKEN_PREFIX: &str = "procluster-worker-";

/// The sticky token of worker slot `index`: used as the value of the key
/// the policy reads (cookie, header, query parameter), it routes the
/// connection to that slot, whichever worker holds it. The same for every
/// worker the slot ever has.
///
/// ```
/// assert_eq!(procluster::sticky::token(3), "procluster-slot-3");
/// ```
pub fn token(index: usize) -> String {
    format!("{TOKEN_PREFIX}{index}")
}

/// The token of a worker forked outside any slot, or of slot `index`.
pub(crate) fn token_of(index: Option<usize>, id: crate::WorkerId) -> String {
    match index {
        Some(index) => token(index),
        None => format!("{WORKER_TOKEN_PREFIX}{}", id.get()),
    }
}

/// The slot a key's value names, if it is a sticky token.
pub(crate) fn slot_of_token(value: &[u8]) -> Option<SlotId> {
    let value = std::str::from_utf8(value).ok()?;
    let number = |digits: &str| -> Option<u64> {
        (!digits.is_empty() && digits.len() <= 19 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    };
    if let Some(index) = value.strip_prefix(TOKEN_PREFIX) {
        return number(index).filter(|n| n & WORKER_BIT == 0);
    }
    let id = number(value.strip_prefix(WORKER_TOKEN_PREFIX)?)?;
    u32::try_from(id).ok().map(|id| WORKER_BIT | u64::from(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back_what_they_print() {
        for text in [
            "ip",
            "ip/24",
            "ip/24/64",
            "ip/32/64",
            "cookie=sid",
            "header=X-User",
            "query=session_id",
        ] {
            let key: StickyKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
        assert_eq!("ip/32/128".parse::<StickyKey>(), Ok(StickyKey::ADDRESS));
    }

    #[test]
    fn bad_keys_say_why() {
        assert!(
            "ip/33"
                .parse::<StickyKey>()
                .unwrap_err()
                .contains("0 to 32")
        );
        assert!(
            "ip/24/129"
                .parse::<StickyKey>()
                .unwrap_err()
                .contains("0 to 128")
        );
        assert!(
            "cookie="
                .parse::<StickyKey>()
                .unwrap_err()
                .contains("empty")
        );
        assert!("cookie=a b".parse::<StickyKey>().is_err());
        assert!("form=x".parse::<StickyKey>().is_err());
        assert!("ip/1/2/3".parse::<StickyKey>().is_err());
        assert!(KeyName::new(&"x".repeat(65)).is_err());
    }

    #[test]
    fn tokens_name_their_slot() {
        assert_eq!(slot_of_token(token(7).as_bytes()), Some(7));
        let worker = token_of(None, crate::WorkerId::new(12));
        assert_eq!(slot_of_token(worker.as_bytes()), Some(WORKER_BIT | 12));
        assert_eq!(slot_of_token(b"procluster-slot-"), None);
        assert_eq!(slot_of_token(b"procluster-slot-1x"), None);
        assert_eq!(slot_of_token(b"abc"), None);
    }
}
