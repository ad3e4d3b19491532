//! What the services' Redis backends (bus, store, pool) share: how they
//! connect, and how a process names itself among others on one server.

use std::time::Duration;

/// No response timeout: a long pipeline, a blocking read or a large payload
/// on a loaded machine is slow, not failed (the `redis` crate's default,
/// 500 ms, would end a subscription or a blocking read); a connection must
/// be made within 30 s.
pub(crate) fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(Duration::from_secs(30)))
}

/// A number no other process is likely to pick.
pub(crate) fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
