//! Connection and session ids: 26 characters of Crockford Base32, like
//! Sora's. The layout is a ULID — 48 bits of milliseconds then 80 random
//! bits — so ids are unique and sort by creation time in logs.

use rand::RngCore;
use std::time::{SystemTime, UNIX_EPOCH};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A fresh id.
pub fn new_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    encode(millis, random)
}

fn encode(millis: u64, random: [u8; 10]) -> String {
    let mut value: u128 = (u128::from(millis) & 0xFFFF_FFFF_FFFF) << 80;
    for (i, b) in random.iter().enumerate() {
        value |= u128::from(*b) << (8 * (9 - i));
    }
    // 26 × 5 = 130 bits; the top two are always zero.
    (0..26)
        .map(|i| CROCKFORD[((value >> (5 * (25 - i))) & 0x1F) as usize] as char)
        .collect()
}

/// Whether `s` has the shape of an id made by [`new_id`].
pub fn is_id(s: &str) -> bool {
    s.len() == 26 && s.bytes().all(|b| CROCKFORD.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn shape_and_uniqueness() {
        let ids: HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| is_id(id)));
    }

    #[test]
    fn known_encoding() {
        assert_eq!(encode(0, [0; 10]), "00000000000000000000000000");
        assert_eq!(
            encode(0, [0, 0, 0, 0, 0, 0, 0, 0, 0, 31]),
            "0000000000000000000000000Z"
        );
        assert_eq!(
            encode(0xFFFF_FFFF_FFFF, [0xFF; 10]),
            "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"
        );
    }

    #[test]
    fn sorts_by_time() {
        assert!(encode(1, [0xFF; 10]) < encode(2, [0; 10]));
    }
}
