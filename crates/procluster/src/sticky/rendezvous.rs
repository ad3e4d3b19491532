//! Rendezvous (highest random weight) hashing of 32-bit keys over worker
//! slots, in arithmetic a classic BPF program can repeat (32-bit wrapping
//! multiplications, shifts and exclusive ors), so that the kernel's choice
//! for an address and the primary's are the same. No IO.

use std::net::IpAddr;

use super::SlotId;

/// The constants of MurmurHash3's finaliser.
pub(crate) const FMIX1: u32 = 0x85EB_CA6B;
pub(crate) const FMIX2: u32 = 0xC2B2_AE35;
/// Folds the words of an IPv6 address together.
pub(crate) const FOLD: u32 = 0x9E37_79B1;

/// MurmurHash3's 32-bit finaliser: every input bit moves every output bit.
pub(crate) fn fmix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(FMIX1);
    x ^= x >> 13;
    x = x.wrapping_mul(FMIX2);
    x ^= x >> 16;
    x
}

/// What slot `slot`'s weights are mixed with.
pub(crate) fn seed(slot: SlotId) -> u32 {
    fmix((slot as u32) ^ fmix((slot >> 32) as u32 ^ 0x5BD1_E995))
}

/// The weight of `slot` for `key`: the key goes to the slot that weighs
/// most.
pub(crate) fn weight(key: u32, slot: SlotId) -> u32 {
    fmix(key ^ seed(slot))
}

/// The slot among `slots` (in ascending order) that weighs most for `key`;
/// on a tie the first. `None` without slots.
pub(crate) fn choose(key: u32, slots: impl IntoIterator<Item = SlotId>) -> Option<SlotId> {
    let mut best: Option<(u32, SlotId)> = None;
    for slot in slots {
        let w = weight(key, slot);
        if best.is_none_or(|(top, _)| w > top) {
            best = Some((w, slot));
        }
    }
    best.map(|(_, slot)| slot)
}

/// The key of a value read from a request (a cookie, header or parameter).
pub(crate) fn text_key(value: &[u8]) -> u32 {
    // FNV-1a, then the finaliser.
    let mut h: u32 = 0x811C_9DC5;
    for b in value {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    fmix(h)
}

/// The mask of an IPv4 address's first `bits` bits.
pub(crate) fn mask(bits: u8) -> u32 {
    match bits {
        0 => 0,
        32.. => u32::MAX,
        n => u32::MAX << (32 - u32::from(n)),
    }
}

/// The key of a client's address, of its first `v4_prefix` or `v6_prefix`
/// bits. An IPv4 client of a dual-stack socket (`::ffff:a.b.c.d`) counts as
/// IPv4, as the kernel sees its packets.
pub(crate) fn address_key(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> u32 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => fmix(u32::from(v4) & mask(v4_prefix)),
        IpAddr::V6(v6) => {
            let octets = v6.octets();
            let mut h: u32 = 0;
            for (i, word) in octets.chunks_exact(4).enumerate() {
                let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
                let bits = v6_prefix.saturating_sub(32 * i as u8).min(32);
                h = (h ^ (word & mask(bits))).wrapping_mul(FOLD);
            }
            fmix(h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u32) -> impl Iterator<Item = u32> {
        (0..n).map(|i| text_key(format!("client-{i}").as_bytes()))
    }

    #[test]
    fn slots_share_the_keys_evenly() {
        let slots: Vec<SlotId> = (0..4).collect();
        let mut counts = [0u32; 4];
        for key in keys(40_000) {
            counts[choose(key, slots.iter().copied()).unwrap() as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(f64::from(*max) / f64::from(*min) < 1.08, "{counts:?}");
    }

    #[test]
    fn a_new_slot_takes_its_share_from_each_and_a_removed_one_gives_back_only_its_own() {
        let four: Vec<SlotId> = (0..4).collect();
        let five: Vec<SlotId> = (0..5).collect();
        let mut moved = 0;
        for key in keys(10_000) {
            let before = choose(key, four.iter().copied()).unwrap();
            let after = choose(key, five.iter().copied()).unwrap();
            if before != after {
                assert_eq!(after, 4, "a key moved between old slots");
                moved += 1;
            }
            let without_1 = choose(key, [0, 2, 3]).unwrap();
            if before != 1 {
                assert_eq!(without_1, before, "only slot 1's keys move");
            }
        }
        // About a fifth.
        assert!((1700..2300).contains(&moved), "{moved}");
    }

    #[test]
    fn prefixes_keep_networks_together() {
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.200".parse().unwrap();
        assert_eq!(address_key(a, 24, 128), address_key(b, 24, 128));
        assert_ne!(address_key(a, 32, 128), address_key(b, 32, 128));
        let c: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let d: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(address_key(c, 32, 64), address_key(d, 32, 64));
        assert_ne!(address_key(c, 32, 128), address_key(d, 32, 128));
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(address_key(mapped, 32, 128), address_key(a, 32, 128));
        assert_eq!(mask(0), 0);
        assert_eq!(mask(24), 0xFFFF_FF00);
    }
}
