//! API key format: `tg_` + 32 base62 characters of randomness (190 bits) + 6 base62 characters
//! of CRC-32 checksum over the random part.
//!
//! The prefix lets secret scanners find leaked keys; the checksum rejects typos before any
//! store lookup. Only the SHA-256 of the whole key is stored.

use rand::Rng;
use sha2::{Digest, Sha256};

const PREFIX: &str = "tg_";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Total length of a well-formed key.
pub const KEY_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;

/// A freshly generated key: the secret (shown once) and what is stored.
pub struct NewKey {
    pub secret: String,
    pub hash: String,
    /// The first characters, safe to display to identify the key.
    pub display_prefix: String,
}

/// Generates a new key.
pub fn generate() -> NewKey {
    let mut rng = rand::thread_rng();
    let random: String = (0..RANDOM_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    let secret = format!("{PREFIX}{random}{}", checksum(&random));
    NewKey {
        hash: hash(&secret),
        display_prefix: secret[..PREFIX.len() + 6].to_string(),
        secret,
    }
}

/// Whether `candidate` has the key format and a valid checksum.
pub fn is_well_formed(candidate: &str) -> bool {
    if candidate.len() != KEY_LEN || !candidate.starts_with(PREFIX) {
        return false;
    }
    let body = &candidate[PREFIX.len()..];
    if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (random, check) = body.split_at(RANDOM_LEN);
    checksum(random) == check
}

/// The stored form of a key.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn checksum(random: &str) -> String {
    let mut n = u64::from(crc32fast::hash(random.as_bytes()));
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(is_well_formed(&a.secret));
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash(&a.secret));
        assert!(a.secret.starts_with(&a.display_prefix));
    }

    #[test]
    fn a_typo_breaks_the_checksum() {
        let k = generate().secret;
        let mut chars: Vec<char> = k.chars().collect();
        let i = 10;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert!(!is_well_formed(&typo));
        assert!(!is_well_formed("sk-not-ours"));
        assert!(!is_well_formed(&k[..k.len() - 1]));
    }
}
